"""`int8_linear`: y = (s_x s_w) * (q_x @ q_w^T) + b with int8 activations and int8 weights.

Weights: int8 [N, K] (one symmetric scale per output row, fp32 [N, 1]).
Activations are quantized here, symmetric int8:

    dynamic (input_scale None): one scale per row (token), s_x = max|x_row| / 127
    static  (input_scale [1]):  the calibrated scale for every row

q_x = clamp(round(x / s_x), -128, 127), as vLLM's int8 kernels do. The int8
product is accumulated exactly in int32 and rescaled in fp32. A NaN input has
no int8 code: with a static scale it becomes a finite one (finding it would
cost a reduction and a host sync per call, much of a decode step's small int8
GEMM), so the layer's output row is finite, and the NaN reaches the logits
through the residual stream. A per-token scale of a NaN row is NaN on CPU.

Devices (path "auto"):
- CPU: the fastest of three kernels, measured once per process for decode
  (M <= 16 rows) and for prefill (kernels/cpu_select.py):
    "intmm":   `torch._int_mm` (oneDNN's int8 GEMM; int32 sums, exact) and an
               fp32 rescale: acc * (s_x * s_w) where s_x is one value (static
               activations, or one row), (acc * s_x) * s_w for many rows of
               per-token scales.
    "dequant": the weight codes converted into a reused fp32 buffer times the
               activation codes kept as fp32 integers, an fp32 matmul, then the
               rescale as "intmm" does it. The products of the integer codes are
               exact in fp32 and so are their sums below 2^24, so it agrees with
               the integer reference to about 1e-7 relative (pays at prefill on
               processors without fast int8 dot products).
    "int8pack": torch's weight-only int8 kernel (`_weight_int8pack_mm`) fed
               the activation codes in bfloat16, which holds them exactly, then
               the fp32 rescale. The kernel returns the int8 sums rounded to
               bfloat16, so it agrees with the integer reference to about 0.5%
               of the output's largest value, the precision of llmq's
               weight-only CPU kernels. It pays at decode where `_int_mm` has
               no fast int8 dot product to call (an AVX2-only processor, where
               `_int_mm` runs 2-8x slower than fp32 and this kernel about 2x
               faster; BENCHMARKS.md). A layer whose width the kernel cannot
               take (in_features not a multiple of 32) runs `fixed_cpu_kernel`.
- CUDA: the Triton kernels of `triton_int8` (per-token quantization fused into
  the GEMM's tile loads, scales in its epilogue; a split-K path for M <= 16).
  Forcing path "splitk" or "gemm" runs them on CPU tensors under the
  interpreter when TRITON_INTERPRET=1 was set before triton was imported (the
  kernel tests do this).
- Anything else: the integer reference (int64 matmul), exact and slow.

Registered as the custom op `llmq::int8_linear` with a fake implementation,
so it traces under torch.compile; eager calls skip the custom op's dispatch,
which costs more than the int8 GEMM itself at M = 1.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from . import cpu_select
from .cpu import int8pack_fits
from .scratch import scratch
from .triton_modules import runs_triton, triton_module

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT8_DECODE_MAX_M = 16
PATHS = ("auto", "intmm", "dequant", "int8pack", "triton", "splitk", "gemm", "gemv", "reference")
# Smallest positive normal fp32: the scale of an all-zero row (any positive
# scale represents it exactly; this one needs no second pass to patch zeros).
_TINY_SCALE = torch.finfo(torch.float32).tiny
# int8's largest level as a 0-dim tensor: an operation on a Python number wraps it in a new
# tensor on every call, which at decode costs as much as the operation (the quotient is the same).
_LEVELS = torch.tensor(127.0)


class Int8Weight(NamedTuple):
    """An int8 weight and its per-row scales in the forms the CPU kernels read: views, no copies.
    Built once per weight (`int8_weight`): the views cost a torch call each, as much as a
    decode step's rescale."""

    codes: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # fp32 [N, 1]
    codes_t: torch.Tensor  # int8 [K, N]: torch._int_mm's right operand
    scale_row: torch.Tensor  # fp32 [1, N]: the rescale's factor
    ones: torch.Tensor  # bf16 [N] of 1: "int8pack"'s scales (the real ones are applied in fp32)


