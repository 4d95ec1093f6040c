"""The native llmq checkpoint: an HF model folder with packed int32 codes.

Saving writes into a temporary sibling folder and renames it into place, so an
interrupted save never leaves something that looks like a finished checkpoint.
Loading-side checks compare the safetensors headers with the model skeleton
before any tensor is read, so a missing or reshaped tensor is named instead of
being silently initialised at random.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from torch import nn

from ..config import QUANT_METHOD, QuantConfig
from ..errors import LlmqError
from ..outdir import atomic_folder, check_output_dir
from .spec import Format


@contextlib.contextmanager
def conversions_kept_apart(model: nn.Module):
    """While saving: the conversions save_pretrained reverses, less those that would fuse quantized
    tensors (folder_io.conversions_for_saving); the model's own list is given back afterwards."""
    from ..folder_io import conversions_for_saving

    had, before = hasattr(model, "_weight_conversions"), getattr(model, "_weight_conversions", None)
    model._weight_conversions = conversions_for_saving(model, model.state_dict())
    try:
        yield
    finally:
        if had:
            model._weight_conversions = before
        else:
            del model._weight_conversions


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
    with atomic_folder(out, overwrite, sources) as tmp, conversions_kept_apart(model):
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


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


def _read(tensors: dict, qcfg: dict) -> tuple[dict, QuantConfig]:
    return tensors, QuantConfig.from_dict(qcfg)


FORMAT = Format(
    QUANT_METHOD,
    detect=lambda qcfg: str(qcfg.get("quant_method", "")).lower() == QUANT_METHOD,
    read=_read,
    small_tensors=(".qzeros", ".scales", ".g_idx", ".weight_scale", ".input_scale"),
    encode=lambda ckpt: ckpt.tensors,
    config=lambda ckpt: ckpt.quant_config.to_dict(),
)
