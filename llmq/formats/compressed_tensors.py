"""The compressed-tensors `pack-quantized` format (vLLM's native one), written and read.

Per quantized linear (N = out_features, K = in_features, G = groups, b = bits):

    weight_packed      int32 [N, K*b/32]  codes packed along K, LSB first
    weight_scale       float [N, G]
    weight_zero_point  int32 [N*b/32, G]  asymmetric only: zero points packed along N
    weight_shape       int64 [2]          (N, K)

compressed-tensors quantizes to signed integers q_s in [-2^(b-1), 2^(b-1)) and
stores q_s + 2^(b-1); zero points likewise. That stored value is llmq's unsigned
code q (and zero z) exactly, and a symmetric scheme's implied zero point 0 is
llmq's z = 2^(b-1). So the words are llmq's own, transposed:

    weight_packed = qweight.T    weight_zero_point = qzeros.T    weight_scale = scales.T

The format has no g_idx (compressed-tensors dropped group act-order), so a model
with a non-trivial act-order permutation is refused on export.

Exports are what compressed-tensors' own compressor (ModelCompressor with the
pack-quantized format, package 0.20) writes for the same codes, scales and zero
points, tensor for tensor and key for key (tests/test_ct_compressor.py compares
them): scales in the model's dtype, so a float32 model's fp16 scales are widened
(exactly) to float32 and narrowed back on import; the config without the
package's `version` (llmq is not that package) and with an extra `llmq` entry.
"""

from __future__ import annotations

import functools

import torch

from ..config import QuantConfig
from ..errors import LlmqError
from ..methods import registry
from ..qweight import quantized_module_names
from ..census import router_names
from .engines import (EngineSupport, fused_layer_tensors, how_transformers_gathers_experts, marlin_problem,
                      moe_engine_support, transformers_code_stops)
from ..kernels.layout import codes_per_word, group_width, pack_rows
from .spec import Checkpoint, Format, Relayout
from .._version import __version__

QUANT_METHOD = "compressed-tensors"
PACKED = "pack-quantized"
_MODEL_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NATIVE_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