def int8_weight(weight: torch.Tensor, weight_scale: torch.Tensor) -> Int8Weight:
    """The CPU kernels' operands for weight int8 [N, K] and weight_scale fp32 [N, 1]."""
    ones = torch.ones(weight.shape[0], dtype=torch.bfloat16, device=weight.device)
    return Int8Weight(weight, weight_scale, weight.t(), weight_scale.reshape(1, -1), ones)


def quantize_activations(x: torch.Tensor, input_scale: torch.Tensor | None = None):
    """(int8 codes [M, K], fp32 scales [M, 1] or [1]) of x [M, K], as int8_linear computes them."""
    xf = x.float()
    if input_scale is None:
        scale = xf.abs().amax(dim=-1, keepdim=True).div_(127.0).clamp_(min=_TINY_SCALE)
        # |x| / (max|x| / 127) <= 127 up to one rounding: no clamp needed.
        q = torch.div(xf, scale).round_()
    else:
        scale = input_scale.float().reshape(1)
        q = torch.div(xf, scale).round_().clamp_(-128, 127)
    return q.to(torch.int8), scale


def int8_reference(x, weight, weight_scale, input_scale=None, bias=None):
    """The integer reference: exact integer products, fp64 rescale; [M, N] float64.

    The products are int64, or float64 on CUDA, which has no int64 matmul: float64 holds the
    int8 sums exactly (|sum| <= K * 2^14, far below 2^53)."""
    q, s = quantize_activations(x, input_scale)
    integers = torch.float64 if q.is_cuda else torch.long
    acc = q.to(integers) @ weight.to(integers).t()
    y = acc.double() * s.double() * weight_scale.double().reshape(1, -1)
    if bias is not None:
        y = y + bias.double()
    return y


def _triton_module():
    return triton_module("triton_int8")


def uses_triton(device: torch.device) -> bool:
    """Whether int8_linear runs the Triton kernels for tensors on `device`."""
    return runs_triton(device, "triton_int8")


def _quantize_into_scratch(x2, input_scale):
    """quantize_activations for many rows on CPU, through reused buffers: the same codes and scales."""
    xf = x2.float()
    if input_scale is None:
        # max|x| as max(max x, -min x): two reductions and no |x| temporary.
        scale = torch.maximum(xf.amax(dim=-1, keepdim=True), xf.amin(dim=-1, keepdim=True).neg_())
        scale = scale.div_(127.0).clamp_(min=_TINY_SCALE)
    else:
        scale = input_scale.float().reshape(1)
    f = torch.div(xf, scale, out=scratch(tuple(xf.shape), torch.float32, "int8 activations")).round_()
    if input_scale is not None:
        f.clamp_(-128, 127)
    return scratch(tuple(xf.shape), torch.int8, "int8 activations").copy_(f), scale


def _quantize_few_rows(x2, input_scale):
    """quantize_activations in the cheapest calls (each costs microseconds at decode; the tensor
    methods .float() and .char() parse less than .to(dtype)): the same codes. input_scale is
    fp32 [1] or None."""
    xf = x2.float()
    if input_scale is None:
        scale = xf.abs().amax(dim=-1, keepdim=True).div_(_LEVELS).clamp_min_(_TINY_SCALE)
        return torch.div(xf, scale).round_().char(), scale
    return torch.div(xf, input_scale).round_().clamp_(-128, 127).char(), input_scale


