"""Dequantize-matmul kernels (installed as llmq.kernels).

- `dequant_matmul`: y = x @ dequant(W)^T + b from the packed checkpoint tensors;
  Triton on CUDA (split-K / tiled GEMM / dequantize + cuBLAS by M), a torch
  reference elsewhere. Registered as the custom op `llmq::dequant_matmul`.
- `prepare_cpu` / `cpu_matmul`: the CPU path, converted once at load into
  torch's int4/int8 weight-only kernels where they fit; each call runs the
  kernel measured fastest for its number of rows (`cpu_select`).
- `dequantize`: the dense weight, in pure torch.
- `int8_linear`: int8 activations x int8 weights (W8A8), `torch._int_mm` or an
  fp32 matmul of the dequantized codes on CPU (measured), Triton on CUDA; the
  custom op `llmq::int8_linear`.
- `reorder_act_order`: sort an act-order layer's inputs by group once, so the
  kernels run without g_idx on x[..., perm].

Importing this package needs neither triton nor a GPU: triton is imported on
the first call that runs a Triton kernel.
"""

# From a source checkout whose root is on sys.path (`python -m pytest` there),
# this folder is also importable as a top-level `kernels`, and transformers
# imports `kernels` to probe for Hugging Face's package of that name. That
# second copy would define every module again and register the custom op
# llmq::dequant_matmul a second time; it stays empty instead.
if __name__ == "llmq.kernels":
    from .api import DECODE_MAX_M, GEMM_MAX_M, dequant_matmul, uses_triton
    from .cpu import CpuState, cpu_matmul, prepare_cpu
    from .dequant import dequantize, reorder_act_order
    from .int8 import int8_linear, quantize_activations

    __all__ = ["dequant_matmul", "uses_triton", "DECODE_MAX_M", "GEMM_MAX_M", "prepare_cpu", "cpu_matmul",
               "CpuState", "dequantize", "reorder_act_order", "int8_linear", "quantize_activations"]
