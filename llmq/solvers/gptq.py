"""GPTQ: quantize a linear layer column by column, feeding each column's error forward.

Pure tensor code; knows nothing of models. Shapes: weight W is [N, K] (nn.Linear
layout, N outputs, K inputs); the Hessian H = 2/n sum_x x x^T is [K, K] fp32.

Algorithm (Frantar et al., the IST-DASLab reference), with these choices:

- Dead inputs (H[i, i] == 0, the input was always zero): H[i, i] = 1 and
  W[:, i] = 0, so the factorisation works and the column quantizes to zero.
- Damping: lambda = damp * mean(diag H) is added to the diagonal. If the
  Cholesky factorisation (of H, then of H^-1) fails, damp is raised x10 and
  tried again (a few times); the damp used is reported in GPTQStats.
- Act-order (desc_act): columns are processed by decreasing H[i, i], then the
  codes are put back in the original input order. Without static groups, a
  group is formed by group_size consecutive columns in processing order, so
  g_idx[k] = (position of k in that order) // group_size (as GPTQModel and
  AutoGPTQ do). With static groups every group's (scale, zero) is computed up
  front from the original weight, so g_idx[k] = k // group_size.
- Without static groups a group's (scale, zero) comes from the current,
  error-updated weights when the group starts. This includes the updates made
  earlier in the same block (the reference reads the block's stale copy there);
  blocks are cut so a group that starts inside a block also ends in it, which
  keeps those weights current.
- Blocked lazy updates: inside a block of `block_size` columns, each column
  updates the rest of the block (one rank-1 update); the rest of the matrix gets
  the block's error in one matmul.
- qparams are llmq.solvers.rtn.find_qparams and codes are rtn.quantize's
  (computed as the signed code q - z, the same numbers), so the dequantized
  weight is bit for bit what QuantizedWeight.dequantize() returns, and with
  H = I (no damping) the result is exactly round-to-nearest.
- The inner column loop is inherent to GPTQ; it does five small tensor
  operations per column and never reads a value back to the host.

Work is done on W transposed ([K, N], one contiguous row per input column),
so the inner loop touches contiguous memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..errors import LlmqError
from ..qweight import QuantizedWeight
from .rtn import find_qparams, search_qparams

__all__ = ["HessianAccumulator", "GPTQStats", "gptq_quantize", "gptq_quantize_many"]

# Damping escalation: damp, 10 damp, 100 damp ... at most this many tries.
_DAMP_TRIES = 6
# A failed factorisation with damp == 0 restarts from this fraction.
_DAMP_FLOOR = 1e-4


# H = x^T x is symmetric: each band of its rows multiplies only from the diagonal rightwards, and
# the part left of the diagonal is copied from the bands above, about (1 + 1/bands) / 2 of the
# full product's arithmetic (BENCHMARKS.md: "The Hessian by bands of rows"). Bands narrower than
# _MIN_BAND rows cost more in smaller products than they save.
_MAX_BANDS = 8
_MIN_BAND = 128


def _band_edges(k: int) -> list[int]:
    bands = min(_MAX_BANDS, max(1, k // _MIN_BAND))
    return [k * i // bands for i in range(bands + 1)]


class HessianAccumulator:
    """H = 2/n * sum x x^T over all rows seen, kept as a running mean in fp32.

    Args:
        in_features: K, the last dimension of the inputs.
        device: where H lives; None takes the device of the first batch.
        input_dtype: None multiplies in fp32. torch.bfloat16 casts x to bf16 and
            multiplies in bf16: on CUDA with fp32 output and accumulation
            (torch.addmm(..., out_dtype=torch.float32)); on other devices the
            bf16 matmul accumulates in fp32 internally but returns bf16, so
            each batch's product is rounded to bf16 (relative 2^-9) before it
            joins the fp32 running mean.
    """

    def __init__(self, in_features: int, device=None, input_dtype: torch.dtype | None = None):
        if input_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise LlmqError(f"HessianAccumulator input_dtype {input_dtype} is not supported; "
                            "use None (fp32), torch.bfloat16 or torch.float16")
        self.in_features = in_features
        self.input_dtype = None if input_dtype == torch.float32 else input_dtype
        self.nsamples = 0
        self._H = None if device is None else torch.zeros(in_features, in_features,
                                                          dtype=torch.float32, device=device)
        self._out_dtype_ok = True  # cleared once if this torch build lacks addmm(out_dtype=)

    @property
    def hessian(self) -> torch.Tensor:
        """[K, K] fp32 (zeros before any batch)."""
        if self._H is None:
            self._H = torch.zeros(self.in_features, self.in_features, dtype=torch.float32)
        return self._H

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Add the rows of x [..., K] (any float dtype) to the running mean."""
        k = self.in_features
        if x.shape[-1] != k:
            raise LlmqError(f"Hessian expects inputs with {k} features, got shape {tuple(x.shape)}")
        x = x.reshape(-1, k)
        n = x.shape[0]
        if n == 0:
            return
        if self._H is None:
            self._H = torch.zeros(k, k, dtype=torch.float32, device=x.device)
        H = self._H
        x = x.to(device=H.device, dtype=self.input_dtype or torch.float32)
        total = self.nsamples + n
        # Running mean: H <- H * old/total + 2/total * x^T x, band by band of rows.
        beta, alpha = self.nsamples / total, 2.0 / total
        self.nsamples = total
        edges = _band_edges(k)
        for a, b in zip(edges, edges[1:]):
            self._add_product(H[a:b, a:], x[:, a:b], x[:, a:], beta, alpha)
            if b < k:
                H[b:, a:b].copy_(H[a:b, b:].t())

    def _add_product(self, out, left, right, beta, alpha) -> None:
        """out <- beta * out + alpha * left^T right, into fp32 out."""
        if left.dtype == torch.float32:
            out.addmm_(left.t(), right, beta=beta, alpha=alpha)
        elif out.device.type == "cuda" and self._out_dtype_ok:
            try:
                torch.addmm(out, left.t(), right, beta=beta, alpha=alpha, out_dtype=torch.float32, out=out)
            except (RuntimeError, TypeError):
                self._out_dtype_ok = False
                out.addmm_(left.t().float(), right.float(), beta=beta, alpha=alpha)
        else:
            out.mul_(beta).add_(torch.mm(left.t(), right), alpha=alpha)


