"""QuantExperts: the experts of one mixture-of-experts block, one linear per expert projection.

transformers 5 stores the experts of an MoE block as 3D parameters of one
module (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`, classes decorated
with `@use_experts_implementation`), and runs them through fused kernels
(grouped_mm, batched_mm) that never call nn.Linear. llmq replaces such a
module by a QuantExperts holding, for expert e, the submodule `e` with one
linear per projection, named as the architecture's checkpoints name them on
disk (Mixtral: `w1`, `w3`, `w2`; Qwen-style: `gate_proj`, `up_proj`,
`down_proj`; no per-expert names known, as for gpt-oss: the fused
`gate_up_proj` and `down_proj` of each expert). So the state dict reads
`<block>.experts.<e>.<proj>.qweight`, the names vLLM and other tools use.

The linears are nn.Linear while the model is being calibrated (views of the
original 3D weights, so nothing is copied) and QuantLinear once quantized.
The forward is the eager experts forward of transformers: tokens grouped by
expert, gate/up projection, the original class's gate (`_apply_gate`:
chunked or interleaved halves, gpt-oss's clamped GLU ...; for a class without
one, act(gate) * up of the chunked halves) or activation, down projection,
weighted by the routing weights and summed per token. Experts called with
scored copies (Llama 4: every token once per expert, multiplied by its routing
score, zero where it is not routed) run the same forward on the copies that
are not zero, each routed to its own expert with weight 1, and return zeros
for the others, which is what the original computes for them.
The original module's weightless attributes (config, act_fn, alpha ...) are
kept in a shallow copy with its parameters removed, so that its own gate
function runs unchanged.

On CUDA, a block whose projections are all QuantLinear without act-order
runs through one grouped Triton dequantize-matmul per side (llmq.kernels.moe:
tokens sorted by expert, every expert in one launch, a small tile for decode
steps) instead of a loop over experts; so does a block of W8A8Linear
projections, through the grouped int8 kernel (static activations: when each
expert's gate and up projections hold one input scale, as they do having
observed the same tensor). On CPU the loop calls each expert's
QuantLinear, which runs torch's int4/int8 weight-only kernels; a single token
(a decode step at batch 1) goes straight to its top-k experts, without the
sort and scatter, and hook-free QuantLinears are called without the module
call: at decode each of these costs as much as a kernel.

Calibration: `record_tokens` counts the tokens each expert receives, and
`calibrate_all` sends every token through every expert (the hooks on the
expert linears then see all tokens) while only the routed outputs flow on;
`visit_every_expert` calls an expert that this process routed no token to
with none, so that several processes (torch.distributed) run their experts'
hooks, and so their collectives, in the same order. While an expert runs in
such a forward, `routed_rows` holds the indices of its rows among the block's
input tokens (None: every token), which tells the statistics shared across
processes where each row lies in the whole calibration batch.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from .input_grad import wants_input_gradient
from .qlinear import QuantLinear
from .offload import offloaded
from .w8a8 import W8A8Linear


def weightless_copy(module: nn.Module) -> nn.Module:
    """A shallow copy of module without parameters and buffers, its submodules' too (its gate function's
    `self`; DBRX keeps its experts' weights in a submodule)."""
    template = copy.copy(module)
    template.__dict__["_parameters"] = {}
    template.__dict__["_buffers"] = {}
    template.__dict__["_modules"] = {name: None if child is None else weightless_copy(child)
                                     for name, child in module._modules.items()}
    return template


