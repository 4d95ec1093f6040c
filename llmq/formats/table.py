"""The format table: every list of checkpoint formats, and every read, write and in-flight load, comes from it.

Each entry is a format module's `FORMAT` (llmq.formats.spec.Format). compressed-tensors
folders hold weight-only (pack-quantized) or W8A8 (int-quantized) layers under one
quant_method: one entry, which hands each folder and each model to the layout that fits.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LlmqError
from ..folder_io import read_folder_config
from . import awq, compressed_tensors, compressed_tensors_w8a8, gptq, native
from .spec import Format, with_variant

# In the order they are listed to users.
FORMATS: dict[str, Format] = {f.name: f for f in (
    native.FORMAT,
    gptq.FORMAT,
    awq.FORMAT,
    with_variant(compressed_tensors.FORMAT, compressed_tensors_w8a8.FORMAT),
)}
READ_FORMATS = tuple(FORMATS)
WRITE_FORMATS = tuple(name for name, f in FORMATS.items() if f.encode is not None)
# Formats loaded by converting their tensors as transformers reads them (llmq.formats.inflight).
IN_FLIGHT_FORMATS = tuple(name for name, f in FORMATS.items() if f.in_flight is not None)


def stored_format(qcfg: dict) -> Format | None:
    """The entry whose format a config.json's quantization_config describes, or None."""
    return next((f for f in FORMATS.values() if f.detect(qcfg)), None)


def side_config(folder: Path) -> tuple[Format, Path] | None:
    """(format, file) when the folder holds a format's side file of quantization settings (its
    `extra_json`, which older loaders read: AutoGPTQ's quantize_config.json), else None."""
    return next(((f, folder / f.extra_json) for f in FORMATS.values()
                 if f.extra_json and (folder / f.extra_json).is_file()), None)


def read_folder_quant_config(folder: Path) -> dict:
    """config.json, with the settings of a format's side file folded in where config.json has none
    (older AutoGPTQ and AutoAWQ folders keep them in quantize_config.json or quant_config.json only)."""
    config = read_folder_config(folder)
    side = side_config(Path(folder))
    if not config.get("quantization_config") and side is not None:
        form, path = side
        try:
            settings = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LlmqError(f"{path} does not read as JSON ({e}): the folder is damaged; repair or remove it") from e
        if not isinstance(settings, dict):
            raise LlmqError(f"{path} holds a JSON {type(settings).__name__}, not an object: the folder is damaged")
        config["quantization_config"] = {"quant_method": form.name, **settings}
    return config
