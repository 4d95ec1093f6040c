"""W8A8: int8 weights (per output row) and int8 activations, with optional SmoothQuant.

Without calibration (round-to-nearest weights, dynamic activations, no
smoothing) each linear is converted on its own. Otherwise the layer-by-layer
engine runs every decoder layer once on the calibration batch. A layer's
linears are split into units of linears reading one input (methods.awq's
units: the architecture's scale groups when smoothing, else the sequential
groups). A forward pre-hook on each linear of a unit, the first time it fires
with the unit's input x:

1. smoothing (config.smooth): factors s from x and the unit's weights
   (solvers.smoothquant), folded into the previous operation (a norm, or the
   rows of the previous linear: for an already quantized one that divides its
   per-row weight scales, exactly), and the unit's weights multiplied by s;
2. static activations: the observer fixes the input scale from x / s;
3. the weights are quantized: round-to-nearest, or GPTQ with the Hessian of x / s;
4. every linear of the unit then computes with the dequantized weights on the
   int8 round-trip of x / s: what W8A8Linear computes. So the layer's output,
   the next layer's calibration input, is the quantized model's, and each
   unit's statistics see the quantized units before it.

After the forward the targets are swapped for W8A8Linear.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .. import arch
from ..config import QuantConfig
from ..errors import LlmqError
from ..modules.replace import replace_module
from ..modules.w8a8 import W8A8Linear
from ..qweight import QuantizedWeight
from ..solvers.gptq import HessianAccumulator, gptq_quantize_many
from ..solvers.rtn import rtn_quantize
from ..solvers.smoothquant import (channel_absmax, fake_quantize_activations, search_smoothing, smoothing_factors,
                                   static_scale)
from .awq import Unit, build_units, fold_into_prev
from .base import Job, LayerStep, Method
from .common import forward_with_pre_hooks

SCALE_DTYPE = torch.float32  # weight scales: fp32, as vLLM's int8 kernels read them


def check_w8a8_data(config: QuantConfig, dataset) -> None:
    """Static activation scales are fixed on calibration text, which must be named explicitly."""
    if config.act == "static" and dataset is None:
        raise LlmqError("--act static fixes the activation scales on calibration text, and none was given: "
                        "pass --dataset (a .txt file, wikitext2, self ...) or use --act dynamic")


class RTNDynamicStep(LayerStep):
    """Round-to-nearest int8 weights and dynamic activations: each linear on its own, no data."""

    def __init__(self, plans: dict[int, list[Unit]]):
        super().__init__()
        self.plans = plans

    @torch.no_grad()
    def __call__(self, index: int, layer: nn.Module, hidden, args, kwargs):
        errs = []
        for unit in self.plans.get(index, []):
            for local in unit.targets:
                linear = layer.get_submodule(local)
                w = linear.weight.detach()
                qw = rtn_quantize(w, 8, w.shape[1], True, SCALE_DTYPE)
                errs.append(((qw.dequantize() - w.float()).norm() / w.float().norm()).item())
                replace_module(layer, local, W8A8Linear.from_quantized(qw, linear.bias))
        return hidden, f"rel_err={max(errs):.4f}" if errs else ""


def build_w8a8_units(spec: arch.ArchSpec, layer: nn.Module, targets: dict[str, str], model_config,
                     smooth) -> list[Unit]:
    if smooth is not None:
        return build_units(spec, layer, targets, model_config)
    return [Unit(names, {n: targets[n] for n in names})
            for names in arch.sequential_groups(spec, layer, list(targets))]


class W8A8LayerStep(LayerStep):
    """The calibrated W8A8 layer step for engine.run_layers (see the module doc)."""

    def __init__(self, config: QuantConfig, units_by_layer: dict[int, list[Unit]]):
        super().__init__()
        self.config = config
        self.units_by_layer = units_by_layer
        self.timings = {"smooth": 0.0, "observe": 0.0, "quantize": 0.0}
        self.alphas: list[list] = []  # per layer: the smoothing strength of each smoothed unit
        self.layer_errors: list[float] = []

    def __call__(self, index: int, layer: nn.Module, hidden, args, kwargs):
        units = self.units_by_layer.get(index, [])
        solved: dict[str, QuantizedWeight] = {}
        transforms: dict[int, tuple] = {}  # unit index -> (s or None, input_scale or None)
        alphas: list = []
        errors: list[float] = []
        hooks = []
        for u, unit in enumerate(units):
            hook = self._hook(layer, u, unit, solved, transforms, alphas, errors)
            hooks += [(n, hook) for n in unit.linears]
        out = forward_with_pre_hooks(layer, hooks, hidden, args, kwargs)
        for u, unit in enumerate(units):
            if u not in transforms:
                raise RuntimeError(f"the forward pass never reached {next(iter(unit.targets.values()))}: "
                                   "it cannot be calibrated")
            input_scale = transforms[u][1]
            for local in unit.targets:
                linear = layer.get_submodule(local)
                bias = None if linear.bias is None else linear.bias.detach()
                replace_module(layer, local, W8A8Linear.from_quantized(solved.pop(local), bias, input_scale))
        self.alphas.append(alphas)
        worst = max(errors) if errors else 0.0
        self.layer_errors.append(worst)
        return out, f"rel_err={worst:.3g}"

    def _hook(self, layer, u: int, unit: Unit, solved: dict, transforms: dict, alphas: list, errors: list):
        def hook(module: nn.Linear, args):
            x = args[0]
            if u not in transforms:
                transforms[u] = self._solve_unit(layer, unit, x, solved, alphas, errors)
            s, input_scale = transforms[u]
            if s is not None:
                x = (x.float() / s).to(x.dtype)
            return (fake_quantize_activations(x, input_scale), *args[1:])
        return hook

    @torch.no_grad()
    def _solve_unit(self, layer, unit: Unit, x: torch.Tensor, solved: dict, alphas: list, errors: list):
        c = self.config
        t0 = time.perf_counter()
        linears = {n: layer.get_submodule(n) for n in unit.linears}
        weights = [m.weight for m in linears.values()]
        s = None
        if unit.group is not None and c.smooth is not None:
            if c.smooth == "auto":
                res = search_smoothing(x, weights, static=c.act == "static")
                s, alpha = res.scales, res.alpha
            else:
                s, alpha = smoothing_factors(channel_absmax(x), weights, c.smooth), c.smooth
            alphas.append(alpha)
            if s is not None:
                self._fold_prev(layer, unit, s, solved)
                for m in linears.values():
                    m.weight.data = (m.weight.float() * s).to(m.weight.dtype)
        xs = x if s is None else (x.float() / s)
        t1 = time.perf_counter()
        input_scale = None
        if c.act == "static":
            input_scale = static_scale(xs, c.act_observer, [linears[n].weight for n in unit.targets])
        t2 = time.perf_counter()
        targets = list(unit.targets)
        k = x.shape[-1]
        if c.method == "gptq":
            acc = HessianAccumulator(k, device=x.device)
            acc.add_batch(xs)
            results = gptq_quantize_many([linears[n].weight.data for n in targets], acc.hessian, bits=8,
                                         group_size=k, sym=True, scale_dtype=SCALE_DTYPE, damp=c.damp,
                                         desc_act=c.desc_act, static_groups=c.static_groups,
                                         clip_search=c.clip_search)
            qws = {}
            for n, (qw, st) in zip(targets, results):
                qw.g_idx = None  # one group per row: the group of every input is 0
                qws[n] = qw
                if st.damp_raised:
                    self.damp_raised.append(f"{unit.targets[n]} (damp {st.damp:g})")
        else:
            qws = {n: rtn_quantize(linears[n].weight, 8, k, True, SCALE_DTYPE) for n in targets}
        for n, qw in qws.items():
            m = linears[n]
            w = m.weight.float()
            eff = qw.dequantize()
            errors.append(((w - eff).norm() / w.norm().clamp(min=1e-30)).item())
            m.weight.data = eff.to(m.weight.dtype)
            solved[n] = qw
        t3 = time.perf_counter()
        self.timings["smooth"] += t1 - t0
        self.timings["observe"] += t2 - t1
        self.timings["quantize"] += t3 - t2
        return s, input_scale

    @staticmethod
    def _fold_prev(layer, unit: Unit, s: torch.Tensor, solved: dict) -> None:
        group = unit.group
        prev = layer.get_submodule(group.prev)
        if group.kind == "linear" and group.prev in solved:
            # Already quantized per row: dividing row i by s_i divides its scale, codes unchanged.
            qw = solved[group.prev]
            qw.scales = (qw.scales.float() / s[:, None]).to(qw.scales.dtype)
            prev.weight.data = (prev.weight.float() / s[:, None]).to(prev.weight.dtype)
            if prev.bias is not None:
                prev.bias.data = (prev.bias.float() / s).to(prev.bias.dtype)
        else:
            fold_into_prev(prev, group, s)


class W8A8(Method):
    """Runs --scheme w8a8; config.method (rtn or gptq) says how the weights are solved."""

    name = "w8a8"

    def calibrates(self, config: QuantConfig) -> bool:
        return config.needs_calibration

    def check(self, job: Job) -> None:
        if job.config.smooth is not None and job.spec.awq is None:
            raise LlmqError(f"SmoothQuant folds its factors into the operation before each group of linears, and "
                            f"llmq knows none for architecture {getattr(job.model.config, 'model_type', '?')!r}: "
                            "add `awq` scale groups to its ArchSpec in llmq.arch.ARCHITECTURES, or pass --smooth off")

    def plan_layer(self, job: Job, index: int, layer: nn.Module, targets: dict[str, str]) -> list[Unit]:
        return build_w8a8_units(job.spec, layer, targets, job.model.config, job.config.smooth)

    def layer_step(self, job: Job, plans) -> LayerStep:
        if self.calibrates(job.config):
            return W8A8LayerStep(job.config, plans)
        return RTNDynamicStep(plans)


METHOD = W8A8()
