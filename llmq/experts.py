"""Mixture-of-experts blocks: finding the experts modules and turning them into QuantExperts.

An experts module is recognised by what it is, not by its name: a module
carrying the flags transformers' `@use_experts_implementation` decorator sets
(has_gate, has_bias, is_transposed, is_concatenated) and 3D weights
`gate_up_proj` (or `up_proj` without a gate) and `down_proj`, one slice per
expert. Its layout comes from those flags: transposed storage ([E, in, out],
gpt-oss), interleaved gate/up rows (gpt-oss; its own `_apply_gate` splits
them), expert biases (`<param>_bias [E, out]`). The few experts classes
transformers does not decorate carry no flags; UNDECORATED gives theirs, and
their calling convention, as data (Llama 4's experts take every token once per
expert, already multiplied by its routing score, instead of the token indices
and weights of the decorated ones).

Per-expert names are those of the architecture's checkpoints on disk, read
from transformers' own checkpoint conversion mapping (the WeightConverter
that merges `experts.*.w1.weight` and `experts.*.w3.weight` into
`experts.gate_up_proj`, and so on): Mixtral's experts become `<e>.w1`,
`<e>.w3`, `<e>.w2`, Qwen-style ones `<e>.gate_proj`, `<e>.up_proj`,
`<e>.down_proj`. Where no such plain merge exists (gpt-oss stores its experts
fused on disk too), each expert keeps the fused names `<e>.gate_up_proj` and
`<e>.down_proj`, with the original row order (interleaved stays interleaved).

Routers (the modules beside the experts in an MoE block that score the
experts: a weight of one row per expert, or one row for a shared-expert
gate) are found the same way and kept in full precision by default.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .errors import LlmqError
from .modules.qexperts import ExpertProjections, QuantExperts, weightless_copy

_DECORATOR_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")


@dataclass(frozen=True)
class ExpertsFlags:
    """An experts class's layout: the decorator's flags (its own, or UNDECORATED's for a class it does
    not decorate), its calling convention, and the per-expert names that the tools serving its
    checkpoints read (None: from transformers' conversion mapping, see the module doc)."""

    has_gate: bool
    has_bias: bool
    is_transposed: bool
    is_concatenated: bool
    up_names: tuple[str, ...] | None = None
    down_name: str | None = None
    # True: called as experts(x) with x [E * T, H], every token once per expert, multiplied by its
    # routing score (0 where the token is not routed there), returning [E * T, H]; False: the
    # decorated classes' experts(hidden_states, top_k_index, top_k_weights).
    scored_copies: bool = False
    # Projections stored apart from gate_up_proj / down_proj, each in one 2D parameter holding the
    # experts' matrices one after another ([E * rows, cols]): (per-expert name, parameter path under
    # the experts module, whether each expert's matrix is stored [in, out]).
    stacked: tuple[tuple[str, str, bool], ...] = ()
    activation: str = "act_fn"  # the experts module's activation, by attribute path
    # The attribute holding how many experts have weights, where the up projection holds more slots:
    # routing indices past those experts (up to the slots) are identity experts, which hand on the
    # token times its routing weight (LongCat-Flash's "zero" experts).
    routed: str | None = None


# Experts classes without the decorator, by class name: facts of their architectures' modelling code.
UNDECORATED = {
    # Llama 4: gate_up_proj [E, H, 2I] (gate, then up), down_proj [E, I, H]. Its checkpoints store them
    # fused; quantized ones are served per expert, as vLLM reads them (experts.<e>.gate_proj ...).
    "Llama4TextExperts": ExpertsFlags(has_gate=True, has_bias=False, is_transposed=True, is_concatenated=True,
                                      up_names=("gate_proj", "up_proj"), down_name="down_proj", scored_copies=True),
    # DBRX: mlp.w1 (gate) and mlp.v1 (up) [E * I, H], mlp.w2 (down) [E * I, H], each expert's [in, out];
    # act(gate) * up. Its checkpoints store them so; per expert llmq keeps DBRX's names.
    "DbrxExperts": ExpertsFlags(has_gate=True, has_bias=False, is_transposed=False, is_concatenated=False,
                                up_names=("w1", "v1"), down_name="w2", activation="mlp.activation_fn",
                                stacked=(("w1", "mlp.w1", False), ("v1", "mlp.v1", False), ("w2", "mlp.w2", True))),
    # LongCat-Flash: gate_up_proj [E + Z, 2I, H] (slots for its Z identity experts too, which its forward
    # never reads), down_proj [E, H, I]; per expert, Qwen2-MoE's names (its conversion mapping).
    "LongcatFlashExperts": ExpertsFlags(has_gate=True, has_bias=False, is_transposed=False, is_concatenated=True,
                                        routed="num_routed_experts"),
}


def experts_flags(module: nn.Module) -> ExpertsFlags | None:
    """The layout flags of an experts module: its class's UNDECORATED entry, or the decorator's flags it
    carries; None for a module that is neither."""
    known = UNDECORATED.get(type(module).__name__)
    if known is not None:
        return known
    if not all(hasattr(module, f) for f in _DECORATOR_FLAGS):
        return None
    return ExpertsFlags(*(bool(getattr(module, f)) for f in _DECORATOR_FLAGS))


@dataclass(frozen=True)
class ExpertsLayout:
    """How one experts module stores its weights, and the per-expert names llmq gives them."""

    up_param: str  # "gate_up_proj" or "up_proj" (no gate)
    num_experts: int
    hidden_size: int
    intermediate_size: int  # per projection of the up side (I)
    transposed: bool  # parameters stored [E, in, out]
    has_bias: bool
    has_gate: bool
    up_names: tuple[str, ...]  # per-expert names whose outputs concatenate to the up side
    down_name: str
    scored_copies: bool = False  # the calling convention of ExpertsFlags.scored_copies
    stacked: tuple[tuple[str, str, bool], ...] = ()  # ExpertsFlags.stacked
    activation: str = "act_fn"  # ExpertsFlags.activation
    identity_experts: int = 0  # routing indices past num_experts that hand on the token (ExpertsFlags.routed)

    @property
    def up_outputs(self) -> int:
        return self.intermediate_size * (2 if self.has_gate else 1)


def is_experts_module(module: nn.Module) -> bool:
    """A transformers experts module: the decorator's flags and 3D expert weights."""
    if isinstance(module, QuantExperts):
        return False
    flags = experts_flags(module)
    if flags is None:
        return False
    if flags.stacked:
        return all(isinstance(p := _parameter(module, path), torch.Tensor) and p.dim() == 2
                   for _, path, _ in flags.stacked)
    up = "gate_up_proj" if flags.has_gate else "up_proj"
    params = module._parameters
    return all(isinstance(params.get(n), torch.Tensor) and params[n].dim() == 3 for n in (up, "down_proj"))


def _parameter(module: nn.Module, path: str) -> torch.Tensor | None:
    owner, _, name = path.rpartition(".")
    try:
        return (module.get_submodule(owner) if owner else module)._parameters.get(name)
    except AttributeError:
        return None


def num_experts(module: nn.Module) -> int:
    """The number of experts of an experts module."""
    flags = experts_flags(module)
    if flags.stacked:
        return module.num_experts  # the parameters hold them one after another: the class says how many
    if flags.routed:
        return getattr(module, flags.routed)
    return module._parameters[_up_param(module)].shape[0]


def inside_quant_experts(root: nn.Module, name: str) -> bool:
    """Whether the module `name` (relative to root) lies inside a QuantExperts: an expert's projection."""
    parts = name.split(".")
    return any(isinstance(_submodule(root, ".".join(parts[:i])), QuantExperts) for i in range(1, len(parts)))


def _submodule(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def find_experts(root: nn.Module) -> dict[str, nn.Module]:
    """{dotted name: module} of every experts module under root."""
    return {name: m for name, m in root.named_modules() if is_experts_module(m)}


def unsupported_expert_weights(root: nn.Module, handled: set[str]) -> list[str]:
    """Names of stacks of matrices (weights with three or more dimensions longer than 1) under root
    that no handled experts module owns and no convolution holds: expert weights llmq cannot run.
    Per-channel parameters stored with extra unit dimensions (Kimi Linear's forget-gate A_log
    [1, 1, heads, 1]) and depthwise kernels ([channels, 1, width]) are not stacks."""
    bad = []
    for owner_name, owner in root.named_modules():
        if owner_name in handled or isinstance(owner, nn.modules.conv._ConvNd):
            continue
        for pname, p in owner._parameters.items():
            if p is not None and sum(size > 1 for size in p.shape) >= 3:
                bad.append(f"{owner_name}.{pname}" if owner_name else pname)
    return bad


def refuse_unsupported(model: nn.Module, experts: dict[str, nn.Module], within: str = "",
                       kept: set[str] = frozenset()) -> None:
    """Raise LlmqError for experts llmq cannot quantize, naming them.

    experts: {full name: module} found by find_experts; within: the dotted path
    (the decoder layers) searched for stray 3D weights; kept: experts left in
    full precision, which need not be quantizable.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    for name, m in experts.items():
        if name in kept:
            continue
        problem = None
        stacked = {path for _, path, _ in experts_flags(m).stacked}
        if getattr(m, "has_post_expert_norm", False):
            problem = "a norm after each expert"
        elif any(f"{child}.{p}" not in stacked for child, c in m.named_children() for p, _ in c.named_parameters()):
            problem = "submodules with weights"
        extra = [n for n in m._parameters if n not in _known_params(m)]
        if extra and problem is None:
            problem = f"extra weights {extra}"
        if problem:
            raise LlmqError(f"architecture {model_type!r}: the experts module {name} ({type(m).__name__}) has "
                            f"{problem}, which llmq cannot quantize yet; keep it in full precision by adding its "
                            "name to modules_to_not_convert (--skip)")
    root = model.get_submodule(within) if within else model
    rel = {n[len(within) + 1:] if within else n for n in experts}
    bad = unsupported_expert_weights(root, rel)
    if bad:
        owner = bad[0].rpartition(".")[0]
        cls = type(root.get_submodule(owner)).__name__ if owner else type(root).__name__
        where = f"{within}.{bad[0]}" if within else bad[0]
        raise LlmqError(f"architecture {model_type!r} stores weights in {len(bad)} tensor(s) of 3 or more "
                        f"dimensions that llmq does not recognise as experts ({where} in {cls}); llmq cannot "
                        "quantize them: add an experts layout to llmq.experts or use a supported architecture")


def _known_params(m: nn.Module) -> set[str]:
    up = _up_param(m)
    known = {up, "down_proj"}
    if experts_flags(m).has_bias:
        known |= {f"{up}_bias", "down_proj_bias"}
    return known


# transformers builds a model's conversion mapping anew at each call (about 0.1 s for a large MoE model);
# _disk_names reads it for each experts module of a model, and only reads it.
_MAPPINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _conversions_read_only(model: nn.Module, build) -> list:
    if model not in _MAPPINGS:
        _MAPPINGS[model] = build(model, add_legacy=False)
    return _MAPPINGS[model]


def _disk_names(model: nn.Module | None, experts_name: str, param: str, parts: int) -> tuple[str, ...] | None:
    """Per-expert checkpoint names for `param` from transformers' conversion mapping, or None."""
    if model is None:
        return None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
    except ImportError:  # pragma: no cover - older transformers
        return None
    try:
        conversions = _conversions_read_only(model, get_model_conversion_mapping)
    except Exception:  # a model that is not a PreTrainedModel (tests of single modules)
        return None
    full = f"{experts_name}.{param}"
    for conv in conversions:
        if not isinstance(conv, WeightConverter):
            continue
        targets = list(conv._original_target_patterns if hasattr(conv, "_original_target_patterns")
                       else conv.target_patterns)
        sources = list(conv._original_source_patterns if hasattr(conv, "_original_source_patterns")
                       else conv.source_patterns)
        # Patterns are regular expressions, some with escaped dots (Kimi Linear's `\.experts.gate_up_proj`).
        if len(targets) != 1 or not full.endswith(targets[0].replace("\\", "").lstrip("^").lstrip(".")):
            continue
        ops = [type(op) for op in conv.operations]
        plain = (ops == [MergeModulelist] and len(sources) == 1 and conv.operations[0].dim == 0) or (
            ops == [MergeModulelist, Concatenate] and conv.operations[0].dim == 0
            and conv.operations[1].dim == 1)
        names = []
        for s in sources:
            match = re.search(r"experts\.\*\.(\w+)\.weight$", s)
            if match is None:
                return None
            names.append(match.group(1))
        if plain and len(names) == parts:
            return tuple(names)
        return None
    return None


def _up_param(experts: nn.Module) -> str:
    """The experts module's up-side parameter: gate and up concatenated, or up alone."""
    return "gate_up_proj" if experts_flags(experts).has_gate else "up_proj"


def experts_layout(experts: nn.Module, experts_name: str = "", model: nn.Module | None = None) -> ExpertsLayout:
    """The layout of one experts module (see the module doc)."""
    flags = experts_flags(experts)
    if flags.stacked:
        e = num_experts(experts)
        gate = _parameter(experts, flags.stacked[0][1])  # [E * I, H]
        return ExpertsLayout(up_param="", num_experts=e, hidden_size=gate.shape[1],
                             intermediate_size=gate.shape[0] // e, transposed=False, has_bias=False,
                             has_gate=flags.has_gate, up_names=flags.up_names,
                             down_name=flags.down_name, stacked=flags.stacked, activation=flags.activation)
    up_param = _up_param(experts)
    up = experts._parameters[up_param]
    e = num_experts(experts)
    if flags.is_transposed:
        hidden, up_out = up.shape[1], up.shape[2]
    else:
        up_out, hidden = up.shape[1], up.shape[2]
    inter = up_out // 2 if flags.has_gate else up_out
    if flags.up_names is not None:
        names, down_names = flags.up_names, (flags.down_name,)
    else:
        split = 2 if flags.has_gate and flags.is_concatenated else 1
        names = _disk_names(model, experts_name, up_param, split) if split == 2 or not flags.has_gate else None
        down_names = _disk_names(model, experts_name, "down_proj", 1)
    if names is None or down_names is None:
        names, down_names = (up_param,), ("down_proj",)
    return ExpertsLayout(up_param=up_param, num_experts=e, hidden_size=hidden, intermediate_size=inter,
                         transposed=flags.is_transposed, has_bias=flags.has_bias, has_gate=flags.has_gate,
                         up_names=names, down_name=down_names[0], scored_copies=flags.scored_copies,
                         activation=flags.activation, identity_experts=_identity_experts(experts))


def _expert_matrix(param: torch.Tensor, e: int, transposed: bool) -> torch.Tensor:
    w = param[e]
    return w.t() if transposed else w  # [out, in]


def linear_view(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear whose weight (and bias) are views of the given tensors, without copying."""
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def _stacked_matrix(experts: nn.Module, path: str, e: int, count: int, transposed: bool) -> torch.Tensor:
    """Expert e's [out, in] matrix, a view of a stacked parameter (ExpertsFlags.stacked)."""
    p = _parameter(experts, path).data
    w = p.view(count, -1, p.shape[-1])[e]
    return w.t() if transposed else w


def unroll(experts: nn.Module, layout: ExpertsLayout) -> QuantExperts:
    """A QuantExperts of nn.Linear views of the module's 3D weights: the same function, per-expert linears."""
    if layout.stacked:
        per_expert = [ExpertProjections({name: linear_view(_stacked_matrix(experts, path, e, layout.num_experts, tr),
                                                           None) for name, path, tr in layout.stacked})
                      for e in range(layout.num_experts)]
        return _quant_experts(experts, per_expert, layout)
    up, down = experts._parameters[layout.up_param].data, experts._parameters["down_proj"].data
    up_bias = experts._parameters.get(f"{layout.up_param}_bias") if layout.has_bias else None
    down_bias = experts._parameters.get("down_proj_bias") if layout.has_bias else None
    per_expert = []
    for e in range(layout.num_experts):
        w_up = _expert_matrix(up, e, layout.transposed)
        b_up = None if up_bias is None else up_bias.data[e]
        parts = len(layout.up_names)
        rows = w_up.shape[0] // parts
        linears = {name: linear_view(w_up[i * rows:(i + 1) * rows],
                                      None if b_up is None else b_up[i * rows:(i + 1) * rows])
                   for i, name in enumerate(layout.up_names)}
        linears[layout.down_name] = linear_view(_expert_matrix(down, e, layout.transposed),
                                                 None if down_bias is None else down_bias.data[e])
        per_expert.append(ExpertProjections(linears))
    return _quant_experts(experts, per_expert, layout)


def _quant_experts(experts: nn.Module, per_expert: list[ExpertProjections], layout: ExpertsLayout) -> QuantExperts:
    return QuantExperts(weightless_copy(experts), per_expert, layout.up_names, layout.down_name, layout.has_gate,
                        scored_copies=layout.scored_copies, activation=layout.activation,
                        identity_experts=layout.identity_experts)


def rolled(q: QuantExperts, weight_of) -> nn.Module:
    """The architecture's experts module (q's template) holding q's experts stacked back into its 3D
    parameters, in its layout: `unroll` reversed. weight_of(linear) gives a projection's (weight
    [out, in], bias or None); gate and up are concatenated as they were split."""
    template = q.template
    flags = experts_flags(template)
    module = weightless_copy(template)
    if flags.stacked:
        for name, path, transposed in flags.stacked:
            weights = [weight_of(q.expert(e)._modules[name])[0] for e in range(q.num_experts)]
            owner, _, pname = path.rpartition(".")
            (module.get_submodule(owner) if owner else module)._parameters[pname] = nn.Parameter(
                torch.cat([w.t() if transposed else w for w in weights]).contiguous(), requires_grad=False)
        return module
    transposed = flags.is_transposed
    for param, names in ((_up_param(template), q.up_names), ("down_proj", (q.down_name,))):
        weights, biases = [], []
        for e in range(q.num_experts):
            parts = [weight_of(q.expert(e)._modules[n]) for n in names]
            weights.append(torch.cat([w for w, _ in parts]))
            biases.append(None if parts[0][1] is None else torch.cat([b for _, b in parts]))
        stacked = torch.stack(weights)
        if param != "down_proj" and q.identity_experts:  # the identity experts' slots, which nothing reads
            stacked = torch.cat([stacked, stacked.new_zeros(q.identity_experts, *stacked.shape[1:])])
        module._parameters[param] = nn.Parameter(stacked.transpose(1, 2).contiguous() if transposed else stacked,
                                                 requires_grad=False)
        if biases[0] is not None:
            module._parameters[f"{param}_bias"] = nn.Parameter(torch.stack(biases), requires_grad=False)
    return module


def empty_quant_experts(experts: nn.Module, layout: ExpertsLayout, make_linear) -> QuantExperts:
    """A QuantExperts of linears built by make_linear(local name, in_features, out_features, has_bias)
    (loading; local name: "<e>.<projection>", relative to the experts module)."""
    parts = len(layout.up_names)
    per_expert = []
    for e in range(layout.num_experts):
        linears = {name: make_linear(f"{e}.{name}", layout.hidden_size, layout.up_outputs // parts, layout.has_bias)
                   for name in layout.up_names}
        linears[layout.down_name] = make_linear(f"{e}.{layout.down_name}", layout.intermediate_size,
                                                layout.hidden_size, layout.has_bias)
        per_expert.append(ExpertProjections(linears))
    return _quant_experts(experts, per_expert, layout)


# Routers that are small networks of their own, beside the experts: every linear in them routes.
# ZAYA1's router projects the hidden states down and scores them with an MLP whose last linear has a
# row per expert and one for its "skip" expert.
ROUTER_NETWORKS = ("ZayaRouter",)


def _identity_experts(module: nn.Module) -> int:
    """How many identity experts an experts module routes to beside its experts (ExpertsFlags.routed)."""
    if not experts_flags(module).routed:
        return 0
    return module._parameters[_up_param(module)].shape[0] - num_experts(module)


def find_routers(root: nn.Module, experts: dict[str, nn.Module]) -> list[str]:
    """Names (relative to root) of the modules that route tokens to the given experts.

    A router sits beside the experts in their MoE block and holds a 2D weight
    with one row per expert (the top-k gate) or a single row (the gate of a
    shared expert, Qwen2-MoE); or it is one of ROUTER_NETWORKS, whose linears
    are named one by one.
    """
    routers = []
    for name, m in experts.items():
        parent_name = name.rpartition(".")[0]
        parent = root.get_submodule(parent_name) if parent_name else root
        n_experts = num_experts(m)
        for child_name, child in parent.named_children():
            if child is m:
                continue
            if type(child).__name__ in ROUTER_NETWORKS:
                for local, module in child.named_modules():
                    if isinstance(module, nn.Linear):
                        routers.append(".".join(p for p in (parent_name, child_name, local) if p))
                continue
            # The router itself, or (DBRX) the one linear of a router module without weights of its own.
            holders = [(n, c) for n, c in child.named_children() if any(True for _ in c.parameters())]
            inner = holders if not child._parameters and len(holders) == 1 else []
            for local, module in [("", child)] + inner:
                w = module._parameters.get("weight")
                # One row per expert, identity experts included (LongCat-Flash's), or one in all.
                rows = (n_experts, n_experts + _identity_experts(m), 1)
                if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] in rows:
                    router = f"{child_name}.{local}" if local else child_name
                    routers.append(f"{parent_name}.{router}" if parent_name else router)
    return sorted(set(routers))
