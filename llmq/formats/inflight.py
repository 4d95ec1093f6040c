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
from ..folder_io import SAFETENSORS_DTYPES
from .table import FORMATS

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class _Relayout(ConversionOps):
    """One stored tensor in, its native form(s) out, by its format's re-layout (spec.Relayout.native)."""

    def __init__(self, native):
        self.native = native

    @torch.no_grad()
    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        tensors = next(iter(input_dict.values()))
        return self.native(tensors[0] if isinstance(tensors, list) else tensors)

    @property
    def reverse_op(self) -> ConversionOps:
        # A loaded model holds native tensors and saves as a native llmq checkpoint: nothing to undo.
        from transformers.core_model_loading import _IdentityOp

        return _IdentityOp()


@dataclass
class ForeignCheckpoint:
    """What llmq's quantizer needs to load a foreign folder: native names, shapes and dtypes, and the converters."""

    source_format: str
    quant_config: QuantConfig
    header: dict[str, tuple[list[int], str]]  # native tensor name -> (shape, safetensors dtype), as read_header
    converters: list[WeightConverter] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # regexes of stored tensors with no native counterpart


def _converters(fmt: str, qcfg: dict, qc: QuantConfig) -> tuple[list[WeightConverter], list[str]]:
    relayouts, unexpected = FORMATS[fmt].in_flight(qcfg, qc)
    convs = [WeightConverter(r.source, list(r.targets) if isinstance(r.targets, tuple) else r.targets,
                             [_Relayout(r.native)]) for r in relayouts]
    return convs, unexpected


def foreign_checkpoint(folder: str | os.PathLike) -> ForeignCheckpoint:
    """Read a gptq / awq / compressed-tensors folder's headers and small tensors; no weight is read."""
    from .convert import read_checkpoint

    ckpt = read_checkpoint(Path(folder), shapes_only=True)  # checks the format and the tensors' consistency
    header = {k: (list(v.shape), _DTYPE_NAMES[v.dtype]) for k, v in ckpt.tensors.items()}
    convs, unexpected = _converters(ckpt.source_format, ckpt.config["quantization_config"], ckpt.quant_config)
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
        loaded = AutoModelForCausalLM.from_pretrained(path, config=config, **hf_kwargs)
    finally:
        del _IN_FLIGHT[key]
    model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading info) when asked for
    # transformers keeps the conversions a load used, to undo them when the model is saved; the model
    # now holds llmq's native tensors and saves as a native checkpoint, so its re-layouts are no longer
    # the load's to undo (undone, a re-layout to several tensors wrote them under its stored name).
    model._weight_conversions = [c for c in getattr(model, "_weight_conversions", None) or ()
                                 if not any(isinstance(op, _Relayout) for op in getattr(c, "operations", ()))]
    return loaded
