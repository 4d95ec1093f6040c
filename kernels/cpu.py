"""CPU path: convert the packed checkpoint tensors once, at load, into what runs fastest.

Backends (chosen by `prepare_cpu`, never per call):

- "int4pack": torch's weight-only int4 kernel (`_weight_int4pack_mm_for_cpu`,
  weight from `_convert_weight_to_int4pack_for_cpu`). Fits bits 4, N % 16 == 0,
  and a group size that one of the kernel's sizes 256/128/64/32 divides (the
  per-group scales are repeated over sub-groups, so -1 and 512 work when K
  allows). Act-order: when every group has exactly group_size members (what
  GPTQ writes), the input features are sorted by group once here and x is
  permuted on each call; otherwise the layer falls back to "dense".
  tinygemm's convention is w = (q - 8) * s + zero, so a true zero point z is
  stored as zero = (8 - z) * s.
- "int8pack": torch's `_weight_int8pack_mm` (per-output-channel scale, no zero
  point). Fits bits 8 with one group per row when every q - z fits in int8
  (symmetric checkpoints: z = 128); the codes are stored as q - z.
- "dense": dequantize once to a [N, K] weight in the model dtype, then F.linear.
  Exact in that dtype; as much memory as the unquantized layer.

The int4/int8 kernels compute in bfloat16: torch's float32 and float16
variants of these CPU kernels are scalar code, 10-100x slower than a dense
fp32 matmul, while the bfloat16 ones run at about 3x a dense fp32 matmul at
M = 1. x is cast to bfloat16 and the result back to x's dtype; the scales and
zeros are stored in bfloat16 (zero = (8 - z) * s rounds to 1/64 of a step at
worst), far below the 4/8-bit weight error.

These kernels slow down linearly with M (at M = 512 a dense bf16 matmul is 10x
faster), so prefill pays. `prefill_dense=True` also keeps a dense bf16 weight
(2 more bytes per weight) used when x has at least `dense_rows` rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dequant import dequantize, sort_by_group
from .layout import codes_per_word, group_width, unpack_qweight, unpack_qzeros

BACKENDS = ("auto", "int4pack", "int8pack", "dense")
INT4PACK_GROUP_SIZES = (256, 128, 64, 32)
COMPUTE_DTYPE = torch.bfloat16
DENSE_ROWS = 8  # M from which the cached dense weight beats the int4 kernel (rough, measured)


@dataclass
class CpuState:
    """A layer's weights in the form its CPU backend consumes (see module doc)."""

    backend: str
    in_features: int
    out_features: int
    dtype: torch.dtype  # model dtype; "dense" weights are stored in it
    weight: torch.Tensor  # int4pack: uint8 packed [N, K/2]; int8pack: int8 [N, K]; dense: [N, K]
    scales: torch.Tensor | None = None  # int4pack: bf16 [K/gs, N, 2] (scale, zero); int8pack: bf16 [N]
    group_size: int = 0  # int4pack's kernel group size
    perm: torch.Tensor | None = None  # int64 [K]: x[..., perm] feeds the kernel (act-order)
    dense_weight: torch.Tensor | None = None  # bf16 [N, K] in perm order, for M >= dense_rows
    dense_rows: int = DENSE_ROWS


def _int4pack_group(gs: int) -> int | None:
    return next((c for c in INT4PACK_GROUP_SIZES if gs % c == 0), None)


def _why_not_int4pack(bits, n, gs, act_fits):
    if bits != 4:
        return "needs bits 4"
    if n % 16:
        return f"needs out_features divisible by 16 (got {n})"
    if _int4pack_group(gs) is None:
        return f"needs a group size divisible by one of {INT4PACK_GROUP_SIZES} (got {gs})"
    if not act_fits:
        return "needs act-order groups of exactly group_size inputs"
    return None


def _int8_codes(qweight, qzeros, bits, groups):
    """int8 [N, K] of q - z, or a reason why it cannot be built."""
    if bits != 8:
        return None, "needs bits 8"
    if groups != 1:
        return None, "needs one group per row (group_size -1), the kernel has one scale per output"
    diff = unpack_qweight(qweight, bits).short() - unpack_qzeros(qzeros, bits).short()  # [K, N]
    if diff.min() < -128 or diff.max() > 127:
        return None, "needs q - z within int8 (symmetric zero point 128)"
    return diff.t().contiguous().to(torch.int8), None


