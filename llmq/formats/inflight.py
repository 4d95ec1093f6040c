"""Loading gptq, awq and compressed-tensors folders into QuantLinear while transformers reads them.

A foreign checkpoint differs from llmq's native layout only by re-layouts:
GPTQ v1 zero points are stored minus one, AWQ packs along the outputs in an
interleaved order, compressed-tensors stores every tensor transposed (and no
zero points when symmetric). So no native copy is written: llmq's quantizer
builds the model with QuantLinear modules exactly as for a native checkpoint,
from the native names and shapes that the folder's headers and small tensors
(zero points, g_idx, stored shapes) give, and hands transformers one
WeightConverter per foreign tensor name. Each converter turns a tensor into
its native form as the loader reads it, so device_map and disk offload work as
they do for native checkpoints, and the result equals `llmq convert` followed
by a native load, bit for bit.
"""

from __future__ import annotations

import copy
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter

from ..config import QuantConfig
from . import awq, compressed_tensors, gptq
from ..folder_io import SAFETENSORS_DTYPES
from ..kernels.layout import codes_per_word, group_width, pack_cols, pack_rows

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def _single(input_dict: dict) -> torch.Tensor:
    tensors = next(iter(input_dict.values()))
    return tensors[0] if isinstance(tensors, list) else tensors


class _Relayout(ConversionOps):
    """One foreign tensor in, its native form(s) out: subclasses say how in `native`."""

    def native(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        return self.native(_single(input_dict))

    @property
    def reverse_op(self) -> ConversionOps:
        # A loaded model holds native tensors and saves as a native llmq checkpoint: nothing to undo.
        from transformers.core_model_loading import _IdentityOp

        return _IdentityOp()


class GptqV1Zeros(_Relayout):
    """GPTQ v1 qzeros (stored z - 1) -> true zero points."""

    def __init__(self, bits: int):
        self.bits = bits

    def native(self, tensor):
        return {"qzeros": gptq.shift_zeros(tensor, self.bits, 1)}


class ToInt32(_Relayout):
    """act-order g_idx, whatever integer type it was stored in."""

    def native(self, tensor):
        return {"g_idx": tensor.to(torch.int32)}


class AwqRepack(_Relayout):
    """AWQ GEMM words (packed along N, interleaved) -> qweight packed along K, or qzeros packed along N."""

    def __init__(self, target: str):
        self.target = target

    def native(self, tensor):
        codes = awq.unpack_awq(tensor)
        return {self.target: pack_rows(codes, 4) if self.target == "qweight" else pack_cols(codes, 4)}


class CtPacked(_Relayout):
    """weight_packed [N, K*b/32] -> qweight [K*b/32, N]; symmetric: also qzeros at the implied 2^(b-1)."""

    def __init__(self, bits: int, sym: bool, group_size: int):
        self.bits, self.sym, self.group_size = bits, sym, group_size

    def native(self, tensor):
        out = {"qweight": tensor.t().contiguous()}
        if self.sym:
            n, k = tensor.shape[0], tensor.shape[1] * codes_per_word(self.bits)
            groups = k // group_width(self.group_size, k)
            out["qzeros"] = compressed_tensors.implied_zeros(n, groups, self.bits)
        return out


class Transposed(_Relayout):
    """compressed-tensors' [N, ...] tensors -> llmq's [..., N], optionally in another float dtype."""

    def __init__(self, target: str, dtype: torch.dtype | None = None):
        self.target, self.dtype = target, dtype

    def native(self, tensor):
        t = tensor.t()
        return {self.target: (t.to(self.dtype) if self.dtype is not None else t).contiguous()}


@dataclass
class ForeignCheckpoint:
    """What llmq's quantizer needs to load a foreign folder: native names, shapes and dtypes, and the converters."""

    source_format: str
    quant_config: QuantConfig
    header: dict[str, tuple[list[int], str]]  # native tensor name -> (shape, safetensors dtype), as read_header
    converters: list[WeightConverter] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # regexes of stored tensors with no native counterpart


def _converters(fmt: str, qcfg: dict, qc: QuantConfig, native_scales: torch.dtype | None):
    if fmt == gptq.QUANT_METHOD:
        convs = [WeightConverter("g_idx", "g_idx", [ToInt32()])] if qc.desc_act else []
        if gptq.stored_format(qcfg) == "gptq":
            convs.append(WeightConverter("qzeros", "qzeros", [GptqV1Zeros(qc.bits)]))
        return convs, [] if qc.desc_act else [r"\.g_idx$"]  # a trivial g_idx is k // group_size: implied
    if fmt == awq.QUANT_METHOD:
        return [WeightConverter("qweight", "qweight", [AwqRepack("qweight")]),
                WeightConverter("qzeros", "qzeros", [AwqRepack("qzeros")])], [r"\.g_idx$"]
    packed = WeightConverter("weight_packed", ["qweight", "qzeros"] if qc.sym else "qweight",
                             [CtPacked(qc.bits, qc.sym, qc.group_size)])
    convs = [packed, WeightConverter("weight_scale", "scales", [Transposed("scales", native_scales)])]
    if not qc.sym:
        convs.append(WeightConverter("weight_zero_point", "qzeros", [Transposed("qzeros")]))
    return convs, [r"\.weight_shape$"]


def foreign_checkpoint(folder: str | os.PathLike) -> ForeignCheckpoint:
    """Read a gptq / awq / compressed-tensors folder's headers and small tensors; no weight is read."""
    from .convert import read_checkpoint

    ckpt = read_checkpoint(Path(folder), shapes_only=True)  # checks the format and the tensors' consistency
    header = {k: (list(v.shape), _DTYPE_NAMES[v.dtype]) for k, v in ckpt.tensors.items()}
    qcfg = ckpt.config["quantization_config"]
    native_scales = compressed_tensors.native_scale_dtype(qcfg) if ckpt.source_format == "compressed-tensors" \
        else None
    convs, unexpected = _converters(ckpt.source_format, qcfg, ckpt.quant_config, native_scales)
    return ForeignCheckpoint(ckpt.source_format, ckpt.quant_config, header, convs, unexpected)


# Foreign checkpoints being loaded, by the key their quantization_config carries as "_foreign": transformers
# rebuilds the config from a dict, so the (unserializable) converters wait here for the quantizer.
_IN_FLIGHT: dict[str, ForeignCheckpoint] = {}


def in_flight(key: str | None) -> ForeignCheckpoint | None:
    return _IN_FLIGHT.get(key) if key else None


def load(path: str | os.PathLike, **hf_kwargs):
    """Load a gptq / awq / compressed-tensors folder as an llmq model (QuantLinear layers), converting in flight."""
    from transformers import AutoConfig, AutoModelForCausalLM

    foreign = foreign_checkpoint(path)
    given = hf_kwargs.pop("config", None)
    config = copy.deepcopy(given) if given is not None else AutoConfig.from_pretrained(path)  # never the caller's
    key = uuid.uuid4().hex
    config.quantization_config = {**foreign.quant_config.to_dict(), "_foreign": key}
    _IN_FLIGHT[key] = foreign
    try:
        return AutoModelForCausalLM.from_pretrained(path, config=config, **hf_kwargs)
    finally:
        del _IN_FLIGHT[key]
