"""GPTQ applied to a decoder layer in a single forward pass.

A forward pre-hook on each target linear fires when the layer's forward first
reaches it: the hook has the linear's input for the whole calibration batch,
builds the Hessian from it, solves, and writes the dequantized weights back
before the linear runs. Linears are therefore quantized in execution order
(q/k/v, then o, then gate/up, then down: true-sequential), each seeing the
outputs of the already quantized linears before it, and the layer's output
is computed with quantized weights in that same pass. Linears that read the
same input tensor (q/k/v, gate/up) share one Hessian.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..config import QuantConfig
from ..engine import layer_output
from ..modules.qlinear import QuantLinear
from ..modules.replace import replace_module
from ..qweight import QuantizedWeight
from ..solvers.gptq import HessianAccumulator, gptq_quantize


class GPTQLayerStep:
    """Callable for engine.run_layers; collects results per full module name."""

    def __init__(self, config: QuantConfig, targets_by_layer: dict[int, dict[str, str]],
                 scale_dtype: torch.dtype, hessian_dtype: torch.dtype | None = None):
        self.config = config
        self.targets_by_layer = targets_by_layer  # layer index -> {local name: full name}
        self.scale_dtype = scale_dtype
        self.hessian_dtype = hessian_dtype
        self.results: dict[str, QuantizedWeight] = {}  # solved, not yet swapped in
        self.done: list[str] = []
        self.timings = {"hessian": 0.0, "solve": 0.0}

    def __call__(self, index: int, layer: nn.Module, hidden, args, kwargs):
        targets = self.targets_by_layer.get(index, {})
        shared: dict = {}  # last input seen -> its Hessian (q/k/v and gate/up share one)
        losses = []
        handles = []
        for local, full in targets.items():
            module = layer.get_submodule(local)
            handles.append(module.register_forward_pre_hook(self._hook(full, shared, losses)))
        try:
            out = layer_output(layer(hidden, *args, **kwargs))
        finally:
            for h in handles:
                h.remove()
        missing = [full for full in targets.values() if full not in self.results]
        if missing:
            raise RuntimeError(f"the forward pass never reached {missing[0]}: it cannot be calibrated")
        for local, full in targets.items():
            linear = layer.get_submodule(local)
            replace_module(layer, local, QuantLinear.from_quantized(self.results.pop(full), linear.bias))
            self.done.append(full)
        return out, f"err={max(losses):.3g}" if losses else ""

    def _hook(self, full_name: str, shared: dict, losses: list):
        def hook(module: nn.Linear, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            t0 = time.perf_counter()
            if shared.get("key") != key:
                acc = HessianAccumulator(module.in_features, device=x.device, input_dtype=self.hessian_dtype)
                acc.add_batch(x)
                shared.clear()
                shared.update(key=key, H=acc.hessian)
            t1 = time.perf_counter()
            c = self.config
            qw, stats = gptq_quantize(
                module.weight.data, shared["H"], bits=c.bits, group_size=c.group_size_for(module.in_features),
                sym=c.sym, scale_dtype=self.scale_dtype, damp=c.damp, desc_act=c.desc_act,
                static_groups=c.static_groups)
            self.timings["hessian"] += t1 - t0
            self.timings["solve"] += time.perf_counter() - t1
            module.weight.data = qw.dequantize(module.weight.dtype)
            self.results[full_name] = qw
            losses.append(_relative_error(stats))
        return hook


def _relative_error(stats) -> float:
    return float(getattr(stats, "loss", 0.0))
