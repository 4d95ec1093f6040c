"""`llmq info`: what a quantized checkpoint holds, without reading its weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .census import census
from .config import QUANT_METHOD, SMOOTH_OFF
from .errors import LlmqError
from .kernels.layout import codes_per_word
from .formats.convert import detect_format, read_checkpoint
from .formats.table import read_folder_quant_config
from .folder_io import SAFETENSORS_DTYPES, checkpoint_files, read_header
from .units import human_bytes
from .qweight import PACKED_TENSORS, quantized_module_names, w8a8_module_names

_BYTES = {name: dtype.itemsize for name, dtype in SAFETENSORS_DTYPES.items()}
_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def checkpoint_info(path: str | os.PathLike) -> dict:
    """Facts about a quantized checkpoint folder (llmq, gptq, awq or compressed-tensors).

    llmq checkpoints are described from their headers alone; the others from
    their zero points and headers, converted to llmq's layout as loading would
    (the weights themselves are not read).
    """
    folder = Path(path)
    config = read_folder_quant_config(folder)
    if not config.get("quantization_config"):
        raise LlmqError(f"{folder} is not quantized (config.json has no quantization_config)")
    fmt = detect_format(config)
    files = checkpoint_files(folder)
    if fmt == QUANT_METHOD:
        qc = read_checkpoint(folder, shapes_only=True).quant_config  # checks dtypes, shapes and scales
        header = read_header(files)
    else:
        ckpt = read_checkpoint(folder, shapes_only=True)
        qc = ckpt.quant_config
        header = {k: (list(t.shape), _NAMES[t.dtype]) for k, t in ckpt.tensors.items()}
    w8a8 = qc.scheme == "w8a8"
    names = w8a8_module_names(header) if w8a8 else quantized_module_names(header)

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
        if w8a8:
            n, k = header[f"{name}.weight"][0]
        else:
            k_packed, n = header[f"{name}.qweight"][0]
            k = k_packed * codes_per_word(qc.bits)
        quantized_params += k * n
        original += k * n * fp_bytes
    suffixes = ("weight", "weight_scale", "input_scale") if w8a8 else PACKED_TENSORS
    quant_keys = {f"{n}.{s}" for n in names for s in suffixes}
    for key, (shape, dt) in header.items():
        if key not in quant_keys:
            numel = 1
            for d in shape:
                numel *= d
            original += numel * _BYTES.get(dt, 4) if dt in ("I32", "I64") else numel * fp_bytes
    counts = census(header, qc.bits)
    return {
        "census": counts,
        "path": str(folder),
        "format": fmt,
        "architecture": (config.get("architectures") or ["?"])[0],
        "model_type": config.get("model_type"),
        "method": qc.method,
        "bits": qc.bits,
        "group_size": qc.group_size,
        "sym": qc.sym,
        "desc_act": qc.desc_act,
        "scheme": qc.scheme,
        "act": qc.act,
        "smooth": qc.smooth,
        "act_observer": qc.act_observer,
        "static_layers": sum(f"{n}.input_scale" in header for n in names) if w8a8 else 0,
        "modules_to_not_convert": qc.modules_to_not_convert,
        "calibration": qc.calibration,
        "quantized_layers": len(names),
        "quantized_params": quantized_params,
        "layers": names,
        "dtype": dtype,
        "size_on_disk": sum(f.stat().st_size for f in files),
        "size_full_precision": original,
        "files": [f.name for f in files],
        "llmq_version": config["quantization_config"].get("llmq_version"),
    }


def format_info(info: dict) -> str:
    gs = "per row" if info["group_size"] == -1 else str(info["group_size"])
    ratio = info["size_full_precision"] / max(info["size_on_disk"], 1)
    lines = [
        f"checkpoint        {info['path']}",
        f"format            {info['format']}{'' if info['format'] == 'llmq' else ' (llmq converts it on load)'}",
        f"model             {info['architecture']} ({info['model_type']}), dtype {info['dtype']}",
        f"method            {info['method']}{', w8a8' if info.get('scheme') == 'w8a8' else ''}, "
        f"int{info['bits']}, group size {gs}, "
        f"{'symmetric' if info['sym'] else 'asymmetric'}{', act-order' if info['desc_act'] else ''}",
    ]
    if info.get("scheme") == "w8a8":
        smooth = info["smooth"]
        smooth = smooth if smooth in (SMOOTH_OFF, "auto") else f"alpha {smooth:g}"
        act = ("dynamic per-token scales" if info["act"] == "dynamic" else
               f"static per-tensor scales ({info['act_observer']}), {info['static_layers']} input scales stored")
        lines.append(f"activations       int8 symmetric, {act}; SmoothQuant {smooth}")
    lines += info["census"].lines()
    lines += [
        f"not converted     {', '.join(info['modules_to_not_convert']) or '-'} (modules_to_not_convert)",
        f"size on disk      {human_bytes(info['size_on_disk'])} in {len(info['files'])} file(s)",
        f"full precision    {human_bytes(info['size_full_precision'])} ({info['dtype']}), {ratio:.2f}x larger",
    ]
    if info["calibration"]:
        lines.append(f"calibration       {json.dumps(info['calibration'])}")
    return "\n".join(lines)
