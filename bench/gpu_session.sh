#!/usr/bin/env bash
# Several grids on a lent GPU machine that outlive one 10-minute command: the grids run detached
# (setsid) and each later command waits, reports progress and brings the results back in $OUT.
# Needs .whl/ (timm), .devdata/data (bench.gpu_data), .devdata/cache/tables (concept tables).
#   bench/gpu_session.sh setup PROTOCOL...          # wheels, CUDA MPS, decode each protocol's data once
#   bench/gpu_session.sh probe [step_speed args]    # python -m bench.step_speed
#   bench/gpu_session.sh graphcheck PROTOCOL M1,M2,...  # a --smoke run of each method in CUDA-graph mode
#   bench/gpu_session.sh start NAME GPU PROTOCOL METHOD:BUFFER:SEED,... [-- bench.run args]
#   bench/gpu_session.sh plan SECONDS STEPS_PER_RUN PROTOCOL M:B:S,... [-- args]  # sized by the probe
#   bench/gpu_session.sh wait SECONDS               # progress every minute; results -> $OUT/results.tar.gz
set -u
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CVM_BENCH_DATA=$PWD/.devdata/data CVM_BENCH_CACHE=/tmp/cvm-cache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
export CVM_BENCH_COMMIT=${CVM_BENCH_COMMIT:-$(cat .devdata/COMMIT 2>/dev/null || echo unknown)}
RES=/tmp/cvm-results GRIDS=/tmp/cvm-grids OUT=${OUT:-/tmp/cvm-out}
mkdir -p "$RES" "$GRIDS" "$OUT" "$CVM_BENCH_CACHE"

collect() {
  tar -czf "$OUT/results.tar.gz" -C "$RES" . 2>/dev/null
  tar -czf "$OUT/logs.tar.gz" -C "$GRIDS" . 2>/dev/null  # one file: a call brings back only a few
  tail -n 3 "$GRIDS"/*.log 2>/dev/null
}

case "${1:?setup|probe|start|wait}" in
setup)
  # A lent machine can keep /tmp from an earlier lease: stale results would come back as this one's.
  pgrep -f bench.grid >/dev/null && { echo "grids are running: setup would delete their results" >&2; exit 1; }
  rm -rf "$RES" "$GRIDS" /tmp/cvm-graph-failed-* && mkdir -p "$RES" "$GRIDS"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  cp -r .devdata/cache/tables "$CVM_BENCH_CACHE"/ 2>/dev/null
  nvidia-smi --query-gpu=index,name,memory.used,utilization.gpu --format=csv
  nvidia-cuda-mps-control -d && echo "MPS started" || echo "MPS not started: processes are time-sliced"
  shift
  for proto in "$@"; do  # decode each protocol's data into the cache once, before any run
    python3 -c "import sys; from bench.protocols import PROTOCOLS, build_scenario as b; b(PROTOCOLS[sys.argv[1]], 0)" \
      "$proto" || exit 1
  done
  ;;
probe)
  shift
  python3 -m bench.step_speed --out "$OUT/step_speed.json" "$@"
  ;;
graphcheck)  # methods whose step fails to capture go to /tmp/cvm-graph-failed-PROTOCOL; start runs them eagerly
  proto=$2 failed=/tmp/cvm-graph-failed-$2
  rm -f "$failed"
  for m in ${3//,/ }; do
    log="$GRIDS/graphcheck-$proto-$m.log"
    python3 -m bench.run --protocol "$proto" --method "$m" --smoke --device cuda --cuda-graph --bf16 \
      --out /tmp/cvm-graphcheck >"$log" 2>&1 || { echo "$m" >>"$failed"; tail -n 4 "$log"; } &
  done
  wait
  echo "graph capture failed on $proto for: $(sort -u "$failed" 2>/dev/null | tr '\n' ' ')"
  ;;
start)
  name=$2 gpu=$3 proto=$4 jobs=$5
  shift 5; [ "${1:-}" = "--" ] && shift
  failed=/tmp/cvm-graph-failed-$proto
  if [ -s "$failed" ] && [[ " $* " == *" --cuda-graph "* ]]; then
    # Jobs of methods that failed graphcheck run in a second grid with eager steps (said here and in
    # each result's hyperparameters.cuda_graph), so one method's capture bug costs no other run.
    keep=() eager=() args=()
    for j in ${jobs//,/ }; do
      if grep -qxF -- "${j%%:*}" "$failed"; then eager+=("$j"); else keep+=("$j"); fi
    done
    for a in "$@"; do [ "$a" != "--cuda-graph" ] && args+=("$a"); done
    if [ ${#eager[@]} -gt 0 ]; then
      echo "eager steps (graph capture failed) for: ${eager[*]}"
      (IFS=,; "$0" start "$name-eager" "$gpu" "$proto" "${eager[*]}" -- "${args[@]}")
    fi
    [ ${#keep[@]} -eq 0 ] && exit 0
    jobs=$(IFS=,; echo "${keep[*]}")
  fi
  CUDA_VISIBLE_DEVICES=$gpu setsid nohup python3 -m bench.grid --protocol "$proto" --jobs "$jobs" \
    --parallel 64 --device cuda --out "$RES" --tag "$name" \
    --logs "$GRIDS/$name" -- "$@" >"$GRIDS/$name.log" 2>&1 </dev/null &
  echo "started $name on GPU $gpu (pid $!)"
  ;;
plan)  # start as many runs of a priority list per GPU as the probe's rate finishes in SECONDS
  secs=$2 steps=$3 proto=$4 jobs=$5
  shift 5; [ "${1:-}" = "--" ] && shift
  # This call's probe, else the committed one ($OUT is empty at the start of every call).
  speed=$OUT/step_speed.json; [ -f "$speed" ] || speed=bench/results/step_speed.json
  # CUDA-graph steps in bf16 when the probe measured them, else the eager fp32 loop.
  plan() { python3 -m bench.gpu_plan --speed "$speed" --mode "$1" --seconds "$secs" \
    --gpus "$(nvidia-smi -L | wc -l)" --steps-per-run "$steps" --jobs "$jobs" >/tmp/cvm-plan.txt; }
  if plan graph-bf16; then mode=(--cuda-graph --bf16); elif plan eager; then mode=(); else exit 1; fi
  while read -r gpu js; do "$0" start "$proto-g$gpu" "$gpu" "$proto" "$js" -- "${mode[@]}" "$@"; done </tmp/cvm-plan.txt
  ;;
wait)
  end=$((SECONDS + ${2:?seconds}))
  while [ $SECONDS -lt $end ]; do
    sleep $((end - SECONDS < 60 ? end - SECONDS : 60))  # never past the deadline: the call's limit is set by it
    echo "--- $(date -u +%T) $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader | tr '\n' ' ')"
    for f in "$GRIDS"/*/*.log; do [ -f "$f" ] && echo "$(basename "$f"): $(grep -c ' task ' "$f") tasks"; done
    # Mammoth's runs (bench/mammoth_grid.sh) are grids too, for this wait
    pgrep -f "bench.grid|bench.mammoth_side" >/dev/null || { echo "all grids finished"; break; }
  done
  collect
  ;;
esac
