"""Loading any model llmq can evaluate, and describing it (label, size on disk)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LlmqError
from ..formats.table import READ_FORMATS
from ..loading import (check_source, from_pretrained, load_model, load_tokenizer, resolve_dtype, source_config,
                       split_revision)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def quant_method(source: str, revision: str | None = None) -> str | None:
    """quantization_config.quant_method of a model folder's or hub model's config.json, or None."""
    qc = source_config(source, revision=revision).get("quantization_config")
    return qc.get("quant_method") if qc else None


def load_any(source: str | os.PathLike, dtype="auto", with_tokenizer: bool = True):
    """(model, tokenizer or None; None too when not `with_tokenizer`) for a hub id (`owner/name@REV` at a branch, tag or commit), a
    full-precision folder, or a quantized folder, on the CPU.

    Every format llmq reads (llmq, gptq, awq, compressed-tensors: READ_FORMATS) loads through
    `llmq.from_pretrained`, onto llmq's layers, as it would be run; only other quantized formats
    go to transformers' own loader, which needs their packages installed. A failure of that loader
    is a one-line LlmqError.
    """
    source, revision = split_revision(source)
    source = check_source(source, revision=revision)  # a hub id while the hub is unreachable: its cached copy
    if Path(source).is_dir():
        revision = None  # a folder, or the hub cache's copy of the revision asked for
    method = quant_method(source, revision)
    if method is None:
        return load_model(source, dtype, revision, with_tokenizer=with_tokenizer)
    if method in READ_FORMATS:
        model = from_pretrained(source, dtype=resolve_dtype(dtype), revision=revision)
    else:
        model = _load_with_transformers(source, method, dtype, revision)
    return model.eval(), load_tokenizer(source, revision) if with_tokenizer else None


def _load_with_transformers(source: str, method: str, dtype, revision: str | None):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=resolve_dtype(dtype), use_safetensors=True,
                                                    revision=revision)
    except Exception as e:  # a foreign loader fails in its own ways (ImportError, RuntimeError, ...): name it
        raise LlmqError(f"transformers could not load the {method!r} checkpoint {source} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); llmq itself reads {', '.join(READ_FORMATS)}: "
                        "install the package transformers needs for this format, or repair the folder") from e


def size_on_disk(source: str | os.PathLike) -> int | None:
    """Bytes of weight files in a local model folder; None for a hub id."""
    path = Path(source)
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES))


def describe(model) -> str:
    """Short label of what a loaded model is: 'bfloat16', 'llmq rtn w4 g64 asym', 'gptq w4 g128'."""
    import torch

    qc = getattr(model.config, "quantization_config", None)
    if qc is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return str(dtype).removeprefix("torch.")
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method", "?")
    parts = [method] if method != "llmq" else [f"{qc.get('method', '?')}"]
    if qc.get("bits") is not None:
        parts.append(f"w{qc['bits']}")
    gs = qc.get("group_size")
    if gs is not None:
        parts.append("per-row" if gs == -1 else f"g{gs}")
    if qc.get("sym") is not None:
        parts.append("sym" if qc["sym"] else "asym")
    if qc.get("desc_act"):
        parts.append("act-order")
    if qc.get("scheme") == "w8a8":
        smooth = qc.get("smooth")
        parts.append(f"a8 {qc.get('act')}" + ("" if smooth is None else f" smooth {smooth}"))
    return " ".join(str(p) for p in parts)
