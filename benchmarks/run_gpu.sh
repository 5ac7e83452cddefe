#!/usr/bin/env bash
# Every GPU measurement in one call (about 8 minutes on an H100/H200-class GPU, no network).
#   bash benchmarks/run_gpu.sh OUT_DIR
# Needs jaxseg installed with a CUDA jax; the MONAI rows also need torch with CUDA and monai
# (the `bench` extra); without them those rows are skipped.
set -euo pipefail
OUT=${1:?usage: bash benchmarks/run_gpu.sh OUT_DIR}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
PEAK=${PEAK_TFLOPS:-989}   # dense bf16 peak of H100/H200 SXM
AGAINST=none
python -c "import torch, monai; assert torch.cuda.is_available()" 2>/dev/null && AGAINST=monai
python -c "import jax; print(jax.devices())" | tee "$OUT/devices.txt"
for DT in bfloat16 float32; do
  python -m benchmarks.model_step --preset=paper --img_size=96 --batch=4 --steps=10 --warmup=2 \
    --against=none --dtype=$DT --json_out="$OUT/model_step_$DT.json"
done
python -m benchmarks.pretrain_throughput --preset=paper --steps=10 --warmup=2 --dtype=bfloat16 \
  --peak_tflops="$PEAK" --against=$AGAINST --loop_entries=72 --json_out="$OUT/pretrain_paper_bf16.json"
python -m benchmarks.pretrain_throughput --preset=small --crop_size=48 --steps=20 --dtype=bfloat16 \
  --sources=device --json_out="$OUT/pretrain_small_bf16.json"
python -m benchmarks.pretrain_throughput --mode=convergence --preset=small --max_steps=300 \
  --json_out="$OUT/convergence_small.json"
python -m benchmarks.inference --preset=paper --dtype=bfloat16 --against=$AGAINST --repeats=3 \
  --json_out="$OUT/inference_bf16.json"
python -m benchmarks.loss_scaling --steps=10 --json_out="$OUT/loss_scaling.json" --png="$OUT/loss_scaling.png"
echo "results in $OUT"
