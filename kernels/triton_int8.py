"""Triton W8A8 kernels: int8 activations x int8 weights -> int32, rescaled in the epilogue.

Imported lazily by `llmq.kernels.int8` (this module imports triton at the top).
Layout (K = in_features, N = out_features):

    x             float [M, K]   activations (any strides)
    weight        int8  [N, K]   contiguous, symmetric codes
    weight_scale  fp32  [N, 1]
    input_scale   fp32  [1]      static activations only

Two launches per call, the quantization in front of `_int8_mm_kernel`, whose
`tl.dot` of int8 tiles accumulates in int32 and whose epilogue multiplies by
s_x (row) and s_w (column), adds the bias and stores in x's dtype:

- GEMM path (M > 16): `_quantize_rows_kernel`, one program per row, computes
  the row's scale s_x = max|x_row| / 127 (1 for an all-zero row; static: the
  calibrated scale) and writes its codes q = clamp(round_half_even(x / s_x),
  -128, 127) to an int8 [M, K] buffer that the GEMM tiles load. Quantizing
  inside the GEMM's tile loads instead would redo it for every N tile and,
  measured by ptxas on sm_90, spills registers at the large tiles.
- decode path (M <= 16): `_row_scale_kernel` computes only the scales (not
  for static activations); the few rows are quantized inside the tile loads,
  so no int8 copy of x is written.

The quantization matches `llmq.kernels.int8.quantize_activations` bit for bit:
IEEE division (`div_rn`) and round-half-to-even (the 1.5 * 2^23 trick, exact
for |v| <= 128 after the clamp), so the int32 products equal the integer
reference exactly and only the fp32 epilogue rounds.

Paths: M <= 16 (decode) runs split-K: SPLIT_K programs per output tile each
cover every SPLIT_K-th K tile and add their rescaled partial sums with fp32
atomics into a zeroed fp32 buffer (the scales are per row and per column, so
rescaling the partial sums is exact algebra). Larger M runs one program per
output tile (SPLIT_K = 1), tiles ordered in GROUP_M bands for L2 reuse.

On an H200 (BENCHMARKS.md, "On an H200") every config passes
scripts/check_kernels.py; the GEMM path beats cuBLAS fp16 at prefill sizes on
wide linears (1.71x at 4096 x 14336 x 4096), while the split-K decode path is
well behind it (0.15-0.53x): the next place to work.

Autotuning (triton_tuning): on CUDA, keyed on the M bucket, N, K and static
or dynamic; under TRITON_INTERPRET=1 one fixed small config per path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_tuning import gemv_grid, grouped_tile, m_bucket, tile_grid, tuned_gemv, tuned_paths

DECODE_MAX_M = 16
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: (v + c) - c rounds fp32 v to the nearest even integer


@triton.jit
def _row_scale(x_ptr, row, K, stride_xm, stride_xk, BLOCK_K: tl.constexpr):
    """The scale max|x| / 127 of one row of x (1 for an all-zero row)."""
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs * stride_xk, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.max(amax, axis=0) / 127.0
    return tl.where(scale > 0, scale, 1.0)


@triton.jit
def _row_scale_kernel(x_ptr, xs_ptr, K, stride_xm, stride_xk, BLOCK_K: tl.constexpr):
    """One program per row: its scale (_row_scale)."""
    row = tl.program_id(0)
    tl.store(xs_ptr + row, _row_scale(x_ptr, row, K, stride_xm, stride_xk, BLOCK_K))


@triton.jit
def _quantize_code(x, xs):
    """int8 codes of fp32 x for scales xs (broadcast): clamp(round_half_even(x / xs), -128, 127)."""
    v = tl.math.div_rn(x, xs)
    v = tl.minimum(tl.maximum(v, -128.0), 127.0)
    v = (v + _ROUND_MAGIC) - _ROUND_MAGIC
    return v.to(tl.int8)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, xs_ptr, K, stride_xm, stride_xk, STATIC: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """One program per row: (dynamic) its scale max|x| / 127, then its int8 codes into q [M, K]."""
    row = tl.program_id(0)
    if STATIC:
        scale = tl.load(xs_ptr)
    else:
        scale = _row_scale(x_ptr, row, K, stride_xm, stride_xk, BLOCK_K)
        tl.store(xs_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs * stride_xk, mask=offs < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * K + offs, _quantize_code(x, scale), mask=offs < K)


@triton.jit
def _int8_mm_kernel(x_ptr, w_ptr, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_xk, M_BUCKET,
                    STATIC: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, X_INT8: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out[M, N] (+)= (q(x) @ weight^T) * s_x * s_w (+ bias); M_BUCKET is only the autotune key."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    if STATIC:
        xs = tl.load(xs_ptr + tl.zeros((BLOCK_M,), dtype=tl.int32))
    else:
        xs = tl.load(xs_ptr + offs_m, mask=m_mask, other=1.0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        x_mask = m_mask[:, None] & k_mask[None, :]
        if X_INT8:
            q = tl.load(x_ptrs, mask=x_mask, other=0)
        else:
            q = _quantize_code(tl.load(x_ptrs, mask=x_mask, other=0.0).to(tl.float32), xs[:, None])
        w = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc = tl.dot(q, w, acc, out_dtype=tl.int32)

    ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y += tl.where(pid_k == 0, 1.0, 0.0) * b[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, y, mask=mask)
    else:
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


_PATHS = tuned_paths(_int8_mm_kernel, ["M_BUCKET", "N", "K", "STATIC"], decode_tiles=[
    (32, 128, 1, 4, 3), (64, 128, 1, 4, 3), (64, 256, 1, 4, 2),
    (64, 128, 2, 4, 3), (128, 128, 2, 4, 3), (64, 256, 4, 4, 2),
    (64, 128, 4, 4, 3), (128, 128, 4, 4, 3), (64, 128, 8, 4, 3),
    (128, 256, 8, 8, 3), (64, 128, 16, 4, 3),
], gemm_tiles=[
    (32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 128, 4, 4),
    (128, 64, 128, 4, 4), (128, 128, 64, 8, 3), (128, 128, 128, 8, 3),
    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
])


@triton.jit
def _int8_gemv_kernel(q_ptr, w_ptr, xs_ptr, ws_ptr, bias_ptr, out_ptr, N, K, STATIC: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """out[m] += (q[m] @ weight^T) * s_x[m] * s_w (+ bias) for the row m = program_id(2) of the int8
    codes q [M, K], over every SPLIT_K-th K tile: each tile's int32 products reduced over K, which
    runs along each thread's contiguous codes (no tl.dot, whose 16-row tiles one row would pad; an
    elementwise [BLOCK_N, BLOCK_K] accumulator instead spilled at most tiles on sm_90).
    out: zeroed fp32 [M, N], atomics."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        q = tl.load(q_ptr + row * K + offs_k, mask=k_mask, other=0).to(tl.int32)
        w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
        acc += tl.sum(w.to(tl.int32) * q[None, :], axis=1)
    xs = tl.load(xs_ptr) if STATIC else tl.load(xs_ptr + row)
    ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc.to(tl.float32) * xs * ws
    if HAS_BIAS:
        y += tl.where(pid_k == 0, 1.0, 0.0) * tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + row * N + offs_n, y, mask=n_mask, sem="relaxed")


