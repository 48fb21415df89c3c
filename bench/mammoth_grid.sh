#!/usr/bin/env bash
# Mammoth's own er and derpp on cifar10-5, detached, beside our harness on a lent GPU machine (issue 20).
#   bench/mammoth_grid.sh EPOCHS SEEDS BUFFERS GPU      e.g. bench/mammoth_grid.sh 5 0,1,2 200,500 0
# (each run detached with setsid, as gpu_session.sh's grids; `gpu_session.sh wait` waits for them too)
# Needs .devdata/mammoth (a copy of aimagelab/mammoth at e75a491, as files), .devdata/data (our
# CIFAR-10, bench.gpu_data) and kornia, kornia_rs, onedrivedownloader wheels in .whl/ (installed
# by `bench/gpu_session.sh setup`). Each seed's data is our CIFAR-10 copy relabelled so that
# Mammoth's tasks are our seeded tasks (bench.mammoth_side convert). Mammoth's best arguments for
# seq-cifar10 are passed explicitly (its --load_best_args would override --n_epochs with 50); plain
# SGD, batch 32, minibatch 32, fp32. Results land as our result JSONs (mammoth-er / mammoth-derpp,
# tag -eEPOCHS unless 50) in /tmp/cvm-results/cifar10-5, where `gpu_session.sh wait` collects them.
set -u
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CVM_BENCH_DATA=$PWD/.devdata/data CVM_BENCH_CACHE=/tmp/cvm-cache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
COMMIT=e75a491
# Mammoth's copy, its converted data and where the result JSONs land (overridable for the tests)
MM=${CVM_MAMMOTH:-/tmp/mammoth} MMDATA=${CVM_MAMMOTH_DATA:-/tmp/mm-data} RES=${CVM_MAMMOTH_RESULTS:-/tmp/cvm-results/cifar10-5}

if [ "${1:-}" = one ]; then  # one run: Mammoth, then its logs as our result JSON
  epochs=$2 s=$3 b=$4 m=$5 gpu=$6
  tag=$([ "$epochs" = 50 ] && echo "" || echo "-e$epochs")
  alpha=$([ "$b" -le 200 ] && echo 0.1 || echo 0.2)  # Mammoth's best_args (and ours): 0.1 at 200, 0.2 at 500
  case $m in
  er) hp="--model er --lr 0.1" ;;
  derpp) hp="--model derpp --lr 0.03 --alpha $alpha --beta 0.5" ;;
  *) echo "unknown model $m" >&2; exit 2 ;;
  esac
  out=results-$m-b$b-s$s-e$epochs/
  args="--dataset seq-cifar10 $hp --buffer_size $b --batch_size 32 --minibatch_size 32 --n_epochs $epochs"
  args="$args --seed $s --device $gpu --num_workers 2 --non_verbose 1 --results_path $out"
  t0=$(date +%s)
  # shellcheck disable=SC2086 # $args is a list of words
  python3 -m bench.mammoth_side run --mammoth "$MM" --data "$MMDATA/s$s" -- $args || exit 1
  exec python3 -m bench.mammoth_side collect --seed "$s" --buffer "$b" --epochs "$epochs" --commit "$COMMIT" \
    --logs "$MMDATA/s$s/$out/class-il/seq-cifar10/$m/logs.pyd" --args "$args" --tag="$tag" \
    --wall-s "$(($(date +%s) - t0))" --out "$RES"
fi

epochs=${1:?epochs} seeds=${2:?seeds} buffers=${3:?buffers} gpu=${4:?gpu}
LOGS=/tmp/cvm-grids/mammoth-e$epochs
mkdir -p "$RES" "$LOGS"
if [ ! -d "$MM" ]; then
  cp -r .devdata/mammoth "$MM" || exit 1
  # datasets/__init__.py imports every dataset module; the others need packages we do not carry.
  find "$MM/datasets" -maxdepth 1 -name '*.py' ! -name __init__.py ! -name seq_cifar10.py -delete
fi
for s in ${seeds//,/ }; do
  [ -d "$MMDATA/s$s" ] || python3 -m bench.mammoth_side convert --seed "$s" --out "$MMDATA/s$s" >/dev/null || exit 1
  for b in ${buffers//,/ }; do
    for m in er derpp; do
      setsid nohup "$0" one "$epochs" "$s" "$b" "$m" "$gpu" >"$LOGS/$m-b$b-s$s.log" 2>&1 </dev/null &
      echo "started mammoth $m buffer $b seed $s ($epochs epochs) on GPU $gpu (pid $!)"
    done
  done
done
