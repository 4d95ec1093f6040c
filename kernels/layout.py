"""The bit layout of quantized weights: GPTQ's int32 words, LSB first.

The one owner of this fact; formats, modules, solvers' outputs and the torch
kernels all pack and unpack through here. It imports nothing but torch, so it
sits at the bottom of llmq's import graph. (The kernels' correctness tests keep
their own float64 reference built from integer codes, not this module.)

`qweight` packs codes along K (rows): input k sits in row k // (32/b) at bit
offset b * (k % (32/b)). `qzeros` packs zero points along N (columns) the same
way. Words are int32; the top code may set the sign bit, which is harmless
because unpacking shifts and masks. Inputs are grouped `group_size` at a time
(-1: one group spanning the whole row), or by g_idx under act-order.
"""

from __future__ import annotations

import torch


def codes_per_word(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"cannot pack {bits}-bit codes into int32 words")
    return 32 // bits


def group_width(group_size: int, in_features: int) -> int:
    """Input features per group: group_size, or in_features for -1 (one group per row)."""
    return in_features if group_size == -1 else group_size


def group_index(in_features: int, group_size: int, g_idx: torch.Tensor | None = None,
                device=None) -> torch.Tensor:
    """int64 [K]: the group of each input feature (g_idx when given, else k // group width)."""
    if g_idx is not None:
        return g_idx.to(device=device or g_idx.device, dtype=torch.long)
    return torch.arange(in_features, device=device) // group_width(group_size, in_features)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[K, N] integer codes in [0, 2^bits) -> int32 [K * bits / 32, N], packed along K."""
    per = codes_per_word(bits)
    k, n = codes.shape
    if k % per:
        raise ValueError(f"{k} rows cannot be packed {per} to a word")
    c = codes.to(torch.int64).reshape(k // per, per, n)
    shifts = (torch.arange(per, device=codes.device, dtype=torch.int64) * bits).view(1, per, 1)
    words = (c << shifts).sum(dim=1)  # disjoint bit fields: sum == bitwise or
    return _to_int32(words)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [K * bits / 32, N] -> [K, N] codes (int32), inverse of pack_rows."""
    per = codes_per_word(bits)
    shifts = (torch.arange(per, device=packed.device, dtype=torch.int32) * bits).view(1, per, 1)
    codes = (packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1, packed.shape[-1])


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[G, N] integer codes -> int32 [G, N * bits / 32], packed along N."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [G, N * bits / 32] -> [G, N] codes (int32), inverse of pack_cols."""
    return unpack_rows(packed.t(), bits).t().contiguous()


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Checkpoint qweight int32 [K*b/32, N] -> uint8 [K, N] codes."""
    return unpack_rows(qweight, bits).to(torch.uint8)


def unpack_qzeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Checkpoint qzeros int32 [G, N*b/32] -> uint8 [G, N] zero points."""
    return unpack_cols(qzeros, bits).to(torch.uint8)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    # Reinterpret the low 32 bits as a signed int32 (two's complement).
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)