def _check_g_idx(name: str, g_idx: torch.Tensor, group_size: int) -> None:
    k = g_idx.numel()
    if not torch.equal(g_idx.long(), torch.arange(k) // group_size):
        raise LlmqError(f"layer {name} uses act-order (a permuted g_idx), which compressed-tensors cannot store: "
                        "export with --format gptq, or quantize again without --act-order (or with "
                        "--static-groups)")


def scale_dtype_for(model_dtype: torch.dtype | None, stored: torch.dtype) -> torch.dtype:
    """The dtype compressed-tensors stores scales in: the model's, when widening llmq's scales to it is exact.

    llmq keeps fp16 scales for float32 models; the compressor keeps float32 ones.
    """
    return torch.float32 if model_dtype == torch.float32 else stored


def export_tensors(tensors: dict[str, torch.Tensor], qc: QuantConfig,
                   model_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Native tensors -> compressed-tensors tensors (a new dict).

    model_dtype: the dtype of the model the codes came from (config.json's
    "dtype"); scales are written in it where that is exact (scale_dtype_for).
    Raises LlmqError when a layer's g_idx is not the plain k // group_size.
    """
    out = dict(tensors)
    for name in quantized_module_names(tensors):
        qweight = out.pop(f"{name}.qweight")
        qzeros = out.pop(f"{name}.qzeros")
        scales = out.pop(f"{name}.scales")
        k = qweight.shape[0] * codes_per_word(qc.bits)
        g_idx = out.pop(f"{name}.g_idx", None)
        if g_idx is not None:
            _check_g_idx(name, g_idx, qc.group_size_for(k))
        out[f"{name}.weight_packed"] = qweight.t().contiguous()
        out[f"{name}.weight_scale"] = scales.t().to(scale_dtype_for(model_dtype, scales.dtype)).contiguous()
        out[f"{name}.weight_shape"] = torch.tensor([scales.shape[1], k], dtype=torch.int64)
        if not qc.sym:
            out[f"{name}.weight_zero_point"] = qzeros.t().contiguous()
    return out


def export_config(qc: QuantConfig, ignore: list[str], native_scale_dtype: torch.dtype | None = None) -> dict:
    """config.json["quantization_config"], with the keys ModelCompressor.update_config writes.

    ignore: every nn.Linear left in full precision. native_scale_dtype: the
    dtype llmq's own scales had when export_tensors widened them, recorded so
    that an import restores them bit for bit.
    """
    weights = {
        "num_bits": qc.bits,
        "type": "int",
        "symmetric": qc.sym,
        "group_size": None if qc.group_size == -1 else qc.group_size,
        "strategy": "channel" if qc.group_size == -1 else "group",
        "dynamic": False,
        "observer": "minmax",
    }
    meta = {"method": qc.method, "modules_to_not_convert": qc.modules_to_not_convert, "calibration": qc.calibration,
            "llmq_version": __version__}
    if native_scale_dtype is not None:
        meta["scale_dtype"] = str(native_scale_dtype).removeprefix("torch.")
    return config_envelope(PACKED, weights, None, ignore, meta)


def config_envelope(fmt: str, weights: dict, input_activations: dict | None, ignore: list[str],
                    meta: dict) -> dict:
    """The quantization_config compressed-tensors' compressor writes around one config group of
    Linear targets (every key it writes, so that its readers find what they expect)."""
    return {
        "quant_method": QUANT_METHOD,
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": input_activations, "output_activations": None,
                                      "format": fmt}},
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "moe_sparsity_config": None,
        "sparsity_config": {},
        "transform_config": {},
        "llmq": meta,
    }


# Transform locations applied to the weights when they were written; any other is applied at run time.
_OFFLINE_TRANSFORMS = ("weight_input", "weight_output")


def refuse_runtime_needs(cfg: dict) -> None:
    """Refuse a folder whose outputs need what llmq does not run (read as plain quantized linears, its
    outputs would be wrong): transforms applied at run time, a quantized kv cache, sparse storage,
    quantized modules other than linear layers."""
    online = sorted({a.get("location") for group in ((cfg.get("transform_config") or {}).get("config_groups")
                                                    or {}).values()
                     for a in group.get("apply") or [] if a.get("location") not in _OFFLINE_TRANSFORMS})
    if online:
        raise LlmqError(f"this compressed-tensors checkpoint applies transforms at run time (transform_config, "
                        f"locations {', '.join(map(str, online))}: rotations such as SpinQuant's), which llmq does "
                        "not run: its outputs would be wrong; serve it with vLLM")
    if cfg.get("kv_cache_scheme"):
        raise LlmqError("this compressed-tensors checkpoint quantizes the kv cache (kv_cache_scheme), which llmq "
                        "does not run; serve it with vLLM, or remove kv_cache_scheme from config.json to run the "
                        "cache in full precision")
    sparse = (cfg.get("sparsity_config") or {}).get("format")
    if sparse not in (None, "dense"):
        raise LlmqError(f"this compressed-tensors checkpoint stores sparse weights ({sparse!r}), which llmq does "
                        "not read")
    for group in (cfg.get("config_groups") or {}).values():
        # A target is a module class (CamelCase), a module's name or a "re:" pattern of names.
        classes = [t for t in group.get("targets") or [] if str(t)[:1].isupper() and "." not in str(t)
                   and t != "Linear"]
        if classes:
            raise LlmqError(f"this compressed-tensors checkpoint quantizes {', '.join(map(str, classes))} modules; "
                            "llmq reads quantized linear layers only")


def _weights_scheme(cfg: dict) -> dict:
    fmt = cfg.get("format")
    groups = cfg.get("config_groups") or {}
    if not groups:
        raise LlmqError("this compressed-tensors checkpoint has no config_groups: it is damaged")
    schemes = []
    for g in groups.values():
        if (g.get("format") or fmt) != PACKED:
            raise LlmqError(f"compressed-tensors format {(g.get('format') or fmt)!r} is not readable by llmq "
                            f"(it reads {PACKED!r}, weight-only integer)")
        if g.get("input_activations") or g.get("output_activations"):
            raise LlmqError("this compressed-tensors checkpoint quantizes activations too; llmq reads "
                            "weight-only checkpoints (W4A16 / W8A16)")
        w = g.get("weights") or {}
        if w.get("type", "int") != "int" or w.get("num_bits") not in (4, 8):
            raise LlmqError(f"compressed-tensors weights of type {w.get('type')!r} with {w.get('num_bits')} bits "
                            "are not readable by llmq (4- or 8-bit int only)")
        if w.get("strategy") not in ("group", "channel"):
            raise LlmqError(f"compressed-tensors strategy {w.get('strategy')!r} is not readable by llmq "
                            "(group or channel only)")
        if str(w.get("actorder") or "").lower() == "group":
            raise LlmqError("compressed-tensors group act-order (weight_g_idx) is not readable by llmq")
        schemes.append((w["num_bits"], bool(w.get("symmetric", True)), w["strategy"], w.get("group_size")))
    if len(set(schemes)) > 1:
        raise LlmqError("this compressed-tensors checkpoint mixes quantization schemes across layers; llmq needs "
                        "one scheme for every layer")
    bits, sym, strategy, group_size = schemes[0]
    return {"bits": bits, "sym": sym, "group_size": -1 if strategy == "channel" else int(group_size)}


def implied_zeros(n: int, groups: int, bits: int) -> torch.Tensor:
    """llmq's qzeros [G, N*b/32] of a symmetric layer: every zero point at 2^(b-1)."""
    mid = torch.full((n, groups), 1 << (bits - 1), dtype=torch.int64)
    return pack_rows(mid, bits).t().contiguous()


def native_scale_dtype(cfg: dict) -> torch.dtype | None:
    """The dtype llmq's own scales had before its export widened them (None: keep the stored dtype)."""
    return _NATIVE_SCALE_DTYPES.get((cfg.get("llmq") or {}).get("scale_dtype"))


def not_converted(cfg: dict) -> list[str]:
    """modules_to_not_convert of a compressed-tensors folder: the patterns llmq's own export recorded
    (what the user skipped, as given), else the config's `ignore` list of linears kept in full precision."""
    recorded = (cfg.get("llmq") or {}).get("modules_to_not_convert")
    return list(recorded if recorded is not None else cfg.get("ignore") or [])


def import_checkpoint(tensors: dict[str, torch.Tensor], cfg: dict) -> tuple[dict[str, torch.Tensor], QuantConfig]:
    """compressed-tensors tensors + quantization_config -> (native tensors, QuantConfig), codes bit-exact."""
    if cfg.get("quantization_status", "compressed") != "compressed":
        raise LlmqError("this compressed-tensors checkpoint is not in compressed form: llmq reads packed weights")
    refuse_runtime_needs(cfg)
    s = _weights_scheme(cfg)
    names = sorted(k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed"))
    if not names:
        raise LlmqError("config.json says compressed-tensors but no '.weight_packed' tensors are stored")
    per = codes_per_word(s["bits"])
    meta = cfg.get("llmq") or {}
    native_scales = native_scale_dtype(cfg)
    out = {k: v for k, v in tensors.items() if not any(k.endswith("." + x) for x in _SUFFIXES)}
    for name in names:
        packed = tensors[f"{name}.weight_packed"]
        n, k = (int(v) for v in tensors[f"{name}.weight_shape"].tolist())
        if tuple(packed.shape) != (n, k // per) or k % per or n % per:
            raise LlmqError(f"{name} has shape {n}x{k}, which llmq's {s['bits']}-bit layout cannot hold "
                            f"(both sizes must be multiples of {per})")
        scale = tensors[f"{name}.weight_scale"]
        groups = scale.shape[1]
        out[f"{name}.qweight"] = packed.t().contiguous()
        out[f"{name}.scales"] = scale.t().to(native_scales or scale.dtype).contiguous()
        if s["sym"]:
            out[f"{name}.qzeros"] = implied_zeros(n, groups, s["bits"])
        else:
            out[f"{name}.qzeros"] = tensors[f"{name}.weight_zero_point"].t().contiguous()
    method = meta.get("method") if meta.get("method") in registry.names() else "rtn"
    # The format holds contiguous groups only (no g_idx), so the layers are never act-order, whatever
    # the method (QuantConfig would default gptq to act-order and expect a g_idx per layer).
    qc = QuantConfig(method=method, bits=s["bits"], group_size=s["group_size"], sym=s["sym"], desc_act=False,
                     modules_to_not_convert=not_converted(cfg),
                     calibration=meta.get("calibration") or {"source_format": QUANT_METHOD})
    return out, qc


def engine_support(qc: QuantConfig, shapes: dict[str, tuple[int, int]], experts_loaded: str | None = "merges",
                   fused: str | None = None, code_stops: str | None = None) -> list[EngineSupport]:
    """What each engine does with this model written as compressed-tensors (shapes: name -> (N, K);
    experts_loaded: how transformers loads per-expert tensors, engines.how_transformers_gathers_experts;
    fused: a layer tensor transformers builds from several stored ones, engines.fused_layer_tensors;
    code_stops: why its modelling code stops transformers, engines.transformers_code_stops)."""
    marlin = marlin_problem(qc, shapes, zero_points_ok=True)
    rows = [EngineSupport("vLLM (compressed-tensors WNA16)", True,
                          "Marlin fast path" if marlin is None else
                          f"loads; not on Marlin ({marlin}): another mixed-precision kernel if the GPU has one")]
    if not qc.sym and qc.bits == 8:
        rows[0] = EngineSupport("vLLM (compressed-tensors WNA16)", True,
                                "asymmetric 8-bit: accepted by the loader, but not every kernel implements it")
    if qc.sym:
        rows.append(EngineSupport("transformers + compressed-tensors", True,
                                  "decompresses on load (checked by llmq's tests, package 0.20)"))
    else:
        # From transformers 5.24, compressed-tensors 0.20 builds the loading skeleton with an unpacked [N, G]
        # zero point while its own compressor (and vLLM) store it packed [N*b/32, G]: the compressor's own
        # output fails the same way.
        rows.append(EngineSupport("transformers + compressed-tensors", False,
                                  "asymmetric: the default load fails from transformers 5.24 with compressed-tensors "
                                  "0.20 (a zero-point size mismatch; the package's own output fails too); load with "
                                  "quantization_config=CompressedTensorsConfig(dequantize=True) (dense weights, "
                                  "checked by llmq's tests)"))
    if any(".experts." in name for name in shapes) and experts_loaded is None:
        rows[-1] = EngineSupport("transformers + compressed-tensors", False,
                                 "this architecture stores its experts fused on disk: transformers has no mapping from "
                                 "per-expert tensors and loads its experts unset, without an error: load the folder "
                                 "with llmq")
    if fused is not None:
        rows[-1] = transformers_stops(fused)
    elif code_stops is not None:
        rows[-1] = EngineSupport("transformers + compressed-tensors", False, f"{code_stops} (transformers 5.24, "
                                 "compressed-tensors 0.20): load the folder with llmq")
    rows.append(EngineSupport("SGLang (compressed-tensors WNA16)", marlin is None and (qc.sym or qc.bits == 4),
                              "Marlin rules as vLLM" if marlin is None else f"Marlin refuses: {marlin}"))
    return rows


def _ignored_linears(ckpt: Checkpoint) -> list[str]:
    """Every linear of the model left in full precision, MoE routers included."""
    quantized = set(ckpt.layer_shapes())
    ignore = ckpt.model_linears.kept(quantized)
    # MoE routers are kept in full precision (vLLM builds them as linears too).
    ignore += [n for n in router_names({k: list(t.shape) for k, t in ckpt.tensors.items()}) if n not in ignore]
    return ignore


def _model_dtype(ckpt: Checkpoint) -> torch.dtype | None:
    return _MODEL_DTYPES.get(ckpt.config.get("dtype") or ckpt.config.get("torch_dtype"))


def _config(ckpt: Checkpoint) -> dict:
    # The compressor writes scales in the model dtype; where that widened llmq's, the config records
    # llmq's dtype so that an import narrows them back bit for bit.
    stored = next(v.dtype for k, v in ckpt.tensors.items() if k.endswith(".scales"))
    widened = stored if scale_dtype_for(_model_dtype(ckpt), stored) != stored else None
    return export_config(ckpt.quant_config, _ignored_linears(ckpt), widened)


def _engines(ckpt: Checkpoint) -> list[EngineSupport]:
    shapes = ckpt.layer_shapes()
    stops = transformers_code_stops(ckpt.config, shapes, ckpt.model_linears.experts)
    return (engine_support(ckpt.quant_config, shapes, experts_loaded(ckpt), fused_layer_tensors(ckpt.config.get(
        "model_type")), stops) + moe_engine_support(QUANT_METHOD, ckpt.quant_config, shapes))


def transformers_stops(fused: str) -> EngineSupport:
    """The transformers row where its compressed-tensors loading stops on a fused layer tensor."""
    return EngineSupport("transformers + compressed-tensors", False,
                         f"its loader builds {fused} from several stored tensors and, loading compressed-tensors, "
                         "finds none of them and stops (transformers 5.24 with compressed-tensors 0.20; 5.17 "
                         "loads it): load the folder with llmq, or load it with transformers 5.17")


def experts_loaded(ckpt: Checkpoint) -> str | None:
    """How stock transformers loads this checkpoint's per-expert tensors written as compressed-tensors
    (engines.how_transformers_gathers_experts)."""
    return how_transformers_gathers_experts(ckpt.config.get("model_type"), ckpt.model_linears.experts, QUANT_METHOD)


def _packed(tensor: torch.Tensor, bits: int, sym: bool, group_size: int) -> dict[str, torch.Tensor]:
    """weight_packed [N, K*b/32] -> qweight [K*b/32, N]; symmetric: also qzeros at the implied 2^(b-1)."""
    out = {"qweight": tensor.t().contiguous()}
    if sym:
        n, k = tensor.shape[0], tensor.shape[1] * codes_per_word(bits)
        out["qzeros"] = implied_zeros(n, k // group_width(group_size, k), bits)
    return out


def _transposed(tensor: torch.Tensor, target: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """compressed-tensors' [N, ...] tensors -> llmq's [..., N], optionally in another float dtype."""
    t = tensor.t()
    return {target: (t.to(dtype) if dtype is not None else t).contiguous()}


def in_flight(qcfg: dict, qc: QuantConfig) -> tuple[list[Relayout], list[str]]:
    relayouts = [Relayout("weight_packed", ("qweight", "qzeros") if qc.sym else "qweight",
                          functools.partial(_packed, bits=qc.bits, sym=qc.sym, group_size=qc.group_size)),
                 Relayout("weight_scale", "scales",
                          functools.partial(_transposed, target="scales", dtype=native_scale_dtype(qcfg)))]
    if not qc.sym:
        relayouts.append(Relayout("weight_zero_point", "qzeros", functools.partial(_transposed, target="qzeros")))
    return relayouts, [r"\.weight_shape$"]


# The weight-only layout; llmq.formats.table pairs it with the W8A8 one (compressed_tensors_w8a8).
FORMAT = Format(
    QUANT_METHOD,
    detect=lambda qcfg: str(qcfg.get("quant_method", "")).lower() == QUANT_METHOD,
    read=import_checkpoint,
    small_tensors=(".weight_shape", ".weight_scale", ".weight_zero_point", ".weight_g_idx"),
    encode=lambda ckpt: export_tensors(ckpt.tensors, ckpt.quant_config, _model_dtype(ckpt)),
    config=_config,
    engines=_engines,
    in_flight=in_flight,
)
