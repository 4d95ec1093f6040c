"""The interface every checkpoint format module exposes, and the native checkpoint it works on.

Each format module (native, gptq, awq, compressed_tensors, compressed_tensors_w8a8)
defines `FORMAT`, a `Format`: a few functions, no class hierarchy. llmq.formats.table
lists them; conversion (convert.py), loading without a copy (inflight.py) and the
checks of what is read (checks.py) go through that table instead of naming formats.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from ..config import QuantConfig
from ..kernels.layout import codes_per_word
from ..qweight import quantized_module_names
from .engines import EngineSupport


@dataclass
class Checkpoint:
    """A quantized checkpoint in llmq's native layout, in memory."""

    folder: Path
    config: dict  # config.json, its quantization_config as found in the source
    tensors: dict[str, torch.Tensor]  # native names and layout
    quant_config: QuantConfig
    source_format: str

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """{quantized linear: (out_features, in_features)}."""
        bits = self.quant_config.bits
        packed = {name: self.tensors[f"{name}.qweight"] for name in quantized_module_names(self.tensors)}
        return {name: (q.shape[1], q.shape[0] * codes_per_word(bits)) for name, q in packed.items()}

    @cached_property
    def model_linears(self) -> "ModelLinears":
        """Where the model's linears stand, from a meta skeleton of its config."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..arch import decoder_layers
        from ..experts import find_experts
        from ..folder_io import name_on_disk

        cfg = AutoConfig.from_pretrained(self.folder)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        prefix, _ = decoder_layers(model)
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        inside = [n for n in names if n.startswith(prefix + ".")]
        head = model.get_output_embeddings()
        head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
        experts = frozenset(type(m).__name__ for m in find_experts(model).values())
        # The checkpoint's tensors carry the names transformers saves them under (Kimi Linear's
        # `mlp.` is `block_sparse_moe.` there): where a linear's differs, both are kept.
        weight_on_disk = name_on_disk(model)
        on_disk = {n: weight_on_disk(f"{n}.weight").removesuffix(".weight") for n in names}
        return ModelLinears(prefix, inside, [n for n in names if n not in inside], head_name, experts,
                            {n: d for n, d in on_disk.items() if d != n})


class ModelLinears(NamedTuple):
    layers: str  # the decoder layers' prefix ("model.layers"); layer i's modules are "<layers>.<i>.<name>"
    inside: list[str]  # linears inside decoder layers
    outside: list[str]  # the other linears
    head: str | None  # the output head's name ("lm_head")
    experts: frozenset = frozenset()  # the class names of its experts modules
    renamed: dict | None = None  # linear -> its name on disk, where the two differ

    def on_disk(self, name: str) -> str:
        """A linear's name in the checkpoint's tensors."""
        return (self.renamed or {}).get(name, name)

    def in_model(self, names) -> set[str]:
        """The model's names of modules named `names` on disk (each itself where no linear is stored so)."""
        back = {d: n for n, d in (self.renamed or {}).items()}
        return {back.get(name, name) for name in names}

    def spellings(self, name: str) -> list[str]:
        """A linear's name in the model, and on disk where that differs (engines match either)."""
        disk = self.on_disk(name)
        return [name] if disk == name else [name, disk]

    def kept(self, quantized) -> list[str]:
        """Every linear whose name on disk is not among `quantized`, under each of its names."""
        quantized = set(quantized)
        return [name for n in self.inside + self.outside if self.on_disk(n) not in quantized
                for name in self.spellings(n)]


@dataclass(frozen=True)
class Relayout:
    """One stored tensor turned into native tensor(s) while a loader reads it (llmq.formats.inflight)."""

    source: str  # the stored name's last part ("qzeros", "weight_packed" ...)
    targets: str | tuple[str, ...]  # the native name's last part(s)
    native: Callable[[torch.Tensor], dict[str, torch.Tensor]]  # stored tensor -> {native last part: tensor}


@dataclass(frozen=True)
class Format:
    """A checkpoint format llmq reads, and perhaps writes."""

    name: str  # the quant_method its config.json names
    # quantization_config -> whether it describes a checkpoint stored in this format
    detect: Callable[[dict], bool]
    # (tensors, quantization_config) -> (tensors in llmq's native layout, QuantConfig), codes bit-exact
    read: Callable[[dict, dict], tuple[dict, QuantConfig]]
    # suffixes of the stored tensor names whose values `read` and the checks need (the rest may stay meta)
    small_tensors: tuple[str, ...]
    # Checkpoint -> this format's tensors; None: read only
    encode: Callable[[Checkpoint], dict] | None = None
    # Checkpoint -> the quantization_config this format writes for it
    config: Callable[[Checkpoint], dict] | None = None
    # Checkpoint -> which engines load it written in this format, and why not
    engines: Callable[[Checkpoint], list[EngineSupport]] = field(default=lambda ckpt: [])
    # (quantization_config, QuantConfig) -> (re-layouts of stored tensors, regexes of stored tensors
    # with no native counterpart), for loading the folder without a converted copy; None: native
    in_flight: Callable[[dict, QuantConfig], tuple[list[Relayout], list[str]]] | None = None
    # QuantConfig -> whether this format writes such a model (for a variant, see with_variant)
    writes: Callable[[QuantConfig], bool] = field(default=lambda qc: True)
    extra_json: str | None = None  # a second file with the quantization_config that older loaders read


def with_variant(base: Format, variant: Format) -> Format:
    """One table entry for two layouts under one quant_method: the variant reads the configs its
    `detect` accepts and writes the models its `writes` accepts; the base does the rest."""

    def stored(qcfg: dict) -> Format:
        return variant if variant.detect(qcfg) else base

    def written(ckpt: Checkpoint) -> Format:
        return variant if variant.writes(ckpt.quant_config) else base

    return replace(
        base,
        read=lambda tensors, qcfg: stored(qcfg).read(tensors, qcfg),
        small_tensors=tuple(dict.fromkeys(base.small_tensors + variant.small_tensors)),
        encode=lambda ckpt: written(ckpt).encode(ckpt),
        config=lambda ckpt: written(ckpt).config(ckpt),
        engines=lambda ckpt: written(ckpt).engines(ckpt),
        in_flight=lambda qcfg, qc: stored(qcfg).in_flight(qcfg, qc),
        writes=lambda qc: base.writes(qc) or variant.writes(qc),
    )