_GEMV = tuned_gemv(_int8_gemv_kernel, ["N", "K", "STATIC"], tiles=[
    (32, 128, 8, 4, 2), (64, 64, 8, 4, 2), (16, 256, 16, 4, 2), (32, 256, 8, 8, 2),
    (64, 128, 4, 8, 2), (128, 64, 4, 8, 2), (64, 128, 4, 4, 1), (32, 256, 4, 4, 1),
])


def row_scales(x: torch.Tensor) -> torch.Tensor:
    """fp32 [M] per-token scales max|x_row| / 127 of x [M, K]."""
    m, k = x.shape
    xs = torch.empty(m, dtype=torch.float32, device=x.device)
    _row_scale_kernel[(m,)](x, xs, k, x.stride(0), x.stride(1), BLOCK_K=min(1024, triton.next_power_of_2(k)))
    return xs


def quantize_rows(x: torch.Tensor, input_scale: torch.Tensor | None):
    """(int8 codes [M, K], fp32 scales [M] or the static [1]) of x [M, K] in one launch."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    xs = input_scale if input_scale is not None else torch.empty(m, dtype=torch.float32, device=x.device)
    _quantize_rows_kernel[(m,)](x, q, xs, k, x.stride(0), x.stride(1), STATIC=input_scale is not None,
                                BLOCK_K=min(1024, triton.next_power_of_2(k)))
    return q, xs


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                input_scale: torch.Tensor | None, bias: torch.Tensor | None, path: str = "auto") -> torch.Tensor:
    """[M, N] in x's dtype. path: "auto" (by M), "splitk", "gemm" or "gemv" (x quantized by one
    launch, then one row per program without tl.dot: for M = 1; not chosen by "auto" until measured
    on a GPU)."""
    m, k = x.shape
    n = weight.shape[0]
    static = input_scale is not None
    if path == "auto":
        path = "splitk" if m <= DECODE_MAX_M else "gemm"
    atomic = path != "gemm"  # split-K and GEMV programs add partial sums into a zeroed fp32 output
    if path == "splitk":
        # Decode: the few rows are quantized inside the tile loads; only their scales come first.
        xq, xs = x, input_scale if static else row_scales(x)
    else:
        # GEMM and GEMV: quantize x once (one launch) rather than in every N tile's loads.
        xq, xs = quantize_rows(x, input_scale)
    out = (torch.zeros((m, n), dtype=torch.float32, device=x.device) if atomic
           else torch.empty((m, n), dtype=x.dtype, device=x.device))
    bias_arg = bias if bias is not None else weight_scale
    if path == "gemv":
        _GEMV.kernel[gemv_grid(m, n)](xq, weight, xs, weight_scale, bias_arg, out, n, k,
                                      STATIC=static, HAS_BIAS=bias is not None, **_GEMV.meta)
    else:
        kernel, meta = (_PATHS.decode, _PATHS.decode_meta) if atomic else (_PATHS.gemm, _PATHS.gemm_meta)
        kernel[tile_grid(m, n)](xq, weight, xs, weight_scale, bias_arg, out,
                                m, n, k, xq.stride(0), xq.stride(1), m_bucket(m),
                                STATIC=static, HAS_BIAS=bias is not None, ATOMIC=atomic, X_INT8=path == "gemm",
                                **meta)
    return out if out.dtype == x.dtype else out.to(x.dtype)
