"""W8A8: int8 weights (per output row) and int8 activations, with optional SmoothQuant.

Without calibration (round-to-nearest weights, dynamic activations, no
smoothing) each linear is converted on its own. Otherwise the layer-by-layer
engine runs every decoder layer once on the calibration batch. A layer's
linears are split into units of linears reading one input (the
architecture's scale groups when smoothing, including grouped-query
attention's v -> o with factors tied across the query heads that share a
value head; else the sequential groups). A forward pre-hook on each linear of a unit, the first time it fires
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
   unit's statistics see the quantized units before it. (W8A8Linear's own
   int8 kernels would be faster here, but their rounding differs with the
   number of rows and with the kernel each process measures fastest, which
   sends the processes of a torchrun run apart.)

After the forward the targets are swapped for W8A8Linear.

Mixture-of-experts experts (unrolled by llmq.moe into per-expert linears) are
units like any other: per expert (gate/up, then down) on the tokens routed to
it, and, when smoothing, the post-attention norm's group over the router and
every expert. An expert routed fewer than moe_min_tokens tokens runs in full
precision for them; after the layer's forward it runs again on every input
token of its block, and its hooks calibrate it on those.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .. import arch, distributed
from ..config import QuantConfig
from ..errors import LlmqError
from ..modules.replace import replace_module
from ..modules.w8a8 import W8A8Linear
from ..qweight import QuantizedWeight
from ..solvers.gptq import HessianAccumulator, gptq_quantize_many
from ..solvers.rtn import rtn_quantize
from ..solvers.smoothquant import (SEARCH_ROWS, ActivationSample, fake_quantize_activations, search_smoothing,
                                   smoothing_factors, static_scale)
from ..arch import ScaleGroup
from ..modules.qexperts import QuantExperts
from ..moe import ExpertTokens, LayerExperts, expert_tokens
from .awq import expand_expert_groups, fold_into_prev
from .base import Job, LayerStep, Method
from .common import forward_with_pre_hooks

SCALE_DTYPE = torch.float32  # weight scales: fp32, as vLLM's int8 kernels read them


class SharedSample(ActivationSample):
    """An ActivationSample over every process's share of the calibration windows (llmq.distributed):
    the channel maxima and the largest |x| of the whole batch, and this rank's part of the rows one
    process would score, whose errors `total` sums, so every rank picks what one process picks.
    positions: where x's rows lie in the whole batch when x is not [windows, tokens, K] (an expert's
    routed tokens, of which this rank may hold none; LayerExperts.positions)."""

    def __init__(self, x: torch.Tensor, positions: torch.Tensor | None = None):
        super().__init__(x)
        self.positions = positions

    def channel_absmax(self) -> torch.Tensor:
        local = super().channel_absmax() if self.x.numel() else self.x.new_zeros(self.x.shape[-1], dtype=torch.float32)
        return distributed.all_reduce_max(local)

    def rows(self) -> torch.Tensor:
        return distributed.spread_rows(self.x, SEARCH_ROWS, self.positions).float()

    def numel(self) -> int:
        return int(distributed.all_reduce_sum(torch.tensor([float(self.x.numel())], dtype=torch.float64)).item())

    def largest_abs(self, k: int) -> torch.Tensor:
        # Each rank's k largest (padded where it holds fewer) contain the whole batch's k largest.
        local = self.x.reshape(-1).abs().float()
        mine = torch.full((k,), -1.0, device=local.device)  # below every |x|
        top = torch.topk(local, min(k, local.numel())).values
        mine[: top.numel()] = top
        return torch.topk(distributed.all_gather_rows(mine), k).values

    def total(self, errors: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_sum(errors)


def _activation_sample(x: torch.Tensor, positions: torch.Tensor | None = None) -> ActivationSample:
    return SharedSample(x, positions) if distributed.active() else ActivationSample(x)


class RTNDynamicStep(LayerStep):
    """Round-to-nearest int8 weights and dynamic activations: each linear on its own, no data."""

    def __init__(self, plans: dict[int, list[W8A8Unit]]):
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


@dataclass
class W8A8Unit:
    """Linears reading one input inside a layer, and how that input may be smoothed.

    linears: every linear reading the input (local names), in forward order.
    targets: local name -> full name of those being quantized.
    group: the scale group whose previous operation takes 1/s, or None.
    kv_repeat, head_dim: grouped-query attention's v -> o: each of v_proj's
        outputs feeds kv_repeat heads' channels of o_proj's input, so s is tied
        across those copies (1: one input channel per previous output).
    """

    linears: list[str]
    targets: dict[str, str]
    group: ScaleGroup | None = None
    kv_repeat: int = 1
    head_dim: int = 0

    def tie(self, v: torch.Tensor) -> torch.Tensor:
        """v [K] with each channel replaced by the max over the channels tied to it."""
        if self.kv_repeat == 1:
            return v
        k = v.shape[0]
        g = v.reshape(k // (self.kv_repeat * self.head_dim), self.kv_repeat, self.head_dim)
        return g.amax(1, keepdim=True).expand_as(g).reshape(k)

    def prev_factors(self, s: torch.Tensor) -> torch.Tensor:
        """The factors of the previous operation's outputs for s [K] over this unit's input."""
        if self.kv_repeat == 1:
            return s
        k = s.shape[0]
        return s.reshape(k // (self.kv_repeat * self.head_dim), self.kv_repeat, self.head_dim)[:, 0].reshape(-1)


def _fold_shape(layer: nn.Module, g: ScaleGroup, linears: list[str], model_config) -> tuple[int, int] | None:
    """(kv_repeat, head_dim) when 1/s can be folded into g.prev for these linears, else None."""
    prev = _get(layer, g.prev)
    if prev is None or not linears:
        return None
    ks = {layer.get_submodule(n).weight.shape[1] for n in linears}  # in_features (an MoE router too)
    if len(ks) != 1:
        return None
    (k,) = ks
    if g.kind == "norm":
        norms_feed = getattr(model_config, "do_layer_norm_before", True) is not False  # OPT-350m: post-norm
        weight = getattr(prev, "weight", None)
        ok = norms_feed and isinstance(weight, torch.Tensor) and weight.shape == (k,)
        return (1, 0) if ok else None
    if not isinstance(prev, nn.Linear):
        return None
    if prev.out_features == k:
        return 1, 0
    # Grouped-query attention: o_proj reads each of v_proj's outputs once per query head of its group.
    heads = getattr(model_config, "num_attention_heads", None)
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or (k // heads if heads else None)
    if not (heads and kv_heads and head_dim) or heads % kv_heads:
        return None
    rep = heads // kv_heads
    if prev.out_features * rep == k == heads * head_dim:
        return rep, head_dim
    return None


def _get(layer: nn.Module, name: str):
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None


def build_w8a8_units(spec: arch.ArchSpec, layer: nn.Module, targets: dict[str, str], model_config,
                     smooth) -> list[W8A8Unit]:
    """The architecture's scale groups that can take smoothing here (when smoothing), then the
    remaining targets grouped by shared input (arch.sequential_groups)."""
    units: list[W8A8Unit] = []
    covered: set[str] = set()
    if smooth is not None:
        for g in expand_expert_groups(spec.awq, layer):
            present = [n for n in g.linears if _get(layer, n) is not None]
            wanted = {n: targets[n] for n in present if n in targets}
            shape = _fold_shape(layer, g, present, model_config) if wanted else None
            if shape is None:
                continue
            units.append(W8A8Unit(present, wanted, g, *shape))
            covered.update(present)
    rest = [n for n in targets if n not in covered]
    for names in arch.sequential_groups(spec, layer, rest):
        units.append(W8A8Unit(names, {n: targets[n] for n in names}))
    return units


@torch.no_grad()
def fold_smoothing(layer: nn.Module, unit: W8A8Unit, s: torch.Tensor, solved: dict | None = None) -> None:
    """Divide the unit's input by s (folded into the previous operation) and multiply the
    linears' input columns by s: the full-precision function is unchanged.

    A previous linear already quantized (in `solved`) has its per-row weight scales
    divided instead: codes unchanged, exactly what quantizing the divided rows gives.
    """
    group = unit.group
    prev = layer.get_submodule(group.prev)
    if group.kind == "linear":
        sp = unit.prev_factors(s)
        if solved is not None and group.prev in solved:
            qw = solved[group.prev]
            qw.scales = (qw.scales.float() / sp[:, None]).to(qw.scales.dtype)
        prev.weight.data = (prev.weight.float() / sp[:, None]).to(prev.weight.dtype)
        if prev.bias is not None:
            prev.bias.data = (prev.bias.float() / sp).to(prev.bias.dtype)
    else:
        fold_into_prev(prev, group, s)
    for name in unit.linears:
        m = layer.get_submodule(name)
        m.weight.data = (m.weight.float() * s).to(m.weight.dtype)


class W8A8LayerStep(LayerStep):
    """The calibrated W8A8 layer step for engine.run_layers (see the module doc)."""

    def __init__(self, config: QuantConfig, units_by_layer: dict[int, list[W8A8Unit]],
                 expert_tokens: ExpertTokens | None = None):
        super().__init__()
        self.config = config
        self.units_by_layer = units_by_layer
        self.expert_tokens = expert_tokens
        self.timings = {"smooth": 0.0, "observe": 0.0, "quantize": 0.0}
        self.alphas: list[list] = []  # per layer: the smoothing strength of each smoothed unit
        self.layer_errors: list[float] = []

    def __call__(self, index: int, layer: nn.Module, hidden, args, kwargs):
        units = self.units_by_layer.get(index, [])
        solved: dict[str, QuantizedWeight] = {}
        transforms: dict[int, tuple] = {}  # unit index -> (s or None, input_scale or None)
        alphas: list = []
        errors: list[float] = []
        experts = None if self.expert_tokens is None else self.expert_tokens.start_layer(index, layer, hidden)
        # The expert (block, index) each unit lies in, if one. A unit that its expert's routed tokens
        # cannot calibrate (fewer than min_tokens) is left in full precision for those tokens, then
        # calibrated on every token of the block.
        owner = {u: _expert_of(experts, unit) for u, unit in enumerate(units)} if experts is not None else {}
        pass_all = set()  # experts (block name, index) now running on every token
        hooks = []
        for u, unit in enumerate(units):
            hooks += [(n, self._hook(layer, u, unit, n in unit.targets, solved, transforms, alphas, errors,
                                     experts, owner.get(u), pass_all)) for n in unit.linears]
        block_inputs: dict[str, torch.Tensor] = {}
        if experts is not None:
            hooks += [(name, _keep_input(block_inputs, name)) for name in experts.blocks]
        try:
            out = forward_with_pre_hooks(layer, hooks, hidden, args, kwargs, after=None if experts is None else (
                lambda: self._calibrate_on_every_token(units, transforms, experts, owner, block_inputs, pass_all)))
        finally:
            if experts is not None:
                experts.finish_counts()
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

    def _hook(self, layer, u: int, unit: W8A8Unit, quantized: bool, solved: dict, transforms: dict, alphas: list,
              errors: list, experts: LayerExperts | None, expert: tuple[str, int] | None, pass_all: set):
        """The pre-hook of one linear of the unit; quantized: whether that linear is a target (a kept
        one, such as an MoE router in a smoothed group, reads the smoothed input in full precision);
        expert: the expert the unit lies in, or None."""

        def hook(module: nn.Linear, args):
            x = args[0]
            if u not in transforms:
                rows = x.numel() // x.shape[-1]
                if (expert is not None and expert not in pass_all and experts.tokens.mode == "routed"
                        and experts.tokens.falls_back(rows)):
                    return None  # too few routed tokens: calibrated on every token after the forward
                positions = None if experts is None else experts.positions(unit.linears[0], x)
                transforms[u] = self._solve_unit(layer, unit, x, solved, alphas, errors, positions)
            s, input_scale = transforms[u]
            if s is not None:
                x = (x.float() / s).to(x.dtype)
            return (fake_quantize_activations(x, input_scale) if quantized else x, *args[1:])
        return hook

    @torch.no_grad()
    def _calibrate_on_every_token(self, units, transforms, experts: LayerExperts, owner: dict, block_inputs,
                                  pass_all):
        """Run each expert left uncalibrated on its block's every input token, its hooks solving it."""
        waiting = [u for u, expert in owner.items() if expert is not None and u not in transforms]
        for block, e in sorted({owner[u] for u in waiting}):
            pass_all.add((block, e))
            experts.blocks[block]._expert_forward(e, block_inputs[block])
        if waiting:
            experts.tokens.fallback.setdefault(experts.index, []).extend(
                n for u in waiting for n in units[u].targets)

    @torch.no_grad()
    def _solve_unit(self, layer, unit: W8A8Unit, x: torch.Tensor, solved: dict, alphas: list, errors: list,
                    positions: torch.Tensor | None = None):
        c = self.config
        t0 = time.perf_counter()
        linears = {n: layer.get_submodule(n) for n in unit.linears}
        weights = [m.weight for m in linears.values()]
        s = None
        if unit.group is not None and c.smoothing is not None:
            sample = _activation_sample(x, positions)
            if c.smooth == "auto":
                res = search_smoothing(sample, weights, static=c.act == "static", tie=unit.tie)
                s, alpha = res.scales, res.alpha
            else:
                s, alpha = smoothing_factors(sample.channel_absmax(), weights, c.smooth, tie=unit.tie), c.smooth
            alphas.append(alpha)
            if s is not None:
                fold_smoothing(layer, unit, s, solved)
        xs = x if s is None else (x.float() / s)
        t1 = time.perf_counter()
        input_scale = None
        if c.act == "static":
            input_scale = static_scale(_activation_sample(xs, positions), c.act_observer,
                                       [linears[n].weight for n in unit.targets])
        t2 = time.perf_counter()
        targets = list(unit.targets)
        k = x.shape[-1]
        if c.method == "gptq":
            acc = HessianAccumulator(k, device=x.device)
            acc.add_batch(xs)
            distributed.all_reduce_hessian(acc)  # several processes: the mean over every rank's rows
            # Several processes solve the unit's linears in parallel and share the results.
            results = distributed.solve_shared(lambda idx: gptq_quantize_many(
                [linears[targets[i]].weight.data for i in idx], acc.hessian, bits=8, group_size=k, sym=True,
                scale_dtype=SCALE_DTYPE, damp=c.damp, desc_act=c.desc_act, static_groups=c.static_groups,
                clip_search=c.clip_search), len(targets))
            qws = {}
            for n, (qw, st) in zip(targets, results):
                qw.g_idx = None  # one group per row: the group of every input is 0
                qws[n] = qw
                self.note_damping(unit.targets[n], st)
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


