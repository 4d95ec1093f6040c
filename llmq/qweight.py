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


def quantized_module_names(tensor_names: Iterable[str]) -> list[str]:
    """The quantized linears among checkpoint tensor names: those with a `.qweight`, sorted."""
    return sorted(k[: -len(".qweight")] for k in tensor_names if k.endswith(".qweight"))


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
        """[N, K] weights in `dtype`, computed in float32."""
        g = self.group_index()
        s = self.scales.float()[:, g]
        z = self.zeros.float()[:, g]
        return ((self.codes.float() - z) * s).to(dtype)

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
