"""Round-to-nearest applied to a decoder layer: no data, each linear on its own."""

from __future__ import annotations

import torch
from torch import nn

from ..config import QuantConfig
from ..modules.qlinear import QuantLinear
from ..modules.replace import replace_module
from ..solvers.rtn import rtn_quantize
from .base import Job, LayerStep, Method


class RTNLayerStep(LayerStep):
    """Quantizes every planned linear of the layer by round-to-nearest (no forward)."""

    def __init__(self, config: QuantConfig, plans: dict[int, list[list[tuple[str, str]]]],
                 scale_dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.plans = plans
        self.scale_dtype = scale_dtype

    @torch.no_grad()
    def __call__(self, index: int, layer: nn.Module, hidden, args, kwargs):
        c = self.config
        errs = []
        for group in self.plans.get(index, []):
            for local, _ in group:
                linear = layer.get_submodule(local)
                w = linear.weight.detach()
                qw = rtn_quantize(w, c.bits, c.group_size_for(w.shape[1]), c.sym, self.scale_dtype)
                errs.append(((qw.dequantize() - w.float()).norm() / w.float().norm()).item())
                replace_module(layer, local, QuantLinear.from_quantized(qw, linear.bias))
        return hidden, f"rel_err={max(errs):.4f}" if errs else ""


class RTN(Method):
    name = "rtn"
    needs_calibration = False

    def layer_step(self, job: Job, plans) -> LayerStep:
        return RTNLayerStep(job.config, plans, job.scale_dtype)


METHOD = RTN()
