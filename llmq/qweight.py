"""QuantizedWeight: integer codes plus group-wise scales and zero points.

This is what every solver returns and what QuantLinear packs. The convention is
one everywhere: w = (q - z) * s, with q and z integers in [0, 2^bits - 1] and
one (s, z) per group of `group_size` consecutive input features, or per the
group g_idx[k] assigns to input k under act-order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from .kernels.layout import group_index, pack_cols, pack_rows


# The tensors a quantized linear `name` holds in a native checkpoint: `name.qweight` ...
PACKED_TENSORS = ("qweight", "qzeros", "scales", "g_idx")

DEQUANT_CHUNK_ELEMENTS = 1 << 22  # weights dequantized at a time (float32 temporaries of 16 MiB)


def quantized_module_names(tensor_names: Iterable[str]) -> list[str]:
    """The quantized linears among checkpoint tensor names: those with a `.qweight`, sorted."""
    return sorted(k[: -len(".qweight")] for k in tensor_names if k.endswith(".qweight"))


def w8a8_module_names(tensors: dict) -> list[str]:
    """The W8A8 linears among checkpoint tensors: an int8 `.weight` beside a `.weight_scale` (a kept
    linear has no scale), sorted. tensors: {name: tensor}, or a safetensors header {name: (shape, dtype)}."""

    def int8(name: str) -> bool:
        entry = tensors.get(name)
        dtype = entry.dtype if isinstance(entry, torch.Tensor) else entry[1] if entry is not None else None
        return dtype in (torch.int8, "I8")

    return sorted(k[: -len(".weight_scale")] for k in tensors
                  if k.endswith(".weight_scale") and int8(k[: -len("_scale")]))


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # [N, K] integer codes
    scales: torch.Tensor  # [N, G] in the storage dtype (fp16 / bf16 / fp32)
    zeros: torch.Tensor  # [N, G] integer zero points
    bits: int
    group_size: int  # input features per group (K for one group per row)
    g_idx: torch.Tensor | None = None  # [K] group of each input, act-order only

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def group_index(self) -> torch.Tensor:
        return group_index(self.codes.shape[1], self.group_size, self.g_idx, self.codes.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] weights in `dtype`, computed in float32, a band of rows at a time
        (the float32 temporaries of an 8192 x 3072 weight would be 96 MiB each)."""
        g = self.group_index()
        n, k = self.codes.shape
        out = torch.empty(n, k, dtype=dtype, device=self.codes.device)
        step = max(1, DEQUANT_CHUNK_ELEMENTS // max(k, 1))
        for r0 in range(0, n, step):
            r1 = min(r0 + step, n)
            s = self.scales[r0:r1].float()[:, g]
            z = self.zeros[r0:r1].float()[:, g]
            out[r0:r1] = (self.codes[r0:r1].float() - z) * s
        return out

    def packed(self) -> dict[str, torch.Tensor]:
        """Tensors named and laid out as in the checkpoint (README: Checkpoint format)."""
        out = {
            "qweight": pack_rows(self.codes.t(), self.bits),
            "qzeros": pack_cols(self.zeros.t(), self.bits),
            "scales": self.scales.t().contiguous(),
        }
        if self.g_idx is not None:
            out["g_idx"] = self.g_idx.to(torch.int32)
        return out