@dataclass
class GPTQStats:
    """What one GPTQ solve did.

    damp: fraction of mean(diag H) actually added to the diagonal.
    damp_raised: True when the requested damp failed to factorise and was raised.
    proxy_loss: the reference's loss, sum over weights of (w - q)^2 / d^2 / 2
        (d the diagonal of the Cholesky factor of H^-1).
    output_mse: tr((W - Q) H (W - Q)^T) / (2 N); with H = 2/n X^T X this is the
        mean squared output error ||X W^T - X Q^T||^2 / (n N) on the calibration rows.
    dead_columns: inputs whose H diagonal was zero (weights zeroed).
    seconds: wall time of the solve (shared by all weights of gptq_quantize_many).
    """

    damp: float
    damp_raised: bool
    proxy_loss: float
    output_mse: float
    dead_columns: int
    seconds: float


# Rows (or elements) copied at a time where a large matrix is permuted, reversed
# or rescaled in place: temporaries stay near 16 MiB whatever the matrix size.
_CHUNK_ELEMENTS = 1 << 22


def _row_chunks(rows: int, width: int):
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    for r0 in range(0, rows, step):
        yield r0, min(r0 + step, rows)


def _reverse_storage(A: torch.Tensor) -> torch.Tensor:
    """A.flip(0, 1) computed in place, for a dense 2-D tensor: turning a matrix by
    half a turn reverses its storage, whatever its strides. Returns A."""
    flat = A.as_strided((A.numel(),), (1,))
    n = flat.numel()
    half = n // 2
    for a, b in _row_chunks(half, 1):
        lo = flat[a:b].clone()
        flat[a:b] = flat[n - b:n - a].flip(0)
        flat[n - b:n - a] = lo.flip(0)
    return A


def _damp_ready(H: torch.Tensor, dead: torch.Tensor, perm: torch.Tensor | None):
    """(Hflip, mean of the diagonal): H with dead inputs' diagonal set to 1, put in
    `perm` order, and turned by half a turn (the order _factor_hessian factorises
    in), as a new matrix built without other full-size temporaries; the mean is
    taken before the turn, as the diagonal of the permuted matrix (the order of a
    float sum matters, and these are the numbers every earlier release produced)."""
    if perm is None:
        Hp = H.clone()
        torch.diagonal(Hp)[dead] = 1.0
    else:
        k = H.shape[0]
        Hp = torch.empty(k, k, dtype=H.dtype, device=H.device)
        for r0, r1 in _row_chunks(k, k):
            torch.index_select(H.index_select(0, perm[r0:r1]), 1, perm, out=Hp[r0:r1])
        torch.diagonal(Hp)[dead[perm]] = 1.0
    mean_diag = torch.diagonal(Hp).mean()
    return _reverse_storage(Hp), mean_diag


