"""GPTQ applied to a decoder layer in a single forward pass.

A forward pre-hook on each target linear fires when the layer's forward first
reaches it. The hook has the linear's input for the whole calibration batch:
it builds the Hessian, solves the linear together with the others that read
the same input (q/k/v, gate/up: the architecture's sequential groups), and
writes the dequantized weights back before they run. Linears are therefore
quantized in execution order (true-sequential), each seeing the outputs of
the already quantized linears before it, and the layer's output is computed
with quantized weights in that same pass: one forward per layer in all.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .. import distributed
from ..config import QuantConfig
from ..moe import ExpertTokens, expert_tokens

from ..qweight import QuantizedWeight
from ..solvers.gptq import HessianAccumulator, gptq_quantize_many
from .base import Job, LayerStep, Method
from .common import forward_with_pre_hooks, swap_in_quantized


class GPTQLayerStep(LayerStep):
    """Callable for engine.run_layers.

    Args:
        config: bits, group size, damping, act-order ...
        plans: layer index -> list of groups, each a list of (local name, full
            name) of linears that read the same input (Method.plan_layer).
        scale_dtype: dtype the scales are stored in.
    """

    def __init__(self, config: QuantConfig, plans: dict[int, list[list[tuple[str, str]]]],
                 scale_dtype: torch.dtype, expert_tokens: ExpertTokens | None = None):
        super().__init__()
        self.config = config
        self.expert_tokens = expert_tokens
        self.plans = plans
        self.scale_dtype = scale_dtype
        self.timings = {"hessian": 0.0, "solve": 0.0}

    def __call__(self, index: int, layer: nn.Module, hidden, args, kwargs):
        groups = self.plans.get(index, [])
        solved: dict[str, QuantizedWeight] = {}
        errors: list[float] = []
        experts = None if self.expert_tokens is None else self.expert_tokens.start_layer(index, layer, hidden)
        hooks = [(local, self._hook(layer, group, solved, errors, experts)) for group in groups
                 for local, _ in group]
        out = forward_with_pre_hooks(layer, hooks, hidden, args, kwargs)
        if experts is not None:  # experts no calibration token reached: round-to-nearest
            experts.finish_layer(index, layer, [t for group in groups for t in group], solved,
                                 self.config, self.scale_dtype)
        swap_in_quantized(layer, [t for group in groups for t in group], solved)
        worst = max(errors) if errors else 0.0
        return out, f"out_mse={worst:.3g}"

    def _hook(self, layer: nn.Module, group: list[tuple[str, str]], solved: dict, errors: list, experts=None):
        def hook(module: nn.Linear, args):
            if any(local in solved for local, _ in group):
                return  # solved with the first linear of its group
            x = args[0]
            if experts is not None and experts.fall_back(group, x, layer, solved, self.config, self.scale_dtype):
                return  # an expert routed too few calibration tokens: round-to-nearest
            t0 = time.perf_counter()
            acc = HessianAccumulator(module.in_features, device=x.device)
            acc.add_batch(x)
            distributed.all_reduce_hessian(acc)  # several processes: the mean over every rank's rows
            t1 = time.perf_counter()
            c = self.config
            linears = [layer.get_submodule(local) for local, _ in group]
            # Several processes solve the group's linears in parallel and share the results.
            results = distributed.solve_shared(lambda idx: gptq_quantize_many(
                [linears[i].weight.data for i in idx], acc.hessian, bits=c.bits,
                group_size=c.group_size_for(module.in_features), sym=c.sym, scale_dtype=self.scale_dtype,
                damp=c.damp, desc_act=c.desc_act, static_groups=c.static_groups, clip_search=c.clip_search),
                len(linears))
            self.timings["hessian"] += t1 - t0
            self.timings["solve"] += time.perf_counter() - t1
            for (local, full), m, (qw, stats) in zip(group, linears, results):
                m.weight.data = qw.dequantize(m.weight.dtype)
                solved[local] = qw
                errors.append(stats.output_mse)
                self.note_damping(full, stats)
        return hook


class GPTQ(Method):
    name = "gptq"

    def layer_step(self, job: Job, plans) -> LayerStep:
        return GPTQLayerStep(job.config, plans, job.scale_dtype, expert_tokens=expert_tokens(job))


METHOD = GPTQ()
