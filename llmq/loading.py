"""Loading full-precision models (to quantize) and llmq checkpoints (to run)."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

from .errors import LlmqError
from .formats.table import read_folder_quant_config

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
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LlmqError(f"device {device!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                        f"GPU(s): use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def read_config(source: str | os.PathLike) -> dict | None:
    """config.json of a local folder (with the quantization settings of an older GPTQ or AWQ folder's
    side file folded in), or None when source is not a local folder."""
    if not Path(source).is_dir():
        return None
    return read_folder_quant_config(source)


def source_config(source: str | os.PathLike, **where) -> dict:
    """config.json of a local folder or of a hub model (a source check_source let through; `where`: the
    revision, token and cache_dir to fetch a hub model with, as from_pretrained takes them)."""
    source = check_source(str(source), **where)
    config = read_config(source)
    if config is None:
        from .hub import hub_config

        config = hub_config(source, **where)
    return config


def split_revision(source: str | os.PathLike) -> tuple[str, str | None]:
    """A hub id with its version, `owner/name@REV` (a branch, tag or commit), as (id, REV); any other
    source, a local path above all, whole, with None. Hub ids hold no "@", so the first one splits."""
    source = os.fspath(source)
    name, at, revision = source.partition("@")
    if at and revision and not Path(source).exists() and _HUB_ID.match(name):
        return name, revision
    return source, None


_read_from_cache: set[tuple] = set()  # (hub id, revision) said to be read from the hub cache: once a process


def check_source(source: str, **where) -> str:
    """Refuse a source that is no model folder and no reachable hub id, before any work; returns where
    to read it: the source, or for a hub id while the hub is unreachable, the hub cache's copy of it at
    the revision asked for (where transformers, offline, reads it too)."""
    if not str(source).strip():
        raise LlmqError("the model is an empty name: pass a model folder or a hub id")
    path = Path(source)
    if path.exists() and not path.is_dir():
        raise LlmqError(f"{source} is a file: pass the model's folder (with config.json) or a hub id")
    if not path.exists() and not _HUB_ID.match(str(source)):
        raise LlmqError(f"model {source!r} not found: it is neither a local folder nor a hub id like "
                        "'owner/name'")
    if not path.exists():
        unreachable = hub_unreachable()
        if unreachable:
            from .hub import cached_model

            cached = cached_model(str(source), **where)
            if cached is not None:
                said = (source, where.get("revision"))
                if said not in _read_from_cache:
                    _read_from_cache.add(said)
                    warnings.warn(f"the Hugging Face hub is unreachable ({unreachable}): {source} is read from "
                                  f"its copy in the hub cache, {cached}", stacklevel=2)
                return cached
            hint = ""
            if Path(source).parent.is_dir():
                hint = f" (there is a local folder {Path(source).parent}: check the path if you meant a folder)"
            raise LlmqError(f"model {source!r} is not a local folder nor in the hub cache; hub unreachable "
                            f"({unreachable}){hint}: pass the path of a downloaded model folder")
    return str(source)


_hub_state: dict[str, str | None] = {}


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached (offline mode, or one failed connection), or None.

    One quick request without retries, remembered for the process: a hub id
    then fails in a second instead of after the hub client's retries.
    """
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    if "reason" not in _hub_state:
        from huggingface_hub.utils import get_session

        try:
            get_session().head(hub.ENDPOINT, timeout=5)
            _hub_state["reason"] = None
        except Exception as e:  # the session's own error types (DNS, refused, timeout, proxy)
            _hub_state["reason"] = f"cannot connect to {hub.ENDPOINT}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return _hub_state["reason"]


def _from_hub_error(source: str, e: Exception) -> LlmqError:
    return LlmqError(f"could not load model {source!r}: it is not a local folder and the Hugging Face hub "
                     f"could not provide it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                     "check the id and your network, or download the model and pass its folder "
                     f"(llmq reads safetensors weights only: {BIN_FIX})")


BIN_FIX = ("convert a pytorch_model.bin model once, in an environment you trust, with "
           "`AutoModelForCausalLM.from_pretrained(SRC).save_pretrained(DST)`, and pass DST")

# Tensors and dtypes that only quantized checkpoints hold: what each says the folder is.
_QUANTIZED_TENSORS = {".qweight": "GPTQ/AWQ", ".qzeros": "GPTQ/AWQ", ".weight_packed": "compressed-tensors",
                      ".weight_scale": "compressed-tensors or FP8", ".SCB": "bitsandbytes int8",
                      ".absmax": "bitsandbytes 4-bit", ".quant_state.bitsandbytes__nf4": "bitsandbytes 4-bit",
                      ".quant_state.bitsandbytes__fp4": "bitsandbytes 4-bit"}
