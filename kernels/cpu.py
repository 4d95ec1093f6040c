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
  (symmetric checkpoints: z = 128) and in_features is a multiple of 32; the
  codes are stored as q - z.
- "dense": dequantize once to a [N, K] weight in the model dtype, then F.linear.
  Exact in that dtype; as much memory as the unquantized layer.

The int4/int8 kernels compute in bfloat16: torch's float32 and float16
variants of these CPU kernels are scalar code, 10-100x slower than a dense
fp32 matmul, while the bfloat16 ones run at about 3x a dense fp32 matmul at
M = 1. x is cast to bfloat16 and the result back to x's dtype; the scales and
zeros are stored in bfloat16 (zero = (8 - z) * s rounds to 1/64 of a step at
worst), far below the 4/8-bit weight error.

These kernels slow down linearly with M (at M = 512 a dense matmul is 10x
faster), so each call picks its kernel by its number of rows M among
candidates timed once per process on this processor (kernels/cpu_select.py,
kinds "int4" and "int8"):

- "int4pack" / "int8pack": the kernel above (bf16 compute);
- "dequant": the layer's dense weight rebuilt on every call into a reused
  fp32 buffer from the checkpoint's codes, scales and zeros, w = (q - z) * s
  exactly as `dequantize` computes it, then an fp32 matmul with x: closer to
  the float64 reference than the bf16 kernels, and the fastest path for
  prefill where bf16 matmuls are slow (an Intel Xeon without AMX,
  BENCHMARKS.md);
