"""`dequantize`: a quantized model back to full-precision modules, in place.

Each quantized linear (QuantLinear, W8A8Linear) becomes an nn.Linear holding the
weight it computes with (`dequantize_weight`), and each QuantExperts the
architecture's own experts module (its weightless template) with that weight
stacked back into its 3D parameters, in the module's layout (transposed or
not, gate and up concatenated as they were split). The model then computes in
full precision what the quantized one approximated, with the quantization
error kept, and saves as a plain transformers checkpoint. Also what
transformers' `model.dequantize()` runs for llmq checkpoints.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .modules.qexperts import QuantExperts
from .modules.qlinear import QuantLinear
from .modules.replace import replace_module
from .modules.w8a8 import W8A8Linear


def _weight(linear: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [N, K], bias [N] or None) in dtype: a quantized linear's dequantized weight, or an
    nn.Linear's own (the experts of a calibration pass)."""
    weight = linear.weight if type(linear) is nn.Linear else linear.dequantize_weight(torch.float32)
    bias = linear.bias
    return weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype)


def _linear(layer: nn.Module, dtype: torch.dtype) -> nn.Linear:
    weight, bias = _weight(layer, dtype)
    with torch.device("meta"):
        linear = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, dtype=dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def _experts(q: QuantExperts, dtype: torch.dtype) -> nn.Module:
    """The template's experts module with the experts' weights stacked back (experts.unroll, reversed)."""
    template = q.template
    transposed = bool(getattr(template, "is_transposed", False))
    up_param = "gate_up_proj" if q.has_gate else "up_proj"
    sides = {up_param: q.up_names, "down_proj": (q.down_name,)}
    module = copy.copy(template)
    module.__dict__["_parameters"] = {}
    module.__dict__["_modules"] = dict(template._modules)
    for param, names in sides.items():
        weights, biases = [], []
        for e in range(q.num_experts):
            parts = [_weight(q.expert(e)._modules[n], dtype) for n in names]
            weights.append(torch.cat([w for w, _ in parts]))  # [out, in]
            biases.append(None if parts[0][1] is None else torch.cat([b for _, b in parts]))
        stacked = torch.stack(weights)
        module._parameters[param] = nn.Parameter(stacked.transpose(1, 2).contiguous() if transposed else stacked,
                                                 requires_grad=False)
        if biases[0] is not None:
            module._parameters[f"{param}_bias"] = nn.Parameter(torch.stack(biases), requires_grad=False)
    return module


def dequantize_modules(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace model's quantized modules with full-precision ones, and cast the model to dtype (one
    dtype throughout: the other modules may be in another one); returns model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantExperts):
            replace_module(model, name, _experts(module, dtype))
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantLinear, W8A8Linear)):
            replace_module(model, name, _linear(module, dtype))
    return model.to(dtype)


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace model's quantized modules with full-precision ones; returns model, no longer marked
    quantized. dtype: the whole model's dtype afterwards (default: the one it computes in now)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dequantize_modules(model, dtype or model.get_input_embeddings().weight.dtype)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # what transformers' model.dequantize() does after
    elif getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model
