"""Mixture-of-experts models in the quantization pipeline.

`prepare_experts` runs at planning time: every experts module of the decoder
layers (llmq.experts.find_experts) is refused when llmq cannot run it, or
replaced by a QuantExperts of per-expert nn.Linear views of its weights. From
then on the experts' projections are ordinary linears to every method: RTN
quantizes them, GPTQ and AWQ see each expert's own inputs through their
forward pre-hooks (the QuantExperts forward calls each expert's linears on
the tokens routed to it, or on every token with `--moe-calibration all`),
and they are swapped for QuantLinear (W8A8Linear with --scheme w8a8) like
any other linear. The routers are added to modules_to_not_convert (unless
keep_routers is off).

Experts that receive fewer calibration tokens than `moe_min_tokens` (or none
at all) are quantized by round-to-nearest instead of the calibrated solve
(W8A8: calibrated on every calibration token of their block instead, which
also gives static activation scales from real inputs); `ExpertTokens`
records the counts and the experts that fell back, per layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from . import distributed
from .arch import is_plain_linear
from .config import QuantConfig
from .errors import LlmqError
from .experts import experts_layout, find_experts, find_routers, refuse_unsupported, unroll
from .modules.qexperts import QuantExperts
from .modules.replace import replace_module


def prepare_experts(model: nn.Module, prefix: str, layers: nn.ModuleList, config: QuantConfig) -> QuantConfig:
    """Unroll the experts modules of the decoder layers (see the module doc).

    Returns the config to quantize with: the given one, or, with routers to
    keep, a copy whose modules_to_not_convert also names them.
    """
    found = {f"{prefix}.{i}.{local}": m for i, layer in enumerate(layers) for local, m in find_experts(layer).items()}
    refuse_unsupported(model, found, within=prefix, kept={n for n in found if config.skips(n)})
    if not found:
        return config
    kept = [n for n in found if config.skips(n)]
    if kept and len(kept) < len(found) and config.quantizes_activations:
        # Stored per expert, W8A8 experts carry the names of full-precision per-expert weights; the
        # loader tells them apart from kept experts only when a checkpoint holds one kind.
        quantized = next(n for n in found if not config.skips(n))
        raise LlmqError(f"--scheme w8a8 quantizes every experts module of a model or keeps all of them, but "
                        f"{kept[0]} is kept and {quantized} is quantized: skip `mlp.experts` everywhere "
                        "or nowhere")
    routers = {name: model.get_submodule(name) for name in find_routers(model, found)}
    others = [(name, m) for name, m in routers.items() if not is_plain_linear(m)]
    if not config.keep_routers and others:
        # Such a router would stay in full precision while the run says it quantizes routers.
        name, router = others[0]
        raise LlmqError(f"--quantize-routers quantizes routers that are linear layers, and {name} is a "
                        f"{type(router).__name__}: drop --quantize-routers")
    if config.keep_routers:
        keep = list(config.modules_to_not_convert)
        for name in routers:
            local = name[len(prefix) + 1:].partition(".")[2]  # relative to its decoder layer
            if local and local not in keep:
                keep.append(local)
        config = dataclasses.replace(config, modules_to_not_convert=keep)
    unrolled = []
    for name, m in found.items():
        if config.skips(name):
            continue  # kept whole in full precision
        q = unroll(m, experts_layout(m, name, model))
        replace_module(model, name, q)
        unrolled.append(name)
    for name in unrolled:
        _check_whole(model.get_submodule(name), name, config)
    return config


def _check_whole(q: QuantExperts, name: str, config: QuantConfig) -> None:
    # An experts module is quantized or kept as a whole: its forward and its checkpoint
    # names assume one kind of linear for every expert.
    skipped = [f"{name}.{local}" for local, m in q.named_modules()
               if isinstance(m, nn.Linear) and config.skips(f"{name}.{local}")]
    if skipped:
        raise LlmqError(f"modules_to_not_convert keeps {skipped[0]} in full precision, which is one projection "
                        f"of the experts module {name}: llmq quantizes or keeps an experts module whole; name "
                        f"the experts module itself (e.g. --skip {name.rpartition('.')[0].rpartition('.')[2]}."
                        f"{name.rpartition('.')[2]}) to keep all of its experts")


def quant_experts(model: nn.Module) -> dict[str, QuantExperts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantExperts)}


def expert_linear_names(layer: nn.Module) -> set[str]:
    """Names (relative to layer) of the linears inside the QuantExperts of a decoder layer."""
    names = set()
    for qname, q in layer.named_modules():
        if isinstance(q, QuantExperts):
            names |= {f"{qname}.{local}" for local, m in q.named_modules()
                      if isinstance(m, nn.Linear) and "." in local}
    return names


@dataclass
class ExpertTokens:
    """Calibration tokens per expert and the experts quantized by the fallback rule, per layer.

    A calibrated method calls start_layer before a layer's forward; the object
    it returns (None for a layer without experts) decides, inside the forward
    pre-hooks, which expert linears fall back to round-to-nearest (fewer
    routed tokens than min_tokens), and after the forward quantizes the expert
    linears the forward never reached (no tokens at all) the same way.
    """

    min_tokens: int
    mode: str = "routed"
    counts: dict[str, list[int]] = field(default_factory=dict)  # experts module (in its layer) -> tokens
    fallback: dict[int, list[str]] = field(default_factory=dict)  # layer index -> expert linears
    fallback_rule: str = "were quantized by round-to-nearest"  # what the method does with them instead

    def start_layer(self, index: int, layer: nn.Module, hidden: torch.Tensor) -> "LayerExperts | None":
        """hidden: the layer's input, this process's windows [windows, tokens, H]."""
        blocks = {name: q for name, q in layer.named_modules() if isinstance(q, QuantExperts)}
        if not blocks:
            return None
        for q in blocks.values():
            q.token_counts.zero_()
            q.record_tokens = True
            q.calibrate_all = self.mode == "all"
            q.visit_every_expert = distributed.active()  # every rank's hooks in one order
        # With several processes: where this process's tokens lie in the whole calibration batch.
        places = distributed.global_rows(*hidden.shape[:2], device=hidden.device)[0] if distributed.active() else None
        return LayerExperts(self, index, blocks, places)

    def falls_back(self, rows: int) -> bool:
        """Whether an expert linear that saw `rows` calibration tokens (on this process; with several,
        on all of them: every rank decides alike) is quantized by RTN."""
        if distributed.active():
            rows = int(distributed.all_reduce_sum(torch.tensor([float(rows)], dtype=torch.float64)).item())
        return rows < self.min_tokens

    def state(self) -> dict:
        """What the report holds so far, as JSON (recorded with a streamed run's finished layers)."""
        return {"counts": self.counts, "fallback": {str(i): names for i, names in self.fallback.items()}}

    def restore(self, state: dict) -> None:
        """Take up the report of the finished layers of an interrupted run (state())."""
        self.counts = {name: list(c) for name, c in state["counts"].items()}
        self.fallback = {int(i): list(names) for i, names in state["fallback"].items()}

    def summary(self) -> list[str]:
        """One line per experts module: tokens per expert; one per layer with fallbacks."""
        lines = []
        for name, counts in self.counts.items():
            s = sorted(counts)
            lines.append(f"{name}: {len(counts)} experts, routed tokens per expert min {s[0]} median "
                         f"{s[len(s) // 2]} max {s[-1]}: {counts}")
        for index, names in sorted(self.fallback.items()):
            lines.append(f"layer {index}: {len(names)} expert linear(s) saw fewer than {self.min_tokens} "
                         f"calibration tokens and {self.fallback_rule}: {', '.join(names)}")
        return lines


class LayerExperts:
    """ExpertTokens' view of one decoder layer (see ExpertTokens)."""

    def __init__(self, tokens: ExpertTokens, index: int, blocks: dict[str, QuantExperts],
                 places: torch.Tensor | None = None):
        self.tokens = tokens
        self.index = index
        self.blocks = blocks
        self.places = places  # several processes: each of this process's tokens' index in the whole batch
        self.names = {f"{qname}.{local}" for qname, q in blocks.items() for local, m in q.named_modules()
                      if isinstance(m, nn.Linear) and "." in local}

    def positions(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """Where each row of x, the input of this layer's linear `name`, lies in the whole calibration
        batch (llmq.distributed.spread_rows), when several processes share it and x has lost its
        windows: the rows of an MoE block flattened to [tokens, H] (a router's, a shared expert's), or
        an expert's routed tokens. None otherwise (one process, or x still [windows, tokens, H])."""
        if self.places is None or x.dim() == 3:
            return None
        places = self.places
        expert = self.expert_of(name)
        routed = None if expert is None else self.blocks[expert[0]].routed_rows
        rows = x.numel() // x.shape[-1]
        if routed is None and rows != places.numel():
            raise LlmqError(f"{name} reads {rows} rows, not the layer's {places.numel()} tokens, so its rows "
                            "cannot be shared across processes: run without torchrun")
        return places if routed is None else places[routed.to(places.device)]

    def expert_of(self, name: str) -> tuple[str, int] | None:
        """(experts block, expert index) of the layer's linear `name`, or None when it is no expert's."""
        if name not in self.names:
            return None
        block, _, e = name.rpartition(".")[0].rpartition(".")  # "<block>.<e>.<projection>"
        return block, int(e)

    def fall_back(self, group, x: torch.Tensor, layer: nn.Module, solved: dict, config: QuantConfig,
                  scale_dtype: torch.dtype) -> bool:
        """In a pre-hook: quantize the group by RTN when it is an expert's with too few tokens."""
        if not all(local in self.names for local, _ in group):
            return False
        rows = x.numel() // x.shape[-1]
        if self.tokens.mode == "all" or not self.tokens.falls_back(rows):
            return False
        for local, _ in group:
            self._rtn(layer, local, solved, config, scale_dtype)
        return True

    def _rtn(self, layer, local, solved, config, scale_dtype):
        linear = layer.get_submodule(local)
        qw = to_rtn(linear, config, scale_dtype)
        linear.weight.data = qw.dequantize(linear.weight.dtype)
        solved[local] = qw
        self.tokens.fallback.setdefault(self.index, []).append(local)

    def finish_layer(self, index: int, layer: nn.Module, targets, solved: dict, config: QuantConfig,
                     scale_dtype: torch.dtype) -> None:
        """After the forward: RTN for expert linears no token reached; record the token counts."""
        for local, _ in targets:
            if local not in solved and local in self.names:
                self._rtn(layer, local, solved, config, scale_dtype)
        self.finish_counts()

    def finish_counts(self) -> None:
        """Record the layer's token counts per experts module and end the blocks' calibration modes."""
        for qname, q in self.blocks.items():
            counts = distributed.all_reduce_sum(q.token_counts.clone())  # several processes: every rank's tokens
            self.tokens.counts[f"layer {self.index} {qname}"] = counts.tolist()
            q.record_tokens = False
            q.calibrate_all = False
            q.visit_every_expert = False


def expert_tokens(job, **kwargs) -> ExpertTokens | None:
    """Per-expert calibration bookkeeping for a job whose model has QuantExperts, else None
    (kwargs: further ExpertTokens fields, such as a method's fallback_rule)."""
    if not any(isinstance(m, QuantExperts) for m in job.layers.modules()):
        return None
    return ExpertTokens(job.config.moe_min_tokens, job.config.moe_calibration, **kwargs)


def to_rtn(linear: nn.Linear, config: QuantConfig, scale_dtype: torch.dtype):
    """The round-to-nearest QuantizedWeight of a linear (the fallback for experts without enough tokens)."""
    from .solvers.rtn import rtn_quantize

    w = linear.weight.detach()
    return rtn_quantize(w, config.bits, config.group_size_for(w.shape[1]), config.sym, scale_dtype)