def _intmm(x2, w: Int8Weight, input_scale, bias, out_dtype):
    if x2.shape[0] <= cpu_select.DECODE_MAX_ROWS:
        q, s = _quantize_few_rows(x2, input_scale)
        # Few rows: s * ws is small, and one multiply converts the int32 sums to fp32 on the way.
        y = torch.mul(torch._int_mm(q, w.codes_t), s * w.scale_row)
    else:
        q, s = _quantize_into_scratch(x2, input_scale)
        # The int32 sums are written into the output's own memory and converted there, element by
        # element: the GEMM, not a later pass, pays for touching fresh memory, and every pass after
        # it reads and writes memory the GEMM has just written (BENCHMARKS.md: "The int8 sums written
        # where the output lives").
        y = torch.empty((q.shape[0], w.codes.shape[0]), dtype=torch.float32)
        acc = torch._int_mm(q, w.codes_t, out=y.view(torch.int32))
        y.copy_(acc)
        # A static scale joins the weight scales first (one pass over the output, not two);
        # per-token scales differ by row: s_x [M, 1], then s_w [1, N].
        y = y.mul_(s * w.scale_row) if input_scale is not None else y.mul_(s).mul_(w.scale_row)
    if bias is not None:
        y.add_(bias)
    return y if out_dtype == torch.float32 else y.to(out_dtype)


def _int8pack(x2, w: Int8Weight, input_scale, bias, out_dtype):
    if not int8pack_fits(w.codes.shape[1]):  # the kernel cannot take this width: the fixed kernel does
        return _CPU_KERNELS[fixed_cpu_kernel()](x2, w, input_scale, bias, out_dtype)
    q, s = _quantize_few_rows(x2, input_scale)
    # Integers in [-128, 127] have at most 8 significant bits: exact in bfloat16. (Through int8,
    # not straight from the rounded floats: a NaN gets the finite code the other kernels give it.)
    sums = torch._weight_int8pack_mm(q.bfloat16(), w.codes, w.ones)
    y = torch.mul(sums, s * w.scale_row)  # bf16 x fp32: an fp32 product
    if bias is not None:
        y.add_(bias)
    return y if out_dtype == torch.float32 else y.to(out_dtype)


def _dequant(x2, w: Int8Weight, input_scale, bias, out_dtype):
    # The codes stay floats: no pass through int8 and back, and the scales are applied to the
    # output (the weight's to [M, N], not to a fresh [N, K] weight per call).
    xf = x2.float()
    if input_scale is None:
        s = torch.maximum(xf.amax(dim=-1, keepdim=True), xf.amin(dim=-1, keepdim=True).neg_())
        s = s.div_(127.0).clamp_(min=_TINY_SCALE)
    else:
        s = input_scale
    codes = torch.div(xf, s, out=scratch(tuple(xf.shape), torch.float32, "int8 activations")).round_()
    if input_scale is not None:
        codes.clamp_(-128, 127).nan_to_num_(0.0)  # a NaN gets the code the int8 kernels give it
    weight = scratch(tuple(w.codes.shape), torch.float32, "dequant weight").copy_(w.codes)
    y = torch.mm(codes, weight.t())
    y = y.mul_(s * w.scale_row) if input_scale is not None else y.mul_(s).mul_(w.scale_row)
    if bias is not None:
        y.add_(bias)
    return y if out_dtype == torch.float32 else y.to(out_dtype)


_CPU_KERNELS = {"intmm": _intmm, "dequant": _dequant, "int8pack": _int8pack}


def _benchmarks(regime: str) -> dict:
    """The CPU candidates on a representative layer (4096 x 1024 int8 weights), for cpu_select."""
    g = torch.Generator().manual_seed(0)
    n, k = 4096, 1024
    m = 1 if regime == "decode" else 256
    x = torch.randn(m, k, generator=g)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n, 1, generator=g) * 1e-3
    operands = int8_weight(w, ws)
    return {name: (lambda f=f: f(x, operands, None, None, torch.float32)) for name, f in _CPU_KERNELS.items()}