def prepare_cpu(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                bits: int, group_size: int, dtype: torch.dtype, *, backend: str = "auto",
                prefill_dense: bool = False) -> CpuState:
    """Convert one layer's checkpoint tensors (CPU) for `cpu_matmul`.

    Args (K = in_features, N = out_features, G = K / group_size):
        qweight int32 [K*bits/32, N]; qzeros int32 [G, N*bits/32]; scales float [G, N];
        g_idx int [K] or None; bits 4 or 8; group_size (-1 = K); dtype: the model's
        activation dtype (float32 / float16 / bfloat16).
        backend: "auto" picks int4pack, then int8pack, then dense, the first that fits;
            naming one that does not fit raises ValueError with the reason.
        prefill_dense: with int4pack/int8pack, also keep a dense bf16 weight for M >= DENSE_ROWS.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if bits not in (4, 8):
        raise ValueError(f"the CPU path supports bits 4 and 8, got {bits}")
    k, n = qweight.shape[0] * codes_per_word(bits), qweight.shape[1]
    gs = group_width(group_size, k)
    if gs <= 0 or k % gs:
        raise ValueError(f"group size {group_size} does not divide {k} input features")
    groups = k // gs
    act_fits, perm = sort_by_group(g_idx, k, gs)

    reasons = {}
    if backend in ("auto", "int4pack"):
        reasons["int4pack"] = _why_not_int4pack(bits, n, gs, act_fits)
        if reasons["int4pack"] is None:
            state = _prepare_int4pack(qweight, qzeros, scales, bits, gs, perm, dtype)
            return _with_dense(state, qweight, qzeros, scales, g_idx, bits, gs, prefill_dense)
    if backend in ("auto", "int8pack"):
        codes, reasons["int8pack"] = _int8_codes(qweight, qzeros, bits, groups)
        if codes is not None:
            state = CpuState("int8pack", k, n, dtype, codes, scales[0].to(COMPUTE_DTYPE).contiguous())
            return _with_dense(state, qweight, qzeros, scales, g_idx, bits, gs, prefill_dense)
    if backend not in ("auto", "dense"):
        raise ValueError(f"CPU backend {backend} does not fit this layer: {reasons[backend]}")
    w = dequantize(qweight, qzeros, scales, bits=bits, group_size=gs, g_idx=g_idx, dtype=dtype)
    return CpuState("dense", k, n, dtype, w)


def _prepare_int4pack(qweight, qzeros, scales, bits, gs, perm, dtype):
    codes = unpack_qweight(qweight, bits)  # [K, N]
    k, n = codes.shape
    if perm is not None:
        codes = codes[perm]  # sorted by group: group j is rows j*gs .. (j+1)*gs - 1
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous().to(torch.int32), 2)
    kgs = _int4pack_group(gs)
    # The kernel's group j (kgs inputs) lies inside original group j*kgs // gs.
    src = torch.arange(k // kgs) * kgs // gs
    s = scales.float()[src]  # [K/kgs, N]
    z = unpack_qzeros(qzeros, bits).float()[src]
    scale_zero = torch.stack([s, (8 - z) * s], dim=-1).to(COMPUTE_DTYPE).contiguous()
    return CpuState("int4pack", k, n, dtype, packed, scale_zero, group_size=kgs, perm=perm)


def _with_dense(state, qweight, qzeros, scales, g_idx, bits, gs, prefill_dense):
    if prefill_dense:
        w = dequantize(qweight, qzeros, scales, bits=bits, group_size=gs, g_idx=g_idx, dtype=COMPUTE_DTYPE)
        state.dense_weight = w if state.perm is None else w[:, state.perm].contiguous()
    return state


def cpu_matmul(x: torch.Tensor, state: CpuState, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias for x [..., K] (float32/float16/bfloat16) -> [..., N] in x's dtype."""
    if x.shape[-1] != state.in_features:
        raise ValueError(f"x has {x.shape[-1]} input features, the layer expects {state.in_features}")
    if state.backend == "dense":
        y = F.linear(x.to(state.dtype), state.weight, None if bias is None else bias.to(state.dtype))
        return y.to(x.dtype)
    x2 = x.reshape(-1, state.in_features)
    if state.perm is not None:
        x2 = x2[:, state.perm]
    x2 = x2.to(COMPUTE_DTYPE).contiguous()
    if x2.shape[0] == 0:
        y = x2.new_empty((0, state.out_features))
    elif state.dense_weight is not None and x2.shape[0] >= state.dense_rows:
        y = F.linear(x2, state.dense_weight)
    elif state.backend == "int4pack":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, state.weight, state.group_size, state.scales)
    else:
        y = torch.ops.aten._weight_int8pack_mm(x2, state.weight, state.scales)
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], state.out_features)