_QUANTIZED_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F4")


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a full-precision model folder, with a clear error when it has none."""
    from .folder_io import checkpoint_files

    if not any(folder.glob("*.safetensors")) and not (folder / "model.safetensors.index.json").exists():
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickled:
            raise LlmqError(f"{folder} holds only pickled weights ({', '.join(pickled[:3])}), which llmq never "
                            f"loads: {BIN_FIX}")
        raise LlmqError(f"{folder} holds no model weights (no *.safetensors): pass a complete model folder")
    return checkpoint_files(folder)


def check_model_source(source: str, revision: str | None = None) -> tuple[str, dict | None]:
    """Refuse a source that is neither a model folder nor a hub id, is already quantized (any known
    format), or whose weight files are damaged, before anything is loaded.

    Returns (where to read it, as check_source says; the folder's config.json, None for a hub id).
    """
    from .folder_io import read_header

    source = check_source(source, revision=revision)
    config = source_config(source, revision=revision)  # a hub id's: with its file list, before any weight
    on_hub = not Path(source).is_dir()
    refuse_quantized(source, config, {} if on_hub else read_header(_weight_files(Path(source))))  # names a damaged file
    _refuse_unknown_architecture(source, config)
    return source, None if on_hub else config


def _refuse_unknown_architecture(source: str, config: dict) -> None:
    """A model type transformers does not ship: its modeling code would come from the folder
    (auto_map), which llmq never runs, or from a newer transformers."""
    import transformers
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    if config.get("auto_map"):
        raise LlmqError(f"{source} needs its own modeling code (auto_map in config.json, model type "
                        f"{model_type!r}), which llmq does not run: llmq quantizes architectures transformers ships")
    raise LlmqError(f"{source} has model type {model_type!r}, which transformers {transformers.__version__} does "
                    "not know: upgrade transformers, or check config.json's model_type")


def refuse_quantized(source: str, config: dict, header: dict[str, tuple[list[int], str]]) -> None:
    """Refuse a model that is already quantized, from its config.json, its folder and its tensors' headers."""
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method")
        raise LlmqError(f"{source} is already quantized ({method}): quantize the full-precision model instead")
    for key, (_, dtype) in header.items():
        kind = next((k for suffix, k in _QUANTIZED_TENSORS.items() if key.endswith(suffix)), None)
        if kind or dtype in _QUANTIZED_DTYPES:
            raise LlmqError(f"{source} is already quantized ({kind or dtype} tensor {key}): quantize the "
                            "full-precision model instead")


def check_loading_info(source: str, info: dict, model=None) -> None:
    """Refuse a model that transformers filled in at random: tensors missing from the checkpoint,
    tensors the model does not use, or tensors of another shape. model: the model loaded, to name the
    modules of a multimodal checkpoint that its causal LM class leaves out."""
    unexpected = sorted(info.get("unexpected_keys") or ())
    if model is not None and unexpected and not info.get("missing_keys") and not info.get("mismatched_keys"):
        own = {name for name, _ in model.named_children()}
        outside = sorted({key.partition(".")[0] for key in unexpected})
        if not own & set(outside):  # whole modules the model has none of: a vision tower and its projector
            raise LlmqError(f"{source} holds {len(unexpected)} tensor(s) of {', '.join(outside)}, which "
                            f"{type(model).__name__}, the causal LM transformers loads it as, does not have (a "
                            "multimodal model's vision modules): llmq quantizes the language model alone; save it "
                            "with `AutoModelForCausalLM.from_pretrained(SRC).save_pretrained(DST)` and pass DST")
    problems = []
    for what, keys in (("missing", info.get("missing_keys")), ("not used by the model", info.get("unexpected_keys"))):
        keys = sorted(keys or ())
        if keys:
            problems.append(f"{len(keys)} tensor(s) {what} (e.g. {keys[0]})")
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        first = mismatched[0]
        detail = (f"{first[0]}: {list(first[1])} in the file, {list(first[2])} in the model"
                  if isinstance(first, tuple) and len(first) == 3 else str(first))
        problems.append(f"{len(mismatched)} tensor(s) of the wrong shape (e.g. {detail})")
    if problems:
        raise LlmqError(f"the weights of {source} do not match its config.json: {'; '.join(problems)}; llmq "
                        "never quantizes randomly initialised weights: re-download or repair the model")


def load_model(source: str | os.PathLike, dtype: str | torch.dtype = "auto", revision: str | None = None, *,
               with_tokenizer: bool = True, **kwargs):
    """(model, tokenizer or None) of a full-precision causal LM, on the CPU (the tokenizer None too
    when not `with_tokenizer`: one hub round trip fewer for a caller that does not use it).

    Safetensors only (nothing is unpickled); every tensor the model has must
    come from the checkpoint with its shape, or the load is refused.
    """
    from transformers import AutoModelForCausalLM

    source, config = check_model_source(str(source), revision)
    if config is not None:
        revision = None  # a folder, or the hub cache's copy of the revision asked for
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source, dtype=resolve_dtype(dtype), use_safetensors=True, output_loading_info=True,
            ignore_mismatched_sizes=True, revision=revision, **kwargs)  # mismatches come back in info, refused
    except (OSError, ValueError) as e:
        if config is None:
            raise _from_hub_error(source, e) from e
        raise LlmqError(f"could not load model {source!r}: {str(e).splitlines()[0]}") from e
    check_loading_info(source, info, model)
    return model, load_tokenizer(source, revision) if with_tokenizer else None