# The instructions oneDNN's int8 GEMM (`torch._int_mm`) needs to beat fp32: without them it runs
# 10-30x slower than an fp32 matmul (an AVX2-only AMD EPYC, BENCHMARKS.md).
_INT8_DOT_PRODUCTS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def fixed_cpu_kernel() -> str:
    """One CPU kernel named by what the processor has, not measured, for callers that need the same
    kernel in every process (calibration, whose ranks must round alike): "intmm" where the processor
    has int8 dot products, else "dequant"."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return "intmm" if any(capabilities.get(name) for name in _INT8_DOT_PRODUCTS) else "dequant"


def cpu_kernel(m: int) -> str:
    """The CPU kernel ("intmm", "dequant" or "int8pack") that int8_linear runs for M = m rows."""
    return cpu_select.choice("w8a8", m, _benchmarks)


def _run(x, weight, weight_scale, input_scale, bias, path):
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*x.shape[:-1], n))
    if path == "auto":
        path = "triton" if x.device.type == "cuda" else cpu_kernel(m) if x.device.type == "cpu" else "reference"
    if path in ("triton", "splitk", "gemm", "gemv"):
        tq = _triton_module()
        if tq is None:
            raise RuntimeError("int8_linear on CUDA needs triton: pip install triton")
        if not uses_triton(x.device):
            raise RuntimeError("the Triton int8 kernels run on CUDA, or on CPU under TRITON_INTERPRET=1 set "
                               "before triton is imported")
        y = tq.int8_matmul(x2, weight, weight_scale, input_scale, bias, "auto" if path == "triton" else path)
    elif path in _CPU_KERNELS:
        y = _CPU_KERNELS[path](x2, int8_weight(weight, weight_scale), input_scale, bias, x.dtype)
    else:
        y = int8_reference(x2, weight, weight_scale, input_scale, bias).to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


def cpu_int8_linear(x: torch.Tensor, w: Int8Weight, input_scale: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """int8_linear on CPU tensors, eager, with the inputs already in the checked form (`int8_weight`
    of an int8 [N, K] contiguous weight and fp32 [N, 1] scales, input_scale fp32 [1] or None, bias
    fp32 or None): W8A8Linear's forward, which skips int8_linear's per-call checks."""
    n, k = w.codes.shape
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*x.shape[:-1], n))
    y = _CPU_KERNELS[cpu_kernel(m)](x2, w, input_scale, bias, x.dtype)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], n)


def _on_device(x, weight, weight_scale, input_scale, bias, path):
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):  # Triton launches on the current device; follow the tensors
            return _run(x, weight, weight_scale, input_scale, bias, path)
    return _run(x, weight, weight_scale, input_scale, bias, path)


@torch.library.custom_op("llmq::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    input_scale: torch.Tensor | None, bias: torch.Tensor | None, path: str) -> torch.Tensor:
    return _on_device(x, weight, weight_scale, input_scale, bias, path)


@_int8_linear_op.register_fake
def _(x, weight, weight_scale, input_scale, bias, path):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                path: str = "auto") -> torch.Tensor:
    """y = x W^T + bias with x quantized to int8 (see module doc).

    Args (K = in_features, N = out_features):
        x: float16 / bfloat16 / float32 [..., K].
        weight: int8 [N, K], contiguous.
        weight_scale: float32 [N, 1] (or [N]): w = weight * weight_scale.
        input_scale: None (dynamic per-token scales) or float32 [1] (static).
        bias: float [N] or None.
        path: "auto" (Triton on CUDA, split-K for M <= 16; on CPU the kernel measured fastest,
            see the module doc), or force "intmm" / "dequant" / "int8pack" (CPU), "triton" (split-K or GEMM
            by M), "splitk" / "gemm" / "gemv" (one row per program, for M = 1; not yet measured
            on a GPU, so "auto" never picks it), "reference".

    Returns [..., N] in x's dtype.
    """
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D int8 tensor [N, K], got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} input features, the weight has {k}")
    if weight_scale.numel() != n or weight_scale.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weight_scale must be float [{n}, 1], got {weight_scale.dtype} {tuple(weight_scale.shape)}")
    if input_scale is not None and input_scale.numel() != 1:
        raise ValueError(f"input_scale must hold one value (static per-tensor), got {tuple(input_scale.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    for name, t in (("weight", weight), ("weight_scale", weight_scale), ("input_scale", input_scale),
                    ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous ([N, K], checkpoint layout)")
    args = (x, weight, weight_scale.float().reshape(n, 1),
            None if input_scale is None else input_scale.float().reshape(1),
            None if bias is None else bias.float(), path)
    return _int8_linear_op(*args) if torch.compiler.is_compiling() else _on_device(*args)
