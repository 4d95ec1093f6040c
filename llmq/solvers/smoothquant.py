"""SmoothQuant factors and static activation observers for W8A8 (pure tensor code).

Shapes: a weight W is [N, K] (nn.Linear layout), inputs x are [n, K].

SmoothQuant (Xiao et al.): per input channel j,

    s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)

(W_j: column j of every linear reading x). The linears compute (x / s) (W s)^T,
the same function, but activation outliers move into the weights, which are
quantized per output row and so tolerate them better. alpha = 0.5 is the
paper's default; `search_smoothing` picks alpha per scale group by the W8A8
output error it gives on sampled calibration rows. Unlike AWQ's weight-only
search, the error cannot be scored through a Gram matrix alone: rounding the
activations depends on each row's own values (its per-token scale, or where
it falls against the static scale), so the sampled rows themselves are
quantized for every grid point.

Observers: one static per-tensor scale for an input x, s_x = range / 127:
- "minmax": range = max |x| over the calibration set;
- "percentile": range = the PERCENTILE-th percentile of |x| (clips the rarest
  outliers);
- "mse": range = c max|x| with c on a grid from 1 down to 0.1 (step 0.05), the one that
  minimises the output error ||(q(x) - x) W^T||^2 of the linears reading x on
  sampled rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.int8 import fixed_cpu_kernel, int8_linear, quantize_activations, uses_triton
from .rtn import rtn_quantize

PERCENTILE = 99.99
# Rows scored by the searches. With 512 the per-group choice of alpha was
# noisy: on the dev model 2048 rows gave W8A8 dynamic with smoothing +0.76%
# over fp (mean of 3 calibration seeds) against +1.11% (BENCHMARKS.md), for
# about a second more per layer on a CPU.
SEARCH_ROWS = 2048


def int8_weight_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [N, K], fp32 scales [N, 1]) of w [N, K] as W8A8 stores it (rtn_quantize, symmetric,
    one scale per row)."""
    qw = rtn_quantize(w, 8, w.shape[1], True, torch.float32)
    return (qw.codes.short() - 128).to(torch.int8), qw.scales.reshape(-1, 1)  # zero point 128


def w8a8_product(x: torch.Tensor, w: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q(x) q(w)^T, fp32 [n, N], for x [n, K] and w [N, K]: what W8A8Linear computes. Where a fast
    int8 GEMM runs (a CPU with int8 dot products, or CUDA with triton), through it: the int32 sums
    are exact and the int8 GEMM is several times faster than an fp32 matmul of the rounded operands,
    which the searches otherwise spend most of their time in; elsewhere that fp32 matmul. One named
    kernel (on CPU `fixed_cpu_kernel`), not the one each
    process measures fastest, and no split-K atomics, so that the processes of a torchrun run,
    each scoring its own rows, round as one process does."""
    codes, scale = int8_weight_codes(w)
    if x.device.type == "cpu":
        return int8_linear(x.float(), codes, scale, input_scale, path=fixed_cpu_kernel())
    if uses_triton(x.device):
        return int8_linear(x.float(), codes, scale, input_scale, path="gemm")
    return fake_quantize_activations(x.float(), input_scale) @ (codes.float() * scale).t()


def fake_quantize_activations(x: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """int8 round-trip of x [..., K]: per row (input_scale None) or with one static scale."""
    q, s = quantize_activations(x.reshape(-1, x.shape[-1]), input_scale)
    return (q.float() * s).reshape(x.shape).to(x.dtype)


def sample_rows(x: torch.Tensor, max_rows: int = SEARCH_ROWS) -> torch.Tensor:
    """At most max_rows rows of x [..., K] as fp32 [n, K], evenly spread over the batch."""
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] > max_rows:
        idx = torch.linspace(0, x.shape[0] - 1, max_rows, device=x.device).round().long()
        x = x[idx]
    return x.float()


def channel_absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x_j| per input channel over every row of x [..., K], fp32 [K]."""
    x = x.reshape(-1, x.shape[-1])
    # max(max x, -min x): two reductions, without an |x| temporary as large as x, which costs more than both.
    return torch.maximum(x.amax(0), x.amin(0).neg_()).float()


class ActivationSample:
    """What the observers and the smoothing search read from a linear's calibration input x [..., K].

    This one reads the whole batch in this process. llmq.methods.w8a8 gives the
    same answers over every process's share of the batch (torch.distributed);
    the searches compute each candidate's error on this process's scored rows
    and `total` sums them, so every process picks the same candidate.
    """

    def __init__(self, x: torch.Tensor):
        self.x = x

    def channel_absmax(self) -> torch.Tensor:
        """max |x_j| per input channel over every row, fp32 [K]."""
        return channel_absmax(self.x)

    def rows(self) -> torch.Tensor:
        """The rows the searches score (sample_rows), fp32 [n, K]."""
        return sample_rows(self.x)

    def numel(self) -> int:
        return self.x.numel()

    def largest_abs(self, k: int) -> torch.Tensor:
        """The k largest |x| over every element, in descending order."""
        return torch.topk(self.x.reshape(-1).abs().float(), k).values

    def total(self, errors: torch.Tensor) -> torch.Tensor:
        """Per-candidate errors summed over the scored rows of every process (here: this one's)."""
        return errors


def _sample(x) -> ActivationSample:
    return x if isinstance(x, ActivationSample) else ActivationSample(x)


def smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float,
                      tie=None) -> torch.Tensor:
    """s [K] fp32 for inputs with per-channel max act_absmax [K] read by weights [N_i, K].

    tie: None, or a map [K] -> [K] replacing each channel's maximum by that of the
    channels that must share its factor (grouped-query attention's v -> o).
    """
    w_absmax = torch.cat([w.float().abs() for w in weights]).amax(0)
    if tie is not None:
        act_absmax, w_absmax = tie(act_absmax), tie(w_absmax)
    s = act_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def static_scale(x, observer: str, weights: list[torch.Tensor] | None = None) -> torch.Tensor:
    """One fp32 scale [1] for x [..., K] (or an ActivationSample of it) by the named observer (see module doc)."""
    sample = _sample(x)
    amax = sample.channel_absmax().max().clamp(min=1e-8)
    if observer == "minmax":
        return (amax / 127).reshape(1)
    if observer == "percentile":
        # The k-th largest |x|, k for the fraction above the percentile (topk: torch.quantile
        # refuses more than 2^24 elements).
        k = max(1, int(round(sample.numel() * (1 - PERCENTILE / 100))))
        return (sample.largest_abs(k)[-1].clamp(min=1e-8) / 127).reshape(1)
    if observer == "mse":
        if not weights:
            raise ValueError("the mse observer needs the weights that read x")
        w = torch.cat([t.float() for t in weights])
        rows = sample.rows()
        ref = rows @ w.t()
        scales = [(amax * c / 127).reshape(1) for c in torch.linspace(1.0, 0.1, 19).tolist()]
        errors = sample.total(torch.tensor([((fake_quantize_activations(rows, scale) @ w.t() - ref) ** 2).sum().item()
                                            for scale in scales], dtype=torch.float64))
        return scales[int(torch.argmin(errors))]  # the first of equal errors: the least clipping
    raise ValueError(f"unknown observer {observer!r}")


