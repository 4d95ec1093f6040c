"""Linears that read the same input, multiplied together on CPU (QuantLinears at decode, W8A8 always).

A decode step multiplies each linear by one row, and a CPU kernel call then
costs little more than its fixed part (the input's conversion to bf16, the
dispatch, the output's conversion back): a 576 x 192 k_proj in int4 runs
slower than its fp32 original. The linears of a decoder layer that read the
same tensor (q/k/v after the input norm, gate/up after the post-attention
norm: the architecture's `sequential` groups in llmq/arch.py, facts about its
modeling code; and each expert's gate and up projections) are therefore
multiplied in one kernel call when their input has at most
`cpu_select.DECODE_MAX_ROWS` rows: the first of them to be called computes
every member's output over their weights concatenated along the outputs,
returns its own, and keeps the others for the members called next with the
same input tensor. The outputs are the separate calls' to the bit: each
output column is the same reduction over the same inputs.

The same input means the same tensor object, unchanged since (its version
counter). Inference-mode tensors have no version counter: for them sharing
rests on the object alone, which holds for the modeling code the groups
describe (none modifies a projection's input between these calls).

Memory: the members' packed CPU weights become row views of the
concatenated one, so only the small per-group scales are held twice. The
int8 CPU layout keeps each output row apart; the int4 one interleaves the
rows of each block of 64 outputs, so an int4 group is multiplied together
only when every member but the last has a multiple of 64 outputs (q/k/v and
gate/up of the usual model sizes do). At prefill (more rows), and where the
members do not fit one call (act-order inputs, dense forms, other backends),
each member runs on its own.

W8A8 layers (modules/w8a8.py) of one group share more, at every number of
rows: the input is quantized to int8 once (per token, or with the members'
static scale, which they hold alike because they observed the same tensor)
and multiplied with the members' int8 weights concatenated, in one GEMM and
one rescale. The int8 GEMM kernel ("intmm") sums exactly, torch's int8
weight-only kernel ("int8pack") sums each output alike wherever its weight row
sits, and the rescale works element by element, so the outputs are again the
separate calls' bits; where the measured choice is the other kernel
("dequant", whose fp32 matmul may sum in another order for another width),
each member runs alone. The members' `weight` and
`weight_scale` buffers become views of the concatenated ones (the state dict
gives them as tensors of their own), and a member whose buffers were replaced
since is noticed by their identity and makes the group concatenate again.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import arch_spec, decoder_layers
from ..errors import LlmqError
from ..kernels import cpu_select
from ..kernels.cpu import CpuState, cpu_kernel, packed_matmul
from ..kernels.int8 import Int8Weight, cpu_int8_linear, int8_weight
from ..kernels.int8 import cpu_kernel as int8_cpu_kernel
from .qexperts import QuantExperts
from .offload import offloaded
from .qlinear import QuantLinear
from .w8a8 import W8A8Linear

_FUSABLE_BACKENDS = ("int4pack", "int8pack")
# torch's int4 CPU layout interleaves the rows of each block of 64 outputs: a concatenation is
# the concatenated layers' layout only where every member but the last fills whole blocks.
INT4PACK_BLOCK_ROWS = 64


@dataclass
class _Fused:
    state: CpuState
    bias: torch.Tensor | None
    sizes: list[int]


@dataclass
class _Pending:
    source: weakref.ref
    version: int | None
    outputs: dict


def _version(x: torch.Tensor) -> int | None:
    return None if x.is_inference() else x._version


class Siblings:
    """The linears of one layer that read one input (see the module doc): QuantLinears at decode."""

    def __init__(self, members: list[nn.Module]):
        self.members = list(members)
        self._fused = None
        self._fused_key: tuple | None = None  # what _fused was built from (None also when nothing fits)
        self._first: CpuState | None = None  # the first member's form when _fused was built
        self._pending: _Pending | None = None

    def output(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """member(x) from a shared call, or None when member must compute on its own."""
        pending = self._pending
        if (pending is not None and pending.source() is x and pending.version == _version(x)
                and member in pending.outputs):
            return pending.outputs.pop(member)
        rows = x.numel() // max(x.shape[-1], 1)
        shared = self._together(x, rows) if rows else None
        if shared is None:
            self._pending = None
            return None
        y, sizes = shared
        outputs = dict(zip(self.members, y.split_with_sizes(sizes, -1)))  # not torch.split's Python layers
        own = outputs.pop(member)
        self._pending = _Pending(weakref.ref(x), _version(x), outputs)
        return own

    def _together(self, x: torch.Tensor, rows: int) -> tuple[torch.Tensor, list[int]] | None:
        """(every member's output concatenated, their widths), or None to compute alone."""
        if rows > cpu_select.DECODE_MAX_ROWS:
            return None
        fused = self._fused_form(x.dtype, rows)
        if fused is None or x.shape[-1] != fused.state.in_features:  # a wrong width: the checked way
            return None
        bias = None if fused.bias is None else fused.bias.to(x.dtype)
        return packed_matmul(x, fused.state, bias), fused.sizes

    def _fused_form(self, dtype: torch.dtype, rows: int) -> _Fused | None:
        # The members' forms change only with their versions (modules/qlinear.py, which also notices
        # buffers written in place), so an unchanged key means unchanged forms: read on every call,
        # the members' forms are built only on a change.
        key = (dtype, *[m.form_version() for m in self.members])
        if self._fused_key != key:
            if offloaded(self.members):
                self._fused, self._fused_key = None, key
                return None
            states = [m._cpu_form(dtype) for m in self.members]
            self._fused, self._fused_key, self._first = _concatenate(self.members, states), key, states[0]
        fused = self._fused
        # Only where the members would run the packed kernel at this many rows.
        if fused is None or cpu_kernel(self._first, rows) != self._first.backend:
            return None
        return fused


# The W8A8 CPU kernels whose outputs are the same bits for a weight alone or inside a concatenation.
_W8A8_GROUPED = ("intmm", "int8pack")


@dataclass
class _FusedW8A8:
    weight: Int8Weight  # int8 [N total, K] and fp32 [N total, 1]
    input_scale: torch.Tensor | None  # the members' shared static scale (the first member's buffer)
    bias: torch.Tensor | None
    sizes: list[int]
    sources: tuple  # what it was built from (_sources)
    held: list  # the buffers named in sources


class W8A8Siblings(Siblings):
    """W8A8Linears of one layer that read one input: one quantization, one int8 GEMM (module doc)."""

    def _together(self, x: torch.Tensor, rows: int) -> tuple[torch.Tensor, list[int]] | None:
        if int8_cpu_kernel(rows) not in _W8A8_GROUPED:  # W8A8Linear.forward calls only with CPU inputs
            return None
        fused = self._current()
        if fused is None or x.shape[-1] != fused.weight.codes.shape[1]:  # a wrong width: the checked way
            return None
        return cpu_int8_linear(x, fused.weight, fused.input_scale, fused.bias), fused.sizes

    def _current(self) -> _FusedW8A8 | None:
        fused = self._fused
        if fused is not None and fused.sources == _sources(self.members):
            return fused
        self._fused = _concatenate_w8a8(self.members)
        return self._fused


def _sources(members: list[W8A8Linear]) -> tuple:
    """What a fused W8A8 form is built from: the members' buffer objects (the form holds them, so
    their ids stay theirs), and the versions of those it copies (the static scales it compares, the
    biases); a weight or weight scale written in place writes into the concatenated form through
    its view. Read on every call: the module tables directly, not the slower attribute lookup."""
    out = []
    for m in members:
        buffers, scale, bias = m._buffers, m._buffers.get("input_scale"), m._parameters.get("bias")
        out += (id(buffers["weight"]), id(buffers["weight_scale"]), id(scale), id(bias))
        if scale is not None:
            out.append(_version(scale))
        if bias is not None:
            out.append(_version(bias))
    return tuple(out)


def _concatenate_w8a8(members: list[W8A8Linear]) -> _FusedW8A8 | None:
    """The members' int8 weights and scales concatenated along the outputs, their buffers turned into
    views of them; None when they cannot share a call."""
    first = members[0]
    scales = [m.input_scale for m in members]  # per member: None (per token) or its static scale
    if (offloaded(members) or any(m.weight.device.type != "cpu" or m.weight_scale.dtype != torch.float32
            or m.in_features != first.in_features for m in members)
            or len({m.bias is None for m in members}) != 1
            or any(m.bias is not None and m.bias.dtype != torch.float32 for m in members)
            or len({s is None for s in scales}) != 1
            or (scales[0] is not None and any(not torch.equal(s, scales[0]) for s in scales[1:]))):
        return None
    weight = torch.cat([m.weight for m in members])
    weight_scale = torch.cat([m.weight_scale.reshape(-1, 1) for m in members])
    sizes = [m.out_features for m in members]
    for m, w, ws in zip(members, weight.split(sizes), weight_scale.split(sizes)):
        m.weight, m.weight_scale = w, ws
    bias = None if first.bias is None else torch.cat([m.bias for m in members])
    held = [(m.weight, m.weight_scale, m.input_scale, m.bias) for m in members]
    return _FusedW8A8(int8_weight(weight, weight_scale), first.input_scale, bias, sizes, _sources(members), held)


def _concatenate(members: list[nn.Module], states: list[CpuState]) -> _Fused | None:
    """The members' packed forms concatenated along the outputs, the members' weights turned into
    views of it; None when they do not fit one kernel call."""
    first = states[0]
    if (first.backend not in _FUSABLE_BACKENDS
            or any(s.backend != first.backend or s.in_features != first.in_features or s.dtype != first.dtype
                   or s.group_size != first.group_size or s.perm is not None or s.dense_weight is not None
                   for s in states)
            or len({m.bias is None for m in members}) != 1
            or (first.backend == "int4pack" and any(s.out_features % INT4PACK_BLOCK_ROWS for s in states[:-1]))):
        return None
    weight = torch.cat([s.weight for s in states])  # [N total, ...]: rows are independent
    scales = torch.cat([s.scales for s in states], dim=1 if first.backend == "int4pack" else 0).contiguous()
    sizes = [s.out_features for s in states]
    for s, w in zip(states, weight.split(sizes)):
        s.weight = w
    state = CpuState(first.backend, first.in_features, sum(sizes), first.dtype, weight, scales,
                     group_size=first.group_size)
    bias = None if members[0].bias is None else torch.cat([m.bias for m in members])
    return _Fused(state, bias, sizes)


def link_siblings(model: nn.Module) -> int:
    """Link the QuantLinears of each decoder layer that read one input (the architecture's
    `sequential` groups, each expert's gate and up); returns the number of groups linked.
    Safe to call again."""
    try:
        spec = arch_spec(model)
        _, layers = decoder_layers(model, spec)
    except LlmqError:  # not a decoder model llmq knows: nothing to link
        return 0
    if layers is None:
        return 0
    linked = 0
    for layer in layers:
        groups = [[_submodule(layer, n) for n in names] for names in spec.sequential or ()]
        # Each expert's gate and up projections read the expert's input.
        groups += [[ex.expert(e)._modules[n] for n in ex.up_names] for ex in layer.modules()
                   if isinstance(ex, QuantExperts) and len(ex.up_names) > 1 for e in range(ex.num_experts)]
        for members in groups:
            group = _group(members)
            if group is None:
                continue
            for m in group.members:
                m.__dict__["_siblings"] = group
            linked += 1
    return linked


def _group(members: list[nn.Module | None]) -> Siblings | None:
    """The group that multiplies these linears together, or None when fewer than two can."""
    w8a8 = [m for m in members if type(m) is W8A8Linear]
    if len(w8a8) >= 2 and len({(m.in_features, m.static) for m in w8a8}) == 1:
        return W8A8Siblings(w8a8)
    packed = [m for m in members if type(m) is QuantLinear]
    if len(packed) >= 2 and len({(m.in_features, m.bits) for m in packed}) == 1:
        return Siblings(packed)
    return None


def _submodule(layer: nn.Module, name: str) -> nn.Module | None:
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None
