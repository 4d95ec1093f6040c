"""Reading Hugging Face model folders: config.json, the safetensors files, their headers.

Generic folder I/O shared by loading, conversion, `llmq info` and the
streaming paths, and the names transformers gives stored tensors on load;
nothing here knows a quantization format. Only safetensors are read, never
pickles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import LlmqError


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
            raise LlmqError(f"{f} is not a safetensors file: llmq reads safetensors weights only")
        if not os.access(f, os.R_OK):  # safetensors would say "no such file"
            raise LlmqError(f"cannot read {f} (permission denied): give this user read access to it")
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
    if not Path(folder).exists():
        raise LlmqError(f"{folder} is not a local folder: pass a model or checkpoint folder (a model on the "
                        "Hugging Face hub: download it first, `hf download ID --local-dir DIR`)")
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


def names_on_load(model, keys, conversions: list) -> dict[str, tuple[str, object]]:
    """{stored key: (the model's name transformers' loader gives it, the source pattern of the converter
    that fuses it, or None)} under `conversions` (a transformers conversion mapping), renamed as that
    loader renames each key; like loading, this marks the conversions that apply as used (their
    `was_used()`)."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    return {key: rename_source_key(key, renamings, converters, prefix, meta) for key in keys}


def name_on_disk(model):
    """A function from a name in the model (a state-dict key) to the name transformers saves it under:
    the architecture's conversion mapping's renamings, reversed, as save_pretrained applies them
    (revert_weight_conversion). Kimi Linear saves `mlp.` as `block_sparse_moe.` and its forget gate's
    `self_attn.forget_gate.f_a_proj.` as `self_attn.f_a_proj.`."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightRenaming
    except ImportError:  # pragma: no cover - transformers without conversion mappings: names are kept
        return lambda name: name
    # Every reversed renaming in turn.
    saving = [c.reverse_transform() for c in get_model_conversion_mapping(model, add_legacy=False)[::-1]
              if not isinstance(c, PrefixChange)]
    saving = [c for c in saving if isinstance(c, WeightRenaming)]

    def on_disk(name: str) -> str:
        for renaming in saving:
            name = renaming.rename_source_key(name)[0]
        return name

    return on_disk


def conversions_for_saving(model, names, conversions: list | None = None) -> list:
    """The conversions save_pretrained reverses for `model` (conversions: those a load used; default:
    what transformers would take), less each converter whose reversal takes one of the tensors `names`
    (model names, the ones about to be written) that a quantized module holds: it would fuse them as
    weights (Sarvam's q/k/v into `query_key_value`, LaRA's projections into `in_proj`), and packed codes
    and their scales do not concatenate like weights. Those modules are written apart under the
    model's names, which the loader reads as they are."""
    from transformers.core_model_loading import PrefixChange, WeightConverter

    from .modules import QUANTIZED_MODULES

    owners = {owner: model.get_submodule(owner) for owner in {name.rpartition(".")[0] for name in names}}
    names = [name for name in names if isinstance(owners[name.rpartition(".")[0]], QUANTIZED_MODULES)]
    if conversions is None:
        conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:  # as revert_weight_conversion builds them for a model not loaded from a folder
        from transformers.conversion_mapping import get_model_conversion_mapping

        conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                       if not isinstance(c, PrefixChange)]
    kept = []
    for conversion in conversions:
        if isinstance(conversion, WeightConverter):
            backwards = conversion.reverse_transform()
            if any(backwards.rename_source_key(name)[1] is not None for name in names):
                continue
        kept.append(conversion)
    return kept


def modules_whose_tensors_do_not_round_trip(model, modules: list[str], leaves: tuple[str, ...]) -> list[str]:
    """The modules among `modules` (names in the model) of which a tensor named `<module>.<leaf>` would be
    saved under a name that the architecture's conversion mapping loads back as another: a renaming
    written for the stored name of a weight that is the module's name on disk (Inkling 2 stores its
    `sconv.weight_proj` linear's weight as `sconv.weight_proj`) also renames the packed tensors below it."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # pragma: no cover - transformers without conversion mappings: names are kept
        return []
    on_disk = name_on_disk(model)
    stored = {f"{module}.{leaf}": on_disk(f"{module}.{leaf}") for module in modules for leaf in leaves}
    loaded = names_on_load(model, set(stored.values()), get_model_conversion_mapping(model))
    return sorted({name.rpartition(".")[0] for name, key in stored.items() if loaded[key][0] != name})


def names_round_trip_gap(model, skip=()) -> tuple[str, str, str] | None:
    """The first (name in the model, name transformers saves it under, name that loads back as) where
    saving and loading through the architecture's conversion mapping disagree, or None. Names under
    the modules in `skip` are left out (experts modules: llmq writes their weights per expert)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # pragma: no cover - transformers without conversion mappings: names are kept
        return None
    on_disk = name_on_disk(model)
    skip = tuple(f"{name}." for name in skip)
    stored = {name: on_disk(name) for name in model.state_dict() if not name.startswith(skip)}
    # And as from_pretrained renames them.
    loaded = names_on_load(model, set(stored.values()), get_model_conversion_mapping(model))
    for name, key in stored.items():
        if loaded[key][0] != name:
            return name, key, loaded[key][0]
    return None
