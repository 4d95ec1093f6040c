"""`dequant_matmul`: y = x @ dequant(W)^T + b straight from the packed checkpoint tensors.

Dispatch by the number of rows M (all leading dimensions of x flattened):

    M <= DECODE_MAX_M (16)        split-K Triton kernel, fp32 atomics
    M <= GEMM_MAX_M (128)         tiled Triton GEMM (tl.dot), one program per tile
    M >  GEMM_MAX_M               Triton dequantize to a dense [K, N] weight + cuBLAS

Devices:
- CUDA tensors run the Triton kernels (triton is imported on first use).
- CPU tensors run the same Triton kernels under the interpreter only when
  TRITON_INTERPRET=1 was set before the kernel module was first imported (the
  tests do this); otherwise, and on any other device, a torch reference runs
  (dequantize in fp32, then matmul): correct but slow. For fast CPU inference
  use `llmq.kernels.cpu.prepare_cpu` / `cpu_matmul`, which convert once at load.

The computation is registered as the custom op `llmq::dequant_matmul` (with a
fake implementation), so it traces under torch.compile; eager calls run it
directly, without the op's dispatch. The decode and GEMM
paths perform no host synchronisation, so they can be captured in CUDA graphs
once the autotuner has seen each M bucket (run one warm-up call per bucket
before capturing: autotuning benchmarks and synchronises). Allocations: the
output; on the split-K path a zeroed fp32 [M, N] accumulator that the atomics
add into, cast to x's dtype at the end (the accumulator is the output when x
is fp32); on the large-M path a dense [K, N] weight in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dequant import dequantize
from .layout import codes_per_word, group_width
from .triton_modules import runs_triton, triton_module

DECODE_MAX_M = 16
GEMM_MAX_M = 128
PATHS = ("auto", "splitk", "gemm", "dequant", "gemv")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_module():
    """The Triton kernel module, or None when triton is not installed."""
    return triton_module("triton_qmm")


def uses_triton(device: torch.device) -> bool:
    """Whether dequant_matmul runs the Triton kernels for tensors on `device`."""
    return runs_triton(device, "triton_qmm")


def check_inputs(x, qweight, qzeros, scales, *, bits, group_size, g_idx=None, bias=None) -> int:
    """Validate shapes, dtypes and devices; return the group size with -1 resolved to K."""
    if bits not in (4, 8):
        raise ValueError(f"dequant_matmul supports bits 4 and 8, got {bits}")
    per = codes_per_word(bits)
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight must be a 2-D int32 tensor [K*{bits}/32, N], got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    k, n = qweight.shape[0] * per, qweight.shape[1]
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} input features but qweight packs {k} "
                         f"({qweight.shape[0]} rows of {per} {bits}-bit codes)")
    gs = group_width(group_size, k)
    if gs <= 0 or k % gs:
        raise ValueError(f"group size {group_size} does not divide {k} input features")
    groups = k // gs
    if n % per:
        raise ValueError(f"{n} output features cannot hold {bits}-bit zero points packed {per} to a word")
    if qzeros.dtype != torch.int32 or tuple(qzeros.shape) != (groups, n // per):
        raise ValueError(f"qzeros must be int32 [{groups}, {n // per}], got {qzeros.dtype} {tuple(qzeros.shape)}")
    if scales.dtype not in _FLOAT_DTYPES or tuple(scales.shape) != (groups, n):
        raise ValueError(f"scales must be float [{groups}, {n}], got {scales.dtype} {tuple(scales.shape)}")
    if g_idx is not None and (g_idx.dtype not in (torch.int32, torch.int64) or tuple(g_idx.shape) != (k,)):
        raise ValueError(f"g_idx must be int32/int64 [{k}], got {g_idx.dtype} {tuple(g_idx.shape)}")
    if bias is not None and (bias.dtype not in _FLOAT_DTYPES or tuple(bias.shape) != (n,)):
        raise ValueError(f"bias must be float [{n}], got {bias.dtype} {tuple(bias.shape)}")
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx),
                    ("bias", bias)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (checkpoint layout)")
    return gs


def pick_path(m: int) -> str:
    if m <= DECODE_MAX_M:
        return "splitk"
    if m <= GEMM_MAX_M:
        return "gemm"
    return "dequant"


def _reference(x, qweight, qzeros, scales, g_idx, bias, bits, group_size):
    w = dequantize(qweight, qzeros, scales, bits=bits, group_size=group_size, g_idx=g_idx)
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


def _triton(x, qweight, qzeros, scales, g_idx, bias, bits, group_size, path):
    tq = _triton_module()
    if tq is None:
        raise RuntimeError("dequant_matmul on CUDA needs triton: pip install triton")
    k, n = x.shape[-1], qweight.shape[1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*x.shape[:-1], n))
    path = pick_path(m) if path == "auto" else path
    if path in ("splitk", "gemv"):
        acc = torch.zeros((m, n), dtype=torch.float32, device=x.device)
        launch = tq.qmm_splitk if path == "splitk" else tq.qmm_gemv
        launch(x2, qweight, qzeros, scales, g_idx, bias, bits, group_size, acc)
        y = acc if x.dtype == torch.float32 else acc.to(x.dtype)
    elif path == "gemm":
        y = tq.qmm_gemm(x2, qweight, qzeros, scales, g_idx, bias, bits, group_size,
                        torch.empty((m, n), dtype=x.dtype, device=x.device))
    else:
        w = tq.dequantize_into(qweight, qzeros, scales, g_idx, bits, group_size,
                               torch.empty((k, n), dtype=x.dtype, device=x.device))
        y = x2 @ w if bias is None else torch.addmm(bias.to(x.dtype), x2, w)
    return y.reshape(*x.shape[:-1], n)


def _on_device(x, qweight, qzeros, scales, g_idx, bias, bits, group_size, path):
    if not uses_triton(x.device):
        return _reference(x, qweight, qzeros, scales, g_idx, bias, bits, group_size)
    if x.device.type == "cuda":
        # Triton launches on the current device; follow the tensors.
        with torch.cuda.device(x.device):
            return _triton(x, qweight, qzeros, scales, g_idx, bias, bits, group_size, path)
    return _triton(x, qweight, qzeros, scales, g_idx, bias, bits, group_size, path)


@torch.library.custom_op("llmq::dequant_matmul", mutates_args=())
def _dequant_matmul_op(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                       g_idx: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int,
                       path: str) -> torch.Tensor:
    return _on_device(x, qweight, qzeros, scales, g_idx, bias, bits, group_size, path)


@_dequant_matmul_op.register_fake
def _(x, qweight, qzeros, scales, g_idx, bias, bits, group_size, path):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


def dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *,
                   bits: int, group_size: int, g_idx: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, path: str = "auto") -> torch.Tensor:
    """y = x @ dequant(W)^T + bias, with w[n, k] = (q[k, n] - z[g(k), n]) * s[g(k), n].

    Args (K = in_features, N = out_features, b = bits, G = K / group_size):
        x:        float16 / bfloat16 / float32 [..., K], any leading dims (flattened to M rows).
        qweight:  int32 [K*b/32, N], contiguous: codes packed along K, LSB first.
        qzeros:   int32 [G, N*b/32], contiguous: true zero points packed along N.
        scales:   float16 / bfloat16 / float32 [G, N], contiguous.
        bits:     4 or 8.
        group_size: inputs per group; -1 = one group per row (G = 1). Must divide K.
        g_idx:    int32 / int64 [K] or None (act-order): group of each input. Values
                  must lie in [0, G); they are not checked (that would synchronise).
        bias:     float [N] or None.
        path:     "auto" (by M, see module doc), or force "splitk", "gemm", "dequant" or "gemv"
                  (benchmarks and tests; ignored by the torch reference). "gemv" runs one row per
                  program without tl.dot, for M = 1; "auto" does not pick it until a GPU has
                  timed it.

    Returns:
        [..., N] in x's dtype; accumulation in fp32.

    Constraints: N divisible by 32/b (zero-point packing); all tensors on x's device.
    Raises ValueError up front for anything else.
    """
    gs = check_inputs(x, qweight, qzeros, scales, bits=bits, group_size=group_size, g_idx=g_idx, bias=bias)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    args = (x, qweight, qzeros, scales, g_idx, bias, bits, gs, path)
    # Eager calls skip the custom op's dispatch (it traces under torch.compile; eagerly it adds
    # host work to every call, which at decode is more than the kernel's time on a GPU).
    return _dequant_matmul_op(*args) if torch.compiler.is_compiling() else _on_device(*args)
