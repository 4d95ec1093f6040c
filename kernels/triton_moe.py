"""Grouped dequantize-matmul for mixture-of-experts: every expert of a layer in one launch.

Imported lazily by `llmq.kernels.moe` (this module imports triton at the top).
Experts' weights are stacked in the native packed layout, one slice per
expert (E experts, K inputs, N outputs, b bits, P = 32 / b, G groups):

    qweight int32 [E, K/P, N]    qzeros int32 [E, G, N/P]    scales float [E, G, N]

The rows of x are visited in expert order: `slots` lists, expert after
expert, the row of x each output slot reads (tokens sorted by expert, as
transformers' grouped_mm forward sorts them). The host cuts each expert's
run of slots into tiles of BLOCK_M rows (`block_expert`, `block_start`,
`block_end`); one program computes one tile x BLOCK_N columns against its
expert's weights, dequantized tile by tile in registers (`_dequant_tile` of
the linear kernels). A decode step (a few tokens, so one short tile per
routed expert) uses BLOCK_M = 16, the smallest tl.dot tile; larger batches
use 64. Experts without tokens cost nothing: they own no tile.

Output: [S, N] in slot order (S = number of slots), in x's dtype, fp32
accumulation. No act-order (g_idx) here: QuantExperts uses this kernel only
for experts without one.

W8A8 experts (`grouped_int8_matmul`) run the same tiles through int8 x int8
`tl.dot` into int32, with the scales in the epilogue as in `triton_int8`:

    weight int8 [E, N, K]    weight_scale fp32 [E, N]    input_scale fp32 [E] (static) or None

Dynamic activations are quantized once per token, before the launch
(`triton_int8.quantize_rows`: a token's scale does not depend on the expert);
static ones with each expert's own scale, inside the tile loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_int8 import _quantize_code, quantize_rows
from .triton_qmm import _dequant_tile
from .triton_tuning import INTERPRET


@triton.jit
def _tile(slots_ptr, block_expert_ptr, block_start_ptr, block_end_ptr, N, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr):
    """This program's tile: (its expert, its slots and their mask, the rows of x they read, its output
    columns and their mask)."""
    e = tl.load(block_expert_ptr + tl.program_id(0)).to(tl.int64)
    start = tl.load(block_start_ptr + tl.program_id(0))
    end = tl.load(block_end_ptr + tl.program_id(0))
    offs_s = start + tl.arange(0, BLOCK_M)
    s_mask = offs_s < end
    rows = tl.load(slots_ptr + offs_s, mask=s_mask, other=0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return e, offs_s, s_mask, rows, offs_n, offs_n < N


@triton.jit
def _grouped_qmm_kernel(x_ptr, slots_ptr, block_expert_ptr, block_start_ptr, block_end_ptr,
                        qw_ptr, qz_ptr, s_ptr, bias_ptr, out_ptr, N, K, stride_xm,
                        BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                        UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    e, offs_s, s_mask, rows, offs_n, n_mask = _tile(slots_ptr, block_expert_ptr, block_start_ptr, block_end_ptr, N,
                                                    BLOCK_M, BLOCK_N)
    PER: tl.constexpr = 32 // BITS
    groups = K // GROUP_SIZE
    qw_e = qw_ptr + e * (K // PER) * N
    qz_e = qz_ptr + e * groups * (N // PER)
    sc_e = s_ptr + e * groups * N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                    mask=s_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        w = _dequant_tile(qw_e, qz_e, sc_e, qw_e, k0, offs_k, offs_n, K, N,
                          BITS, GROUP_SIZE, False, BLOCK_K, BLOCK_N)
        w = w.to(x.dtype)
        if UPCAST_DOT:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    if HAS_BIAS:
        b = tl.load(bias_ptr + e * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += b[None, :]
    out_ptrs = out_ptr + offs_s[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=s_mask[:, None] & n_mask[None, :])


@triton.jit
def _grouped_int8_kernel(x_ptr, xs_ptr, slots_ptr, block_expert_ptr, block_start_ptr, block_end_ptr,
                         w_ptr, ws_ptr, bias_ptr, out_ptr, N, K, stride_xm,
                         STATIC: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[s] = (q(x[slots[s]]) @ W_e^T) * s_x * s_w[e] (+ bias[e]). x: int8 codes of every token
    (dynamic, xs their scales [T]) or the float tokens (static, xs the experts' scales [E])."""
    e, offs_s, s_mask, rows, offs_n, n_mask = _tile(slots_ptr, block_expert_ptr, block_start_ptr, block_end_ptr, N,
                                                    BLOCK_M, BLOCK_N)
    if STATIC:
        xs = tl.load(xs_ptr + e + tl.zeros((BLOCK_M,), dtype=tl.int64))
    else:
        xs = tl.load(xs_ptr + rows, mask=s_mask, other=1.0)
    w_e = w_ptr + e * N * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
        x_mask = s_mask[:, None] & k_mask[None, :]
        if STATIC:
            q = _quantize_code(tl.load(x_ptrs, mask=x_mask, other=0.0).to(tl.float32), xs[:, None])
        else:
            q = tl.load(x_ptrs, mask=x_mask, other=0)
        w = tl.load(w_e + offs_n[None, :] * K + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc = tl.dot(q, w, acc, out_dtype=tl.int32)
    ws = tl.load(ws_ptr + e * N + offs_n, mask=n_mask, other=0.0)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + e * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y += b[None, :]
    out_ptrs = out_ptr + offs_s[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=s_mask[:, None] & n_mask[None, :])


# Rows per tile: a decode step gives each routed expert a handful of rows.
DECODE_BLOCK_M = 16
PREFILL_BLOCK_M = 64


def tiles(counts: list[int], block_m: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert, first slot, end slot) of each tile over per-expert slot counts."""
    expert, start, end = [], [], []
    offset = 0
    for e, c in enumerate(counts):
        for s in range(offset, offset + c, block_m):
            expert.append(e)
            start.append(s)
            end.append(min(s + block_m, offset + c))
        offset += c
    as_tensor = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    return as_tensor(expert), as_tensor(start), as_tensor(end)


def _plan(x: torch.Tensor, slots: torch.Tensor, counts: list[int], n: int):
    """(rows per tile, the tiles, the output [S, N]) of a grouped launch: a decode step's few tokens per
    expert take the smallest tl.dot tile."""
    block_m = DECODE_BLOCK_M if max(counts, default=0) <= DECODE_BLOCK_M else PREFILL_BLOCK_M
    return block_m, tiles(counts, block_m, x.device), torch.empty(slots.numel(), n, dtype=x.dtype, device=x.device)


def grouped_dequant_matmul(x: torch.Tensor, slots: torch.Tensor, counts: list[int], qweight: torch.Tensor,
                           qzeros: torch.Tensor, scales: torch.Tensor, *, bits: int, group_size: int,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """out[s] = x[slots[s]] @ dequant(W_e)^T (+ bias_e) for the expert e owning slot s (see module doc)."""
    e, k_words, n = qweight.shape
    k = k_words * (32 // bits)
    block_m, (block_expert, block_start, block_end), out = _plan(x, slots, counts, n)
    if block_expert.numel() == 0:
        return out
    x = x.contiguous()
    launch = packed_launch(group_size, x.dtype)
    grid = (block_expert.numel(), triton.cdiv(n, launch["BLOCK_N"]))
    _grouped_qmm_kernel[grid](
        x, slots.to(torch.int32).contiguous(), block_expert, block_start, block_end,
        qweight.contiguous(), qzeros.contiguous(), scales.contiguous(),
        bias.contiguous() if bias is not None else scales, out, n, k, x.stride(0),
        BITS=bits, GROUP_SIZE=group_size, HAS_BIAS=bias is not None,
        UPCAST_DOT=INTERPRET or x.dtype == torch.float32, BLOCK_M=block_m, **launch)
    return out


def packed_launch(group_size: int, dtype: torch.dtype) -> dict:
    """BLOCK_N, BLOCK_K and num_warps of a grouped dequantize-matmul launch. fp32 activations multiply
    in fp32 without tensor cores, whose tiles take more registers: ptxas (sm_90) spills kilobytes at
    the K tiles of fp16/bf16, and next to nothing at 32-wide tiles over 8 warps
    (scripts/compile_kernels.py compiles both)."""
    aligned = max(32, min(128, group_size)) if group_size % 32 == 0 else 32  # K tiles aligned with the groups
    if INTERPRET:
        return dict(BLOCK_N=32, BLOCK_K=aligned, num_warps=4)
    if dtype == torch.float32:
        return dict(BLOCK_N=64, BLOCK_K=32, num_warps=8)
    return dict(BLOCK_N=64, BLOCK_K=aligned, num_warps=4)


def grouped_int8_matmul(x: torch.Tensor, slots: torch.Tensor, counts: list[int], weight: torch.Tensor,
                        weight_scale: torch.Tensor, input_scale: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """out[s] = q(x[slots[s]]) @ W_e^T * s_x * s_w[e] (+ bias[e]) for the expert e owning slot s (module doc)."""
    n, k = weight.shape[1], weight.shape[2]
    block_m, (block_expert, block_start, block_end), out = _plan(x, slots, counts, n)
    if block_expert.numel() == 0:
        return out
    x = x.contiguous()
    if input_scale is None:
        xq, xs = quantize_rows(x, None)  # every token once: its codes serve each expert it is routed to
    else:
        xq, xs = x, input_scale.float().contiguous()
    launch = int8_launch(block_m)
    grid = (block_expert.numel(), triton.cdiv(n, launch["BLOCK_N"]))
    _grouped_int8_kernel[grid](
        xq, xs, slots.to(torch.int32).contiguous(), block_expert, block_start, block_end,
        weight.contiguous(), weight_scale.float().contiguous(),
        bias.float().contiguous() if bias is not None else weight_scale, out, n, k, xq.stride(0),
        STATIC=input_scale is not None, HAS_BIAS=bias is not None, BLOCK_M=block_m, **launch)
    return out


def int8_launch(block_m: int) -> dict:
    """BLOCK_N, BLOCK_K and num_warps of a grouped int8 launch of block_m rows per tile. Gathering the
    rows of x takes registers: ptxas (sm_90) spills with K tiles of 128, or with 4 warps at 64 rows,
    and not at these (scripts/compile_kernels.py compiles them)."""
    if INTERPRET:
        return dict(BLOCK_N=32, BLOCK_K=32, num_warps=4)
    return dict(BLOCK_N=64, BLOCK_K=64, num_warps=4 if block_m <= DECODE_BLOCK_M else 8)
