#!/usr/bin/env bash
# One command for a GPU machine: run a grid slice as N parallel processes on one card, then tar the
# results into $OUT/results.tar.gz. Needs the repo, the data (../shared/data or .devdata/data) and
# timm; wheels in .whl/ and extra site dirs in .devdata/site are used when present.
#   OUT=/tmp/out bench/gpu_grid.sh cifar10-5 12 all "200,500" "0,1,2" --epochs 50
set -u
PROTO=${1:?protocol}; PAR=${2:-8}; METHODS=${3:-all}; BUFFERS=${4:-200,500}; SEEDS=${5:-0,1,2}
shift $(( $# < 5 ? $# : 5 ))
OUT=${OUT:-/tmp/cvm-bench-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD/.devdata/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CVM_BENCH_CACHE=${CVM_BENCH_CACHE:-$PWD/.devdata/cache}
export CVM_BENCH_COMMIT=${CVM_BENCH_COMMIT:-$(cat .devdata/COMMIT 2>/dev/null || echo unknown)}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
RES=${RES:-/tmp/cvm-bench-results}
# Processes time-sliced on one card without MPS ran ~3x slower in aggregate (bench/BENCHMARKS.md); MPS=1 starts
# the CUDA MPS daemon for the grid (falls back to plain time-slicing when it cannot start).
if [ "${MPS:-1}" = 1 ]; then
  if nvidia-cuda-mps-control -d 2>/dev/null && python3 -c "import torch; torch.ones(1, device='cuda')"; then
    trap 'echo quit | nvidia-cuda-mps-control' EXIT
  else
    echo quit | nvidia-cuda-mps-control 2>/dev/null; echo "MPS not available: processes are time-sliced"
  fi
fi
${GRID_TIMEOUT:+timeout -s TERM $GRID_TIMEOUT} python3 -m bench.grid --protocol "$PROTO" --methods "$METHODS" --buffers "$BUFFERS" --seeds "$SEEDS" \
  --parallel "$PAR" --device cuda --out "$RES" --tag "${TAG:-grid}" ${DEADLINE:+--deadline "$DEADLINE"} ${SKIP:+--skip-existing "$SKIP"} -- "$@"
rc=$?
tar -czf "$OUT/results.tar.gz" -C "$RES" .
exit $rc
