"""Pure-torch dequantization and act-order re-layout of the native packed layout (kernels/layout.py).

Used by the CPU path (at load), by `dequant_matmul` on devices where no
Triton kernel runs, and by callers that re-lay out an act-order layer once
(`reorder_act_order`). Works on any device; no triton import.
"""

from __future__ import annotations

import torch

from .layout import codes_per_word, group_index, group_width, pack_rows, unpack_qweight, unpack_qzeros


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *, bits: int,
               group_size: int, g_idx: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense weight [N, K] in `dtype` (computed in fp32): w[n, k] = (q - z[g(k), n]) * s[g(k), n].

    group_size -1 means one group per row (K). Inputs as in the checkpoint:
    qweight int32 [K*b/32, N], qzeros int32 [G, N*b/32], scales float [G, N],
    g_idx int [K] or None.
    """
    codes = unpack_qweight(qweight, bits)  # [K, N]
    k = codes.shape[0]
    g = group_index(k, group_size, g_idx, qweight.device)
    zeros = unpack_qzeros(qzeros, bits).float()[g]  # [K, N]
    w = (codes.float() - zeros) * scales.float()[g]
    return w.t().contiguous().to(dtype)


def sort_by_group(g_idx: torch.Tensor | None, k: int, group_size: int) -> tuple[bool, torch.Tensor | None]:
    """(fits, perm) for an act-order layer: perm (int64 [K]) sorts the inputs by group.

    fits: after sorting, group j is exactly inputs j*group_size .. (j+1)*group_size - 1,
    as GPTQ's act-order writes it; then the layer computes like a plain grouped
    layer on x[..., perm]. perm is None when g_idx is None or already in order.
    """
    if g_idx is None:
        return True, None
    g = g_idx.long()
    expected = torch.arange(k, device=g.device) // group_size
    if torch.equal(g, expected):
        return True, None
    perm = torch.argsort(g, stable=True)
    return torch.equal(g[perm], expected), perm


def reorder_act_order(qweight: torch.Tensor, g_idx: torch.Tensor | None, *, bits: int,
                      group_size: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Re-layout an act-order layer once so the kernels need no g_idx.

    Returns (qweight_sorted, perm): qweight with its input rows in group order
    and perm (int64 [K]) such that

        dequant_matmul(x, qweight, qzeros, scales, g_idx=g_idx, ...)
        == dequant_matmul(x[..., perm], qweight_sorted, qzeros, scales, g_idx=None, ...)

    (qzeros and scales are unchanged). perm is None when g_idx is None or in
    order. Returns None when the groups are not full contiguous runs once
    sorted (see `sort_by_group`): such a layer keeps its g_idx.
    """
    k = qweight.shape[0] * codes_per_word(bits)
    fits, perm = sort_by_group(g_idx, k, group_width(group_size, k))
    if not fits:
        return None
    if perm is None:
        return qweight, None
    return pack_rows(unpack_qweight(qweight, bits)[perm], bits), perm
