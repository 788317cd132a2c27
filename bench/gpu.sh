#!/usr/bin/env bash
# The GPU benchmarks in one call (about 3.5 minutes on an H200), from the repository root:
#   bench/gpu.sh OUT_DIR
# Wheels for what the machine lacks (apache-beam and its deps, open_clip_torch, webdataset, ...)
# may sit in .whl/ (see BENCHMARKS.md); they are unpacked into /tmp/site first.
set -uo pipefail
OUT=${1:?usage: bench/gpu.sh OUT_DIR}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 170 python3 -m bench.gpu_scorer --out "$OUT/scorer" --budget_s ${SCORER_BUDGET_S:-130}
timeout 160 python3 -m bench.gpu_precompute --out "$OUT/precompute" --budget_s ${PRECOMPUTE_BUDGET_S:-100}