def _project(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(x). A CPU QuantLinear that nothing hooks (no forward hooks, global or its own, and no
    replaced forward, as accelerate's offloading installs) runs its CPU forward directly."""
    if (x.device.type == "cpu" and type(linear) is QuantLinear and not linear._forward_hooks
            and not linear._forward_pre_hooks and "forward" not in linear.__dict__
            and not torch_module._global_forward_hooks and not torch_module._global_forward_pre_hooks):
        return linear.cpu_forward(x)
    return linear(x)


class ExpertProjections(nn.Module):
    """The linears of one expert, registered under their checkpoint names."""

    def __init__(self, linears: dict[str, nn.Module]):
        super().__init__()
        for name, linear in linears.items():
            self.add_module(name, linear)


class QuantExperts(nn.Module):
    """One MoE block's experts as per-expert linears (see the module doc).

    Args:
        template: the original experts module, weightless (see weightless_copy);
            its `_apply_gate` (or `act_fn` when it has no gate) is applied
            between the two projections.
        experts: one ExpertProjections per expert.
        up_names: the projections whose outputs, concatenated in this order,
            form the original gate_up (or up) projection's output.
        down_name: the down projection.
        has_gate: whether the template gates (gate_up) or only activates (up).
        scored_copies: called as experts(x), x [E * T, H] the scored copies of the block's tokens
            (llmq.experts.ExpertsFlags), instead of experts(hidden_states, top_k_index, top_k_weights).
        activation: the template's activation, by attribute path ("mlp.activation_fn" for DBRX).
        identity_experts: routing indices past the experts that hand on the token times its routing
            weight (LongCat-Flash's "zero" experts; llmq.experts.ExpertsFlags.routed).
    """

    def __init__(self, template: nn.Module, experts: list[ExpertProjections], up_names: tuple[str, ...],
                 down_name: str, has_gate: bool = True, scored_copies: bool = False, activation: str = "act_fn",
                 identity_experts: int = 0):
        super().__init__()
        self.__dict__["template"] = template  # not a submodule: no weights, not in the state dict
        for e, projections in enumerate(experts):
            self.add_module(str(e), projections)
        self.num_experts = len(experts)
        self.up_names = tuple(up_names)
        self.down_name = down_name
        self.has_gate = has_gate
        self.scored_copies = scored_copies
        self.identity_experts = identity_experts
        act = template
        for part in activation.split("."):  # absent where the template's own gate function activates
            act = getattr(act, part, None)
        self.__dict__["act_fn"] = act  # the template's, not a submodule of this one
        self.calibrate_all = False
        self.record_tokens = False
        self.visit_every_expert = False
        self.routed_rows: torch.Tensor | None = None  # the running expert's tokens (see the module doc)
        self.row_tokens: torch.Tensor | None = None  # scored copies: each forward row's token in the block
        self.token_counts = torch.zeros(self.num_experts, dtype=torch.long)

    def expert(self, e: int) -> ExpertProjections:
        return self._modules[str(e)]

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        t = self.template
        if not self.has_gate:
            return self.act_fn(h)
        if hasattr(type(t), "_apply_gate"):
            return type(t)._apply_gate(t, h)
        gate, up = h.chunk(2, dim=-1)  # a class without the decorator's gate (Llama 4, DBRX): halves, gate first
        return up * self.act_fn(gate)

    def _expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        linears = self.expert(e)._modules
        ups = [_project(linears[n], x) for n in self.up_names]
        h = ups[0] if len(ups) == 1 else torch.cat(ups, dim=-1)
        return _project(linears[self.down_name], self._activate(h))

    def grouped_kind(self, linears: list | None = None) -> str | None:
        """The grouped kernel that runs this block: "packed" (every projection a QuantLinear without
        act-order, one bit width and group size), "int8" (every projection a W8A8Linear, all static or
        all dynamic), or None. linears: _quant_linears(), when the caller has them."""
        linears = self._quant_linears() if linears is None else linears
        if all(type(m) is W8A8Linear for m in linears) and len({m.static for m in linears}) == 1:
            return "int8"
        if (all(isinstance(m, QuantLinear) and m.g_idx is None for m in linears)
                and len({(m.bits, m.group_size) for m in linears}) == 1):
            return "packed"
        return None

    def _quant_linears(self) -> list:
        """Every expert's projections, expert after expert. Read on every CUDA forward: the module
        tables directly."""
        names = self.up_names + (self.down_name,)
        return [projections._modules[n] for projections in self._modules.values() for n in names]

    def _apply(self, fn, recurse=True):
        moved = super()._apply(fn, recurse)
        # Placed on a CUDA device, the stacked form is built now, from the moved experts (quantized
        # projections hold their weights as buffers; _grouped_form builds nothing for a block that no
        # grouped kernel runs).
        self.__dict__.pop("_grouped", None)
        self.__dict__.pop("_grouped_key", None)
        if any(t.is_cuda for t in self.expert(0)._modules[self.down_name].buffers()):
            self._grouped_form()
        return moved

    def _grouped_form(self):
        """Each side's weights stacked over experts ([E, ...] per tensor), or None where no grouped kernel
        runs the block (grouped_kind), or a static W8A8 expert's gate and up projections hold different
        input scales, or the experts' tensors are offloaded (accelerate puts each expert's in for its own
        call only): the loop runs it then.

        Built when the block is placed on a CUDA device, or on the first grouped call; built
        again when an expert's buffers changed since (each QuantLinear's form version moves
        when its buffers are loaded, put in by an offloading hook, moved or written in place; a W8A8Linear's
        buffers are followed by identity and version).
        The gate and up projections of an expert are concatenated along the outputs, which keeps
        the packing (codes along K, zero points along N in whole words). A copy: while it is
        cached, the experts take twice their memory on the device.
        """
        linears = self._quant_linears()
        kind = self.grouped_kind(linears)
        if kind is None:
            return None
        key = (kind, *(_w8a8_key(m) if kind == "int8" else m.form_version() for m in linears))
        if self.__dict__.get("_grouped_key") == key:
            return self._grouped
        if offloaded(linears):  # looked at only when the experts' tensors changed: not on every call
            return None
        sides = []
        for names in (self.up_names, (self.down_name,)):
            per = [[self.expert(e)._modules[n] for n in names] for e in range(self.num_experts)]
            side = _stack_int8(per) if kind == "int8" else _stack_packed(per)
            if side is None:
                sides = None
                break
            sides.append(side)
        self.__dict__["_grouped"] = sides
        self.__dict__["_grouped_key"] = key
        # The copy lives no longer than the tensors it was made from: where an offloading hook puts the
        # experts in for each call and takes them out after it (accelerate), it is dropped with them,
        # instead of holding every offloaded block's experts on the device between calls.
        source = linears[0]._buffers["weight" if kind == "int8" else "qweight"]
        weakref.finalize(source, _forget_grouped, weakref.ref(self), key)  # a strong reference would keep the block
        return sides

    def grouped_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor, form: list | None = None) -> torch.Tensor:
        """The forward through the grouped Triton kernel: all experts of the block in one launch per side.
        form: the stacked weights (_grouped_form), when the caller has them."""
        form = self._grouped_form() if form is None else form
        if form is None:
            raise RuntimeError("no grouped kernel runs this block: its projections are not all QuantLinear without "
                               "act-order or all W8A8Linear alike, or its static W8A8 experts hold different input "
                               "scales for their gate and up projections (the forward loops over experts)")
        up, down = form
        top_k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat.clamp(0, self.num_experts), minlength=self.num_experts + 1).tolist()
        counts = counts[: self.num_experts]  # expert-parallel sentinels sort last and are dropped
        order = order[: sum(counts)]
        slots = order // top_k
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        h = self._activate(_grouped_matmul(x, slots, counts, up))
        out = _grouped_matmul(h, torch.arange(h.shape[0], device=h.device), counts, down)
        out = out * top_k_weights.reshape(-1)[order, None]
        final = torch.zeros_like(hidden_states)
        final.index_add_(0, slots, out.to(final.dtype))
        return final

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        if top_k_index is None and self.scored_copies:
            return self.scored_forward(hidden_states)
        if hidden_states.dim() > 2:  # DBRX's block hands its [batch, tokens, H] as they are
            flat = hidden_states.reshape(-1, hidden_states.shape[-1])
            return self.forward(flat, top_k_index, top_k_weights, *args, **kwargs).view_as(hidden_states)
        out = self._routed_forward(hidden_states, top_k_index, top_k_weights)
        if self.identity_experts:
            # The identity experts' share, added after the experts' as the original adds them (higher
            # indices last); each path above drops the indices past num_experts.
            weight = top_k_weights.masked_fill(top_k_index < self.num_experts, 0).sum(dim=-1, keepdim=True)
            out = out + (hidden_states * weight).to(out.dtype)
        return out

    def _routed_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
        """The experts' share of the forward, by whichever path runs them here."""
        # The grouped kernels have no backward; the loop's linears give the input a gradient (input_grad).
        if hidden_states.device.type == "cuda" and not self.record_tokens and not wants_input_gradient(hidden_states):
            form = self._grouped_form()  # None when no grouped kernel runs this block
            if form is not None:
                return self.grouped_forward(hidden_states, top_k_index, top_k_weights, form)
        if top_k_index.shape[0] == 1 and not (self.calibrate_all or self.record_tokens):  # one token
            return self.token_forward(hidden_states, top_k_index, top_k_weights)
        final = torch.zeros_like(hidden_states)
        top_k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        # One host sync for all experts; indices past num_experts (expert-parallel sentinels) are dropped.
        counts = torch.bincount(flat.clamp(0, self.num_experts), minlength=self.num_experts + 1).tolist()
        if self.record_tokens:
            self.token_counts += torch.tensor(counts[: self.num_experts])
        weights = top_k_weights.reshape(-1)
        start = 0
        for e in range(self.num_experts):
            end = start + counts[e]
            if end == start and not (self.calibrate_all or self.visit_every_expert):
                continue
            slots = order[start:end]
            tokens = slots // top_k
            if self.calibrate_all:
                # Every token through the expert (its linears' hooks see them all); routed rows flow on.
                out = self._expert_forward(e, hidden_states)[tokens]
            else:
                self.routed_rows = tokens if self.row_tokens is None else self.row_tokens[tokens]
                try:
                    out = self._expert_forward(e, hidden_states[tokens])
                finally:
                    self.routed_rows = None
            out = out * weights[slots, None]
            final.index_add_(0, tokens, out.to(final.dtype))
            start = end
        return final

    def scored_forward(self, copies: torch.Tensor) -> torch.Tensor:
        """The forward of experts called with scored copies ([E * T, H]; see the module doc): the copies
        that are not zero, in token order, each through its own expert with weight 1 (exact)."""
        per_expert = copies.view(self.num_experts, -1, copies.shape[-1])
        tokens = per_expert.shape[1]
        token, expert = per_expert.ne(0).any(dim=-1).t().nonzero(as_tuple=True)  # [T, E] mask: token order
        rows = expert * tokens + token
        self.row_tokens = token
        try:
            out = self.forward(copies[rows], expert[:, None], copies.new_ones(len(rows), 1))
        finally:
            self.row_tokens = None
        return torch.zeros_like(copies).index_copy_(0, rows, out)

    def token_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor) -> torch.Tensor:
        """The forward of one token ([1, H]): its experts in ascending order, each output weighted and
        added, which sums in the order (and so to the bits) of the loop's scatter into zeros."""
        final = None
        for e, k in sorted((e, k) for k, e in enumerate(top_k_index[0].tolist())):
            if e >= self.num_experts:  # an expert-parallel sentinel
                continue
            out = (self._expert_forward(e, hidden_states) * top_k_weights[:, k:k + 1]).to(hidden_states.dtype)
            final = out if final is None else final.add_(out)
        return torch.zeros_like(hidden_states) if final is None else final

    def extra_repr(self) -> str:
        identities = f", identity_experts={self.identity_experts}" if self.identity_experts else ""
        return (f"num_experts={self.num_experts}{identities}, projections={self.up_names + (self.down_name,)}, "
                f"gate={type(self.template).__name__ if self.has_gate else 'none'}")


