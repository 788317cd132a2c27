#!/usr/bin/env bash
# Beam's Prism runner (the portable local runner, a Go program) at the project's Beam version:
#   scripts/prism.sh build   build it once from the Go module proxy into the cache; prints its path
#   scripts/prism.sh flags   the Beam flags that put a job on it, on one line (builds it if needed)
#
# Prism runs a job as a portable pipeline: its own job service and runner, the Python SDK harness
# on loopback in the launching process. The version is apache-beam's pin in constraints.txt, so
# SDK and runner are one release. Cache: $EDJE_PRISM_CACHE (default ~/.cache/edje-prism). The
# build needs Go and the module proxy once (about 100 MB of modules, 2-5 minutes on 2 cores).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VERSION=$(sed -n 's/^apache-beam==//p' "$ROOT/constraints.txt")
[ -n "$VERSION" ] || { echo "[prism] error: no apache-beam pin in constraints.txt" >&2; exit 1; }
DIR=${EDJE_PRISM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edje-prism}/$VERSION
BIN=$DIR/prism

build() {
  if [ ! -x "$BIN" ]; then
    command -v go >/dev/null || { echo "[prism] error: building Prism needs Go (go.dev/doc/install)" >&2; exit 1; }
    echo "[prism] building github.com/apache/beam/sdks/v2/go/cmd/prism@v$VERSION into $DIR" >&2
    mkdir -p "$DIR"
    local part; part=$(mktemp -d "$DIR/.part-XXXXXX")
    GOBIN=$part GOFLAGS=-mod=mod go install "github.com/apache/beam/sdks/v2/go/cmd/prism@v$VERSION" >&2 \
      || { rm -rf "$part"; echo "[prism] error: go install failed" >&2; exit 1; }
    mv "$part/prism" "$BIN"  # one rename: a concurrent build never sees half a binary
    rm -rf "$part"
  fi
  echo "$BIN"
}

case "${1:-}" in
  build) build ;;
  flags) echo "--runner=PrismRunner --prism_location=$(build)" ;;
  *) echo "usage: scripts/prism.sh build|flags" >&2; exit 2 ;;
esac
