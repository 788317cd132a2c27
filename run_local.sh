#!/usr/bin/env bash
# Sets up .venv (offline-capable: every package comes from the configured registries) and then
#   ./run_local.sh          the demo on the embedded default: a test split of the scenes benchmark
#                           -> precompute -> retrieve top 20 -> rerank -> evaluate (table + report),
#                           then the same on a 3-object split (.demo/three_objects)
#   ./run_local.sh test     runs the test suite (extra args go to pytest)
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv
STAMP="$VENV/.edje-install-stamp"
want=$(cat setup.py constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ]; then
  echo "[run_local] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[run_local] installing the project and its pinned dependencies (first time: a few minutes)" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
  echo "$want" > "$STAMP"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::DeprecationWarning}

mode=${1:-demo}
case "$mode" in
  test)
    shift
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  demo)
    DEMO=${EDJE_DEMO_DIR:-.demo}
    PYBIN="$VENV/bin/python"
    # chain DIR MAKE_SCENES_ARGS...: scenes -> precompute -> verify -> retrieve top 20 -> rerank -> evaluate
    chain() {
      local D="$1"; shift
      local SCENES="$D/scenes"
      if [ ! -f "$SCENES/queries.jsonl" ]; then
        echo "== make_scenes $*: a test split of the compositional scenes benchmark ($SCENES)"
        "$PYBIN" -m pipeline.make_scenes --split test "$@" --per_shard 50 --output "$SCENES"
      fi
      local last=$(( $(ls "$SCENES"/*.tar | wc -l) - 1 ))  # make_scenes rounds --per_shard to whole groups
      local SHARDS="$SCENES/{00000..$(printf %05d "$last")}.tar"
      rm -rf "$D/store" "$D/report"  # a fresh store each time (an older one may hold another checkpoint's tokens)
      echo "== precompute: shards -> token store ($D/store)"
      "$PYBIN" -m pipeline.precompute --runner=DirectRunner --input "$SHARDS" --output "$D/store"
      "$PYBIN" -m pipeline.verify --store "$D/store" --no_hash > "$D/verify.json" \
        && echo "   verify: ok ($D/verify.json)"
      echo "== retrieve: top-20 candidates per caption from the stored embeddings"
      "$PYBIN" -m pipeline.retrieve --runner=DirectRunner --queries "$SCENES/queries.jsonl" \
        --store "$D/store" --top_k 20 --output "$D/candidates.jsonl"
      echo "== rerank: joint encoder over caption + stored tokens"
      "$PYBIN" -m pipeline.rerank --runner=DirectRunner --queries "$D/candidates.jsonl" \
        --store "$D/store" --output "$D/scores.parquet"
      echo "== evaluate: recall@k, first stage vs reranked ($D/report)"
      "$PYBIN" -m pipeline.evaluate --queries "$D/candidates.jsonl" --scores "$D/scores.parquet" \
        --output "$D/report" --images "$SHARDS" --strips 4
      echo "Done: first stage (the stored embeddings' cosine) against reranked (the joint encoder over the"
      echo "stored tokens, fused with that cosine) on $(wc -l < "$SCENES/queries.jsonl") held-out captions; report in $D/report."
    }
    chain "$DEMO" --n 200 --seed 1
    chain "$DEMO/three_objects" --n 100 --seed 1 --objects 3  # busier scenes (a third of the checkpoint's training scenes)
    ;;
  *)
    echo "usage: ./run_local.sh [test [pytest args...]]" >&2
    exit 2
    ;;
esac
