"""The `gptq` checkpoint format (AutoGPTQ / GPTQModel), written and read.

The tensors are llmq's native layout under the same names (qweight [K*b/32, N]
packed along K, qzeros [G, N*b/32] packed along N, scales [G, N], g_idx [K]);
the differences are in the zero points and the config:

- checkpoint_format "gptq" (v1) stores every zero point as z - 1, the historic
  off-by-one that v1 kernels undo by adding 1. llmq writes v1 only for
  symmetric models, where z = 2^(b-1) and the stored value is exact
  (0x77777777 for 4 bits).
- checkpoint_format "gptq_v2" stores the true z. An asymmetric model can have
  z = 0, which v1 would store as -1 and wrap: it is always written as v2.

Reading accepts both. An asymmetric v1 export stores z = 0 as a wrapped -1, and
how it wraps depends on the writer: GPTQModel subtracts 1 from every zero point
of a word at once (0x11111111 for 4 bits), so a wrapped one borrows from the
zero point above it in the word; AutoGPTQ's packer fills the rest of the word
with ones. v1 is read as GPTQModel and transformers read it, adding 1 to each
zero point of a word at once, carries included: exact for GPTQModel's files,
and AutoGPTQ's lost zero points read as 0.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass

import torch

from ..config import QuantConfig
from ..errors import LlmqError
from ..methods import registry
from ..kernels.layout import codes_per_word, group_index, unpack_cols
from ..qweight import quantized_module_names
from .engines import EngineSupport, marlin_problem, moe_engine_support
from .spec import Checkpoint, Format, Relayout
from .._version import __version__

QUANT_METHOD = "gptq"


def shift_zeros(qzeros: torch.Tensor, bits: int, delta: int) -> torch.Tensor:
    """Add delta (+1 or -1) to every zero point of int32 [G, N*b/32] as v1's writers and readers do:
    one addition per 32-bit word, so that a zero point that wraps carries into (or borrows from) the
    one above it in its word. Reading v1 (+1) so undoes GPTQModel's writing (-1) exactly, wrapped
    zero points included; llmq writes v1 for symmetric models only, where nothing wraps."""
    ones = sum(1 << (bits * i) for i in range(32 // bits))  # 0x11111111 for 4 bits
    words = (qzeros.to(torch.int64) + delta * ones) & 0xFFFFFFFF
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def stored_format(cfg: dict) -> str:
    """The checkpoint_format of a gptq quantization_config: "gptq" (v1, zeros stored minus one) or another."""
    return str(cfg.get("checkpoint_format") or cfg.get("format") or "gptq").lower()


def checkpoint_format(qc: QuantConfig) -> str:
    return "gptq" if qc.sym else "gptq_v2"


def export_tensors(tensors: dict[str, torch.Tensor], qc: QuantConfig) -> dict[str, torch.Tensor]:
    """Native tensors -> gptq tensors (same names; a new dict, inputs untouched).

    Every quantized layer gets a g_idx: without act-order it is k // group_size,
    which is what AutoGPTQ writes and what loaders that always read g_idx expect.
    """
    out = dict(tensors)
    for name in quantized_module_names(tensors):
        if checkpoint_format(qc) == "gptq":
            out[f"{name}.qzeros"] = shift_zeros(tensors[f"{name}.qzeros"], qc.bits, -1)
        if f"{name}.g_idx" not in tensors:
            k = tensors[f"{name}.qweight"].shape[0] * codes_per_word(qc.bits)
            out[f"{name}.g_idx"] = (torch.arange(k) // qc.group_size_for(k)).to(torch.int32)
    return out


def export_config(qc: QuantConfig, layout: "ExportLayout | None" = None) -> dict:
    """config.json["quantization_config"] (also written as quantize_config.json), for a model whose
    quantized linears `layout` describes (None: every decoder-layer linear and nothing else)."""
    layout = layout or ExportLayout()
    cfg = {
        "quant_method": QUANT_METHOD,
        "checkpoint_format": checkpoint_format(qc),
        "bits": qc.bits,
        "group_size": qc.group_size,
        "desc_act": qc.desc_act,
        "sym": qc.sym,
        "static_groups": qc.static_groups,
        "true_sequential": True,
        "damp_percent": qc.damp,
        "lm_head": layout.lm_head,
        "meta": {"quantizer": [f"llmq:{__version__}"], "llmq_method": qc.method, "calibration": qc.calibration,
                 "llmq_modules_to_not_convert": qc.modules_to_not_convert},
    }
    if layout.skipped:
        # Each loader reads its own list: GPTQModel and vLLM negative "dynamic" rules, optimum (transformers)
        # only the linears in modules_in_block_to_quantize, giving any other one a GPTQ layer to fill.
        cfg["dynamic"] = {f"-:^{re.escape(n)}$": {} for n in layout.skipped}
        cfg["modules_in_block_to_quantize"] = [list(layout.in_block)]
    return cfg


def import_checkpoint(tensors: dict[str, torch.Tensor], cfg: dict) -> tuple[dict[str, torch.Tensor], QuantConfig]:
    """gptq tensors + quantization_config -> (native tensors, QuantConfig), codes bit-exact."""
    fmt = stored_format(cfg)
    if fmt not in ("gptq", "gptq_v2"):
        raise LlmqError(f"GPTQ checkpoint_format {fmt!r} is not readable by llmq (it reads 'gptq' and 'gptq_v2'): "
                        "convert it to one of those with GPTQModel first")
    bits = int(cfg.get("bits", 4))
    if bits not in (4, 8):
        raise LlmqError(f"this GPTQ checkpoint has {bits}-bit weights; llmq runs 4- and 8-bit weights only")
    if cfg.get("dynamic") and any(not k.startswith("-:") for k in cfg["dynamic"]):
        raise LlmqError("this GPTQ checkpoint overrides bits or group size per module ('dynamic'), "
                        "which llmq does not support: it needs one setting for every layer")
    group_size = int(cfg.get("group_size", 128))
    names = quantized_module_names(tensors)
    if not names:
        raise LlmqError("config.json says GPTQ but the checkpoint holds no '.qweight' tensors: it is damaged")
    out = dict(tensors)
    trivial = True
    centred = True  # every zero point 2^(b-1): what symmetric quantization writes
    wrapped = 0
    for name in names:
        k = tensors[f"{name}.qweight"].shape[0] * codes_per_word(bits)
        if fmt == "gptq":
            stored = unpack_cols(tensors[f"{name}.qzeros"], bits)
            wrapped += int((stored == (1 << bits) - 1).sum())
            out[f"{name}.qzeros"] = shift_zeros(tensors[f"{name}.qzeros"], bits, 1)
        centred = centred and bool((unpack_cols(out[f"{name}.qzeros"], bits) == 1 << (bits - 1)).all())
        g = tensors.get(f"{name}.g_idx")
        if g is not None and not torch.equal(g.long(), group_index(k, group_size)):
            trivial = False
    if wrapped:
        warnings.warn(f"{wrapped} zero points of this asymmetric v1 GPTQ checkpoint are stored as {(1 << bits) - 1} "
                      "(a wrapped -1): llmq reads them as GPTQModel and transformers do, as 0 with the carry into the "
                      "next zero point of their word (exact for GPTQModel's files; AutoGPTQ's packer lost the zero "
                      "points above a wrapped one, which read as 0); v1 kernels (vLLM's gptq) compute with "
                      f"{1 << bits} there: convert it to gptq_v2", stacklevel=2)
    sym = _symmetric(cfg.get("sym"), centred)
    meta = cfg.get("meta") or {}
    method = meta.get("llmq_method") if meta.get("llmq_method") in registry.names() else "gptq"
    if not trivial and not registry.runs_gptq(method):
        method = "gptq"  # a permuted g_idx is GPTQ's act-order, whatever the metadata names
    # An rtn/awq export once recorded a requested act-order with the trivial g_idx: nothing was reordered.
    desc_act = bool(cfg.get("desc_act")) and registry.runs_gptq(method) and group_size != -1 or not trivial
    for name in names:
        if desc_act and f"{name}.g_idx" not in out:
            raise LlmqError(f"GPTQ checkpoint uses act-order but {name}.g_idx is missing: it is damaged")
        if not desc_act:
            out.pop(f"{name}.g_idx", None)
        else:
            out[f"{name}.g_idx"] = out[f"{name}.g_idx"].to(torch.int32)
    qc = QuantConfig(method=method, bits=bits, group_size=group_size, sym=sym,
                     desc_act=desc_act, static_groups=bool(cfg.get("static_groups", False)) and desc_act,
                     damp=float(cfg.get("damp_percent") or 0.01),
                     # what llmq's export recorded (routers, --skip), else the head that GPTQ leaves whole
                     modules_to_not_convert=meta.get("llmq_modules_to_not_convert")
                     or (["lm_head"] if not cfg.get("lm_head") else []),
                     calibration=meta.get("calibration") or {"source_format": fmt})
    return out, qc


def _symmetric(stated, centred: bool) -> bool:
    """Whether a gptq checkpoint is symmetric: as its config says, checked against its zero points (a
    symmetric one has 2^(b-1) everywhere), or read from them where the config does not say. Symmetric
    exports are v1 with implied zero points, so a wrong "sym" would decode wrong in other engines."""
    if stated is None:
        return centred
    if stated and not centred:
        warnings.warn("this GPTQ checkpoint's config says sym=true but its zero points are not all 2^(bits-1): "
                      "llmq reads it as asymmetric, with its zero points", stacklevel=3)
        return False
    return bool(stated)


def engine_support(qc: QuantConfig, shapes: dict[str, tuple[int, int]],
                   layout: "ExportLayout | None" = None) -> list[EngineSupport]:
    """What each engine does with this model written as gptq (shapes: name -> (N, K))."""
    layout = layout or ExportLayout()
    rows = []
    split = None
    if layout.split_fused:
        split = (f"{layout.split_fused[0]} stays in full precision while its siblings are quantized, and this "
                 "engine loads q/k/v and gate/up as one linear, quantized whole or not at all")
    marlin = split or marlin_problem(qc, shapes, zero_points_ok=False)
    if marlin is None:
        rows.append(EngineSupport("vLLM (gptq_marlin, fast path)", True,
                                  "symmetric, 4/8-bit, Marlin group size and shapes (at tensor parallel 1)"))
    else:
        rows.append(EngineSupport("vLLM (gptq_marlin, fast path)", False, marlin))
    if split:
        rows.append(EngineSupport("vLLM (gptq kernel, --quantization gptq)", False, split))
    elif qc.sym:
        rows.append(EngineSupport("vLLM (gptq kernel, --quantization gptq)", True, "v1 zero points"))
    else:
        rows.append(EngineSupport("vLLM (gptq kernel, --quantization gptq)", True,
                                  "asymmetric as gptq_v2: needs a vLLM with gptq_v2 support (PR 26092, "
                                  "late 2025); older versions decode garbage"))
    rows.append(EngineSupport("SGLang", marlin is None,
                              "same Marlin rules as vLLM" if marlin is None else f"Marlin path refuses: {marlin}"))
    if layout.lm_head:
        rows.append(EngineSupport("transformers (optimum + gptqmodel)", False,
                                  "optimum quantizes decoder-layer linears only: the quantized lm_head would "
                                  "load unset"))
    else:
        rows.append(EngineSupport("transformers (optimum + gptqmodel)", True,
                                  "GPTQModel reads gptq and gptq_v2" + (
                                      "; the linears kept in full precision are left out of "
                                      "modules_in_block_to_quantize" if layout.skipped else "")))
    if split:
        rows.append(EngineSupport("TGI", False, split))
    else:
        rows.append(EngineSupport("TGI", qc.sym,
                                  "v1 symmetric GPTQ" if qc.sym else "no gptq_v2 (asymmetric) support known"))
    return rows


def refuse_w8a8(ckpt: Checkpoint, fmt: str) -> None:
    """A W8A8 checkpoint written as a weight-only format: refused by name."""
    if ckpt.quant_config.scheme == "w8a8":
        raise LlmqError(f"a W8A8 checkpoint has activation scales, which format {fmt!r} cannot hold: "
                        "write --format compressed-tensors or keep the llmq format")


# Sibling projections that vLLM loads as one fused linear (its packed_modules_mapping): quantized whole or
# not at all, else it stops with "Detected some but not all shards ... are quantized".
_VLLM_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class ExportLayout:
    """Which linears a gptq export quantizes, as GPTQ loaders need to be told."""

    skipped: tuple[str, ...] = ()  # decoder-layer linears left in full precision
    in_block: tuple[str, ...] = ()  # the quantized decoder-layer linears, as modules_in_block_to_quantize lists them
    lm_head: bool = False  # the output head quantized too (GPTQModel's "lm_head": true)
    split_fused: tuple[str, ...] = ()  # skipped linears whose vLLM fused siblings are quantized


def _in_block(layers: str, quantized: list[str], linears: list[str]) -> tuple[str, ...]:
    """modules_in_block_to_quantize's names (optimum matches their ends, vLLM finds them inside its
    names): the names within a layer ("self_attn.q_proj") where each is quantized in every layer that
    has it, else the full names."""
    def within(name):  # "model.layers.3.self_attn.q_proj" -> "self_attn.q_proj"
        return name[len(layers) + 1:].partition(".")[2]

    quantized = set(quantized)
    quantized_within = {within(n) for n in quantized}
    if all((within(name) in quantized_within) == (name in quantized) for name in linears):
        return tuple(sorted(quantized_within))
    return tuple(sorted(quantized))


def export_layout(ckpt: Checkpoint) -> ExportLayout:
    """What ckpt quantizes, for its gptq config and engine report; refuses a model that quantizes a linear
    that GPTQ checkpoints cannot hold (one outside the decoder layers other than the output head)."""
    refuse_w8a8(ckpt, QUANT_METHOD)
    linears = ckpt.model_linears
    quantized = linears.in_model(ckpt.layer_shapes())  # the model's names, as optimum matches them
    if any(n in quantized and n != linears.head for n in linears.outside):
        raise LlmqError("GPTQ checkpoints quantize decoder-layer linears (and the output head) only, and this "
                        "model quantizes another linear outside them: export with --format compressed-tensors")
    skipped = tuple(n for n in linears.inside if n not in quantized)
    if not skipped:
        return ExportLayout(lm_head=linears.head in quantized)
    in_layers = sorted(n for n in quantized if n.startswith(linears.layers + "."))
    split = tuple(n for n in skipped for group in _VLLM_FUSED
                  if n.rpartition(".")[2] in group
                  and any(f"{n.rpartition('.')[0]}.{sibling}" in quantized for sibling in group))
    return ExportLayout(skipped, _in_block(linears.layers, in_layers, sorted(set(in_layers) | set(skipped))),
                        linears.head in quantized, split)


def _encode(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    export_layout(ckpt)
    return export_tensors(ckpt.tensors, ckpt.quant_config)


def _engines(ckpt: Checkpoint) -> list[EngineSupport]:
    shapes = ckpt.layer_shapes()
    return engine_support(ckpt.quant_config, shapes, export_layout(ckpt)) + moe_engine_support(
        QUANT_METHOD, ckpt.quant_config, shapes)


def _g_idx_int32(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"g_idx": tensor.to(torch.int32)}  # act-order g_idx, whatever integer type it was stored in


def _v1_zeros(tensor: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    return {"qzeros": shift_zeros(tensor, bits, 1)}  # stored z - 1 -> true zero points


def in_flight(qcfg: dict, qc: QuantConfig) -> tuple[list[Relayout], list[str]]:
    relayouts = [Relayout("g_idx", "g_idx", _g_idx_int32)] if qc.desc_act else []
    if stored_format(qcfg) == "gptq":
        relayouts.append(Relayout("qzeros", "qzeros", functools.partial(_v1_zeros, bits=qc.bits)))
    return relayouts, [] if qc.desc_act else [r"\.g_idx$"]  # a trivial g_idx is k // group_size: implied


FORMAT = Format(
    QUANT_METHOD,
    detect=lambda qcfg: str(qcfg.get("quant_method", "")).lower() == QUANT_METHOD,
    read=import_checkpoint,
    small_tensors=(".qzeros", ".scales", ".g_idx"),
    encode=_encode,
    config=lambda ckpt: export_config(ckpt.quant_config, export_layout(ckpt)),
    engines=_engines,
    in_flight=in_flight,
    extra_json="quantize_config.json",
)
