"""Round-to-nearest with min-max ranges: the baseline every method is measured against.

Symmetric: the zero point is fixed at z = 2^(b-1), so codes cover
(q - z) in [-2^(b-1), 2^(b-1) - 1]. The scale is the smallest that keeps the
group's min and max inside that range: s = max(max / (2^(b-1) - 1),
-min / 2^(b-1)). A group whose largest magnitude is negative uses the extra
negative code, one whose largest is positive does not lose it to clamping.

Asymmetric: the range [min(w, 0), max(w, 0)] (zero is always inside, so the
integer zero point lies in the code range) is split into 2^b - 1 steps,
s = (max - min) / (2^b - 1), z = round(-min / s).

Symmetric groups keep every weight within half a step s/2 of its dequantized
value; the integer zero point of an asymmetric group shifts its grid by up to
half a step, so its extreme weights can be up to a step away. Scales are rounded
to their storage dtype before the codes are chosen, so dequantizing the stored
tensors gives exactly what the solver measured (and the rounding moves the
extremes by a further (2^b - 1) times its relative error).
"""

from __future__ import annotations

import torch

from ..qweight import QuantizedWeight


def find_qparams(w: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype):
    """Scales and zero points for groups along the last dimension of w.

    Returns (scale, zero), float32 tensors shaped w.shape[:-1]; scale is already
    rounded through scale_dtype and zero holds integers.
    """
    w = w.float()
    return qparams_of_range(w.amin(dim=-1), w.amax(dim=-1), bits, sym, scale_dtype)


def qparams_of_range(wmin: torch.Tensor, wmax: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype):
    """find_qparams for groups given by their min and max (float32)."""
    wmin = wmin.clamp(max=0)
    wmax = wmax.clamp(min=0)
    maxq = 2**bits - 1
    if sym:
        half = 2 ** (bits - 1)
        scale = torch.maximum(wmax / (half - 1), -wmin / half)
        zero = torch.full_like(scale, float(half))
    else:
        scale = (wmax - wmin) / maxq
        zero = None
    all_zero = scale == 0
    scale = scale.to(scale_dtype).float()
    # An all-zero group: any positive scale represents it exactly. Subnormal scales (fp16: below 6.1e-5)
    # are kept, as replacing them would quantize their groups' weights to 0; a group so small that its
    # scale rounds to 0 in scale_dtype (fp16: below 6e-8) takes the dtype's smallest positive value.
    smallest = torch.finfo(scale_dtype).tiny * torch.finfo(scale_dtype).eps
    scale = torch.where(all_zero, torch.ones_like(scale), scale.clamp(min=smallest))
    if zero is None:
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    return scale, zero


SEARCH_CHUNK_ELEMENTS = 1 << 24  # elements per temporary of search_qparams (fp32: 64 MiB)


def search_qparams(w: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype, *, grid: int = 50,
                   min_shrink: float = 0.5, norm: float = 2.4):
    """Like find_qparams, but each group's range is shrunk by the factor in
    linspace(1, min_shrink, grid) that minimises sum |w - dequant(quant(w))|^norm
    over the group (the GPTQ reference's "mse" search). Clipping a few large
    weights buys a finer step for all the others. Used by GPTQ, never by RTN,
    which stays plain min-max.
    """
    w = w.float()
    # The grid multiplies w's size by `grid` in each temporary; rows are independent,
    # so large inputs go in row chunks that keep the temporaries near 64 MiB.
    rows = max(1, SEARCH_CHUNK_ELEMENTS // (grid * max(1, w[0].numel()))) if w.dim() > 1 else w.shape[0] + 1
    if w.shape[0] > rows:
        parts = [search_qparams(c, bits, sym, scale_dtype, grid=grid, min_shrink=min_shrink, norm=norm)
                 for c in w.split(rows)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    shrink = torch.linspace(1.0, min_shrink, grid, device=w.device).view(-1, *([1] * (w.dim() - 1)))
    # The range of shrink * w is shrink times w's range: rounding is monotonic and shrink > 0,
    # so the [grid, ...] product never has to be formed just to find its min and max.
    scale, zero = qparams_of_range(w.amin(dim=-1) * shrink, w.amax(dim=-1) * shrink, bits, sym, scale_dtype)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    # quantize, dequantize and the error, each step in place in one [grid, ..., group] buffer:
    # the same operations in the same order as quantize() and dequantize().
    err = torch.div(w.unsqueeze(0), s)
    err.round_().add_(z).clamp_(0, 2**bits - 1).sub_(z).mul_(s).sub_(w)
    err = err.abs_().pow_(norm).sum(-1)
    best = err.argmin(dim=0, keepdim=True)  # ties keep the widest range
    return scale.gather(0, best).squeeze(0), zero.gather(0, best).squeeze(0)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (float tensor) of w for broadcastable scale and zero."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool,
                 scale_dtype: torch.dtype) -> QuantizedWeight:
    """Quantize a [N, K] weight with one (scale, zero) per group of group_size inputs."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide {k} input features")
    w = weight.float().reshape(n, k // group_size, group_size)
    scale, zero = find_qparams(w, bits, sym, scale_dtype)
    q = quantize(w, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    return QuantizedWeight(
        codes=q.reshape(n, k).to(torch.uint8),
        scales=scale.to(scale_dtype),
        zeros=zero.to(torch.int32),
        bits=bits,
        group_size=group_size,
    )
