"""AWQ's two searches: per-input-channel scales, then per-group weight clipping.

Pure tensor code; knows nothing of models. Shapes: a weight W is [N, K]
(nn.Linear layout), inputs x are [n, K].

Both searches measure the output error of quantized weights on the cached
inputs through the Gram matrix G = x^T x / n ([K, K], fp32), since
||x D^T||^2 / n = sum((D G) * D) for any weight error D [N, K]. One grid point
then costs N K^2 multiply-adds instead of n K N: for the usual n of several
thousand tokens and K of a few hundred to a few thousand this is several
times cheaper, and the search sees every sampled row.

Scale search (Lin et al., AWQ): s = mean|x|^alpha per input channel for
alpha = 0, 1/grid, ..., (grid-1)/grid, normalised to s / sqrt(max s * min s).
The linears' input columns are multiplied by s and their inputs divided by s,
so the quantized block computes (x / s) Q(W s)^T = x (Q(W s) / s)^T and the
error of one grid point is that of D = W - Q(W s) / s. alpha = 0 is plain
round-to-nearest, so the chosen scales never do worse than RTN on the data
searched.

Clip search: per output row and group, the group's range [min, max] (zero
included, as round-to-nearest has it) is shrunk by a factor f on a grid from 1
down to min_shrink; the weights are clamped to [f min, f max] and quantized
with the min-max range of the clamped weights. The error of a (row, group) is
that group's share of the output, d^T G_gg d with G_gg the group's diagonal
block of G (the AWQ reference measures the same partial products), so each
(row, group) keeps its own best factor.

Quantization inside both searches is llmq.solvers.rtn's, scales rounded to
their storage dtype, so rtn_quantize of the clamped weights gives exactly the
codes that were scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .rtn import find_qparams

__all__ = ["InputStats", "input_stats", "fake_quantize", "ScaleResult", "search_scales", "ClipResult",
           "search_clip", "scale_gram"]


@dataclass
class InputStats:
    """What the searches need from one linear input.

    gram: [K, K] fp32, x^T x / n over the sampled rows.
    mean_abs: [K] fp32, mean |x| per channel over all rows.
    rows: number of rows in gram.
    """

    gram: torch.Tensor
    mean_abs: torch.Tensor
    rows: int


def input_stats(x: torch.Tensor, max_rows: int | None = None) -> InputStats:
    """Statistics of inputs x [..., K] (any float dtype).

    mean |x| uses every row; the Gram matrix uses at most max_rows rows spread
    evenly over the batch (None: all rows), because its cost grows with n K^2.
    """
    x = x.reshape(-1, x.shape[-1])
    n = x.shape[0]
    mean_abs = x.abs().float().mean(0)
    if max_rows is not None and n > max_rows:
        # Evenly spaced rows reach every calibration window and every position.
        idx = torch.linspace(0, n - 1, max_rows, device=x.device).round().long()
        x = x[idx]
    xf = x.float()
    gram = xf.t() @ xf / xf.shape[0]
    return InputStats(gram=gram, mean_abs=mean_abs, rows=xf.shape[0])


def scale_gram(gram: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Gram matrix of x / s given that of x: G / (s s^T)."""
    return gram / (s[:, None] * s[None, :])


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool, scale_dtype: torch.dtype) -> torch.Tensor:
    """Round-to-nearest and back: [N, K] -> [N, K] fp32, groups of group_size along K.

    The same numbers as rtn.dequantize(rtn.quantize(...)) with rtn.find_qparams'
    scales, computed in place because the searches call it many times.
    """
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    return _fake_quantize_groups(g, g.amin(-1, keepdim=True), g.amax(-1, keepdim=True), bits, sym,
                                 scale_dtype).reshape(n, k)


def _fake_quantize_groups(g: torch.Tensor, gmin: torch.Tensor, gmax: torch.Tensor, bits: int, sym: bool,
                          scale_dtype: torch.dtype) -> torch.Tensor:
    # find_qparams looks only at each group's min and max, so it is given just those two.
    scale, zero = find_qparams(torch.cat([gmin, gmax], -1), bits, sym, scale_dtype)
    scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    # clamp(round(w / s) + z, 0, maxq) - z, in integers held exactly in fp32.
    q = g / scale
    return q.round_().clamp_(-zero, (2**bits - 1) - zero).mul_(scale)