@dataclass
class SmoothResult:
    """scales: [K] fp32, or None when no smoothing scored best; alpha: the chosen
    strength (None: off); error / plain_error: squared W8A8 output error on the
    sampled rows with the chosen factors / with none."""

    scales: torch.Tensor | None
    alpha: float | None
    error: float
    plain_error: float


@torch.no_grad()
def w8a8_output_error(rows: torch.Tensor, weights: torch.Tensor, ref: torch.Tensor, s: torch.Tensor | None,
                      static: bool, act_absmax: torch.Tensor) -> float:
    """||q(x / s) q(W s)^T - x W^T||^2 on rows [n, K] for stacked weights [N, K]."""
    if s is None:
        xs, ws, amax = rows, weights, act_absmax.max()
    else:
        xs, ws, amax = rows / s, weights * s, (act_absmax / s).max()
    input_scale = (amax.clamp(min=1e-8) / 127).reshape(1) if static else None
    return w8a8_product(xs, ws, input_scale).sub_(ref).square_().sum().item()


@torch.no_grad()
def search_smoothing(x, weights: list[torch.Tensor], *, static: bool,
                     alphas: list[float] | None = None, tie=None) -> SmoothResult:
    """The alpha (or no smoothing) minimising the W8A8 output error of linears reading x.

    x: the inputs [..., K], or an ActivationSample of them (every row sets the
    channel maxima; SEARCH_ROWS rows are scored). Static activations are scored
    with a min-max per-tensor scale of the smoothed inputs; dynamic ones per
    row. tie: as for smoothing_factors.
    """
    sample = _sample(x)
    alphas = [i / 10 for i in range(11)] if alphas is None else alphas
    act_absmax = sample.channel_absmax()
    rows = sample.rows()
    w = torch.cat([t.float() for t in weights])
    ref = rows @ w.t()
    candidates = [None] + [smoothing_factors(act_absmax, weights, a, tie) for a in alphas]
    errors = sample.total(torch.tensor([w8a8_output_error(rows, w, ref, s, static, act_absmax) for s in candidates],
                                       dtype=torch.float64))
    best = int(torch.argmin(errors))  # the first of equal errors: no smoothing, then the weakest
    return SmoothResult(scales=candidates[best], alpha=None if best == 0 else alphas[best - 1],
                        error=errors[best].item(), plain_error=errors[0].item())
