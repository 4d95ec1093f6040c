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

import torch
from torch import nn

from .experts import linear_view, rolled
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


def dequantize_modules(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Replace model's quantized modules with full-precision ones, and cast the model to dtype (default:
    the one it computes in now; one dtype throughout: the other modules may be in another one);
    returns model."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or model.get_input_embeddings().weight.dtype
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantExperts):
            replace_module(model, name, rolled(module, lambda linear: _weight(linear, dtype)))
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantLinear, W8A8Linear)):
            replace_module(model, name, linear_view(*_weight(module, dtype)))
    return model.to(dtype)


def dequantize(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Replace model's quantized modules with full-precision ones; returns model, no longer marked
    quantized. dtype: the whole model's dtype afterwards (default: the one it computes in now)."""
    dequantize_modules(model, dtype)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # what transformers' model.dequantize() does after
    elif getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model
