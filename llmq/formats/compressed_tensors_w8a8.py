"""W8A8 checkpoints as compressed-tensors `int-quantized` (what vLLM's int8 W8A8 path reads).

Per quantized linear (N = out_features, K = in_features), the tensors are the
native W8A8 ones, already named as compressed-tensors names them:

    weight        int8    [N, K]   symmetric codes (compressed-tensors' signed codes)
    weight_scale  float32 [N, 1]   strategy "channel"
    input_scale   float32 [1]      static activations only (strategy "tensor")

and the config has one group whose `input_activations` are
{num_bits 8, type int, symmetric, strategy token + dynamic (per-token scales at
run time) or tensor + static}. compressed-tensors' own compressor writes the
same tensors and keys for the same codes and scales (tests/test_w8a8_ct.py);
its decompressor and stock transformers (with compressed-tensors installed)
load the folder. Scales stay float32, the dtype vLLM keeps them in, also for
16-bit models.
"""

from __future__ import annotations

import torch

from .._version import __version__
from ..config import QuantConfig
from ..qweight import w8a8_module_names
from . import compressed_tensors
from .compressed_tensors import QUANT_METHOD, config_envelope, not_converted, refuse_runtime_needs
from .engines import EngineSupport, expert_name_vllm_skips, fused_layer_tensors, moe_engine_support
from .spec import Checkpoint, Format

INT_QUANTIZED = "int-quantized"


