#!/bin/bash
# The real-size benchmarks of issue 14, for a lent GPU machine with torch, transformers and
# accelerate installed (the package itself runs from src/): LLaVA-1.5-7B and BLIP2-OPT-2.7B at
# their real widths and depths (benchmarks/real_sizes.py), random weights, bfloat16:
# inference with 1 / 100 / 10,000 edits stored against the bare model, applying an edit
# against a full forward, and a training step (time, and peak memory with one model copy).
#   usage: OUT=<folder for the logs and JSON> bash scripts/gpu_real_sizes.sh
# About 7 minutes on one H100-class GPU; each step has a time limit, results are written as
# they come.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_real_sizes}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
step() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
step env
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import sys,torch,transformers,accelerate;print(sys.version.split()[0],torch.__version__,transformers.__version__,accelerate.__version__)"
COMMON="--size real --device cuda --dtype bfloat16"
step "bench inference (real sizes)"
timeout 200 python3 benchmarks/inference.py $COMMON --repeats 10 --warmup 2 \
  --out "$OUT/inference_cuda_real_bf16.json" 2>&1 | tail -24
step "bench apply_edit (real sizes)"
timeout 100 python3 benchmarks/apply_edit.py $COMMON --repeats 10 --warmup 2 \
  --out "$OUT/apply_edit_cuda_real_bf16.json" 2>&1 | tail -12
step "bench train_step (real sizes)"
timeout 150 python3 benchmarks/train_step.py $COMMON --repeats 5 --warmup 1 \
  --out "$OUT/train_step_cuda_real_bf16.json" 2>&1 | tail -14
step done
