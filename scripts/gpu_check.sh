#!/bin/bash
# The GPU check of docs/experiments/gpu_h100.md, for a machine with a CUDA GPU and torch,
# transformers and accelerate installed (the package itself runs from src/).
#   usage: OUT=<folder for the logs and JSON> bash scripts/gpu_check.sh
# DUALEDIT_CACHE (default ~/.cache/dualedit) should hold the demo's models; the world is drawn
# there if missing. Each step has a time limit; results are written as they come.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
CACHE=${DUALEDIT_CACHE:-$HOME/.cache/dualedit}
DE='import sys; from dualedit.cli import main; raise SystemExit(main(sys.argv[1:]))'
T0=$(date +%s)
step() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
step env
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import sys,torch,transformers,accelerate;print(sys.version.split()[0],torch.__version__,transformers.__version__,accelerate.__version__)"
step world
[ -f "$CACHE/world-seed0/world.json" ] || python3 -c "$DE" -q world --out "$CACHE/world-seed0" | tail -1
step tests
timeout 200 python3 -m pytest -q -p no:cacheprovider -n 8 tests 2>&1 | tee "$OUT/pytest.log" | tail -8
for b in apply_edit inference train_step; do
  step "bench $b (demo models, float32)"
  timeout 120 python3 benchmarks/$b.py --device cuda --repeats 40 --warmup 5 \
    --out "$OUT/${b}_cuda.json" 2>&1 | tail -14
  step "bench $b (32 decoder layers, bfloat16)"
  timeout 120 python3 benchmarks/$b.py --device cuda --dtype bfloat16 --decoder-layers 32 \
    --repeats 30 --warmup 5 --out "$OUT/${b}_cuda_32layers_bf16.json" 2>&1 | tail -14
done
step profile
timeout 60 python3 scripts/profile_forward.py 2>&1 | tee "$OUT/profile.txt" | grep -E "^==|total"
step done
