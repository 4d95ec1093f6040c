"""A model's skeleton on the meta device, and whether its shards can be read layer by layer or tensor by tensor.

Working from the shards instead of a loaded model is only safe when what is
read gives, by name, shape and content, the tensors `from_pretrained` would
put in the model. transformers 5 renames some checkpoint keys on load and
fuses others (mixture-of-experts weights stored per expert become 3D
parameters); it keeps some modules in float32; it initialises tensors a
checkpoint lacks. Two readings of the shards, two answers, each a phrase
saying why not (None: it can):

- `Skeleton.blocker`: layer by layer (llmq.stream). transformers' own loader
  materialises one decoder layer from that layer's keys, renaming and fusing
  them as from_pretrained does, so renamed or fused tensors stream as long as
  every one stays in its decoder layer.
- `Skeleton.tensor_blocker`: tensor by tensor, each stored tensor quantized
  under its own name (llmq.shard_rtn): only when no tensor is renamed or fused
  and the model has no experts modules (unrolled per expert in memory).

Where a reading cannot work the caller takes the next one, or loads the model
the ordinary way.

The skeleton is built the way `from_pretrained` builds it (the dtype it would
pick, the conversion mapping it would apply), so that these checks ask
transformers rather than a copy of its rules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import LlmqError
from .folder_io import names_on_load
from .formats.table import read_folder_quant_config
from .loading import check_model_source, refuse_quantized, resolve_dtype
from .shards import SourceShards


@dataclass
class Skeleton:
    """The model's module tree on the meta device, with its source shards."""

    source: str  # what the user named: a folder or a hub id
    model: nn.Module  # on the meta device
    dtype: torch.dtype  # what from_pretrained would load floating tensors as
    shards: SourceShards | None
    blocker: str | None  # why the shards cannot be read layer by layer; None when they can
    folder: str | None = None  # the local folder with config and tokenizer (a hub model's snapshot)
    tensor_blocker: str | None = None  # why they cannot be read tensor by tensor (blocker included)

    def __post_init__(self):
        if self.folder is None and Path(self.source).is_dir():
            self.folder = self.source

    @property
    def tied(self) -> set[str]:
        """Tensors tied to another one: from_pretrained fills them from their source, saves skip them."""
        return set(getattr(self.model, "all_tied_weights_keys", {}) or {})

    def model_bytes(self) -> int:
        """Host memory the model's tensors take once loaded (in the dtype from_pretrained picks)."""
        sd = self.model.state_dict()
        return sum(t.numel() * t.element_size() for k, t in sd.items() if k not in self.tied)

    def expected_keys(self) -> list[str]:
        """The model's state dict keys that a checkpoint holds, in module order."""
        tied = self.tied
        return [k for k in self.model.state_dict() if k not in tied]


def build_skeleton(source: str | os.PathLike, dtype="auto", revision: str | None = None) -> Skeleton:
    """The meta-device skeleton of the causal LM at source (a local folder or hub id).

    Raises LlmqError for a source that is not a model (or is already quantized),
    exactly as loading it would.
    """
    from transformers import AutoConfig
    from transformers.modeling_utils import _get_dtype

    source, _ = check_model_source(str(source), revision)
    state_dict = None
    if Path(source).is_dir():
        folder = source
        try:
            shards = SourceShards(source)
        except FileNotFoundError:
            shards = None
        files = shards.files if shards else None
    else:  # a hub id: small files now, each weight shard when first read (llmq.hub)
        from .hub import open_hub_model

        hub = open_hub_model(source, revision)
        shards = SourceShards.from_hub(hub)
        folder = str(shards.folder)
        refuse_quantized(source, read_folder_quant_config(folder),
                         {k: v for name in hub.headers for k, v in hub.headers[name].items()})
        files = None
        # The dtype from the first shard's header, as transformers reads it from the file itself.
        first = shards.files[0]
        state_dict = {k: torch.empty(shape, dtype=dt, device="meta")
                      for k, (shape, dt) in shards.header.items() if shards.file_of[k] == first and dt is not None}
    config = AutoConfig.from_pretrained(folder)
    sharded = shards.metadata if shards and shards.metadata is not None else None
    if shards is None:
        resolved = resolve_dtype(dtype)
        resolved = config.dtype if resolved == "auto" and getattr(config, "dtype", None) else resolved
        resolved = torch.float32 if resolved == "auto" else resolved
    else:
        config, resolved = _get_dtype(resolve_dtype(dtype), files, config, sharded, state_dict, True)
    try:
        model = _build_like_from_pretrained(config, resolved)
    except (KeyError, ValueError) as e:  # not a causal LM transformers knows: from_pretrained will say why
        reason = f"transformers builds no causal LM from this config ({e})"
        return Skeleton(source, None, resolved, shards, reason, folder, reason)
    skeleton = Skeleton(source, model, resolved, shards, None, folder)
    if shards is None:
        skeleton.blocker = skeleton.tensor_blocker = "the model folder holds no safetensors weights"
    else:
        skeleton.blocker, converted = _blockers(skeleton)
        skeleton.tensor_blocker = skeleton.blocker or converted
    return skeleton


