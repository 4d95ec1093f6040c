"""Cheap checks that a quantized checkpoint's tensors are whole, before anything uses them.

A float32 `qweight` would be cast to int32 codes, a NaN scale would poison every
output of its group, a missing zero point would be created at random: each is
refused here, by name. The checks need the headers (names, shapes, dtypes) and
the values of the small tensors only (scales, zero points, g_idx), about 1/30
of a 4-bit checkpoint; the packed weights are never read for them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import QuantConfig
from ..errors import LlmqError
from ..folder_io import SAFETENSORS_DTYPES, read_header

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def read_small_tensors(files: list[str | os.PathLike], small: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Every tensor of the files: meta tensors of the stored shape and dtype, with the values of the
    small ones read: those whose names end in one of `small` (the format's `small_tensors`, see
    llmq.formats.table), which the checks and the format's reader need."""
    header = read_header(files)  # names a damaged or hostile file clearly
    unknown = next((k for k, (_, dtype) in header.items() if dtype not in SAFETENSORS_DTYPES), None)
    if unknown:
        raise LlmqError(f"tensor {unknown} has dtype {header[unknown][1]}, which no llmq-readable checkpoint holds")
    tensors = {k: torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype], device="meta")
               for k, (shape, dtype) in header.items()}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    if key.endswith(small):
                        tensors[key] = sf.get_tensor(key)
        except Exception as e:  # safetensors' own error types
            raise LlmqError(f"checkpoint file {f} is damaged ({e}): re-create or re-download it") from e
    return tensors


def check_native_tensors(tensors: dict[str, torch.Tensor], qc: QuantConfig, where: str | os.PathLike) -> None:
    """Native-layout tensors (values, or meta tensors where not read) of a weight-only checkpoint:
    every quantized module has qweight, qzeros and scales (and g_idx) of the right dtypes and of
    shapes that agree with each other and with qc; the scales that were read are finite, the g_idx
    values in range. W8A8 checkpoints: their scales are finite."""
    where = Path(where) if where else "checkpoint"
    if qc.scheme == "w8a8":
        for key, t in tensors.items():
            if key.endswith((".weight_scale", ".input_scale")):
                _finite(key, t, where)
        return
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.rsplit(".", 1)[-1] in _PARTS})
    bits = qc.bits
    per = 32 // bits
    for m in modules:
        for part in ("qweight", "qzeros", "scales"):
            if f"{m}.{part}" not in tensors:
                _damaged(where, f"tensor {m}.{part} is missing")
        qweight, qzeros, scales = (tensors[f"{m}.{p}"] for p in ("qweight", "qzeros", "scales"))
        for key, t, ok in ((f"{m}.qweight", qweight, (torch.int32,)), (f"{m}.qzeros", qzeros, (torch.int32,)),
                           (f"{m}.scales", scales, _FLOATS)):
            if t.dtype not in ok:
                _damaged(where, f"{key} is {str(t.dtype).removeprefix('torch.')}, not "
                                f"{' or '.join(str(d).removeprefix('torch.') for d in ok)}")
            if t.dim() != 2:
                _damaged(where, f"{key} has shape {list(t.shape)}, not two dimensions")
        k, n = qweight.shape[0] * per, qweight.shape[1]
        gs = qc.group_size_for(k)
        groups = -(-k // gs) if gs > 0 else 0
        expect = {f"{m}.scales": [groups, n], f"{m}.qzeros": [groups, n // per if n % per == 0 else -1]}
        for key, shape in expect.items():
            if list(tensors[key].shape) != shape:
                _damaged(where, f"{key} has shape {list(tensors[key].shape)}, but {m}.qweight "
                                f"{list(qweight.shape)} at {bits} bits, group size {qc.group_size} needs {shape}")
        g_idx = tensors.get(f"{m}.g_idx")
        if g_idx is not None:
            if g_idx.dtype not in (torch.int32, torch.int64) or list(g_idx.shape) != [k]:
                _damaged(where, f"{m}.g_idx is {str(g_idx.dtype).removeprefix('torch.')} {list(g_idx.shape)}, "
                                f"not int32 [{k}]")
            if not g_idx.is_meta and g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
                _damaged(where, f"{m}.g_idx names groups outside 0..{groups - 1}")
        _finite(f"{m}.scales", scales, where)


def _finite(key: str, t: torch.Tensor, where) -> None:
    if not t.is_meta and t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        _damaged(where, f"{key} holds {bad} NaN or infinite value(s)")


def _damaged(where, problem: str):
    raise LlmqError(f"{where} is damaged: {problem}; re-create or re-download it")