def export_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native W8A8 tensors -> compressed-tensors tensors (the same names; a new dict)."""
    out = dict(tensors)
    for name in w8a8_module_names(tensors):
        out[f"{name}.weight_scale"] = tensors[f"{name}.weight_scale"].float().reshape(-1, 1).contiguous()
        if f"{name}.input_scale" in tensors:
            out[f"{name}.input_scale"] = tensors[f"{name}.input_scale"].float().reshape(1).contiguous()
    return out


def export_config(qc: QuantConfig, ignore: list[str]) -> dict:
    """config.json["quantization_config"], with the keys ModelCompressor.update_config writes."""
    static = qc.act == "static"
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "channel",
               "dynamic": False, "observer": "minmax"}
    inputs = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
              "strategy": "tensor" if static else "token", "dynamic": not static,
              "observer": "minmax" if static else None}
    meta = {"method": qc.method, "desc_act": qc.desc_act, "scheme": qc.scheme, "act": qc.act, "smooth": qc.smooth,
            "act_observer": qc.act_observer, "modules_to_not_convert": qc.modules_to_not_convert,
            "calibration": qc.calibration, "llmq_version": __version__}
    return config_envelope(INT_QUANTIZED, weights, inputs, ignore, meta)


def engine_support(qc: QuantConfig, names=(), experts_loaded: str | None = "merges",
                   fused: str | None = None) -> list[EngineSupport]:
    """names: the checkpoint's W8A8 layer names (experts: `<block>.experts.<e>.<proj>`); experts_loaded:
    how transformers loads per-expert tensors (engines.how_transformers_gathers_experts); fused: a layer
    tensor transformers builds from several stored ones (engines.fused_layer_tensors)."""
    experts = any(".experts." in name for name in names)
    what = "per-token dynamic" if qc.act == "dynamic" else "static per-tensor"
    rows = [EngineSupport("vLLM (compressed-tensors W8A8 int8)", True,
                          f"int8 weights per channel, {what} int8 activations: the layout of its "
                          "CompressedTensorsW8A8Int8 scheme (vLLM itself is not run here)")]
    if experts:
        engine = "vLLM MoE experts (FusedMoE)"
        if expert_name_vllm_skips(names) is not None:
            rows += moe_engine_support(QUANT_METHOD, qc, dict.fromkeys(names))  # its names, not its scheme, refuse
        elif qc.act == "dynamic":
            rows.append(EngineSupport(engine, True, "int8 experts per channel, dynamic per-token activations: what "
                                                    "its CompressedTensorsW8A8Int8MoEMethod takes"))
        else:
            rows.append(EngineSupport(engine, False, "its CompressedTensorsW8A8Int8MoEMethod refuses static input "
                                                     "scales: quantize with --act dynamic"))
        if experts_loaded == "per-expert":
            rows.append(EngineSupport("transformers + compressed-tensors", True,
                                      "its quantizer puts one module per expert in place of the fused experts and "
                                      "loads their int8 weights as a dense model's"))
        else:
            why = ("transformers stacks per-expert weights into its fused experts parameters and stops on int8 ones"
                   if experts_loaded == "merges" else
                   "this architecture stores its experts fused on disk: transformers has no mapping from per-expert "
                   "tensors and loads its experts unset, without an error")
            rows.append(EngineSupport("transformers + compressed-tensors", False, f"{why}: load the folder with llmq"))
    else:
        rows.append(EngineSupport("transformers + compressed-tensors", True, "decompresses the weights on load"))
    if fused is not None:
        rows[-1] = compressed_tensors.transformers_stops(fused)
    return rows


def is_w8a8(cfg: dict) -> bool:
    """Whether a compressed-tensors quantization_config quantizes activations (read by import_checkpoint)."""
    return any((g or {}).get("input_activations") for g in (cfg.get("config_groups") or {}).values())


def import_checkpoint(tensors: dict[str, torch.Tensor], cfg: dict) -> tuple[dict[str, torch.Tensor], QuantConfig]:
    """compressed-tensors int-quantized W8A8 -> (native tensors, QuantConfig); the tensors are used as stored."""
    from ..errors import LlmqError

    if cfg.get("quantization_status", "compressed") != "compressed":
        raise LlmqError("this compressed-tensors checkpoint is not in compressed form: llmq reads int8 weights")
    refuse_runtime_needs(cfg)
    groups = list((cfg.get("config_groups") or {}).values())
    acts = set()
    for g in groups:
        fmt = g.get("format") or cfg.get("format")
        w, a = g.get("weights") or {}, g.get("input_activations") or {}
        ok_w = (fmt == INT_QUANTIZED and w.get("type", "int") == "int" and w.get("num_bits") == 8
                and w.get("symmetric", True) and w.get("strategy") == "channel")
        ok_a = (a.get("type", "int") == "int" and a.get("num_bits") == 8 and a.get("symmetric", True)
                and (a.get("strategy"), bool(a.get("dynamic"))) in (("token", True), ("tensor", False)))
        if not (ok_w and ok_a) or g.get("output_activations"):
            raise LlmqError("llmq reads compressed-tensors activation quantization only as W8A8 int8: format "
                            "int-quantized, 8-bit symmetric per-channel weights and 8-bit symmetric per-token "
                            "dynamic or per-tensor static input activations")
        acts.add("dynamic" if a.get("dynamic") else "static")
    if len(acts) != 1:
        raise LlmqError("this compressed-tensors checkpoint mixes dynamic and static activations across layers; "
                        "llmq needs one activation mode for every layer")
    out = dict(tensors)
    names = w8a8_module_names(tensors)
    if not names:
        raise LlmqError("config.json says compressed-tensors W8A8 but no int8 '.weight' with a '.weight_scale' is "
                        "stored")
    act = acts.pop()
    for name in names:
        n = tensors[f"{name}.weight"].shape[0]
        out[f"{name}.weight_scale"] = tensors[f"{name}.weight_scale"].float().reshape(n, 1)
        if act == "static":
            out[f"{name}.input_scale"] = tensors[f"{name}.input_scale"].float().reshape(1)
        out.pop(f"{name}.weight_zero_point", None)  # symmetric: zero
        if act == "dynamic":
            out.pop(f"{name}.input_zero_point", None)
            out.pop(f"{name}.input_scale", None)
        else:
            out.pop(f"{name}.input_zero_point", None)
    meta = cfg.get("llmq") or {}  # what llmq records of its own exports; another tool's has none
    # from_dict: a stored config, whose absent smoothing setting reads as off. Per-row int8 weights have no
    # g_idx: act-order only says how a GPTQ solve ran, so it is what llmq's export recorded, else off (the
    # method's default would claim it for any gptq folder).
    qc = QuantConfig.from_dict(dict(
        method=meta.get("method") if meta.get("method") in ("rtn", "gptq") else "rtn",
        desc_act=bool(meta.get("desc_act")), scheme="w8a8", act=act,
        smooth=meta.get("smooth"), act_observer=meta.get("act_observer") if act == "static" else None,
        modules_to_not_convert=not_converted(cfg),
        calibration=meta.get("calibration") or {"source_format": QUANT_METHOD}))
    return out, qc


def _config(ckpt: Checkpoint) -> dict:
    quantized = set(w8a8_module_names(ckpt.tensors))
    return export_config(ckpt.quant_config, ckpt.model_linears.kept(quantized))


# The W8A8 layout under compressed-tensors' quant_method (llmq.formats.table pairs it with the weight-only one).
FORMAT = Format(
    QUANT_METHOD,
    detect=lambda qcfg: str(qcfg.get("quant_method", "")).lower() == QUANT_METHOD and is_w8a8(qcfg),
    read=import_checkpoint,
    small_tensors=(".weight_scale", ".input_scale"),
    encode=lambda ckpt: export_tensors(ckpt.tensors),
    config=_config,
    engines=lambda ckpt: engine_support(ckpt.quant_config, w8a8_module_names(ckpt.tensors),
                                        compressed_tensors.experts_loaded(ckpt),
                                        fused_layer_tensors(ckpt.config.get("model_type"))),
    in_flight=lambda qcfg, qc: ([], []),  # the stored tensors are the native ones
    writes=lambda qc: qc.scheme == "w8a8",
)
