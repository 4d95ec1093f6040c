"""Gradients for a quantized layer's input: dL/dx = dL/dy W, W the weight the layer computes with.

The quantized layers' kernels (torch's int4/int8 CPU kernels, the int8 GEMM,
the Triton kernels) have no backward, and their weights are integer codes that
take no gradient. What a caller differentiates through a frozen quantized model
is its input: soft prompts, input attributions, adapters added beside the
layers. So a layer called with an input that requires a gradient (and grad mode
on) computes its output as before, and the backward multiplies the output's
gradient by the dequantized weight, in the gradient's dtype. For W8A8 layers
the input's rounding to int8 passes the gradient straight through, as
quantization-aware training does.
"""

from __future__ import annotations

import torch


class _InputGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer, compute):
        ctx.layer = layer
        return compute(layer, x)

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.layer.dequantize_weight(grad.dtype).to(grad.device)  # [N, K]
        return grad @ weight, None, None


def wants_input_gradient(x: torch.Tensor) -> bool:
    """Whether a call must record the input's gradient (eager only: traced graphs keep the kernels)."""
    return x.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()


def with_input_gradient(layer, x: torch.Tensor, compute):
    """compute(layer, x), differentiable in x (module doc)."""
    return _InputGradient.apply(x, layer, compute)
