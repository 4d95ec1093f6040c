"""Reading `awq` checkpoints (AutoAWQ / llm-awq GEMM packing) into llmq's layout.

AWQ GEMM tensors per linear (K = in_features, N = out_features, G = K / group):

    qweight int32 [K, N/8]  codes packed along N; word j of row k holds output
                            columns 8j .. 8j+7, nibble i (bits 4i .. 4i+3) holding
                            column 8j + AWQ_ORDER[i]
    qzeros  int32 [G, N/8]  true zero points, packed the same way
    scales  fp16  [G, N]
    bias    fp16  [N]       when the layer has one

w[n, k] = (q - z) * s with the group of k being k // group_size; no g_idx.
Only 4-bit GEMM checkpoints exist in practice; GEMV, Marlin and other AWQ
packings are refused with a message.
"""

from __future__ import annotations

import functools

import torch

from ..config import QuantConfig
from ..errors import LlmqError
from ..kernels.layout import group_width, pack_cols, pack_rows, unpack_cols
from ..qweight import quantized_module_names
from .spec import Format, Relayout

QUANT_METHOD = "awq"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column AWQ_ORDER[i]


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] in AWQ order -> int32 [R, N] codes in column order."""
    nibbles = unpack_cols(packed, 4)  # [R, N], column 8j+i is nibble i of word j
    r, n = nibbles.shape
    out = torch.empty_like(nibbles)
    # Scatter nibble i of each word to column AWQ_ORDER[i] of its block of 8.
    out.view(r, n // 8, 8)[:, :, list(AWQ_ORDER)] = nibbles.view(r, n // 8, 8)
    return out


def import_checkpoint(tensors: dict[str, torch.Tensor], cfg: dict) -> tuple[dict[str, torch.Tensor], QuantConfig]:
    """awq tensors + quantization_config -> (native tensors, QuantConfig), codes bit-exact."""
    version = str(cfg.get("version") or cfg.get("format") or "gemm").lower()
    if version != "gemm":
        raise LlmqError(f"AWQ version {version!r} is not readable by llmq (it reads the GEMM packing): "
                        "re-export the model with AutoAWQ's GEMM version")
    bits = int(cfg.get("bits", cfg.get("w_bit", 4)))
    if bits != 4:
        raise LlmqError(f"this AWQ checkpoint has {bits}-bit weights; llmq reads 4-bit AWQ only")
    if not cfg.get("zero_point", True):
        raise LlmqError("this AWQ checkpoint has no zero points (zero_point=false), which llmq does not read")
    group_size = int(cfg.get("group_size", cfg.get("q_group_size", 128)))
    names = quantized_module_names(tensors)
    if not names:
        raise LlmqError("config.json says AWQ but the checkpoint holds no '.qweight' tensors: it is damaged")
    out = dict(tensors)
    for name in names:
        codes = unpack_awq(tensors[f"{name}.qweight"])  # [K, N]
        zeros = unpack_awq(tensors[f"{name}.qzeros"])  # [G, N]
        k, n = codes.shape
        gs = group_width(group_size, k)
        if k % gs or zeros.shape[0] != k // gs or tuple(tensors[f"{name}.scales"].shape) != (k // gs, n):
            raise LlmqError(f"AWQ tensors of {name} do not fit group size {group_size}: the checkpoint is damaged")
        out[f"{name}.qweight"] = pack_rows(codes, 4)
        out[f"{name}.qzeros"] = pack_cols(zeros, 4)
        out.pop(f"{name}.g_idx", None)
    skip = cfg.get("modules_to_not_convert") or []
    qc = QuantConfig(method="awq", bits=4, group_size=group_size, sym=False,
                     modules_to_not_convert=sorted(set(skip) | {"lm_head"}),
                     calibration={"source_format": "awq"})
    return out, qc


def _repacked(tensor: torch.Tensor, target: str) -> dict[str, torch.Tensor]:
    """AWQ GEMM words (packed along N, interleaved) -> qweight packed along K, or qzeros packed along N."""
    codes = unpack_awq(tensor)
    return {target: pack_rows(codes, 4) if target == "qweight" else pack_cols(codes, 4)}


def in_flight(qcfg: dict, qc: QuantConfig) -> tuple[list[Relayout], list[str]]:
    return [Relayout(name, name, functools.partial(_repacked, target=name)) for name in ("qweight", "qzeros")], \
        [r"\.g_idx$"]


FORMAT = Format(
    QUANT_METHOD,
    detect=lambda qcfg: str(qcfg.get("quant_method", "")).lower() == QUANT_METHOD,
    read=import_checkpoint,
    small_tensors=(".qzeros", ".scales"),
    in_flight=in_flight,
    extra_json="quant_config.json",  # where AutoAWQ's first releases kept the settings
)
