"""`int8_linear`: y = (s_x s_w) * (q_x @ q_w^T) + b with int8 activations and int8 weights.

Weights: int8 [N, K] (one symmetric scale per output row, fp32 [N, 1]).
Activations are quantized here, symmetric int8:

    dynamic (input_scale None): one scale per row (token), s_x = max|x_row| / 127
    static  (input_scale [1]):  the calibrated scale for every row

q_x = clamp(round(x / s_x), -128, 127), as vLLM's int8 kernels do. The int8
product is accumulated exactly in int32 and rescaled in fp32.

Devices (path "auto"):
- CPU: `torch._int_mm` (oneDNN's int8 GEMM, exact) and an in-place fp32 rescale.
- CUDA: the Triton kernels of `triton_int8` (per-token quantization fused into
  the GEMM's tile loads, scales in its epilogue; a split-K path for M <= 16).
  Forcing path "splitk" or "gemm" runs them on CPU tensors under the
  interpreter when TRITON_INTERPRET=1 was set before triton was imported (the
  kernel tests do this).
- Anything else: the integer reference (int64 matmul), exact and slow.

Registered as the custom op `llmq::int8_linear` with a fake implementation,
so it traces under torch.compile.
"""

from __future__ import annotations

import importlib
import os

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT8_DECODE_MAX_M = 16
PATHS = ("auto", "intmm", "triton", "splitk", "gemm", "reference")


def quantize_activations(x: torch.Tensor, input_scale: torch.Tensor | None = None):
    """(int8 codes [M, K], fp32 scales [M, 1] or [1]) of x [M, K], as int8_linear computes them."""
    xf = x.float()
    if input_scale is None:
        scale = xf.abs().amax(dim=-1, keepdim=True).div_(127.0)
        # An all-zero row: any positive scale represents it exactly.
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    else:
        scale = input_scale.float().reshape(1)
    q = torch.round(xf / scale).clamp_(-128, 127).to(torch.int8)
    return q, scale


def int8_reference(x, weight, weight_scale, input_scale=None, bias=None):
    """The integer reference: int64 products, fp64 rescale; [M, N] float64."""
    q, s = quantize_activations(x, input_scale)
    acc = q.long() @ weight.long().t()
    y = acc.double() * s.double() * weight_scale.double().reshape(1, -1)
    if bias is not None:
        y = y + bias.double()
    return y


def _triton_module():
    try:
        return importlib.import_module(f"{__package__}.triton_int8")
    except ImportError:
        return None


def uses_triton(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    if device.type != "cpu" or os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    module = _triton_module()
    return module is not None and module.INTERPRET


def _intmm(x2, weight, weight_scale, input_scale, bias, out_dtype):
    q, s = quantize_activations(x2, input_scale)
    acc = torch._int_mm(q, weight.t())
    y = acc.to(torch.float32)
    # Rescale in place: (s_x [M, 1] or [1]) * (s_w [1, N]).
    y.mul_(s).mul_(weight_scale.reshape(1, -1))
    if bias is not None:
        y.add_(bias)
    return y if out_dtype == torch.float32 else y.to(out_dtype)


def _run(x, weight, weight_scale, input_scale, bias, path):
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*x.shape[:-1], n))
    if path == "auto":
        path = "triton" if x.device.type == "cuda" else "intmm" if x.device.type == "cpu" else "reference"
    if path in ("triton", "splitk", "gemm"):
        tq = _triton_module()
        if tq is None:
            raise RuntimeError("int8_linear on CUDA needs triton: pip install triton")
        if not uses_triton(x.device):
            raise RuntimeError("the Triton int8 kernels run on CUDA, or on CPU under TRITON_INTERPRET=1 set "
                               "before triton is imported")
        y = tq.int8_matmul(x2, weight, weight_scale, input_scale, bias, "auto" if path == "triton" else path)
    elif path == "intmm":
        y = _intmm(x2, weight, weight_scale, input_scale, bias, x.dtype)
    else:
        y = int8_reference(x2, weight, weight_scale, input_scale, bias).to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


@torch.library.custom_op("llmq::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    input_scale: torch.Tensor | None, bias: torch.Tensor | None, path: str) -> torch.Tensor:
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):  # Triton launches on the current device; follow the tensors
            return _run(x, weight, weight_scale, input_scale, bias, path)
    return _run(x, weight, weight_scale, input_scale, bias, path)


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
        path: "auto" (Triton on CUDA, split-K for M <= 16; torch._int_mm on CPU), or force
            "intmm" (CPU), "triton" (split-K or GEMM by M), "splitk" / "gemm", "reference".

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
    return _int8_linear_op(x, weight, weight_scale.float().reshape(n, 1),
                           None if input_scale is None else input_scale.float().reshape(1),
                           None if bias is None else bias.float(), path)