def _expert_of(experts: LayerExperts, unit: W8A8Unit) -> tuple[str, int] | None:
    """(experts block, expert index) when every linear of the unit belongs to that one expert, else None."""
    found = {experts.expert_of(name) for name in unit.linears}
    return found.pop() if len(found) == 1 and None not in found else None


def _keep_input(store: dict, name: str):
    def hook(module: QuantExperts, args):
        store[name] = args[0]
    return hook


class W8A8(Method):
    """Runs --scheme w8a8; config.method (rtn or gptq) says how the weights are solved."""

    name = "w8a8"

    def calibrates(self, config: QuantConfig) -> bool:
        return config.needs_calibration

    def check_data(self, config: QuantConfig, dataset) -> None:
        # Static activation scales are fixed on calibration text, which must be named explicitly.
        if config.act == "static" and dataset is None:
            raise LlmqError("--act static fixes the activation scales on calibration text, and none was given: "
                            "pass --dataset (a .txt file, wikitext2, self ...) or use --act dynamic")

    def check(self, job: Job) -> None:
        if job.config.smoothing is not None and job.spec.awq is None:
            raise LlmqError(f"SmoothQuant folds its factors into the operation before each group of linears, and "
                            f"llmq knows none for architecture {getattr(job.model.config, 'model_type', '?')!r}: "
                            "add `awq` scale groups to its ArchSpec in llmq.arch.ARCHITECTURES, or pass --smooth off")

    def plan_layer(self, job: Job, index: int, layer: nn.Module, targets: dict[str, str]) -> list[W8A8Unit]:
        return build_w8a8_units(job.spec, layer, targets, job.model.config, job.config.smoothing)

    def layer_step(self, job: Job, plans) -> LayerStep:
        if self.calibrates(job.config):
            tokens = expert_tokens(job, fallback_rule="were calibrated on every calibration token of their block "
                                                      "instead")
            return W8A8LayerStep(job.config, plans, tokens)
        return RTNDynamicStep(plans)


METHOD = W8A8()