def _factor_hessian(H: torch.Tensor, dead: torch.Tensor, damp: float, perm: torch.Tensor | None):
    """Upper Cholesky factor U of (H + lambda I)^-1 (H^-1 = U^T U), in `perm` order.

    H is the caller's Hessian and is not modified; dead inputs (dead[i]: H[i, i]
    is zero) take a diagonal of 1. The reference computes chol(H), then H^-1,
    then chol(H^-1). With J the order-reversing permutation and J H J = L L^T,
    H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper triangular with a
    positive diagonal, so it is U: one Cholesky and one triangular inverse,
    about 2/3 of the work, and H^-1 is never formed.

    Memory: at most about three K x K matrices besides H (the damped copy and its
    factor, then the factor, the inverse and the solver's workspace); the
    inverse is computed in place of an identity laid out as the solver returns
    it, and turned in place. Returns (U, damp_used, raised, lambda).
    """
    k = H.shape[0]
    frac = damp
    for attempt in range(_DAMP_TRIES):
        Hd, mean_diag = _damp_ready(H, dead, perm)  # rebuilt on a retry: the failed one was damped
        torch.diagonal(Hd).add_(frac * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if int(info) == 0:
            # L^-1 in place of an identity in column-major layout (the layout
            # solve_triangular gives its result: same numbers, no extra copy).
            Linv = torch.empty(k, k, dtype=H.dtype, device=H.device).t()
            Linv.zero_()
            torch.diagonal(Linv).fill_(1.0)
            torch.linalg.solve_triangular(L, Linv, upper=False, out=Linv)
            del L
            return _reverse_storage(Linv), frac, attempt > 0, float(frac * mean_diag)
        del L
        frac = frac * 10 if frac > 0 else _DAMP_FLOOR
    raise LlmqError(f"GPTQ could not factorise the {k}x{k} Hessian even with damp {frac / 10:g}; "
                    "check the calibration inputs for overflow or use more calibration samples")


def _block_end(i1: int, k: int, block_size: int, group_size: int, static: bool) -> int:
    """End of the block that starts at i1.

    A group that starts strictly inside a block must end inside it, so its
    qparams can be read from weights that are already up to date.
    """
    i2 = min(i1 + block_size, k)
    if static:
        return i2
    c = (i1 // group_size + 1) * group_size  # first group start after i1
    while c < i2:
        if c + group_size > i2:
            return c
        c += group_size
    return i2


def _solve(Wt: torch.Tensor, U: torch.Tensor, *, bits: int, sym: bool, scale_dtype: torch.dtype,
           group_size: int, col_group: list[int], static_qparams, block_size: int, qparams=find_qparams):
    """Blocked GPTQ on Wt [K, N] fp32 (spent: it holds Qd on return), columns in processing order.

    U: [K, K] upper Cholesky factor of H^-1 in the same order (spent: divided in place). col_group[i] is
    the group of processing position i. static_qparams: None, or (scale, zero)
    each [G, N] fp32 indexed by group.
    Returns codes [K, N] (float), Qd [K, N] (dequantized), scale [G, N], zero [G, N],
    row_loss [N] (proxy loss per output row).
    """
    k, n = Wt.shape
    maxq = 2**bits - 1
    n_groups = k // group_size
    # Qi holds q - z, the signed code. rtn.quantize is clamp(round(w / s) + z, 0, maxq);
    # since z is an integer and all values are small integers (exact in fp32),
    # clamp(round(w / s), -z, maxq - z) is the same number minus z, bit for bit,
    # in two fewer operations per column. Codes are Qi + z, rebuilt at the end.
    Qi = torch.empty_like(Wt)
    if static_qparams is None:
        scales = torch.empty(n_groups, n, dtype=torch.float32, device=Wt.device)
        zeros = torch.empty_like(scales)
    else:
        scales, zeros = static_qparams
    lo_all, hi_all = -zeros, maxq - zeros  # only read for static groups
    d = torch.diagonal(U).clone()
    # Rows of U divided by their diagonal: the update of column i's error e = w - q
    # is then W[j] -= Us[i, j] * e, the reference's (e / d) * U[i, j]. In place:
    # U is not needed otherwise, and for an 8192-input linear it is 256 MiB.
    Us = U.div_(d.unsqueeze(1))
    E = torch.empty(min(block_size, k), n, dtype=torch.float32, device=Wt.device)
    row_loss = torch.zeros(n, dtype=torch.float32, device=Wt.device)
    w_rows, q_rows, e_rows = Wt.unbind(0), Qi.unbind(0), E.unbind(0)
    cur = -1
    scale = lo = hi = None
    i1 = 0
    while i1 < k:
        i2 = _block_end(i1, k, block_size, group_size, static_qparams is not None)
        Ub = Us[i1:i2, i1:i2]
        for i in range(i1, i2):
            g = col_group[i]
            if g != cur:
                cur = g
                if static_qparams is None:
                    # Rows i..i+group_size are current: either the group lies in
                    # this block, or it starts at the block start (see _block_end).
                    scale, zero = qparams(Wt[i:i + group_size].t(), bits, sym, scale_dtype)
                    scales[g] = scale
                    zeros[g] = zero
                    lo, hi = -zero, maxq - zero
                else:
                    scale, lo, hi = scales[g], lo_all[g], hi_all[g]
            w, q, e = w_rows[i], q_rows[i], e_rows[i - i1]
            torch.div(w, scale, out=q)
            q.round_().clamp_(lo, hi)
            torch.addcmul(w, q, scale, value=-1.0, out=e)  # e = w - (q - z) * s
            if i + 1 < i2:
                # Rank-1 update of the rest of the block. addmm_ with an inner
                # dimension of 1, not addr_: addr_ is many times slower on CPU.
                Wt[i + 1:i2].addmm_(Ub[i - i1, i - i1 + 1:, None], e[None], alpha=-1.0)
        Eb = E[:i2 - i1]
        row_loss += (Eb / d[i1:i2].unsqueeze(1)).square_().sum(0)
        if i2 < k:
            Wt[i2:].addmm_(Us[i1:i2, i2:].t(), Eb, alpha=-1.0)
        i1 = i2
    # Qd = (codes - z) * s, as QuantizedWeight.dequantize computes it, written
    # over Wt (spent), and codes = Qi + z in place, a band of rows at a time so
    # that no [K, N] table of scales or zeros is built.
    grp = torch.tensor(col_group, device=Wt.device)
    Qd = Wt
    for r0, r1 in _row_chunks(k, n):
        g = grp[r0:r1]
        torch.mul(Qi[r0:r1], scales[g], out=Qd[r0:r1])
        Qi[r0:r1].add_(zeros[g])
    return Qi, Qd, scales, zeros, row_loss * 0.5


def _check(weight: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, damp: float,
           block_size: int) -> None:
    if weight.dim() != 2:
        raise LlmqError(f"GPTQ expects a 2-D [N, K] weight, got shape {tuple(weight.shape)}")
    k = weight.shape[1]
    if tuple(H.shape) != (k, k):
        raise LlmqError(f"GPTQ Hessian has shape {tuple(H.shape)}, expected ({k}, {k}) for a weight "
                        f"with {k} input features")
    if not 2 <= bits <= 8:
        raise LlmqError(f"GPTQ supports 2 to 8 bits, got {bits}")
    if group_size <= 0 or k % group_size:
        raise LlmqError(f"group size {group_size} does not divide {k} input features; "
                        f"use a divisor of {k} or -1 for one group per row")
    if damp < 0 or block_size <= 0:
        raise LlmqError(f"GPTQ needs damp >= 0 and block_size > 0 (got {damp}, {block_size})")
    if not bool(torch.isfinite(H).all()):
        raise LlmqError("GPTQ Hessian has inf/nan entries: the calibration activations overflowed; quantize "
                        "with --dtype bfloat16 (float32's range in 16 bits)")


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, *, bits: int, group_size: int, sym: bool,
                  scale_dtype: torch.dtype, damp: float = 0.01, desc_act: bool = False,
                  static_groups: bool = False, block_size: int = 128, clip_search: bool = False
                  ) -> tuple[QuantizedWeight, GPTQStats]:
    """Quantize weight [N, K] with GPTQ given the Hessian H [K, K] of its inputs.

    group_size is already resolved (K for one group per row). H is read, never
    modified (several linears fed the same input may pass the same H; for those
    gptq_quantize_many is faster). Work happens on the weight's device in fp32.
    clip_search: choose each group's range with rtn.search_qparams (a shrink
    search minimising the group's quantization error) instead of min-max.
    Returns the QuantizedWeight (g_idx set when desc_act) and GPTQStats.
    """
    qws, stats = _gptq(weight, [weight.shape[0]], H, bits=bits, group_size=group_size, sym=sym,
                       scale_dtype=scale_dtype, damp=damp, desc_act=desc_act,
                       static_groups=static_groups, block_size=block_size, clip_search=clip_search)
    return qws[0], stats[0]


def gptq_quantize_many(weights: list[torch.Tensor], H: torch.Tensor, **kwargs
                       ) -> list[tuple[QuantizedWeight, GPTQStats]]:
    """GPTQ for several weights [N_i, K] that read the same input (q/k/v, gate/up).

    Output rows do not interact in GPTQ (each row's error feeds forward through
    H alone), so the weights are stacked along N and solved once: one
    factorisation and one column loop instead of one per weight. Same keyword
    arguments as gptq_quantize; the result equals separate calls up to float
    rounding in the block matmuls.
    """
    if not weights:
        return []
    ks = {w.shape[1] for w in weights}
    if len(ks) != 1 or any(w.dim() != 2 for w in weights):
        raise LlmqError("gptq_quantize_many needs 2-D weights with the same number of input features, "
                        f"got shapes {[tuple(w.shape) for w in weights]}")
    qws, stats = _gptq(list(weights), [w.shape[0] for w in weights], H, **kwargs)
    return list(zip(qws, stats))


def _gptq(weight, splits: list[int], H: torch.Tensor, *, bits: int, group_size: int,
          sym: bool, scale_dtype: torch.dtype, damp: float = 0.01, desc_act: bool = False,
          static_groups: bool = False, block_size: int = 128, return_q: bool = False,
          clip_search: bool = False):
    """The solve behind gptq_quantize(_many): weight is one [N, K] tensor whose rows
    are split into results of `splits` rows, or a list of weights (one per split)."""
    parts = list(weight) if isinstance(weight, (list, tuple)) else list(weight.split(splits))
    with torch.no_grad():  # weights may be nn.Parameters; nothing here needs autograd
        return _gptq_impl(parts, splits, H, bits=bits, group_size=group_size, sym=sym,
                          scale_dtype=scale_dtype, damp=damp, desc_act=desc_act,
                          static_groups=static_groups, block_size=block_size, return_q=return_q,
                          qparams=search_qparams if clip_search else find_qparams)


def _stacked_fp32(parts: list[torch.Tensor], device, dead: torch.Tensor, r0: int = 0, r1: int | None = None):
    """Rows r0:r1 of the weights stacked along N, in fp32, dead inputs zeroed (a new tensor)."""
    r1 = sum(p.shape[0] for p in parts) if r1 is None else r1
    out = torch.empty(r1 - r0, parts[0].shape[1], dtype=torch.float32, device=device)
    start = 0
    for p in parts:
        a, b = max(r0, start), min(r1, start + p.shape[0])
        if a < b:
            out[a - r0:b - r0].copy_(p[a - start:b - start])
        start += p.shape[0]
    out[:, dead] = 0.0
    return out


def _gptq_impl(parts, splits, H, *, bits, group_size, sym, scale_dtype, damp, desc_act,
               static_groups, block_size, return_q, qparams):
    """One solve for the stacked rows of `parts`.

    Memory, for weights of N x K stacked rows: the working copy Wt and the codes
    (N x K fp32 each), the factor of H (K x K, see _factor_hessian) and bands of
    rows; the caller's weights and H are read, never copied whole. For an
    8192-input projection H and its factor are 256 MiB each, for q/k/v or
    gate/up the stacked weights dominate.
    """
    t0 = time.perf_counter()
    _check(parts[0], H, bits, group_size, damp, block_size)  # the parts share K (gptq_quantize_many)
    n, k = sum(splits), parts[0].shape[1]
    device = parts[0].device
    H0 = H.to(device=device, dtype=torch.float32)
    diag = torch.diagonal(H0)
    dead = diag == 0
    n_dead = int(dead.sum())

    n_groups = k // group_size
    static_qparams = None
    if static_groups:
        # Every group's qparams from the original weight, natural group order.
        W = _stacked_fp32(parts, device, dead)
        s, z = qparams(W.reshape(n, n_groups, group_size), bits, sym, scale_dtype)
        del W
        static_qparams = (s.t().contiguous(), z.t().contiguous())  # [G, N]

    perm = invperm = None
    if desc_act:
        perm = torch.argsort(torch.where(dead, torch.ones_like(diag), diag), descending=True, stable=True)
        invperm = torch.argsort(perm)
    # Wt [K, N]: one contiguous row per input, in processing order, built a band
    # of inputs at a time from the caller's weights (no full-size temporaries).
    Wt = torch.empty(k, n, dtype=torch.float32, device=device)
    for c0, c1 in _row_chunks(k, n):
        r0 = 0
        for part in parts:
            rows = part[:, c0:c1] if perm is None else part.index_select(1, perm[c0:c1])
            Wt[c0:c1, r0:r0 + part.shape[0]].copy_(rows.t())
            r0 += part.shape[0]
    Wt[dead if perm is None else dead[perm]] = 0.0
    if static_groups and perm is not None:
        col_group = (perm // group_size).tolist()
    else:
        col_group = [i // group_size for i in range(k)]

    U, damp_used, raised, lam = _factor_hessian(H0, dead, damp, perm)
    codes, Qdt, scales, zeros, row_loss = _solve(
        Wt, U, bits=bits, sym=sym, scale_dtype=scale_dtype, group_size=group_size,
        col_group=col_group, static_qparams=static_qparams, block_size=block_size, qparams=qparams)
    del U, Wt  # spent (Qdt is Wt's storage)

    scales = scales.t().to(scale_dtype)  # exact: already rounded through scale_dtype
    zeros = zeros.t().to(torch.int32)
    if desc_act:
        g_idx = (torch.arange(k, device=device) // group_size if static_groups
                 else invperm // group_size).to(torch.int32)
    else:
        g_idx = None

    def original_order(T: torch.Tensor, r0: int, r1: int, dtype=None) -> torch.Tensor:
        """Rows r0:r1 of T.t() ([N, K], inputs in their original order), contiguous."""
        cols = T[:, r0:r1] if invperm is None else T[invperm, r0:r1]
        return cols.t().contiguous() if dtype is None else cols.t().to(dtype, memory_format=torch.contiguous_format)

    # Hessian-weighted output error per row, tr(D H D^T) with D = W - Q. The
    # sequential solve is exact for the damped quadratic, so its proxy loss is
    # tr(D (H + lambda I) D^T) / 2 (dead columns have D = 0): subtracting the
    # damping term gives the undamped error without an N x K x K matmul. When
    # damping dominates that difference cancels badly; then compute it directly.
    # D is formed a band of rows at a time (W: dead columns zeroed, where the
    # caller's H is zero anyway).
    damp_term = torch.empty(n, dtype=torch.float32, device=device)
    for r0, r1 in _row_chunks(n, k):
        D = _stacked_fp32(parts, device, dead, r0, r1).sub_(original_order(Qdt, r0, r1))
        damp_term[r0:r1] = D.square().sum(1)
    damp_term.mul_(0.5 * lam)
    row_out = row_loss - damp_term
    if float(damp_term.sum()) > 0.5 * float(row_loss.sum()):
        D = _stacked_fp32(parts, device, dead).sub_(original_order(Qdt, 0, n))
        row_out = (D @ H0).mul_(D).sum(1).mul_(0.5)
        del D
    seconds = time.perf_counter() - t0

    qws, stats, r0 = [], [], 0
    for rows in splits:
        r1 = r0 + rows
        qws.append(QuantizedWeight(codes=original_order(codes, r0, r1, torch.uint8),
                                   scales=scales[r0:r1].contiguous(), zeros=zeros[r0:r1].contiguous(),
                                   bits=bits, group_size=group_size, g_idx=g_idx))
        stats.append(GPTQStats(damp=damp_used, damp_raised=raised,
                               proxy_loss=float(row_loss[r0:r1].sum()),
                               output_mse=max(float(row_out[r0:r1].sum()), 0.0) / rows,
                               dead_columns=n_dead, seconds=seconds))
        r0 = r1
    if return_q:
        return qws, stats, original_order(Qdt, 0, n)
    return qws, stats
