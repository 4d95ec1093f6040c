"""Loading full-precision models (to quantize) and llmq checkpoints (to run)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .errors import LlmqError
from .formats.native import read_folder_config

DTYPES = {"auto": "auto", "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_dtype(dtype: str | torch.dtype):
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LlmqError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise LlmqError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LlmqError(f"device {device!r} requested but no CUDA GPU is available: use --device cpu")
    return dev


def read_config(source: str | os.PathLike) -> dict | None:
    """config.json of a local folder, or None when source is not a local folder."""
    if not Path(source).is_dir():
        return None
    return read_folder_config(source)


def _check_source(source: str) -> None:
    path = Path(source)
    if path.exists() and not path.is_dir():
        raise LlmqError(f"{source} is a file: pass the model's folder (with config.json) or a hub id")
    if not path.exists() and not _HUB_ID.match(str(source)):
        raise LlmqError(f"model {source!r} not found: it is neither a local folder nor a hub id like "
                        "'owner/name'")


def _from_hub_error(source: str, e: Exception) -> LlmqError:
    return LlmqError(f"could not load model {source!r}: it is not a local folder and the Hugging Face hub "
                     f"could not provide it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                     "check the id and your network, or download the model and pass its folder")


def check_model_source(source: str) -> dict | None:
    """Refuse a source that is neither a model folder nor a hub id, or is already quantized.

    Returns the folder's config.json (None for a hub id).
    """
    _check_source(source)
    config = read_config(source)
    if config is not None and config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method")
        raise LlmqError(f"{source} is already quantized ({method}): quantize the full-precision model instead")
    return config


def load_model(source: str | os.PathLike, dtype: str | torch.dtype = "auto", **kwargs):
    """(model, tokenizer or None) of a full-precision causal LM, on the CPU."""
    from transformers import AutoModelForCausalLM

    source = str(source)
    config = check_model_source(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=resolve_dtype(dtype), **kwargs)
    except (OSError, ValueError) as e:
        if config is None:
            raise _from_hub_error(source, e) from e
        raise LlmqError(f"could not load model {source!r}: {str(e).splitlines()[0]}") from e
    return model, load_tokenizer(source)


def load_tokenizer(source: str | os.PathLike):
    """The tokenizer saved with a model, or None when the folder has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except Exception:  # a weights-only folder (tests, tools) has no tokenizer; RTN does not need one
        return None


def from_pretrained(path: str | os.PathLike, **hf_kwargs):
    """Load an llmq checkpoint with transformers, after checking that it is one.

    gptq, awq and compressed-tensors checkpoints are read too: their tensors are
    converted to llmq's layout (no requantization) and run on llmq's kernels.

    Accepts everything AutoModelForCausalLM.from_pretrained accepts (dtype=,
    device_map=, offload_folder=, ...). Registration with transformers happens
    on `import llmq`; calling this function guarantees it.
    """
    from transformers import AutoModelForCausalLM

    from .hf import register

    register()
    source = str(path)
    _check_source(source)
    config = read_config(source)
    if config is not None:
        qc = config.get("quantization_config")
        if not qc:
            raise LlmqError(f"{source} is not quantized (no quantization_config in config.json): "
                            "load it with transformers directly, or quantize it with `llmq quantize`")
        if qc.get("quant_method") in ("gptq", "awq", "compressed-tensors"):
            # Foreign layouts are converted to llmq's as transformers reads them (codes bit-exact, no copy on
            # disk) and run on llmq's kernels.
            from .formats.inflight import load

            return load(source, **hf_kwargs)
        if qc.get("quant_method") != "llmq":
            raise LlmqError(f"{source} is a {qc.get('quant_method')!r} checkpoint, which llmq does not read "
                            "(it reads llmq, gptq, awq and compressed-tensors)")
    try:
        return AutoModelForCausalLM.from_pretrained(source, **hf_kwargs)
    except OSError as e:
        if config is None:
            raise _from_hub_error(source, e) from e
        raise