# Files that make a folder hold a tokenizer; a folder with none of them has no tokenizer (not an error).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "special_tokens_map.json", "*.tiktoken")


def has_tokenizer_files(source: str | os.PathLike, revision: str | None = None) -> bool:
    """Whether a local folder (or hub repo, at revision) holds tokenizer files."""
    import fnmatch

    path = Path(source)
    if path.is_dir():
        names = [p.name for p in path.iterdir()]
    else:
        from huggingface_hub import list_repo_files

        names = list_repo_files(str(source), revision=revision)
    return any(fnmatch.fnmatch(n, pattern) for n in names for pattern in TOKENIZER_FILES)


def load_tokenizer(source: str | os.PathLike, revision: str | None = None):
    """The tokenizer saved with a model, or None when the folder has no tokenizer files.

    A tokenizer whose files are there but do not load is an error with its cause,
    never a silent None (a checkpoint would ship without it).
    """
    from transformers import AutoTokenizer

    try:
        present = has_tokenizer_files(source, revision)
    except Exception as e:  # hub listing failed: the load below reports it
        present = True
        del e
    if not present:
        return None
    try:
        return AutoTokenizer.from_pretrained(str(source), revision=revision)
    except Exception as e:  # tokenizers, sentencepiece, json and OS errors alike
        raise LlmqError(f"the tokenizer of {source} does not load ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}): repair or re-download its tokenizer files, "
                        "or remove them all to go without a tokenizer") from e


def from_pretrained(path: str | os.PathLike, **hf_kwargs):
    """Load an llmq checkpoint with transformers, after checking that it is one.

    gptq, awq and compressed-tensors checkpoints are read too: their tensors are
    converted to llmq's layout (no requantization) and run on llmq's kernels.

    Accepts everything AutoModelForCausalLM.from_pretrained accepts (dtype=,
    device_map=, offload_folder=, ...); with a device_map, offload_buffers
    defaults to True, so that offloaded layers offload their quantized weights
    (buffers) too. Registration with transformers happens
    on `import llmq`; calling this function guarantees it.
    """
    from transformers import AutoModelForCausalLM

    from .hf import register

    register()
    if hf_kwargs.get("device_map") is not None:
        # Quantized weights are buffers, which accelerate keeps on the execution device unless told
        # otherwise: offloaded layers would hold every quantized weight there (as transformers itself
        # decides for its fp8 checkpoints).
        hf_kwargs.setdefault("offload_buffers", True)
    from .hub import WHERE

    where = {k: hf_kwargs[k] for k in WHERE if k in hf_kwargs}
    source = check_source(str(path), **where)
    on_hub = not Path(source).is_dir()
    if on_hub and "subfolder" in hf_kwargs:  # a model inside a repository: transformers finds it
        return _from_hub(source, hf_kwargs)
    if not on_hub:
        hf_kwargs.pop("revision", None)  # a folder, or the hub cache's copy of the revision asked for
    config = source_config(source, **where)  # a hub model's says what it is, as a folder's does
    qc = config.get("quantization_config")
    if not qc:
        raise LlmqError(f"{source} is not quantized (no quantization_config in config.json): "
                        "load it with transformers directly, or quantize it with `llmq quantize`")
    from .formats.table import IN_FLIGHT_FORMATS, READ_FORMATS

    if qc.get("quant_method") in IN_FLIGHT_FORMATS:
        # Foreign layouts are converted to llmq's as transformers reads them (codes bit-exact, no copy on
        # disk) and run on llmq's kernels.
        from .formats.inflight import load

        if on_hub:  # the conversion reads the folder's files: the checkpoint comes down first
            from .hub import hub_checkpoint

            folder = hub_checkpoint(source, **where)
            return load(folder, **{k: v for k, v in hf_kwargs.items() if k not in WHERE})
        return load(source, **hf_kwargs)
    if qc.get("quant_method") != "llmq":
        raise LlmqError(f"{source} is a {qc.get('quant_method')!r} checkpoint, which llmq does not read "
                        f"(it reads {', '.join(READ_FORMATS)})")
    if on_hub:
        return _from_hub(source, hf_kwargs)
    hf_kwargs.setdefault("use_safetensors", True)  # never unpickle
    return AutoModelForCausalLM.from_pretrained(source, **hf_kwargs)


def _from_hub(source: str, hf_kwargs: dict):
    """transformers' load of a hub model, its failures in one line."""
    from transformers import AutoModelForCausalLM

    hf_kwargs.setdefault("use_safetensors", True)  # never unpickle
    try:
        return AutoModelForCausalLM.from_pretrained(source, **hf_kwargs)
    except OSError as e:
        raise _from_hub_error(source, e) from e
