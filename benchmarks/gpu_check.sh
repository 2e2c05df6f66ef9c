#!/usr/bin/env bash
# One pass of every check that needs a CUDA GPU: install, the GPU tests, the kernel benchmark and
# the training-step benchmark. Each stage has its own time limit so that a slow one cannot starve
# the rest; logs go to $OUT (or ./gpu-check-out), and a short summary is printed last.
#
#   bash benchmarks/gpu_check.sh [stage ...]      stages: install tests kernels train (default)
#                                                 and the tuning sweeps: tiles rmsnorm
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check-out}
mkdir -p "$out"
stages=${*:-install tests kernels train}
export PYTHONUNBUFFERED=1
summary=()

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    summary+=("$name rc=$rc $((SECONDS - start))s")
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)" | tee -a "$out/gpu.txt"

for s in $stages; do
    case $s in
        install) stage install 120 python3 -m pip install -q --no-build-isolation --no-deps -e . ;;
        tests) stage tests "${TESTS_LIMIT:-170}" python3 -m pytest -q -n 8 -k "gpu or every_tile" \
                   tests/test_kernels_*.py ;;
        kernels) stage kernels "${KERNELS_LIMIT:-230}" python3 benchmarks/fused_kernels.py ;;
        train) stage train "${TRAIN_LIMIT:-130}" python3 benchmarks/train_step.py --preset evolm-1b --seq-len 2048 \
                   --micro-batch 4 --steps 10 --warmup 3 --hf ;;
        tiles) stage tiles "${TILES_LIMIT:-300}" python3 benchmarks/attention_tiles.py --workers 14 ;;
        rmsnorm) stage rmsnorm "${RMSNORM_LIMIT:-150}" python3 benchmarks/rmsnorm_configs.py ;;
        *) echo "unknown stage $s" ;;
    esac
done
echo "=== summary"
printf '%s\n' "${summary[@]}"
