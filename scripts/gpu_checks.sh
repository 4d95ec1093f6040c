#!/usr/bin/env bash
# The checks and figures llmq needs most from a CUDA GPU (README, *Kernels*, lists the rest), in one
# command, each step under a time limit.
#
#     OUT=DIR bash scripts/gpu_checks.sh          # from the repository root
#
# Steps, in order of what matters most if time runs out (each writes DIR/<step>.txt and ends it with
# its exit status; a step that fails or runs out of time does not stop the next):
#   env           the GPU, driver and the torch / triton / transformers versions
#   check         scripts/check_kernels.py --quick: every kernel path against float64 and integer
#                 references, CUDA graphs, quantized tiny Llamas eager and under torch.compile
#   w8a8_dynamic  scripts/bench_kernels.py --w8a8: the Triton int8 GEMM with per-token activations
#                 against cuBLAS fp16 at M = 1, 16, 256, 4096 on Llama-3.1-8B's linears
#   w8a8_static   the same with static activation scales
#   int4          scripts/bench_kernels.py: the int4 g128 dequantize-matmul kernels against cuBLAS fp16
#   moe           scripts/bench_moe_kernels.py: the grouped MoE kernels (int4 g128, W8A8) against the
#                 fp16 experts block of a Qwen3-30B-A3B-shaped layer
#
# Limits (seconds) come from LLMQ_GPU_LIMITS="env check w8a8_dynamic w8a8_static int4 moe", default
# "30 210 90 60 90 90": 9.5 minutes at most, so that the whole run fits a 10-minute command. Without a
# GPU every step says so and ends.
#
# LLMQ_GPU_STEPS names the steps to run (default: all, in the order above), to run again only those
# that failed or ran out of time, e.g. LLMQ_GPU_STEPS="int4 moe" LLMQ_GPU_LIMITS="0 0 0 0 300 240".
set -uo pipefail

all_steps=(env check w8a8_dynamic w8a8_static int4 moe)
read -r -a limits <<< "${LLMQ_GPU_LIMITS:-30 210 90 60 90 90}"
read -r -a chosen <<< "${LLMQ_GPU_STEPS:-${all_steps[*]}}"
if [ "${#limits[@]}" -ne "${#all_steps[@]}" ]; then
    echo "LLMQ_GPU_LIMITS needs ${#all_steps[@]} numbers, one per step (${all_steps[*]})" >&2
    exit 2
fi
for name in "${chosen[@]}"; do
    if [[ " ${all_steps[*]} " != *" $name "* ]]; then
        echo "LLMQ_GPU_STEPS: no step named $name; the steps are: ${all_steps[*]}" >&2
        exit 2
    fi
done

out=${OUT:-gpu-checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}

step() {
    local name=$1 limit=$2
    shift 2
    [[ " ${chosen[*]} " == *" $name "* ]] || return 0
    echo "== $name (at most ${limit} s)"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    echo "exit status ${PIPESTATUS[0]}" | tee -a "$out/$name.txt"
}

step env "${limits[0]}" bash -c "nvidia-smi; $python -c 'import torch, triton, transformers
print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"transformers\", transformers.__version__)
print(\"device\", torch.cuda.get_device_name() if torch.cuda.is_available() else \"none\")'"
step check "${limits[1]}" "$python" scripts/check_kernels.py --quick
step w8a8_dynamic "${limits[2]}" "$python" scripts/bench_kernels.py --w8a8
step w8a8_static "${limits[3]}" "$python" scripts/bench_kernels.py --w8a8 --act static
step int4 "${limits[4]}" "$python" scripts/bench_kernels.py --bits 4 --group-size 128 --dtype float16 \
    --m 1 16 256 2048
step moe "${limits[5]}" "$python" scripts/bench_moe_kernels.py
