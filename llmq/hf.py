"""transformers integration: the "llmq" quantization config and quantizer (5.x API).

`import llmq` registers both once, so that
`AutoModelForCausalLM.from_pretrained(OUT)` of an llmq checkpoint swaps the
quantized nn.Linear modules for QuantLinear on the meta device before the
weights are read; the packed buffers are then assigned by transformers' own
loader. Which modules are quantized is read from the checkpoint itself (the
tensors ending in `.qweight`; W8A8: int8 `.weight`s beside a `.weight_scale`,
experts included), and every expected tensor is checked against the
safetensors headers first.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .config import QUANT_METHOD, QuantConfig
from .errors import LlmqError
from .experts import empty_quant_experts, experts_layout, find_experts, inside_quant_experts
from .folder_io import names_on_load, read_header
from .formats import native
from .formats.checks import check_native_tensors, read_small_tensors
from .formats.native import check_against_model
from .qweight import quantized_module_names, w8a8_module_names
from .modules import QUANTIZED_MODULES
from .modules.qlinear import QuantLinear
from .modules.replace import replace_module
from .modules.siblings import link_siblings
from .modules.w8a8 import W8A8Linear


class LlmqConfig(QuantizationConfigMixin):
    """config.json["quantization_config"] of an llmq checkpoint, as transformers sees it."""

    def __init__(self, **kwargs):
        kwargs["quant_method"] = QUANT_METHOD
        QuantConfig.from_dict(kwargs)  # validates; raises LlmqError on a bad config
        self.__dict__.update(kwargs)

    @property
    def foreign(self):
        """The gptq / awq / compressed-tensors folder being loaded through this config, or None (native)."""
        from .formats.inflight import in_flight

        return in_flight(self.__dict__.get("_foreign"))

    def to_dict(self) -> dict:
        # Private keys ("_foreign") belong to one load and are never written to a checkpoint.
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items() if not k.startswith("_")}

    @property
    def quant_config(self) -> QuantConfig:
        return QuantConfig.from_dict(self.to_dict())


_SAFETENSORS_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def swap_in_quant_linears(model: nn.Module, names: list[str], qc: QuantConfig, dtype: torch.dtype,
                          header: dict) -> None:
    """Replace the named nn.Linear modules by empty QuantLinear modules (meta device).

    Scales keep the dtype they were stored in, so the loaded buffers equal the
    saved ones bit for bit, unless a 16-bit model dtype was asked for: then they
    follow it, as the kernels read scales in the activation dtype.
    """
    for name in names:
        linear = _linear(model, name)
        gs = qc.group_size_for(linear.in_features)
        if linear.in_features % gs:
            raise LlmqError(f"group size {qc.group_size} does not divide {name}'s {linear.in_features} "
                            "input features: the checkpoint config is inconsistent")
        stored = _SAFETENSORS_FLOATS.get(header.get(f"{name}.scales", (None, "F16"))[1], torch.float16)
        scale_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else stored
        with torch.device("meta"):
            q = QuantLinear(linear.in_features, linear.out_features, bits=qc.bits, group_size=gs,
                            bias=linear.bias is not None, desc_act=qc.desc_act, dtype=scale_dtype)
            if linear.bias is not None:
                q.bias = nn.Parameter(torch.empty_like(linear.bias), requires_grad=False)
        replace_module(model, name, q)


def swap_in_w8a8_linears(model: nn.Module, names: list[str], qc: QuantConfig, dtype: torch.dtype) -> None:
    """Replace the named nn.Linear modules by empty W8A8Linear modules (meta device)."""
    for name in names:
        linear = _linear(model, name)
        with torch.device("meta"):
            q = W8A8Linear(linear.in_features, linear.out_features, static=qc.act == "static",
                           bias=linear.bias is not None, dtype=dtype)
        replace_module(model, name, q)


def _linear(model: nn.Module, name: str) -> nn.Linear:
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        linear = None
    if not isinstance(linear, nn.Linear):
        raise LlmqError(f"checkpoint quantizes {name!r}, which is not a linear layer of this model: "
                        "the checkpoint does not match its config.json")
    return linear


def names_in_model(model: nn.Module, header: dict, quantizer=None, int8_experts: bool = False) -> dict:
    """The header keyed by the names the tensors get in the model.

    Some architectures name tensors differently on disk and in memory (Mixtral's
    `block_sparse_moe` is `mlp` in transformers 5); transformers' own conversion
    mapping renames them on load, and is applied here the same way. Keys that a
    converter merges (per-expert full-precision weights stacked into one 3D
    parameter) get the shape None: their stored shape is not the parameter's.

    int8_experts: the header holds W8A8 experts, which load per expert (see
    LlmqHfQuantizer.update_weight_conversions), not through the MoE converters.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # pragma: no cover - transformers without conversion mappings
        return header
    conversions = get_model_conversion_mapping(model, hf_quantizer=quantizer)
    if int8_experts:
        conversions = [c for c in conversions if not _merges_experts(c)]
    if not conversions:
        return header
    renamed = {}
    for key, (name, converted) in names_on_load(model, header, conversions).items():
        shape, dtype = header[key]
        renamed[name] = (None if converted is not None else shape, dtype)
    return renamed


