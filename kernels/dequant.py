"""Pure-torch unpacking and dequantization of the native packed layout.

Used by the CPU path (at load) and by `dequant_matmul` on devices where no
Triton kernel runs. Works on any device; no triton import.
"""

from __future__ import annotations

import torch


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
