"""Grouped matmuls over the experts of an MoE block, int4/int8 weight-only or W8A8 (see triton_moe for the kernels).

Importing this module needs neither triton nor a GPU: triton is imported on the first call.
"""

from __future__ import annotations

import torch


def grouped_dequant_matmul(x: torch.Tensor, slots: torch.Tensor, counts: list[int], qweight: torch.Tensor,
                           qzeros: torch.Tensor, scales: torch.Tensor, *, bits: int, group_size: int,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """out[s] = x[slots[s]] @ dequant(W_e)^T (+ bias[e]) for the expert e owning slot s.

    Args (E experts, K inputs, N outputs, P = 32 / bits, G = K / group_size):
        x: [T, K] rows; slots: [S] the row of x each slot reads, expert after expert;
        counts: slots per expert (sum S); qweight int32 [E, K/P, N]; qzeros int32 [E, G, N/P];
        scales [E, G, N] in x's dtype; bias [E, N] or None.

    Returns [S, N] in x's dtype. Triton (CUDA, or CPU tensors under TRITON_INTERPRET=1).
    """
    if len(counts) != qweight.shape[0] or sum(counts) != slots.numel():
        raise ValueError(f"counts {counts} do not match {qweight.shape[0]} experts and {slots.numel()} slots")
    from .triton_moe import grouped_dequant_matmul as run

    k = qweight.shape[1] * (32 // bits)
    return run(x, slots, counts, qweight, qzeros, scales, bits=bits, group_size=k if group_size == -1 else group_size,
               bias=bias)


def grouped_int8_matmul(x: torch.Tensor, slots: torch.Tensor, counts: list[int], weight: torch.Tensor,
                        weight_scale: torch.Tensor, input_scale: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """out[s] = q(x[slots[s]]) @ W_e^T * s_x * s_w[e] (+ bias[e]) for the expert e owning slot s: W8A8 experts.

    Args (E experts, K inputs, N outputs): x [T, K] float rows; slots and counts as for
        grouped_dequant_matmul; weight int8 [E, N, K]; weight_scale fp32 [E, N]; input_scale
        fp32 [E] (static activations, one scale per expert) or None (per-token scales); bias [E, N] or None.

    Returns [S, N] in x's dtype: the codes and int32 products of int8_linear, expert by expert.
    Triton (CUDA, or CPU tensors under TRITON_INTERPRET=1).
    """
    if len(counts) != weight.shape[0] or sum(counts) != slots.numel():
        raise ValueError(f"counts {counts} do not match {weight.shape[0]} experts and {slots.numel()} slots")
    from .triton_moe import grouped_int8_matmul as run

    return run(x, slots, counts, weight, weight_scale, input_scale, bias)
