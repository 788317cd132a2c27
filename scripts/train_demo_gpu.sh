#!/usr/bin/env bash
# Trains the demo checkpoint on one GPU (about 8 minutes on an H200, data generation included):
#   scripts/train_demo_gpu.sh OUT_DIR
# Needs the project's packages importable (see docs/scenes.md).
set -euo pipefail
OUT=${1:?usage: scripts/train_demo_gpu.sh OUT_DIR}
WORK=${WORK:-/tmp/edje-train}
mkdir -p "$OUT" "$WORK"
python3 -m pipeline.make_scenes --split train --n 40000 --seed 0 --output "$WORK/scenes/train"
python3 -m pipeline.make_scenes --split test --n 2000 --seed 1 --output "$WORK/scenes/test"
python3 -m pipeline.train --stage all --device cuda --seed 0 \
  --data "$WORK/scenes/train/*.tar" --test_data "$WORK/scenes/test/*.tar" --output "$WORK/run" \
  --batch_size 512 --lr_clip 1e-3 --max_minutes_clip 2.0 \
  --batch_size_edje 128 --lr_joint 1e-4 --lr_adapter 5e-4 --max_minutes_edje 3.5 \
  --max_steps 8000 --warmup 300 --eval_every 250 --patience 6 --random_only_steps 500 \
  --hard_negatives 3 --joint_layers 3 --num_tokens 16 --max_text_tokens 32 \
  --clip_batching random --adapter_positions
cp -r "$WORK/run/checkpoint" "$OUT/"
cp "$WORK/run/test_metrics.json" "$OUT/"
cp "$WORK/run/clip/history.json" "$OUT/clip_history.json"
cp "$WORK/run/edje/history.json" "$OUT/edje_history.json"
