"""Converting checkpoints between llmq's native format and gptq / awq / compressed-tensors.

    llmq convert SRC DST --format llmq|gptq|compressed-tensors

Every conversion goes through llmq's native tensors in memory and moves the
integer codes, scales and zero points as they are: nothing is requantized, so
the codes are bit-exact. SRC may be native llmq, gptq (v1 or v2), awq (GEMM) or
compressed-tensors pack-quantized; DST is written into a temporary sibling
folder that is renamed into place at the end. Tokenizer and generation files
are copied from SRC.

Which formats exist, and how each one is read and written, comes from the format
table (llmq.formats.table).

The whole checkpoint is held in memory during a conversion (quantized weights:
about 0.55 GB per billion parameters at 4 bits).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import LlmqError
from .checks import check_native_tensors, read_small_tensors
from .engines import EngineSupport, format_report
from .spec import Checkpoint
from .table import FORMATS, READ_FORMATS, WRITE_FORMATS, read_folder_quant_config, stored_format
from ..folder_io import checkpoint_files, read_header
from ..outdir import atomic_folder, check_output_dir

_WEIGHT_FILES = ("config.json", "model.safetensors.index.json") + tuple(
    f.extra_json for f in FORMATS.values() if f.extra_json)
# The files of SRC a conversion copies: tokenizer, generation config, chat template, model card, custom
# code. Stray weights (.bin, .pt, .gguf, old .safetensors) never travel into the new checkpoint.
_COPIED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".md", ".py")


def detect_format(config: dict) -> str:
    """The quant_method of a config.json, checked to be one llmq reads."""
    qc = config.get("quantization_config")
    if not qc:
        raise LlmqError("this model is not quantized (no quantization_config in config.json): quantize it with "
                        "`llmq quantize` instead")
    form = stored_format(qc)
    if form is None:
        raise LlmqError(f"quantization format {str(qc.get('quant_method', '')).lower()!r} is not readable by "
                        f"llmq: it reads {', '.join(READ_FORMATS)}")
    return form.name


def _load_tensors(files: list[Path], shapes_only: bool, small: tuple[str, ...]) -> dict[str, torch.Tensor]:
    if shapes_only:
        return read_small_tensors(files, small)
    read_header(files)  # names a damaged or hostile file clearly
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))  # safetensors only: never pickle
        except Exception as e:  # safetensors' own error types
            raise LlmqError(f"checkpoint file {f} is damaged ({e}): re-create or re-download it") from e
    return tensors


def read_checkpoint(folder: str | os.PathLike, *, shapes_only: bool = False) -> Checkpoint:
    """Read any checkpoint llmq understands and convert its tensors to the native layout.

    shapes_only: read only the small tensors the conversion needs values of
    (zero points, g_idx, stored shapes); the weights and scales come back as
    meta tensors of their native shape and dtype. Enough to describe a
    checkpoint (`llmq info`) without reading its weights.
    """
    folder = Path(folder)
    config = read_folder_quant_config(folder)
    fmt = detect_format(config)
    tensors = _load_tensors(checkpoint_files(folder), shapes_only, FORMATS[fmt].small_tensors)
    qcfg = config["quantization_config"]
    try:
        tensors, qc = FORMATS[fmt].read(tensors, qcfg)
    except (KeyError, IndexError, TypeError, RuntimeError) as e:  # a tensor missing, or of another dtype/shape
        what = f"tensor {e.args[0]} is missing" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise LlmqError(f"{folder} is damaged: its {fmt} tensors do not read ({what}); re-create or "
                        "re-download it") from e
    check_native_tensors(tensors, qc, folder)
    return Checkpoint(folder, config, tensors, qc, fmt)


def encode(ckpt: Checkpoint, fmt: str) -> tuple[dict, dict[str, torch.Tensor], list[EngineSupport]]:
    """(quantization_config, tensors, engine support) of ckpt written as fmt."""
    form = FORMATS.get(fmt)
    if form is None or form.encode is None:
        raise LlmqError(f"cannot write format {fmt!r}: choose one of {', '.join(WRITE_FORMATS)}")
    return form.config(ckpt), form.encode(ckpt), form.engines(ckpt)


def write_folder(out: Path, src: Path, config: dict, tensors: dict[str, torch.Tensor], *, overwrite: bool,
                 extra_json: dict[str, dict] | None = None, max_shard_size: str | int = "4GB",
                 sources=()) -> Path:
    """Write config.json, safetensors shards and src's other files to out, atomically."""
    from huggingface_hub import split_torch_state_dict_into_shards

    with atomic_folder(out, overwrite, sources or [src]) as tmp:
        for f in src.iterdir():  # tokenizer, generation config, chat template ..., never stray weights
            if f.is_file() and f.name not in _WEIGHT_FILES and f.suffix in _COPIED_SUFFIXES:
                shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, data in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size,
                                                   filename_pattern="model{suffix}.safetensors")
        for filename, names in split.filename_to_tensors.items():
            save_file({n: tensors[n].contiguous() for n in names}, str(tmp / filename), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return Path(out)


def convert(src: str | os.PathLike, dst: str | os.PathLike, fmt: str = "llmq", *, overwrite: bool = False,
            max_shard_size: str | int = "4GB", sources=(), check_first: bool = True) -> list[EngineSupport]:
    """Convert the checkpoint at src to fmt at dst without requantizing; return engine support rows.

    dst may not be, hold or sit inside src (or any of `sources`); see llmq.outdir.
    check_first: as for `save`.
    """
    if fmt not in WRITE_FORMATS:
        raise LlmqError(f"cannot write format {fmt!r}: choose one of {', '.join(WRITE_FORMATS)}")
    src = Path(src)
    sources = [src, *sources]
    check_output_dir(dst, overwrite, sources, contents=check_first)  # fail before reading anything
    ckpt = read_checkpoint(src)
    qcfg, tensors, rows = encode(ckpt, fmt)
    config = dict(ckpt.config)
    config["quantization_config"] = qcfg
    extra = {FORMATS[fmt].extra_json: qcfg} if FORMATS[fmt].extra_json else None
    write_folder(Path(dst), src, config, tensors, overwrite=overwrite, extra_json=extra,
                 max_shard_size=max_shard_size, sources=sources)
    return rows


def export(model, out: str | os.PathLike, tokenizer=None, fmt: str = "llmq", *, overwrite: bool = False,
           max_shard_size: str | int = "4GB", check_first: bool = True) -> list[EngineSupport]:
    """Save a quantized model (from llmq.quantize) in fmt; return engine support rows.

    check_first: as for `save`.
    """
    from ..outdir import PARTIAL_TAG
    from .native import save

    sources = [getattr(model, "name_or_path", None) or None]
    out = check_output_dir(out, overwrite, sources, contents=check_first)
    if fmt == "llmq":
        save(model, out, tokenizer, overwrite=overwrite, max_shard_size=max_shard_size, sources=sources,
             check_first=check_first)
        return []
    out.parent.mkdir(parents=True, exist_ok=True)
    # Named like a partial folder of OUT, so a killed run's copy is found as stale by the next run.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.{PARTIAL_TAG}-{os.getpid()}-native-", dir=out.parent) as tmp:
        native = save(model, Path(tmp) / "native", tokenizer, sources=sources)
        return convert(native, out, fmt, overwrite=overwrite, max_shard_size=max_shard_size, sources=sources,
                       check_first=check_first)


# ---- `llmq convert` --------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("src", metavar="SRC", help="checkpoint folder: llmq, gptq, awq or compressed-tensors")
    p.add_argument("dst", metavar="DST", help="output folder (must be empty or absent unless --overwrite)")
    p.add_argument("--format", choices=WRITE_FORMATS, default="llmq",
                   help="format to write: llmq (native), gptq (vLLM/SGLang/TGI/transformers), "
                        "compressed-tensors (vLLM's native format, transformers)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")


def print_report(fmt: str, rows: list[EngineSupport]) -> None:
    if rows:
        print(format_report(f"engines for the {fmt} export", rows))


def run(args) -> int:
    from ..outdir import handle_stale_partials

    check_output_dir(args.dst, args.overwrite, [args.src])
    handle_stale_partials(args.dst, args.overwrite)
    rows = convert(args.src, args.dst, args.format, overwrite=args.overwrite)
    if not args.quiet:
        print_report(args.format, rows)
        print(f"wrote {args.dst}")
    return 0
