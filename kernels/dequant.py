"""Pure-torch unpacking, dequantization and act-order re-layout of the native packed layout.

Used by the CPU path (at load), by `dequant_matmul` on devices where no
Triton kernel runs, and by callers that re-lay out an act-order layer once
(`reorder_act_order`). Works on any device; no triton import.
"""

from __future__ import annotations

import torch

from ..formats.packing import pack_rows


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [K*b/32, N] -> uint8 [K, N] codes (input k = row k // P, offset b*(k % P))."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, device=qweight.device, dtype=torch.int32).view(1, per, 1)
    codes = (qweight.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1, qweight.shape[1]).to(torch.uint8)


def unpack_qzeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [G, N*b/32] -> uint8 [G, N] zero points (column n = word n // P, offset b*(n % P))."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, device=qzeros.device, dtype=torch.int32).view(1, 1, per)
    zeros = (qzeros.unsqueeze(2) >> shifts) & ((1 << bits) - 1)
    return zeros.reshape(qzeros.shape[0], -1).to(torch.uint8)


def group_index(k: int, group_size: int, g_idx: torch.Tensor | None, device) -> torch.Tensor:
    """int64 [K]: the group of each input feature."""
    if g_idx is not None:
        return g_idx.to(device=device, dtype=torch.long)
    return torch.arange(k, device=device) // group_size


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
    gs = k if group_size == -1 else group_size
    g = group_index(k, gs, g_idx, qweight.device)
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
    k = qweight.shape[0] * (32 // bits)
    fits, perm = sort_by_group(g_idx, k, k if group_size == -1 else group_size)
    if not fits:
        return None
    if perm is None:
        return qweight, None
    return pack_rows(unpack_qweight(qweight, bits)[perm], bits), perm
