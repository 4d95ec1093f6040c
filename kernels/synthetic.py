"""Random packed layers with their float64 dense weight, for the kernel benchmark and GPU check scripts.

The dense weight is computed from the integer codes, zero points and scales
(not by unpacking), so it is an independent reference for any kernel.
"""

from __future__ import annotations

import torch

from .layout import group_width, pack_cols, pack_rows


def random_layer(n: int, k: int, bits: int, group_size: int, act_order: bool, dtype: torch.dtype, device):
    """(checkpoint tensors {qweight, qzeros, scales, g_idx}, float64 weight [N, K]) of a random layer.

    Scales are in [0.005, 0.015) (never zero); act_order draws a random g_idx.
    """
    gs = group_width(group_size, k)
    groups = k // gs
    codes = torch.randint(0, 2**bits, (k, n), device=device)
    zeros = torch.randint(0, 2**bits, (groups, n), device=device)
    scales = ((torch.rand(groups, n, device=device) + 0.5) * 0.01).to(dtype)
    if act_order:
        g = torch.argsort(torch.randperm(k, device=device)) // gs
        g_idx = g.to(torch.int32)
    else:
        g = torch.arange(k, device=device) // gs
        g_idx = None
    w64 = ((codes.double() - zeros.double()[g]) * scales.double()[g]).t()  # [N, K]
    layer = dict(qweight=pack_rows(codes, bits), qzeros=pack_cols(zeros, bits), scales=scales, g_idx=g_idx)
    return layer, w64