def _output_error(d: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    # ||x d^T||^2 / n = sum over rows of d G d^T.
    return ((d @ gram) * d).sum()


@dataclass
class ScaleResult:
    """scales: [K] fp32 (multiply W's columns, divide the inputs); alpha: the
    exponent chosen; error / rtn_error: mean squared output error per row of x
    with the chosen scales / with none (alpha = 0); energy: the same for the
    full-precision output, sum((W G) * W), to make errors relative."""

    scales: torch.Tensor
    alpha: float
    error: float
    rtn_error: float
    energy: float


@torch.no_grad()
def search_scales(weights: list[torch.Tensor], stats: InputStats, *, bits: int, group_size: int, sym: bool,
                  scale_dtype: torch.dtype, grid: int = 20,
                  evaluate: Callable[[Callable[[list[int]], list[float]], int], list[float]] | None = None
                  ) -> ScaleResult:
    """The AWQ scale grid for linears sharing one input (their errors are summed).

    weights: [N_i, K] each; group_size must divide K.
    evaluate(score, grid): the errors of grid points 0 .. grid - 1, where score(indices) gives
    those of some; None scores them all here (llmq.distributed.solve_shared spreads them over
    processes: each point's error does not depend on where it is computed).
    """
    w = torch.cat([t.float() for t in weights])
    gram = stats.gram.to(w.device)
    x_mean = stats.mean_abs.to(w.device)
    energy = _output_error(w, gram).item()

    def factors(i: int) -> torch.Tensor:
        s = x_mean.pow(i / grid).clamp(min=1e-4)
        return s / (s.max() * s.min()).sqrt()

    def score(indices: list[int]) -> list[float]:
        return [_output_error(w - fake_quantize(w * s, bits, group_size, sym, scale_dtype) / s, gram).item()
                for s in map(factors, indices)]

    errors = score(list(range(grid))) if evaluate is None else evaluate(score, grid)
    best = min(range(grid), key=errors.__getitem__)  # the first of equal errors: the smallest alpha
    return ScaleResult(scales=factors(best), alpha=best / grid, error=errors[best], rtn_error=errors[0],
                       energy=energy)


@dataclass
class ClipResult:
    """weight: [N, K] fp32, clamped to the chosen ranges; shrink: [N, G] the
    factor chosen per (row, group); error / rtn_error: summed per-group output
    error of the quantized weight with the chosen clip / without clipping."""

    weight: torch.Tensor
    shrink: torch.Tensor
    error: float
    rtn_error: float


@torch.no_grad()
def search_clip(weight: torch.Tensor, gram: torch.Tensor, *, bits: int, group_size: int, sym: bool,
                scale_dtype: torch.dtype, grid: int = 20, min_shrink: float = 0.5) -> ClipResult:
    """Per (row, group) range shrink minimising that group's output error.

    weight: [N, K] (already multiplied by the AWQ scales); gram: [K, K] of the
    inputs it sees (already divided by the scales).
    """
    n, k = weight.shape
    ng = k // group_size
    w = weight.float().reshape(n, ng, group_size)
    # The diagonal blocks of G, one [gs, gs] per group.
    blocks = gram.to(w.device).reshape(ng, group_size, ng, group_size).diagonal(dim1=0, dim2=2)
    blocks = blocks.permute(2, 0, 1).contiguous()  # [G, gs, gs]
    wmin = w.amin(-1, keepdim=True).clamp(max=0)
    wmax = w.amax(-1, keepdim=True).clamp(min=0)
    best_err = best_f = None
    rtn_err = None
    for f in torch.linspace(1.0, min_shrink, grid).tolist():
        lo, hi = wmin * f, wmax * f
        c = torch.minimum(torch.maximum(w, lo), hi)
        # The clamped group's min and max are f min and f max (zero is always in the range).
        d = (w - _fake_quantize_groups(c, lo, hi, bits, sym, scale_dtype)).transpose(0, 1)  # [G, N, gs]
        err = (torch.bmm(d, blocks) * d).sum(-1).transpose(0, 1)  # [N, G]
        if best_err is None:
            best_err, best_f = err, torch.full_like(err, f)
            rtn_err = err.sum().item()
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_f = torch.where(better, torch.full_like(err, f), best_f)
    fb = best_f.unsqueeze(-1)
    clipped = torch.minimum(torch.maximum(w, wmin * fb), wmax * fb).reshape(n, k)
    return ClipResult(weight=clipped, shrink=best_f, error=best_err.sum().item(), rtn_error=rtn_err)