def _build_like_from_pretrained(config, dtype: torch.dtype) -> nn.Module:
    # from_pretrained's own construction: its init contexts put parameters on the
    # meta device with the dtype it would load them in.
    from transformers.modeling_utils import ContextManagers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if getattr(config, "sub_configs", {}).get("text_config") is getattr(cls, "config_class", None):
        config = config.get_text_config()  # a multimodal config whose causal LM is its language model alone
    with ContextManagers(cls.get_init_context(dtype, False, False, None)):
        model = cls(config)
    return model.eval()


def _layer_of(name: str, prefix: str | None) -> str | None:
    """The decoder layer index a state-dict name lies in ("0", "1", ...), or None outside the layers."""
    if prefix is None or not name.startswith(prefix):
        return None
    return name[len(prefix):].partition(".")[0]


def _split_into(loads_as: dict, conversions: list) -> set[str]:
    """The further names the tensors that a one-to-many converter splits load into (Sarvam's
    `query_key_value` into q_proj, k_proj and v_proj): names_on_load gives the first alone."""
    from transformers.core_model_loading import WeightConverter

    splits = {pattern: c.target_patterns for c in conversions if isinstance(c, WeightConverter)
              and len(c.source_patterns) == 1 and len(c.target_patterns) > 1 for pattern in c.source_patterns}
    names = set()
    for renamed, pattern in loads_as.values():
        first, *others = splits.get(pattern, [None])
        if first is not None and first in renamed:
            names.update(renamed.replace(first, other, 1) for other in others)
    return names


def _blockers(sk: Skeleton) -> tuple[str | None, str | None]:
    """(why not layer by layer, why not tensor by tensor beyond that), each None when it can."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    from .arch import decoder_layers
    from .experts import find_experts

    model = sk.model
    # transformers' loader keeps such modules in float32 (its dtype plan), a tensor-by-tensor cast would not.
    converted = (f"transformers keeps some of {type(model).__name__}'s modules in float32"
                 if model._get_dtype_plan(sk.dtype) else None)
    meta_sd = model.state_dict()
    try:
        prefix = decoder_layers(model)[0] + "."
    except LlmqError:
        prefix = None
    target = {}  # stored name -> the model's name it loads into
    conversions = get_model_conversion_mapping(model)
    loads_as = names_on_load(model, sk.shards.keys(), conversions)
    for key, (renamed, converter) in loads_as.items():
        if renamed not in meta_sd and key in meta_sd:  # as transformers' loader does: the name as stored
            renamed, converter = key, None
        if converter is not None or renamed != key:
            converted = converted or f"transformers renames or fuses this model's tensors on load ({key} -> {renamed})"
            if _layer_of(key, prefix) != _layer_of(renamed, prefix):
                return f"transformers loads tensor {key} into {renamed}, outside its decoder layer", converted
        target[key] = renamed
    loaded = set(target.values()) | _split_into(loads_as, conversions)
    tied = sk.tied
    missing = sorted(set(meta_sd) - loaded - tied)
    if missing:
        return f"the checkpoint lacks {len(missing)} tensors the model expects (e.g. {missing[0]})", converted
    unexpected = sorted(k for k, name in target.items() if name not in meta_sd)
    if unexpected:
        return (f"the checkpoint holds {len(unexpected)} tensors the model does not use (e.g. {unexpected[0]})",
                converted)
    unknown = [k for k, (_, dtype) in sk.shards.header.items() if dtype is None]
    if unknown:
        return f"tensor {unknown[0]} has a dtype llmq does not read tensor by tensor", converted
    for key, name in target.items():  # converted tensors' shapes: the loader checks them (llmq.stream)
        if name == key and sk.shards.header[key][0] != list(meta_sd[key].shape):
            return (f"tensor {key} has shape {sk.shards.header[key][0]}, the model expects "
                    f"{list(meta_sd[key].shape)}"), converted
    if converted is None and find_experts(model):  # stored fused on disk too (gpt-oss)
        converted = "its mixture-of-experts experts are unrolled per expert in memory"
    return None, converted
