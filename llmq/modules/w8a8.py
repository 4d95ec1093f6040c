"""W8A8Linear: int8 weights and int8 activations (SmoothQuant-style W8A8).

Buffers, named and shaped as in the checkpoint (and as compressed-tensors'
`int-quantized` format and vLLM have them; K = in_features, N = out_features):

    weight        int8    [N, K]   symmetric codes, w = weight * weight_scale
    weight_scale  float32 [N, 1]   one scale per output row
    input_scale   float32 [1]      static activations only: the calibrated scale
    bias          float   [N]      only when the layer has one

The scales stay float32 when the model is cast to another dtype.

Forward: the input is quantized to int8 (per token at run time, or with the
static scale), multiplied with the int8 weight into int32 and rescaled
(llmq.kernels.int8_linear: on CPU torch._int_mm or an fp32 matmul of the
dequantized codes, whichever was measured faster on this processor; Triton on
CUDA). On CPU the W8A8 linears of a layer that read one input (q/k/v, gate/up)
quantize it once and share one int8 GEMM (modules/siblings.py).
An input that requires a gradient gets one through the dequantized weight
(modules/input_grad.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import int8_linear
from ..kernels.int8 import Int8Weight, cpu_int8_linear, int8_weight
from ..qweight import QuantizedWeight
from .input_grad import wants_input_gradient, with_input_gradient


class W8A8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, static: bool = False, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.static = static
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=torch.float32, device=device))
        if static:
            self.register_buffer("input_scale", torch.empty(1, dtype=torch.float32, device=device))
        else:
            self.input_scale = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # Linked siblings (modules/siblings.py) turn weight and weight_scale into views of one
        # concatenated tensor; saved, each is a tensor of its own.
        self._register_state_dict_hook(_views_as_own_tensors)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       input_scale: float | torch.Tensor | None = None) -> "W8A8Linear":
        """From a solver's 8-bit symmetric per-row result (zero point 128)."""
        n, k = qw.shape
        if qw.bits != 8 or qw.group_size != k or qw.scales.shape[1] != 1:
            raise ValueError("W8A8Linear takes 8-bit weights with one scale per output row")
        if not torch.all(qw.zeros == 128):
            raise ValueError("W8A8Linear takes symmetric weights (zero point 128)")
        layer = cls(k, n, static=input_scale is not None, bias=bias is not None,
                    dtype=bias.dtype if bias is not None else torch.float32, device=qw.codes.device)
        layer.weight.copy_((qw.codes.short() - 128).to(torch.int8))
        layer.weight_scale.copy_(qw.scales.float().reshape(n, 1))
        if input_scale is not None:
            layer.input_scale.copy_(torch.as_tensor(input_scale, dtype=torch.float32).reshape(1))
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer

    def _apply(self, fn, recurse=True):
        # The scales stay fp32 wherever the layer goes (`.to(torch.bfloat16)`, `.half()`): the
        # kernels and the checkpoint format take them so, and a cast there and back would round them.
        scales = {name: t for name in ("weight_scale", "input_scale") if (t := self._buffers.get(name)) is not None}
        moved = super()._apply(fn, recurse)
        for name, before in scales.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return moved

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [N, K] weight this layer computes with."""
        return (self.weight.float() * self.weight_scale.float()).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if wants_input_gradient(x):
            return with_input_gradient(self, x, W8A8Linear.forward)
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            # Buffers in their built form: skip int8_linear's checks, which cost as much as the
            # int8 GEMM of a decode step (so do nn.Module's attribute lookups: the tables directly).
            siblings = self.__dict__.get("_siblings")  # linears reading the same input (modules/siblings.py)
            if siblings is not None:
                y = siblings.output(self, x)
                if y is not None:
                    return y
            bias = self._parameters["bias"]
            if (self._buffers["weight"].device.type == "cpu" and x.shape[-1] == self.in_features
                    and (bias is None or bias.dtype == torch.float32)):  # a bias in another dtype: checked way
                return cpu_int8_linear(x, self.cpu_weight(), self._buffers.get("input_scale"), bias)
        return int8_linear(x, self.weight, self.weight_scale, self.input_scale, self.bias)

    def cpu_weight(self) -> Int8Weight:
        """The CPU kernels' views of the present weight buffers, made again when one is replaced."""
        weight, scale = self._buffers["weight"], self._buffers["weight_scale"]
        made = self.__dict__.get("_cpu_weight")
        if made is None or made.codes is not weight or made.scale is not scale:
            made = self.__dict__["_cpu_weight"] = int8_weight(weight, scale)
        return made

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"act={'static' if self.static else 'dynamic'}, bias={self.bias is not None}")


def _views_as_own_tensors(module, state_dict, prefix, local_metadata) -> None:
    for name in ("weight", "weight_scale"):
        t = state_dict.get(prefix + name)
        if t is not None and t._base is not None:
            state_dict[prefix + name] = t.clone()
