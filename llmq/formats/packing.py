"""Bit packing of integer codes into int32 words (LSB first), GPTQ's layout.

`qweight` packs codes along K (rows): input k sits in row k // (32/b) at bit
offset b * (k % (32/b)). `qzeros` packs zero points along N (columns) the same
way. Words are int32; the top code may set the sign bit, which is harmless
because unpacking shifts and masks.
"""

from __future__ import annotations

import torch


def codes_per_word(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"cannot pack {bits}-bit codes into int32 words")
    return 32 // bits


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


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    # Reinterpret the low 32 bits as a signed int32 (two's complement).
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)
