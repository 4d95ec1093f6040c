"""Triton dequantize-matmul kernels on the native packed layout.

Imported lazily by `llmq.kernels.api` (this module imports triton at the top).
Layout (K = in_features, N = out_features, G = groups, b = bits, P = 32 / b):

    qweight int32 [K/P, N]   input k in row k // P at bit offset b * (k % P)
    qzeros  int32 [G, N/P]   zero point of column n in word n // P, offset b * (n % P)
    scales  float [G, N]
    g_idx   int   [K]        group of each input feature (act-order only)

One kernel body (`_qmm_kernel`) computes out = x @ dequant(W) (+ bias) for a
tile of rows and columns. It serves two dispatch paths:

- split-K (decode, small M): a grid of (row/column tiles) x SPLIT_K programs,
  each covering every SPLIT_K-th K tile, so a 1-row matmul still fills every SM.
  Programs add their partial sums with fp32 atomics into a zeroed fp32 buffer.
- tiled GEMM (medium M): SPLIT_K = 1, each program owns its output tile and
  stores it in the output dtype.

`_qgemv_kernel` is a third, forced-only path for M = 1 ("gemv"): elementwise
products reduced over K, no tl.dot, split-K atomics as above.

`_dequant_kernel` writes the dense [K, N] weight for the large-M path
(dequantize + cuBLAS).

Given g_idx (act-order), a tile gathers each input's scale and zero point
(x is not permuted): the checkpoint tensors are used as stored. QuantLinear
avoids that path where it can by sorting the layer's rows by group once
(`reorder_act_order`) and permuting x instead.

Each K tile loads its packed words once, [BLOCK_K*b/32, BLOCK_N], and unpacks
them in registers; a tile that holds several whole groups loads one row of
scales and zeros per group.

Autotuning (triton_tuning): on CUDA each path is autotuned, keyed on the M
bucket, N, K and the quantization constants; under TRITON_INTERPRET=1 one fixed
config per path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_tuning import INTERPRET, gemv_grid, grouped_tile, m_bucket, tile_grid, tuned_gemv, tuned_paths


@triton.jit
def _dequant_tile(qw_ptr, qz_ptr, s_ptr, gidx_ptr, k0, offs_k, offs_n, K, N,
                  BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ACT_ORDER: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 [BLOCK_K, BLOCK_N] tile of (q - z) * s; zero outside K x N."""
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    k_mask = offs_k < K
    n_mask = offs_n < N
    kn_mask = k_mask[:, None] & n_mask[None, :]
    words_per_row = N // PER

    # Each packed word is loaded once and unpacked in registers: row r of the
    # [BLOCK_K / PER, BLOCK_N] word tile holds inputs r * PER .. r * PER + PER - 1.
    offs_w = k0 // PER + tl.arange(0, BLOCK_K // PER)
    qw = tl.load(qw_ptr + offs_w[:, None] * N + offs_n[None, :],
                 mask=(offs_w < K // PER)[:, None] & n_mask[None, :], other=0)
    shifts = tl.arange(0, PER) * BITS
    # Arithmetic shift of a negative word leaves sign bits on top; the mask drops them.
    q = tl.reshape((qw[:, None, :] >> shifts[None, :, None]) & MASK, (BLOCK_K, BLOCK_N))
    zshift = (offs_n % PER) * BITS
    zcol = offs_n // PER
    if ACT_ORDER:
        g = tl.load(gidx_ptr + offs_k, mask=k_mask, other=0).to(tl.int32)
        zw = tl.load(qz_ptr + g[:, None] * words_per_row + zcol[None, :], mask=kn_mask, other=0)
        z = (zw >> zshift[None, :]) & MASK
        s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=kn_mask, other=0.0).to(tl.float32)
    elif GROUP_SIZE % BLOCK_K == 0:
        # k0 is a multiple of BLOCK_K, so the whole tile lies in one group.
        g = k0 // GROUP_SIZE
        zw = tl.load(qz_ptr + g * words_per_row + zcol, mask=n_mask, other=0)
        z = ((zw >> zshift) & MASK)[None, :]
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    elif BLOCK_K % GROUP_SIZE == 0:
        # The tile holds BLOCK_K / GROUP_SIZE whole groups: one row of zeros and
        # scales per group, broadcast over the group's inputs.
        GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE
        offs_g = k0 // GROUP_SIZE + tl.arange(0, GROUPS)
        gn_mask = (offs_g < K // GROUP_SIZE)[:, None] & n_mask[None, :]
        zw = tl.load(qz_ptr + offs_g[:, None] * words_per_row + zcol[None, :], mask=gn_mask, other=0)
        z = (zw >> zshift[None, :]) & MASK
        s = tl.load(s_ptr + offs_g[:, None] * N + offs_n[None, :], mask=gn_mask, other=0.0).to(tl.float32)
        # Broadcast over [GROUPS, GROUP_SIZE, BLOCK_N]; the reshapes keep row-major order.
        z = tl.reshape(tl.broadcast_to(z[:, None, :], (GROUPS, GROUP_SIZE, BLOCK_N)), (BLOCK_K, BLOCK_N))
        s = tl.reshape(tl.broadcast_to(s[:, None, :], (GROUPS, GROUP_SIZE, BLOCK_N)), (BLOCK_K, BLOCK_N))
    else:
        # Group size not a power of two: look up each input's group.
        g = offs_k // GROUP_SIZE
        zw = tl.load(qz_ptr + g[:, None] * words_per_row + zcol[None, :], mask=kn_mask, other=0)
        z = (zw >> zshift[None, :]) & MASK
        s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=kn_mask, other=0.0).to(tl.float32)
    return (q - z).to(tl.float32) * s


@triton.jit
def _qmm_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, gidx_ptr, bias_ptr, out_ptr,
                M, N, K, stride_xm, stride_xk, M_BUCKET,
                BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ACT_ORDER: tl.constexpr,
                HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out[M, N] (+)= x[M, K] @ dequant(W)[K, N] (+ bias); out is contiguous.

    ATOMIC: out is a zeroed fp32 buffer and each of the SPLIT_K programs of a
    tile atomically adds its partial sum (bias added by the first split only).
    Otherwise (SPLIT_K must be 1) the tile is stored in out's dtype.
    M_BUCKET is unused by the body: it is the autotune key for M.
    UPCAST_DOT runs the dot in fp32 on operands already rounded to x's dtype:
    the interpreter's tl.dot mis-reads bf16 operands (triton 3.x).
    """
    tl.static_assert(ATOMIC or SPLIT_K == 1)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, gidx_ptr, k0, offs_k, offs_n, K, N,
                          BITS, GROUP_SIZE, ACT_ORDER, BLOCK_K, BLOCK_N)
        w = w.to(x.dtype)
        if UPCAST_DOT:
            # bf16 products are exact in fp32, so this equals the bf16 dot.
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, 1.0, 0.0) * b[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=out_mask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dequant_kernel(qw_ptr, qz_ptr, s_ptr, gidx_ptr, w_ptr, N, K,
                    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ACT_ORDER: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """w[K, N] (contiguous, w's dtype) = dequant(W)."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, gidx_ptr, k0, offs_k, offs_n, K, N,
                      BITS, GROUP_SIZE, ACT_ORDER, BLOCK_K, BLOCK_N)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qgemv_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, gidx_ptr, bias_ptr, out_ptr, N, K, stride_xm, stride_xk,
                  BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ACT_ORDER: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """out[m] += x[m] @ dequant(W) for the row m = program_id(2), over every SPLIT_K-th K tile.

    No tl.dot: a single row would fill one of its 16-row tiles, and the dequantized weights would
    change layout for the tensor cores. Each tile's products are summed elementwise and reduced
    over K once, at the end. out is a zeroed fp32 [M, N] buffer (atomics; bias from the first
    split). Weights are read once per row: meant for M = 1.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs_k * stride_xk, mask=offs_k < K, other=0.0).to(tl.float32)
        w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, gidx_ptr, k0, offs_k, offs_n, K, N,
                          BITS, GROUP_SIZE, ACT_ORDER, BLOCK_K, BLOCK_N)
        acc += w * x[:, None]
    y = tl.sum(acc, axis=0)
    if HAS_BIAS:
        y += tl.where(pid_k == 0, 1.0, 0.0) * tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + row * N + offs_n, y, mask=n_mask, sem="relaxed")


_KEY = ["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "ACT_ORDER"]


_PATHS = tuned_paths(_qmm_kernel, _KEY, decode_tiles=[
    (32, 128, 1, 4, 3), (64, 128, 1, 4, 3), (32, 256, 1, 4, 2),
    (32, 128, 2, 4, 3), (64, 128, 2, 4, 3), (64, 256, 2, 4, 2),
    (32, 128, 4, 4, 3), (64, 128, 4, 4, 3), (128, 128, 4, 4, 3),
    (64, 64, 8, 4, 4), (64, 128, 8, 4, 3), (128, 64, 8, 4, 3),
    (64, 64, 16, 4, 4), (128, 128, 16, 8, 3),
], gemm_tiles=[
    (32, 64, 64, 4, 4), (32, 128, 64, 4, 4), (64, 64, 64, 4, 4),
    (64, 128, 64, 4, 4), (64, 128, 32, 4, 4), (128, 64, 64, 8, 3),
    (128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (64, 256, 32, 8, 3),
])
_GEMV = tuned_gemv(_qgemv_kernel, ["N", "K", "BITS", "GROUP_SIZE", "ACT_ORDER"], tiles=[
    (64, 64, 4, 4, 3), (128, 64, 4, 4, 3), (128, 32, 8, 4, 3), (64, 128, 8, 4, 3),
    (256, 32, 8, 8, 3), (128, 128, 4, 8, 3), (256, 64, 2, 8, 3),
])
_DEQUANT_META = dict(BLOCK_K=32, BLOCK_N=64)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 activations: exact fp32 products, not tf32 (fp32 is for checking, not speed).
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast_dot(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def _launch_qmm(kernel, meta, atomic, x, qweight, qzeros, scales, g_idx, bias, bits, group_size, out):
    m, k = x.shape
    n = qweight.shape[1]
    # Absent optional tensors are passed as any valid pointer; HAS_BIAS / ACT_ORDER keep them unread.
    kernel[tile_grid(m, n)](
        x, qweight, qzeros, scales, g_idx if g_idx is not None else qweight,
        bias if bias is not None else scales, out,
        m, n, k, x.stride(0), x.stride(1), m_bucket(m),
        BITS=bits, GROUP_SIZE=group_size, ACT_ORDER=g_idx is not None, HAS_BIAS=bias is not None,
        ATOMIC=atomic, DOT_PRECISION=_dot_precision(x.dtype), UPCAST_DOT=_upcast_dot(x.dtype), **meta)
    return out


def qmm_splitk(x, qweight, qzeros, scales, g_idx, bias, bits, group_size, out_fp32):
    """Decode path. x [M, K] (stride along K any), out_fp32 [M, N] fp32, ZEROED."""
    return _launch_qmm(_PATHS.decode, _PATHS.decode_meta, True, x, qweight, qzeros, scales, g_idx, bias, bits,
                       group_size, out_fp32)


def qmm_gemv(x, qweight, qzeros, scales, g_idx, bias, bits, group_size, out_fp32):
    """GEMV path (not chosen by "auto" until measured on a GPU). x [M, K], out_fp32 [M, N] fp32, ZEROED."""
    m, k = x.shape
    n = qweight.shape[1]
    _GEMV.kernel[gemv_grid(m, n)](x, qweight, qzeros, scales, g_idx if g_idx is not None else qweight,
                                  bias if bias is not None else scales, out_fp32, n, k, x.stride(0), x.stride(1),
                                  BITS=bits, GROUP_SIZE=group_size, ACT_ORDER=g_idx is not None,
                                  HAS_BIAS=bias is not None, **_GEMV.meta)
    return out_fp32


def qmm_gemm(x, qweight, qzeros, scales, g_idx, bias, bits, group_size, out):
    """Medium-M path. x [M, K], out [M, N] contiguous in x's dtype (every element written)."""
    return _launch_qmm(_PATHS.gemm, _PATHS.gemm_meta, False, x, qweight, qzeros, scales, g_idx, bias, bits,
                       group_size, out)


def dequantize_into(qweight, qzeros, scales, g_idx, bits, group_size, w):
    """w [K, N] contiguous (any float dtype) <- dequant(W); every element written."""
    k, n = w.shape
    grid = (triton.cdiv(k, _DEQUANT_META["BLOCK_K"]), triton.cdiv(n, _DEQUANT_META["BLOCK_N"]))
    _dequant_kernel[grid](qweight, qzeros, scales, g_idx if g_idx is not None else qweight, w, n, k,
                          BITS=bits, GROUP_SIZE=group_size, ACT_ORDER=g_idx is not None, **_DEQUANT_META)
    return w
