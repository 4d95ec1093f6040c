"""`llmq info`: what a checkpoint holds, read from its headers only."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .config import QuantConfig
from .errors import LlmqError
from .formats.native import checkpoint_files, quantized_module_names, read_folder_config, read_header

_BYTES = {"F64": 8, "F32": 4, "I32": 4, "I64": 8, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def checkpoint_info(path: str | os.PathLike) -> dict:
    """Facts about an llmq checkpoint folder, without loading any tensor."""
    folder = Path(path)
    config = read_folder_config(folder)
    qc_dict = config.get("quantization_config")
    if not qc_dict:
        raise LlmqError(f"{folder} is not quantized (config.json has no quantization_config)")
    qc = QuantConfig.from_dict(qc_dict)
    files = checkpoint_files(folder)
    header = read_header(files)
    names = quantized_module_names(header)

    def nbytes(key):
        shape, dtype = header[key]
        n = 1
        for d in shape:
            n *= d
        return n * _BYTES.get(dtype, 4)

    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    fp_bytes = _DTYPE_BYTES.get(dtype, 4)
    quantized_params = 0
    original = 0
    for name in names:
        k_packed, n = header[f"{name}.qweight"][0]
        k = k_packed * 32 // qc.bits
        quantized_params += k * n
        original += k * n * fp_bytes
    quant_keys = {f"{n}.{s}" for n in names for s in ("qweight", "qzeros", "scales", "g_idx")}
    for key, (shape, dt) in header.items():
        if key not in quant_keys:
            numel = 1
            for d in shape:
                numel *= d
            original += numel * _BYTES.get(dt, 4) if dt in ("I32", "I64") else numel * fp_bytes
    return {
        "path": str(folder),
        "architecture": (config.get("architectures") or ["?"])[0],
        "model_type": config.get("model_type"),
        "method": qc.method,
        "bits": qc.bits,
        "group_size": qc.group_size,
        "sym": qc.sym,
        "desc_act": qc.desc_act,
        "modules_to_not_convert": qc.modules_to_not_convert,
        "calibration": qc.calibration,
        "quantized_layers": len(names),
        "quantized_params": quantized_params,
        "layers": names,
        "dtype": dtype,
        "size_on_disk": sum(f.stat().st_size for f in files),
        "size_full_precision": original,
        "files": [f.name for f in files],
        "llmq_version": qc_dict.get("llmq_version"),
    }


def format_info(info: dict) -> str:
    gs = "per row" if info["group_size"] == -1 else str(info["group_size"])
    ratio = info["size_full_precision"] / max(info["size_on_disk"], 1)
    lines = [
        f"checkpoint        {info['path']}",
        f"model             {info['architecture']} ({info['model_type']}), dtype {info['dtype']}",
        f"method            {info['method']}, int{info['bits']}, group size {gs}, "
        f"{'symmetric' if info['sym'] else 'asymmetric'}{', act-order' if info['desc_act'] else ''}",
        f"quantized layers  {info['quantized_layers']} linears, {info['quantized_params'] / 1e6:.1f} M weights",
        f"kept full prec.   {', '.join(info['modules_to_not_convert']) or '-'}, embeddings, norms",
        f"size on disk      {_human(info['size_on_disk'])} in {len(info['files'])} file(s)",
        f"full precision    {_human(info['size_full_precision'])} ({info['dtype']}), {ratio:.2f}x larger",
    ]
    if info["calibration"]:
        lines.append(f"calibration       {json.dumps(info['calibration'])}")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