- "dequant_bf16": the same weight rounded to bf16 and a bf16 matmul (the
  bf16 kernels' precision), which pays where bf16 matmuls are faster than fp32
  (an AMD Zen 5: 3.4x-4.0x at 512 rows, `scripts/bench_cpu_matmul.py`).

The dequant kernels' buffers are per thread and sized by the largest layer
(1 + 4 bytes per weight of that one layer, + 2 for bf16), not per model.

Layers whose inputs are permuted (act-order) always run the kernel.
`prefill_dense=True` instead keeps a dense bf16 weight (2 more bytes per
weight) used when x has at least `dense_rows` rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import cpu_select
from .dequant import dequantize, sort_by_group
from .layout import codes_per_word, group_width, unpack_qweight, unpack_qzeros
from .scratch import scratch

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
    # For the "dequant" kernels (None for act-order layers, which always run the kernel):
    # int4pack: the checkpoint's qweight int32 [K/8, N] (the layer's own buffer, not a copy);
    # int8pack: None (the int8 codes in `weight` serve).
    dequant_codes: torch.Tensor | None = None
    dequant_zeros: torch.Tensor | None = None  # int4pack: int8 [G, 1, N]
    dequant_scales: torch.Tensor | None = None  # int4pack: [G, 1, N] (a view of the scales); int8pack: fp32 [N, 1]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the CPU kernels read (some may be the layer's own buffers)."""
        return [t for t in (self.weight, self.scales, self.perm, self.dense_weight, self.dequant_codes,
                            self.dequant_zeros, self.dequant_scales) if t is not None]


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


# torch's `_weight_int8pack_mm` reads the inputs in vectors without a tail: with K not a multiple of
# its vector it returns garbage or crashes (torch 2.13 on AVX2: K = 17, 33, 100). 32 covers the
# vector widths of AVX2 and AVX-512.
INT8PACK_K_MULTIPLE = 32


def int8pack_fits(k: int) -> bool:
    """Whether `_weight_int8pack_mm` computes with k input features."""
    return k % INT8PACK_K_MULTIPLE == 0


def _int8_codes(qweight, qzeros, bits, groups):
    """int8 [N, K] of q - z, or a reason why it cannot be built."""
    if bits != 8:
        return None, "needs bits 8"
    if not int8pack_fits(qweight.shape[0] * codes_per_word(bits)):
        return None, f"needs in_features divisible by {INT8PACK_K_MULTIPLE}"
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
            if perm is None:
                state.dequant_scales = scales[0].float().reshape(n, 1).contiguous()
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
    state = CpuState("int4pack", k, n, dtype, packed, scale_zero, group_size=kgs, perm=perm)
    if perm is None:
        groups = k // gs
        state.dequant_codes = qweight
        state.dequant_zeros = unpack_qzeros(qzeros, bits).to(torch.int8).reshape(groups, 1, n).contiguous()
        state.dequant_scales = scales.reshape(groups, 1, n)
    return state


def _with_dense(state, qweight, qzeros, scales, g_idx, bits, gs, prefill_dense):
    if prefill_dense:
        w = dequantize(qweight, qzeros, scales, bits=bits, group_size=gs, g_idx=g_idx, dtype=COMPUTE_DTYPE)
        state.dense_weight = w if state.perm is None else w[:, state.perm].contiguous()
    return state


_SHIFTS4 = None  # int32 [1, 8, 1]: the bit offsets of the 8 codes in a qweight word


def _dequant_weight_t(state: CpuState, dtype: torch.dtype) -> torch.Tensor:
    """W^T [K, N] in dtype in a reused buffer: w = (q - z) * s computed in fp32, as `dequantize` does."""
    global _SHIFTS4
    k, n = state.in_features, state.out_features
    if state.backend == "int8pack":  # codes int8 [N, K] are q - z already
        w = scratch((n, k), dtype, "dequant weight").copy_(state.weight)
        return w.mul_(state.dequant_scales).t()
    if _SHIFTS4 is None:
        _SHIFTS4 = (torch.arange(8, dtype=torch.int32) * 4).view(1, 8, 1)
    # int8 codes: q - z fits, and a quarter of int32's traffic. The shifted words wrap when stored
    # as int8, but their low four bits, the code, survive.
    codes = scratch((k // 8, 8, n), torch.int8, "dequant codes")
    torch.bitwise_right_shift(state.dequant_codes.unsqueeze(1), _SHIFTS4, out=codes).bitwise_and_(15)
    groups = state.dequant_zeros.shape[0]
    codes = codes.view(groups, k // groups, n).sub_(state.dequant_zeros)  # q - z, exact
    # Convert, then scale: an int32 x float multiply is not vectorised, a conversion is.
    w = scratch((groups, k // groups, n), torch.float32, "dequant weight").copy_(codes).mul_(state.dequant_scales)
    if dtype == torch.float32:
        return w.view(k, n)
    return scratch((k, n), dtype, "dequant weight").copy_(w.view(k, n))


# The float dtypes' cast methods: a decode step's casts cost microseconds, .to(dtype) more.
_CAST = {torch.float32: torch.Tensor.float, torch.float16: torch.Tensor.half, torch.bfloat16: torch.Tensor.bfloat16}
_TO_COMPUTE = _CAST[COMPUTE_DTYPE]


def _kernel(x2, state):
    # torch's own bindings of these operators: a microsecond less per call than torch.ops.aten's
    # Python dispatch, as much as the cast of a decode step's row.
    x2 = _TO_COMPUTE(x2).contiguous()
    if state.backend == "int4pack":
        return torch._weight_int4pack_mm_for_cpu(x2, state.weight, state.group_size, state.scales)
    return torch._weight_int8pack_mm(x2, state.weight, state.scales)


def _dequant(x2, state, dtype):
    return torch.mm(x2.to(dtype), _dequant_weight_t(state, dtype))


_KERNELS = {
    "int4pack": _kernel, "int8pack": _kernel,
    "dequant": lambda x2, state: _dequant(x2, state, torch.float32),
    "dequant_bf16": lambda x2, state: _dequant(x2, state, torch.bfloat16),
}
_KIND = {"int4pack": "int4", "int8pack": "int8"}


def _benchmarks(kind: str):
    """cpu_select's candidates for `kind` on a representative layer (4096 x 1024, int4 groups of 128)."""
    from .layout import pack_cols, pack_rows

    def make(regime: str) -> dict:
        g = torch.Generator().manual_seed(0)
        n, k, bits, gs = 4096, 1024, (4 if kind == "int4" else 8), (128 if kind == "int4" else -1)
        groups = 1 if gs == -1 else k // gs
        qweight = pack_rows(torch.randint(0, 2**bits, (k, n), generator=g), bits)
        qzeros = pack_cols(torch.full((groups, n), 2 ** (bits - 1)), bits)
        scales = torch.rand(groups, n, generator=g) * 1e-2
        state = prepare_cpu(qweight, qzeros, scales, None, bits, gs, torch.float32,
                            backend="int4pack" if kind == "int4" else "int8pack")
        x = torch.randn(1 if regime == "decode" else 256, k, generator=g)
        return {name: (lambda f=_KERNELS[name]: f(x, state)) for name in cpu_select.CANDIDATES[kind]}

    return make


_BENCHMARKS = {kind: _benchmarks(kind) for kind in ("int4", "int8")}


def cpu_kernel(state: CpuState, m: int) -> str:
    """The kernel that cpu_matmul runs for M = m rows of this layer (see the module doc)."""
    if state.backend == "dense":
        return "dense"
    if state.dense_weight is not None and m >= state.dense_rows:
        return "dense_weight"
    if state.perm is not None:
        return state.backend
    kind = _KIND[state.backend]
    return cpu_select.choice(kind, m, _BENCHMARKS[kind])


def cpu_matmul(x: torch.Tensor, state: CpuState, bias: torch.Tensor | None = None, *,
               kernel: str = "auto") -> torch.Tensor:
    """y = x @ W^T + bias for x [..., K] (float32/float16/bfloat16) -> [..., N] in x's dtype.

    kernel: "auto" (the measured choice for this M, see the module doc), or force one of the
    candidates of the layer's backend ("int4pack"/"int8pack", "dequant", "dequant_bf16").
    """
    if x.shape[-1] != state.in_features:
        raise ValueError(f"x has {x.shape[-1]} input features, the layer expects {state.in_features}")
    if state.backend == "dense":
        y = F.linear(x.to(state.dtype), state.weight, None if bias is None else bias.to(state.dtype))
        return y.to(x.dtype)
    x2 = x if x.dim() == 2 else x.reshape(-1, state.in_features)
    m = x2.shape[0]
    if kernel == "auto":
        kernel = cpu_kernel(state, m)
    elif kernel not in cpu_select.CANDIDATES[_KIND[state.backend]]:
        raise ValueError(f"kernel must be 'auto' or one of {cpu_select.CANDIDATES[_KIND[state.backend]]} for a "
                         f"{state.backend} layer, got {kernel!r}")
    elif kernel.startswith("dequant") and state.perm is not None:
        raise ValueError("an act-order layer with permuted inputs runs only its kernel")
    if state.perm is not None:
        x2 = x2[:, state.perm]
    if m == 0:
        y = x2.new_empty((0, state.out_features))
    elif kernel == "dense_weight":
        y = F.linear(x2.to(COMPUTE_DTYPE), state.dense_weight)
    else:
        y = _KERNELS[kernel](x2, state)
    return _output(y, x, bias, state.out_features)


def packed_matmul(x: torch.Tensor, state: CpuState, bias: torch.Tensor | None = None) -> torch.Tensor:
    """cpu_matmul through the layer's own kernel ("int4pack"/"int8pack"), for a caller that has checked
    x's width and that this kernel runs its M >= 1 rows: a decode step's shared calls
    (modules/siblings.py), where cpu_matmul's checks cost as much as the kernel."""
    x2 = x if x.dim() == 2 else x.reshape(-1, state.in_features)
    if state.perm is not None:
        x2 = x2[:, state.perm]
    return _output(_KERNELS[state.backend](x2, state), x, bias, state.out_features)


def _output(y, x, bias, n):
    # Each call costs microseconds, as much as a decode step's kernel: skip the ones with no effect.
    if y.dtype != x.dtype:
        cast = _CAST.get(x.dtype)
        y = cast(y) if cast is not None else y.to(x.dtype)
    if bias is not None:
        y = y.add_(bias.to(x.dtype))  # y is this call's own output
    return y if x.dim() == 2 else y.view(*x.shape[:-1], n)
