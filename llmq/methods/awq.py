"""AWQ (optionally followed by GPTQ) applied to a decoder layer in one forward pass.

A layer's linears are split into units: a scale group of the architecture
(previous op -> the linears reading its output), or, for linears no group
covers (o_proj under grouped-query attention, OPT's fc2 ...), the linears
sharing one input, without scales. A forward pre-hook on the unit's first
linear fires with the unit's input for the whole calibration batch and:

1. takes its statistics (mean |x| per channel, Gram matrix of sampled rows;
   for awq+gptq the Hessian of all rows);
2. searches the scales s and folds 1/s into the previous op: a norm's weight
   (and bias), or the rows of the previous linear, which is then already
   quantized: dividing a row of a quantized weight by a constant divides its
   group scales and leaves codes and zero points as they are, which is what
   quantizing the divided row would give (up to rounding the divided scales
   to their storage dtype: relative 2^-11 in fp16);
3. clip-searches and quantizes W s (round-to-nearest, or GPTQ with the
   Hessian of x / s);
4. writes Q(W s) / s into the linear for the rest of this forward: applied to
   the (not yet divided) x it equals Q(W s) applied to x / s.

So the layer's output for the next layer comes from the same pass, computed
with the quantized weights, and each unit's statistics see the quantized
linears before it (true-sequential). Linears of a scale group that are not
quantized (modules_to_not_convert) keep full precision but still get the
column scaling, after the forward.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import distributed
from ..arch import ArchSpec, ScaleGroup, sequential_groups
from ..config import QuantConfig
from ..errors import LlmqError
from ..modules.qexperts import QuantExperts
from ..moe import ExpertTokens, expert_tokens
from ..qweight import QuantizedWeight
from ..solvers.awq import InputStats, input_stats, scale_gram, search_clip, search_scales
from ..solvers.gptq import HessianAccumulator, gptq_quantize_many
from ..solvers.rtn import rtn_quantize
from .base import Job, LayerStep, Method
from .common import forward_with_pre_hooks, swap_in_quantized

# Rows of each input used for the Gram matrix of the scale and clip searches
# (mean |x| always uses all rows; awq+gptq uses all rows for its Hessian).
SEARCH_ROWS = 8192
# Points of the scale grid and of the clip grid.
GRID = 20


def _mean_abs(x: torch.Tensor) -> torch.Tensor:
    """mean |x| per channel over every row (of every process: a sum and a count, reduced exactly)."""
    rows = x.reshape(-1, x.shape[-1])
    if not distributed.active():
        return rows.abs().float().mean(0)
    total = distributed.all_reduce_sum(torch.tensor([float(rows.shape[0])], dtype=torch.float64, device=x.device))
    return distributed.all_reduce_sum(rows.abs().float().sum(0)).div_(float(total.item()))


def shared_input_stats(x: torch.Tensor, max_rows: int, positions: torch.Tensor | None = None) -> InputStats:
    """input_stats(x, max_rows), with several processes over the whole calibration batch.

    Each rank holds its share of the windows (llmq.distributed); it adds |x| of
    its rows and the Gram products of those of its rows that one process, with
    the whole batch, would sample; the sums and the counts are reduced, so the
    statistics are those of one process up to floating-point summation order.
    positions: where x's rows lie in the whole batch when x is not [windows, tokens, K]
    (an expert's routed tokens; LayerExperts.positions).
    """
    if not distributed.active():
        return input_stats(x, max_rows)
    xf = distributed.spread_rows(x, max_rows, positions).float()  # the rows input_stats picks from the batch
    sampled = distributed.all_reduce_sum(torch.tensor([float(xf.shape[0])], dtype=torch.float64, device=x.device))
    gram = distributed.all_reduce_sum(xf.t() @ xf).div_(float(sampled.item()))
    return InputStats(gram=gram, mean_abs=_mean_abs(x), rows=int(sampled.item()))


@dataclass
class Unit:
    """Linears sharing one input inside a layer, and how that input may be scaled.

    linears: every linear reading the input (local names), in forward order.
    targets: local name -> full name of those being quantized.
    group: the scale group, or None when the input is not scaled.
    """

    linears: list[str]
    targets: dict[str, str]
    group: ScaleGroup | None = None
    no_clip: tuple[str, ...] = field(default_factory=tuple)


def build_units(spec: ArchSpec, layer: nn.Module, targets: dict[str, str], model_config=None) -> list[Unit]:
    """The units of one layer: its architecture's scale groups that apply here, then
    the remaining targets grouped by shared input (arch.sequential_groups)."""
    require_scale_groups(spec, model_config)
    norms_feed = getattr(model_config, "do_layer_norm_before", True) is not False  # OPT-350m: post-norm
    units: list[Unit] = []
    covered: set[str] = set()
    for g in expand_expert_groups(spec.awq, layer):
        present = [n for n in g.linears if _get(layer, n) is not None]
        wanted = {n: targets[n] for n in present if n in targets}
        if not wanted or not _foldable(layer, g, present, norms_feed):
            continue
        units.append(Unit(present, wanted, g, g.no_clip))
        covered.update(present)
    rest = [n for n in targets if n not in covered]
    for names in sequential_groups(spec, layer, rest):
        units.append(Unit(names, {n: targets[n] for n in names}))
    return units


def expand_expert_groups(groups, layer: nn.Module) -> list[ScaleGroup]:
    """Scale groups with "*" (each expert, see llmq.arch) written out for this layer's experts."""
    out = []
    for g in groups:
        names = (g.prev,) + g.linears
        starred = [n for n in names if "*" in n]
        if not starred:
            out.append(g)
            continue
        experts = _get(layer, starred[0].partition(".*")[0])
        if not isinstance(experts, QuantExperts):
            # No experts here (a dense layer of an MoE model), or experts kept whole in full
            # precision: they read the group's input too, unscaled, so nothing may be folded into it.
            continue
        count = experts.num_experts
        if "*" in g.prev:  # one group per expert
            out += [dataclasses.replace(g, prev=g.prev.replace("*", str(e)),
                                        linears=tuple(n.replace("*", str(e)) for n in g.linears))
                    for e in range(count)]
        else:  # every expert in the one group, expert by expert
            linears = [n for n in g.linears if "*" not in n]
            pos = next(i for i, n in enumerate(g.linears) if "*" in n)
            expert_names = [n.replace("*", str(e)) for e in range(count) for n in g.linears if "*" in n]
            linears[pos:pos] = expert_names
            out.append(dataclasses.replace(g, linears=tuple(linears)))
    return out


def require_scale_groups(spec: ArchSpec, model_config=None) -> None:
    """Raise LlmqError when the architecture has no AWQ scale groups."""
    if spec.awq is None:
        model_type = getattr(model_config, "model_type", "?")
        raise LlmqError(f"AWQ needs the scale groups of architecture {model_type!r} (which norm or linear feeds "
                        "which linears), and llmq has none: add an `awq` entry to its ArchSpec in "
                        "llmq.arch.ARCHITECTURES, or use --method gptq or rtn")


def _get(layer: nn.Module, name: str):
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None


def _foldable(layer: nn.Module, g: ScaleGroup, linears: list[str], norms_feed: bool) -> bool:
    prev = _get(layer, g.prev)
    if prev is None or not linears:
        return False
    # Routers are not nn.Linear but hold a [experts, in] weight all the same.
    k = {layer.get_submodule(n).weight.shape[1] for n in linears}
    if len(k) != 1:
        return False
    (k,) = k
    if g.kind == "linear":
        # Grouped-query attention: v_proj has fewer outputs than o_proj has inputs.
        return isinstance(prev, nn.Linear) and prev.out_features == k
    weight = getattr(prev, "weight", None)
    return norms_feed and isinstance(weight, torch.Tensor) and weight.shape == (k,)


@torch.no_grad()
def fold_into_prev(prev: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Make prev's output x become x / s (prev in full precision)."""
    if group.kind == "linear":
        prev.weight.data = (prev.weight.float() / s[:, None]).to(prev.weight.dtype)
    else:
        # out = n(x) * (c + w): (c + w') = (c + w) / s.
        c = group.norm_offset
        prev.weight.data = ((prev.weight.float() + c) / s - c).to(prev.weight.dtype)
    bias = getattr(prev, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.data = (bias.float() / s).to(bias.dtype)


class AWQLayerStep(LayerStep):
    """Callable for engine.run_layers.

    Args:
        config: bits, group size, symmetry.
        units_by_layer: layer index -> units (build_units).
        scale_dtype: dtype the scales are stored in.
        use_gptq: quantize the scaled weights with GPTQ (awq+gptq) instead of
            round-to-nearest.
    """

    def __init__(self, config: QuantConfig, units_by_layer: dict[int, list[Unit]], scale_dtype: torch.dtype,
                 use_gptq: bool = False, expert_tokens: ExpertTokens | None = None):
        super().__init__()
        self.config = config
        self.expert_tokens = expert_tokens
        self.units_by_layer = units_by_layer
        self.scale_dtype = scale_dtype
        self.use_gptq = use_gptq
        self.timings = {"stats": 0.0, "scales": 0.0, "clip": 0.0, "quantize": 0.0}

    def __call__(self, index: int, layer: nn.Module, hidden, args, kwargs):
        units = self.units_by_layer.get(index, [])
        solved: dict[str, QuantizedWeight] = {}
        after: list = []  # column scalings of unquantized group members, applied after the forward
        errors: list[float] = []
        hooks = []
        experts = None if self.expert_tokens is None else self.expert_tokens.start_layer(index, layer, hidden)
        for unit in units:
            hook = self._hook(layer, unit, solved, after, errors, experts)
            hooks += [(n, hook) for n in unit.linears]
        out = forward_with_pre_hooks(layer, hooks, hidden, args, kwargs)
        for fn in after:
            fn()
        if experts is not None:  # experts no calibration token reached: round-to-nearest
            experts.finish_layer(index, layer, [t for unit in units for t in unit.targets.items()], solved,
                                 self.config, self.scale_dtype)
        swap_in_quantized(layer, [t for unit in units for t in unit.targets.items()], solved)
        worst = max(errors) if errors else 0.0
        return out, f"rel_err={worst:.3g}"

    def _hook(self, layer, unit: Unit, solved: dict, after: list, errors: list, experts=None):
        def hook(module: nn.Linear, args):
            if any(n in solved for n in unit.targets):
                return  # the unit was done when its first linear ran
            if experts is not None and experts.fall_back(list(unit.targets.items()), args[0], layer, solved,
                                                         self.config, self.scale_dtype):
                return  # an expert routed too few calibration tokens: round-to-nearest, unscaled
            positions = None if experts is None else experts.positions(unit.linears[0], args[0])
            self._solve_unit(layer, unit, args[0], solved, after, errors, positions)
        return hook

    def _solve_unit(self, layer, unit: Unit, x: torch.Tensor, solved: dict, after: list, errors: list,
                    positions: torch.Tensor | None = None):
        c = self.config
        t0 = time.perf_counter()
        linears = {n: layer.get_submodule(n) for n in unit.linears}
        k = x.shape[-1]
        gs = c.group_size_for(k)
        hessian = None
        if self.use_gptq:
            acc = HessianAccumulator(k, device=x.device)
            acc.add_batch(x)
            distributed.all_reduce_hessian(acc)  # several processes: the mean over every rank's rows
            hessian = acc.hessian
            # The searches reuse the Hessian: H = 2 x^T x / n.
            stats = InputStats(gram=hessian / 2, mean_abs=_mean_abs(x), rows=acc.nsamples)
        else:
            stats = shared_input_stats(x, SEARCH_ROWS, positions)
        t1 = time.perf_counter()
        self.timings["stats"] += t1 - t0

        s = None
        gram = stats.gram
        target_w = [linears[n].weight for n in unit.targets]
        if unit.group is not None:
            # Several processes score the grid's points in parallel and share the errors.
            res = search_scales(target_w, stats, bits=c.bits, group_size=gs, sym=c.sym,
                                scale_dtype=self.scale_dtype, grid=GRID, evaluate=distributed.solve_shared)
            s = res.scales
            self._fold_prev(layer, unit.group, s, solved)
            gram = scale_gram(gram, s)
            if hessian is not None:
                hessian = scale_gram(hessian, s)
            for n, m in linears.items():
                if n not in unit.targets:
                    # Still reads the undivided input during this forward: scale it afterwards.
                    after.append(lambda m=m, s=s: m.weight.data.copy_((m.weight.float() * s).to(m.weight.dtype)))
        t2 = time.perf_counter()
        self.timings["scales"] += t2 - t1

        targets = list(unit.targets)

        def clip_and_quantize(indices: list[int]) -> list:
            """(QuantizedWeight, its GPTQStats or None) of the targets at `indices`."""
            t = time.perf_counter()
            clipped = []
            for i in indices:
                w = linears[targets[i]].weight.float()
                w = w * s if s is not None else w
                if targets[i] not in unit.no_clip:
                    w = search_clip(w, gram, bits=c.bits, group_size=gs, sym=c.sym, scale_dtype=self.scale_dtype,
                                    grid=GRID).weight
                clipped.append(w)
            t_clip = time.perf_counter()
            self.timings["clip"] += t_clip - t
            if hessian is not None:
                out = gptq_quantize_many(clipped, hessian, bits=c.bits, group_size=gs, sym=c.sym,
                                         scale_dtype=self.scale_dtype, damp=c.damp, desc_act=c.desc_act,
                                         static_groups=c.static_groups)
            else:
                out = [(rtn_quantize(w, c.bits, gs, c.sym, self.scale_dtype), None) for w in clipped]
            self.timings["quantize"] += time.perf_counter() - t_clip
            return out

        # Several processes clip and quantize the unit's linears in parallel and share the results.
        qws = {}
        for n, (qw, st) in zip(targets, distributed.solve_shared(clip_and_quantize, len(targets))):
            qws[n] = qw
            self.note_damping(unit.targets[n], st)
        t3 = time.perf_counter()
        for n, qw in qws.items():
            m = linears[n]
            orig = m.weight.float()
            eff = qw.dequantize()
            eff = eff / s if s is not None else eff
            d = orig - eff
            errors.append((((d @ stats.gram) * d).sum() / ((orig @ stats.gram) * orig).sum().clamp(min=1e-30))
                          .item())
            m.weight.data = eff.to(m.weight.dtype)
            solved[n] = qw
        self.timings["quantize"] += time.perf_counter() - t3

    @torch.no_grad()
    def _fold_prev(self, layer, group: ScaleGroup, s: torch.Tensor, solved: dict) -> None:
        if group.kind == "linear" and group.prev in solved:
            # Already quantized: divide its rows' group scales (codes and zeros do not change).
            qw = solved[group.prev]
            qw.scales = (qw.scales.float() / s[:, None]).to(qw.scales.dtype)
            prev = layer.get_submodule(group.prev)
            if prev.bias is not None:
                prev.bias.data = (prev.bias.float() / s).to(prev.bias.dtype)
            # The forward has already run prev; keep its weight consistent all the same.
            prev.weight.data = (prev.weight.float() / s[:, None]).to(prev.weight.dtype)
        else:
            fold_into_prev(layer.get_submodule(group.prev), group, s)


class AWQ(Method):
    """AWQ; with use_gptq, the scaled weights are quantized by GPTQ (awq+gptq)."""

    def __init__(self, name: str = "awq", use_gptq: bool = False):
        self.name = name
        self.use_gptq = use_gptq

    def check(self, job: Job) -> None:
        require_scale_groups(job.spec, job.model.config)

    def plan_layer(self, job: Job, index: int, layer: nn.Module, targets: dict[str, str]) -> list[Unit]:
        return build_units(job.spec, layer, targets, job.model.config)

    def layer_step(self, job: Job, plans) -> LayerStep:
        return AWQLayerStep(job.config, plans, job.scale_dtype, use_gptq=self.use_gptq,
                            expert_tokens=expert_tokens(job))


METHOD = AWQ()