def swap_in_quant_experts(model: nn.Module, header: dict, qc: QuantConfig, dtype: torch.dtype) -> None:
    """Replace each experts module whose projections the checkpoint quantizes by an empty QuantExperts
    of QuantLinear (weight-only) or W8A8Linear (scheme w8a8) modules."""
    marker = ".weight_scale" if qc.scheme == "w8a8" else ".qweight"
    for name, experts in find_experts(model).items():
        if not any(k.startswith(name + ".") and k.endswith(marker) for k in header):
            continue  # kept in full precision: transformers' own conversion loads it
        layout = experts_layout(experts, name, model)

        def make_linear(local, k, n, bias, _name=name):
            if qc.scheme == "w8a8":
                return W8A8Linear(k, n, static=qc.act == "static", bias=bias, dtype=dtype)
            gs = qc.group_size_for(k)
            if k % gs:
                raise LlmqError(f"group size {qc.group_size} does not divide the {k} input features of the "
                                f"experts in {_name}: the checkpoint config is inconsistent")
            first = f"{_name}.0.{layout.down_name}.scales"
            stored = _SAFETENSORS_FLOATS.get(header.get(first, (None, "F16"))[1], torch.float16)
            scale_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else stored
            # Per expert: one routed too few tokens was quantized by round-to-nearest, without act-order.
            return QuantLinear(k, n, bits=qc.bits, group_size=gs, bias=bias,
                               desc_act=f"{_name}.{local}.g_idx" in header, dtype=scale_dtype)

        with torch.device("meta"):
            q = empty_quant_experts(experts, layout, make_linear)
        replace_module(model, name, q)


def spare_parents_from_init(model: nn.Module) -> None:
    """Mark as initialized each module that holds a quantized module and no buffer that loading leaves
    empty.

    After loading, transformers runs the model's `_init_weights` on every module, and some
    architectures' versions reach into a child linear's `.weight` by name (GPT-BigCode's c_proj,
    ModernBERT's Wi/Wo, Mamba's out_proj), which a quantized module does not have. What such a parent
    holds itself comes from the checkpoint, which llmq writes whole and checks against the model
    (check_against_model), except its non-persistent buffers: a parent with any is left to its
    initializer. Children are still visited one by one."""
    for module in model.modules():
        if not module._non_persistent_buffers_set and any(isinstance(c, QUANTIZED_MODULES) for c in module.children()):
            module._is_hf_initialized = True


def holds_int8_experts(header: dict) -> bool:
    """Whether a checkpoint's (disk-named) tensors hold W8A8 experts: per-expert int8 `weight`s, which
    transformers' MoE converters would otherwise stack into the full-precision 3D expert parameters."""
    return any(".experts." in name for name in w8a8_module_names(header))


def _merges_experts(converter) -> bool:
    from transformers.core_model_loading import WeightConverter

    return isinstance(converter, WeightConverter) and any(
        ".experts." in source for source in converter._original_source_patterns)


