#!/usr/bin/env bash
# The CPU recipe for the demo checkpoint (models/default) on this project's 2-core machines, seeded:
#   scripts/train_demo_cpu.sh OUT_DIR
# Data (20k training scenes, 2k test scenes), clip stage (40-minute budget, stops earlier at a
# validation plateau), edje stage (40-minute budget: 1,500 MLM-only steps masking every object
# word of a caption at once, then ITM + MLM fused with the first stage), then the test split's
# rerank gain: about 85 minutes in all (README, "Benchmark, training, evaluation"). The stages are
# time-boxed, so a run's outcome depends on the machine's speed; step budgets
# (--max_steps_clip/_edje) make it repeatable, but have not yet found a recipe that reproduces
# the shipped checkpoint (BENCHMARKS.md, "Issue 12, session 8"). Run from the repository root
# with the project installed (./run_local.sh sets up .venv; PYTHON defaults to .venv/bin/python).
set -euo pipefail
OUT=${1:?usage: scripts/train_demo_cpu.sh OUT_DIR}
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-$OUT/work}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT" "$WORK"
"$PY" -m pipeline.make_scenes --split train --n 20000 --seed 0 --output "$WORK/scenes/train"
"$PY" -m pipeline.make_scenes --split test --n 2000 --seed 1 --output "$WORK/scenes/test"
"$PY" -m pipeline.train --stage all --device cpu --seed 0 \
  --data "$WORK/scenes/train/*.tar" --test_data "$WORK/scenes/test/*.tar" --output "$WORK/run" \
  --batch_size 128 --lr_clip 1e-3 --max_minutes_clip 40 --max_steps 100000 --eval_every 200 --patience 5 \
  --batch_size_edje 32 --joint_layers 6 --text_layers 4 --frozen_text_layers 3 --num_tokens 16 --max_text_tokens 32 \
  --image_positions fixed --adapter_cells --adapter_output_positions --adapter_output_norm 1.0 \
  --mlm_only_steps 1500 --mlm_words objects --mlm_weight 0.5 \
  --fusion --random_only_steps 100 --hard_negatives 3 --lr_joint 1e-4 --lr_adapter 5e-4 --eval_every_edje 250 \
  --max_minutes_edje 40
cp -r "$WORK/run/checkpoint" "$OUT/"
cp "$WORK/run/test_metrics.json" "$OUT/"
cp "$WORK/run/clip/history.json" "$OUT/clip_history.json"
cp "$WORK/run/edje/history.json" "$OUT/edje_history.json"
