#!/usr/bin/env bash
# The checks and figures llmq needs most from a CUDA GPU (README, *Kernels*, lists the rest), in one
# command, each step under a time limit.
#
#     OUT=DIR bash scripts/gpu_checks.sh          # from the repository root
#
# Steps, in order of what matters most if time runs out (each writes DIR/<step>.txt and ends it with
# its exit status; a step that fails or runs out of time does not stop the next):
#   env           the GPU, driver and the torch / triton / transformers versions
#   check         scripts/check_kernels.py --quick: every kernel path and tile config against float64
#                 and integer references, CUDA graphs, quantized tiny Llamas eager and under torch.compile
#   w8a8_dynamic  scripts/bench_kernels.py --w8a8: the Triton int8 GEMM with per-token activations
#                 against cuBLAS fp16 at M = 1, 16, 256, 4096 on Llama-3.1-8B's linears
#   w8a8_static   the same with static activation scales, on the 4096x4096 and 14336x4096 linears
#   int4          scripts/bench_kernels.py: the int4 g128 dequantize-matmul kernels against cuBLAS fp16
#   moe           scripts/bench_moe_kernels.py: the grouped MoE kernels (int4 g128, W8A8) against the
#                 fp16 experts block of a Qwen3-30B-A3B-shaped layer
#   profile       bench_kernels.py --all-paths --profile at decode sizes (M = 1, 16; int4 also 256), W8A8
#                 and int4: every path, the forced-only GEMV among them, each kernel's GPU time per call
#   e2e           scripts/bench_e2e.py on a Llama-3.2-1B-shaped model with random weights, fp16:
#                 transformers' greedy decode, fp16 against RTN int4 g128 and against W8A8 dynamic
#
# Limits (seconds) come from LLMQ_GPU_LIMITS="env check w8a8_dynamic w8a8_static int4 moe profile e2e",
# default "30 150 85 45 85 50 180 240": each of the first six took under its limit on an H200
# (BENCHMARKS.md, "On an H200"); the last two are estimates (profile compiles every path's configs at
# each M; e2e draws and quantizes a 1.2B-parameter model on the host, once per quantization). All
# steps take up to 14 minutes, more than one 10-minute command allows: LLMQ_GPU_STEPS splits them.
# Without a GPU every step says so and ends.
#
# LLMQ_GPU_STEPS names the steps to run, in the order given (default: all, in the order above), to run
# again only those that failed or ran out of time, e.g. LLMQ_GPU_STEPS="int4 moe" LLMQ_GPU_LIMITS="0 0 0 0
# 300 240 0 0". The output ends with a summary: each step's last result lines.
set -uo pipefail

all_steps=(env check w8a8_dynamic w8a8_static int4 moe profile e2e)
read -r -a limits <<< "${LLMQ_GPU_LIMITS:-30 150 85 45 85 50 180 240}"
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

limit_of() {
    local i
    for i in "${!all_steps[@]}"; do
        [ "${all_steps[$i]}" = "$1" ] && echo "${limits[$i]}"
    done
}

step() {
    local name=$1 limit
    shift
    limit=$(limit_of "$name")
    echo "== $name (at most ${limit} s)"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    echo "exit status ${PIPESTATUS[0]}" | tee -a "$out/$name.txt"
}

# The benchmarks print each autotuning's time and chosen config, which the tile lists are pruned by.
bench=(env TRITON_PRINT_AUTOTUNING=1 "$python")
for name in "${chosen[@]}"; do
    case $name in
        env) step env bash -c "nvidia-smi; $python -c 'import torch, triton, transformers
print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"transformers\", transformers.__version__)
print(\"device\", torch.cuda.get_device_name() if torch.cuda.is_available() else \"none\")'" ;;
        check) step check "$python" scripts/check_kernels.py --quick ;;
        w8a8_dynamic) step w8a8_dynamic "${bench[@]}" scripts/bench_kernels.py --w8a8 ;;
        w8a8_static) step w8a8_static "${bench[@]}" scripts/bench_kernels.py --w8a8 --act static \
            --shapes 4096x4096 14336x4096 ;;
        int4) step int4 "${bench[@]}" scripts/bench_kernels.py --bits 4 --group-size 128 --dtype float16 \
            --m 1 16 256 2048 ;;
        moe) step moe "${bench[@]}" scripts/bench_moe_kernels.py ;;
        profile) step profile bash -c "$python scripts/bench_kernels.py --w8a8 --shapes 4096x4096 14336x4096 \
            --m 1 16 --all-paths --profile; $python scripts/bench_kernels.py --bits 4 --group-size 128 \
            --dtype float16 --shapes 4096x4096 14336x4096 --m 1 16 256 --all-paths --profile" ;;
        e2e) step e2e bash -c "for q in rtn:4:128:sym w8a8; do $python scripts/bench_e2e.py --device cuda \
            --dtype float16 --random-config llama-3.2-1b --quantize \$q --new-tokens 64 --repeats 3; done" ;;
    esac
done

# The end of the output is what a remote run shows first: each step's result lines, without the
# autotuner's per-config lines.
echo "== summary"
for name in "${chosen[@]}"; do
    echo "-- $name"
    grep -v -e '^Autotuning kernel' -e '^Triton autotuning' -e '^with key as' -e '^finished after' \
        -e '^best config selected' -e '^[|+]' "$out/$name.txt" | tail -n 30
done
