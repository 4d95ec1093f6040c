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
from .engines import EngineSupport

QUANT_METHOD = "compressed-tensors"
FORMAT = "int-quantized"


def w8a8_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Modules held as W8A8 in native tensors (an int8 `weight` beside a `weight_scale`)."""
    return sorted(k[: -len(".weight_scale")] for k in tensors
                  if k.endswith(".weight_scale") and getattr(tensors.get(k[: -len("_scale")]), "dtype", None)
                  == torch.int8)


def export_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native W8A8 tensors -> compressed-tensors tensors (the same names; a new dict)."""
    out = dict(tensors)
    for name in w8a8_names(tensors):
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
    meta = {"method": qc.method, "scheme": qc.scheme, "act": qc.act, "smooth": qc.smooth,
            "act_observer": qc.act_observer, "calibration": qc.calibration, "llmq_version": __version__}
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs,
                                      "output_activations": None, "format": FORMAT}},
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "moe_sparsity_config": None,
        "sparsity_config": {},
        "transform_config": {},
        "llmq": meta,
    }


def engine_support(qc: QuantConfig) -> list[EngineSupport]:
    what = "per-token dynamic" if qc.act == "dynamic" else "static per-tensor"
    return [
        EngineSupport("vLLM (compressed-tensors W8A8 int8)", True,
                      f"int8 weights per channel, {what} int8 activations: the layout of its "
                      "CompressedTensorsW8A8Int8 scheme (vLLM itself is not run here)"),
        EngineSupport("transformers + compressed-tensors", True, "decompresses the weights on load"),
    ]
