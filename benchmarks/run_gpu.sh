#!/usr/bin/env bash
# Every GPU measurement in one call, at most ~9 minutes on an H100/H200 with compiles included:
# each part runs under its own timeout and rewrites its JSON after every row, so a part cut short
# still leaves what it measured; at most 8 files land in OUT_DIR (summary.md last).
#   bash benchmarks/run_gpu.sh OUT_DIR
# On an offline GPU machine, from the project root, with the missing wheels in .whl/ (benchmarks/README.md):
#   S=$(mktemp -d); python3 -m pip install -q --no-index --no-deps --no-compile --target $S .whl/*.whl
#   export PYTHONPATH=$S:$PWD; bash benchmarks/run_gpu.sh "$OUT"
# JAXSEG_BENCH_SIZE=tiny runs the same parts at toy sizes (CI runs it on CPU to keep it working).
set -uo pipefail
OUT=${1:?usage: bash benchmarks/run_gpu.sh OUT_DIR}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
# A fresh compilation cache: compile times below are cold, as on a first run.
export JAXSEG_CACHE_DIR=${JAXSEG_CACHE_DIR:-$(mktemp -d)}
PY=${PYTHON:-python3}
LOG="$OUT/log.txt"
: > "$LOG"

if [ "${JAXSEG_BENCH_SIZE:-paper}" = tiny ]; then
  # Toy sizes; the MONAI side (12 layers) only where it is cheap to compile on a CPU.
  MODEL="--model=tiny --img_size=32 --batch=2 --steps=2 --warmup=0 --dtypes=float32 --torch_dtypes=float32 \
         --kinds=train_step"
  # The sampled objective from grain batches too: the rows the paper-size run leaves out.
  PRE="--config=tiny --crop_size=32 --steps=1 --warmup=0 --dtype=float32 --objectives=comparative_sampled \
       --stages=encoder --against=none --sources=device,pipeline"
  INF="--model=tiny --roi=32 --cases=spleen:40x36x32x1x2 --repeats=1 --dtype=float32 --torch_dtypes=float32"
  LOSS="--partitions=4 --images=4 --stages=enc4 --steps=1"
  CKPT="--model=tiny --img_size=32 --saves=2"
  T_MODEL=300 T_PRE=300 T_INF=120 T_LOSS=120 T_CKPT=60
else
  MODEL="--model=paper --img_size=96 --batch=4 --steps=10 --warmup=2 --dtypes=bfloat16,float32 \
         --torch_dtypes=bfloat16,float32"
  PRE="--config=paper --crop_size=96 --steps=5 --warmup=1 --dtype=bfloat16 --objectives=comparative,contrastive \
       --stages=encoder,decoder --torch_dtypes=bfloat16,float32 --loop_entries=8"
  INF="--model=paper --roi=96 --cases=spleen:192x192x192x1x2 --repeats=3 --dtype=bfloat16 \
       --torch_dtypes=bfloat16,float32"
  LOSS="--partitions=4,16,64 --images=4 --stages=enc4,decoder --steps=10"
  CKPT="--model=paper --img_size=96 --saves=3"
  T_MODEL=135 T_PRE=215 T_INF=60 T_LOSS=45 T_CKPT=45
fi

part() {  # part NAME SECONDS MODULE ARGS...: run one benchmark under its own time limit
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$PY" -m "$@" 2>&1 | grep -v -e '^I[0-9]' -e 'Warning' | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0))s$([ "$rc" = 124 ] && echo ' (timed out: rows so far kept)')" | tee -a "$LOG"
}

"$PY" -c "import jax; print('devices:', jax.devices())" 2>&1 | tee -a "$LOG"
AGAINST=none
"$PY" -c "import torch, monai" 2>/dev/null && AGAINST=monai
echo "reference: $AGAINST" | tee -a "$LOG"
# --against first: a part's own flags may override it.
part model_step "$T_MODEL" benchmarks.model_step --against=$AGAINST $MODEL --json_out="$OUT/model_step.json"
part pretrain "$T_PRE" benchmarks.pretrain_throughput --against=$AGAINST --sources=device $PRE \
  --json_out="$OUT/pretrain.json"
part inference "$T_INF" benchmarks.inference --against=$AGAINST $INF --json_out="$OUT/inference.json"
part loss_scaling "$T_LOSS" benchmarks.loss_scaling $LOSS --json_out="$OUT/loss_scaling.json" \
  --png="$OUT/loss_scaling.png"
part checkpoint "$T_CKPT" benchmarks.checkpoint $CKPT --json_out="$OUT/checkpoint.json"
"$PY" -m benchmarks.summary "$OUT" > "$OUT/summary.md"
cat "$OUT/summary.md"
echo "results in $OUT"