class LlmqHfQuantizer(HfQuantizer):
    requires_calibration = True  # checkpoints are quantized by `llmq quantize`, never on load

    def validate_environment(self, *args, **kwargs):
        return

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, dtype=None, **kwargs):
        qc = self.quantization_config.quant_config
        if not checkpoint_files:
            raise LlmqError("an llmq checkpoint must be loaded from its safetensors files")
        foreign = self.quantization_config.foreign
        if foreign is not None:
            # A gptq / awq / compressed-tensors folder: its tensors are converted as they are read
            # (get_weight_conversions), so the model is built from their native names and shapes.
            self.int8_experts = holds_int8_experts(foreign.header)
            header = names_in_model(model, foreign.header, int8_experts=self.int8_experts)
            model._keys_to_ignore_on_load_unexpected = (set(model._keys_to_ignore_on_load_unexpected or ())
                                                        | set(foreign.unexpected))
        else:
            # dtypes, shapes, finite scales: a damaged tensor is named, never loaded into a layer
            small = read_small_tensors(checkpoint_files, native.FORMAT.small_tensors)
            check_native_tensors(small, qc, Path(checkpoint_files[0]).parent)
            stored = read_header(checkpoint_files)
            self.int8_experts = holds_int8_experts(stored)
            header = names_in_model(model, stored, self)
        if qc.scheme == "w8a8":
            dtype = dtype or torch.get_default_dtype()
            if not w8a8_module_names(header):
                raise LlmqError("config.json says llmq w8a8 but the checkpoint holds no int8 weights with a "
                                "'.weight_scale': it is damaged; re-create it with `llmq quantize`")
            swap_in_quant_experts(model, header, qc, dtype)
            names = [n for n in w8a8_module_names(header) if not inside_quant_experts(model, n)]
            swap_in_w8a8_linears(model, names, qc, dtype)
            self.experts_all_quantized = not find_experts(model)
            check_against_model(model, header)
            spare_parents_from_init(model)
            return model
        if not quantized_module_names(header):
            raise LlmqError("config.json says llmq-quantized but the checkpoint holds no '.qweight' tensors: "
                            "it is damaged; re-create it with `llmq quantize`")
        dtype = dtype or torch.get_default_dtype()
        swap_in_quant_experts(model, header, qc, dtype)
        names = [n for n in quantized_module_names(header) if not inside_quant_experts(model, n)]
        swap_in_quant_linears(model, names, qc, dtype, header)
        self.experts_all_quantized = not find_experts(model)
        check_against_model(model, header)
        spare_parents_from_init(model)
        return model

    def update_weight_conversions(self, weight_conversions, *model):
        # transformers 5.24 passes the model too; 5.17 passes the conversions alone.
        updated = super().update_weight_conversions(weight_conversions, *model)
        # W8A8 experts are stored per expert as int8 `weight`s, the names of the full-precision
        # per-expert weights that the MoE converters stack into 3D parameters: here they load into
        # the experts' own W8A8Linear modules instead. And where no full-precision experts module is
        # left, the converters have nothing to load, while transformers 5.17 matches their
        # `experts.*.w1.weight` inside `experts.0.w1.weight_packed` (no name boundary), taking the
        # tensors that llmq's own converters read.
        if getattr(self, "int8_experts", False) or getattr(self, "experts_all_quantized", False):
            updated = [c for c in updated if not _merges_experts(c)]
        return updated

    def get_weight_conversions(self):
        foreign = self.quantization_config.foreign
        return list(foreign.converters) if foreign is not None else []

    def _process_model_after_weight_loading(self, model, **kwargs):
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.post_load()
        link_siblings(model)
        return model

    def _dequantize(self, model, dtype=None):
        from .dequantize import dequantize_modules

        return dequantize_modules(model, dtype)

    @property
    def is_trainable(self) -> bool:
        return False

    def is_serializable(self, safe_serialization=None):
        return True


_registered = False


def register() -> None:
    """Register the llmq config and quantizer with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LlmqConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LlmqHfQuantizer)
    _registered = True