def _forget_grouped(block: weakref.ref, key: tuple) -> None:
    """Drop a QuantExperts' stacked copy if the block still lives and the copy is still the one built for `key`."""
    state = getattr(block(), "__dict__", {})
    if state.get("_grouped_key") == key:
        state.pop("_grouped", None)
        state.pop("_grouped_key", None)


def _stack_packed(per: list[list[QuantLinear]]) -> dict:
    """One side's packed tensors stacked over experts, each expert's projections concatenated along N."""
    stacked = {name: torch.stack([torch.cat([getattr(m, name) for m in ms], dim=1) for ms in per])
               for name in ("qweight", "qzeros", "scales")}
    first = per[0][0]
    stacked["bias"] = torch.stack([torch.cat([m.bias for m in ms]) for ms in per]) if first.bias is not None else None
    stacked["bits"], stacked["group_size"] = first.bits, first.group_size
    return stacked


def _stack_int8(per: list[list[W8A8Linear]]) -> dict | None:
    """One side's int8 weights [E, N, K], weight scales [E, N], static input scales [E] (or None) and
    biases stacked over experts; None when an expert's projections hold different input scales."""
    first = per[0][0]
    if first.static and any(not torch.equal(m.input_scale, ms[0].input_scale) for ms in per for m in ms[1:]):
        return None
    return {"weight": torch.stack([torch.cat([m.weight for m in ms]) for ms in per]),
            "weight_scale": torch.stack([torch.cat([m.weight_scale.reshape(-1) for m in ms]) for ms in per]).float(),
            "input_scale": torch.cat([ms[0].input_scale.reshape(1) for ms in per]).float() if first.static else None,
            "bias": torch.stack([torch.cat([m.bias for m in ms]) for ms in per]) if first.bias is not None else None}


def _w8a8_key(m: W8A8Linear) -> tuple:
    """What a stacked copy of a W8A8Linear's buffers was made from: each tensor's identity and version.
    Read on every CUDA forward: the module tables directly, not the slower attribute lookup."""
    b = m._buffers
    tensors = (b["weight"], b["weight_scale"], b.get("input_scale"), m._parameters.get("bias"))
    return tuple((id(t), None if t is None or t.is_inference() else t._version) for t in tensors)


def _grouped_matmul(x: torch.Tensor, slots: torch.Tensor, counts: list[int], side: dict) -> torch.Tensor:
    """One side of the block through its grouped kernel: W8A8 or packed weights, by the side's tensors."""
    from ..kernels.moe import grouped_dequant_matmul, grouped_int8_matmul

    bias = None if side["bias"] is None else side["bias"].to(x.dtype)
    if "weight" in side:
        return grouped_int8_matmul(x, slots, counts, side["weight"], side["weight_scale"], side["input_scale"], bias)
    return grouped_dequant_matmul(x, slots, counts, side["qweight"], side["qzeros"], side["scales"].to(x.dtype),
                                  bits=side["bits"], group_size=side["group_size"], bias=bias)
