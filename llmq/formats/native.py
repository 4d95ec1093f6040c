"""The native llmq checkpoint: an HF model folder with packed int32 codes.

Saving writes into a temporary sibling folder and renames it into place, so an
interrupted save never leaves something that looks like a finished checkpoint.
Loading-side checks compare the safetensors headers with the model skeleton
before any tensor is read, so a missing or reshaped tensor is named instead of
being silently initialised at random.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import LlmqError
from ..outdir import atomic_folder, check_output_dir  # noqa: F401  (the rules for OUT live there)



def save(model: nn.Module, out: str | os.PathLike, tokenizer=None, *, overwrite: bool = False,
         max_shard_size: str | int = "4GB", sources=None, check_first: bool = True) -> Path:
    """Write a quantized model (and its tokenizer) as an HF folder at `out`.

    The folder holds config.json (with quantization_config), generation config,
    tokenizer files and safetensors weights, sharded with an index past
    max_shard_size. `out` may not be or touch the folder the model was loaded
    from (sources: default, the model's name_or_path); see llmq.outdir.
    check_first=False skips the check of what OUT holds before writing (for a
    caller that checked before its own long work): an OUT that appeared since
    is then found at the final rename, and the finished checkpoint is kept.
    """
    if sources is None:
        sources = [getattr(model, "name_or_path", None) or None]
    check_output_dir(out, overwrite, sources, contents=check_first)
    if not getattr(model.config, "quantization_config", None):
        raise LlmqError("this model carries no quantization_config: quantize it with llmq.quantize first")
    with atomic_folder(out, overwrite, sources) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


# safetensors' dtype names (as in a file's header) and the torch dtypes they hold.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_header(files: list[str | os.PathLike]) -> dict[str, tuple[list[int], str]]:
    """{tensor name: (shape, dtype string)} over all safetensors files, without reading data."""
    header = {}
    for f in files:
        f = str(f)
        if not f.endswith(".safetensors"):
            raise LlmqError(f"{f} is not a safetensors file: llmq checkpoints are safetensors only")
        try:
            with safe_open(f, framework="pt") as sf:
                for key in sf.keys():
                    sl = sf.get_slice(key)
                    header[key] = (list(sl.get_shape()), sl.get_dtype())
        except LlmqError:
            raise
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise LlmqError(f"checkpoint file {f} is damaged or not a safetensors file ({e}): "
                            "re-create or re-download it") from e
    return header


def read_folder_config(folder: str | os.PathLike) -> dict:
    """config.json of a local model or checkpoint folder, with a clear error when absent or damaged."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        raise LlmqError(f"{folder} has no config.json: pass a Hugging Face model or checkpoint folder")
    try:
        config = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlmqError(f"{cfg} is not valid JSON ({e}): the folder is damaged") from e
    except OSError as e:
        raise LlmqError(f"cannot read {cfg} ({e.strerror})") from e
    if not isinstance(config, dict):
        raise LlmqError(f"{cfg} holds a JSON {type(config).__name__}, not an object: the folder is damaged")
    if not isinstance(config.get("quantization_config", {}) or {}, dict):
        raise LlmqError(f"{cfg}: quantization_config is not an object: the folder is damaged")
    return config


def checkpoint_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a local HF folder (sharded or not)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise LlmqError(f"{index} is damaged (not JSON with a weight_map of file names): re-create or "
                            "re-download it") from e
        bad = [n for n in names if not isinstance(n, str) or "/" in n or n.startswith(".")]
        if bad:
            raise LlmqError(f"{index} names {bad[0]!r}, which is not a file of the folder: it is damaged")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise LlmqError(f"checkpoint {folder} is incomplete: shard {missing[0]} named in "
                            "model.safetensors.index.json is missing")
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise LlmqError(f"no model.safetensors (or index) in {folder}: not a complete checkpoint")


def w8a8_module_names(header: dict) -> list[str]:
    """Modules stored as W8A8 (int8 `weight` with a `weight_scale`)."""
    return sorted(k[: -len(".weight_scale")] for k in header
                  if k.endswith(".weight_scale") and header.get(k[: -len("_scale")], (None, None))[1] == "I8")


def check_against_model(model: nn.Module, header: dict) -> None:
    """Every tensor the model expects is in the checkpoint with the right shape."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in tied:
            continue
        if name not in header:
            raise LlmqError(f"checkpoint is missing tensor {name!r}: it is damaged or was written for another "
                            "model; re-create it with `llmq quantize`")
        shape = header[name][0]
        if shape is not None and list(tensor.shape) != shape:
            raise LlmqError(f"checkpoint tensor {name!r} has shape {shape}, the model expects "
                            f"{list(tensor.shape)}: the checkpoint does not match its config.json")
