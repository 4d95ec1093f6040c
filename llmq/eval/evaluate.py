"""Several models, one after another, on identical windows: perplexity, KL, top-1."""

from __future__ import annotations

import gc
import os
import platform
from typing import Callable, Sequence, Union

import torch
from torch import nn

from ..data import check_positions, text_span, tokenize, window_bos
from ..errors import LlmqError
from ..loading import resolve_device, source_config, split_revision
from ..outdir import test_point
from .metrics import auto_batch_size, perplexity, vocab_size
from .models import describe, load_any, load_tokenizer, size_on_disk
from .refstore import STORE_DTYPES, RefStore, check_store_dir
from .windows import cut_windows, eval_split, eval_text
from .._version import __version__

ModelEntry = Union[str, os.PathLike, nn.Module, Callable[[], nn.Module]]
KL_QUANTILE = 0.99


def evaluate(models: Sequence[ModelEntry], *, dataset: str = "wikitext2", split: str | None = None,
             seqlen: int = 2048, max_windows: int | None = None, device: str | torch.device = "auto",
             dtype: str | torch.dtype = "auto", batch_size: int | None = None, tokenizer=None,
             names: Sequence[str] | None = None, kl: bool = True, kl_dtype: str = "float16",
             tmp_dir: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Perplexity of each model, and KL / top-1 agreement against the first.

    Models are loaded, scored and freed one at a time, so peak memory is one
    model plus one batch of logits. The first model is the reference: its
    tokenizer cuts the windows for all, and its log-probs go to a temporary
    disk store (see `RefStore`, about tokens_scored x vocab x 2 bytes) that
    is deleted before returning, also on error.

    Args:
        models: each a hub id (`owner/name@REV`: at a branch, tag or commit) or local folder
            (fp; a checkpoint llmq reads, loaded by llmq.from_pretrained; or another quantized
            format transformers reads: loaded here and freed after scoring),
            an nn.Module (used as is, on `device`), or a zero-argument callable
            returning one (called when its turn comes, dropped after).
        dataset, split: text spec as for calibration (wikitext2, builtin, c4,
            pileval, hf:..., a local .txt/.jsonl/.json/.parquet file or folder;
            not `self`: a model scored on its own samples says nothing); named
            hub datasets default to their test/validation split.
        seqlen, max_windows: window length; keep only the first N windows.
        device: where the models run ("auto": CUDA when available).
        dtype: dtype to load paths in ("auto": as stored).
        batch_size: windows per forward pass (None: from seqlen and vocab).
        tokenizer: tokenizer object or source to use instead of the reference's.
        names: display names (default: the path, or model<i>).
        kl: compute KL divergence and top-1 agreement (needs the disk store).
        kl_dtype: "float16" (default) or "float32" storage of reference log-probs.
        tmp_dir: where the reference store goes (default: the system temp dir).
        progress: progress bars.

    Returns:
        {"protocol": {...}, "versions": {...}, "models": [{"model", "label",
        "perplexity", "nll", "kl_mean", "kl_p99", "top1_agreement",
        "tokens_scored", "windows", "size_bytes", "memory_bytes", "dtype",
        "reference"}, ...]}: the shape `llmq eval --json` writes.
    """
    if not models:
        raise LlmqError("give at least one model to evaluate")
    if kl_dtype not in STORE_DTYPES:
        raise LlmqError(f"kl_dtype must be one of {', '.join(STORE_DTYPES)}, not {kl_dtype!r}")
    if names is not None and len(names) != len(models):
        raise LlmqError(f"{len(names)} names for {len(models)} models")
    names = list(names) if names is not None else [_default_name(m, i) for i, m in enumerate(models)]
    device = resolve_device(device)
    if kl and len(models) > 1:
        check_store_dir(tmp_dir)  # before any model is loaded
    _check_configs(models, names, seqlen)
    text = eval_text(dataset, split)  # before any model: a missing dataset fails at once

    rows: list[dict] = []
    store: RefStore | None = None
    protocol: dict = {}
    windows = None
    ref_vocab = None
    try:
        for i, (entry, name) in enumerate(zip(models, names)):
            # Only the reference's tokenizer is used, and only when none is given.
            model, own_tokenizer = _materialise(entry, dtype, with_tokenizer=(i == 0 and tokenizer is None))
            try:
                check_positions(model.config, seqlen)  # a model built in memory, or a hub id
                if i == 0:
                    tok = _reference_tokenizer(tokenizer, own_tokenizer, name)
                    ref_vocab = vocab_size(model)
                    if len(tok) > ref_vocab:
                        raise LlmqError(f"the tokenizer has {len(tok)} tokens but {name} has {ref_vocab} logits: "
                                        "pass the model's own tokenizer")
                    bos = window_bos(tok)
                    stream = tokenize(tok, text)
                    windows = cut_windows(stream, seqlen, bos, max_windows)
                    bs = batch_size or auto_batch_size(seqlen, ref_vocab)
                    if kl and len(models) > 1:
                        store = RefStore(windows.shape[0], seqlen - 1, ref_vocab, dtype=kl_dtype, dir=tmp_dir)
                    protocol = _protocol(dataset, split, seqlen, max_windows, stream.numel(), windows, bos, tok,
                                         name, bs, device, store, kl_dtype if kl and len(models) > 1 else None)
                else:
                    vocab = vocab_size(model)
                    if vocab != ref_vocab:
                        raise LlmqError(f"{name} has a vocabulary of {vocab} but the reference {names[0]} has "
                                        f"{ref_vocab}: models compared must share the reference's tokenizer")
                model.to(device)
                stats = perplexity(model, windows, batch_size=bs, device=device,
                                   reference=store if i > 0 else None, record=store if i == 0 else None,
                                   progress=progress, desc=f"[{i + 1}/{len(models)}] {name}")
                rows.append(_row(name, entry, model, stats, reference=(i == 0), kl=store is not None))
                test_point("reference-scored" if i == 0 else "model-scored")
            finally:
                del model
                _free(device)
    finally:
        if store is not None:
            store.close()
    return {"protocol": protocol, "versions": versions(), "models": rows}


def _default_name(entry: ModelEntry, i: int) -> str:
    return os.fspath(entry) if isinstance(entry, (str, os.PathLike)) else f"model{i}"


def _materialise(entry: ModelEntry, dtype, with_tokenizer: bool = True):
    """(model, its tokenizer or None) for one entry of `models`."""
    if isinstance(entry, (str, os.PathLike)):
        return load_any(entry, dtype, with_tokenizer)
    if isinstance(entry, nn.Module):
        return entry, None
    if callable(entry):
        model = entry()
        if not isinstance(model, nn.Module):
            raise LlmqError(f"a model factory returned {type(model).__name__}, not a model")
        return model, None
    raise LlmqError(f"cannot evaluate a {type(entry).__name__}: pass a path, a hub id or a model")


def _reference_tokenizer(given, own, name: str):
    if given is not None:
        tok = load_tokenizer(*split_revision(given)) if isinstance(given, (str, os.PathLike)) else given
        if tok is None:
            raise LlmqError(f"no tokenizer could be loaded from {given}: pass a folder or hub id that has one")
        return tok
    if own is None:
        raise LlmqError(f"the reference model {name} has no tokenizer: save one into its folder "
                        "(tokenizer.save_pretrained(folder)) or pass --tokenizer SOURCE")
    return own


def _check_configs(models, names, seqlen: int) -> None:
    """Fail before loading anything when local config.json files disagree on vocab_size, or hold fewer
    positions than a window."""
    sizes = []
    for entry, name in zip(models, names):
        config = None
        if isinstance(entry, (str, os.PathLike)):
            source, revision = split_revision(entry)
            config = source_config(source, revision=revision)
        if config:
            check_positions(config, seqlen)
        if config and config.get("vocab_size"):
            sizes.append((name, config["vocab_size"]))
    for name, size in sizes[1:]:
        if size != sizes[0][1]:
            raise LlmqError(f"{name} has a vocabulary of {size} but {sizes[0][0]} has {sizes[0][1]}: "
                            "models compared must share the reference's tokenizer")


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _row(name, entry, model, stats, *, reference: bool, kl: bool) -> dict:
    floats = [p for p in model.parameters() if p.is_floating_point()]
    memory = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    row = {
        "model": name,
        "label": describe(model),
        "reference": reference,
        "perplexity": stats.perplexity,
        "nll": stats.nll,
        "tokens_scored": stats.tokens,
        "windows": stats.windows,
        "kl_mean": None,
        "kl_p99": None,
        "top1_agreement": None,
        "size_bytes": size_on_disk(entry) if isinstance(entry, (str, os.PathLike)) else None,
        "memory_bytes": memory,
        "dtype": str(floats[0].dtype).removeprefix("torch.") if floats else None,
    }
    if kl and reference:  # against itself, by definition
        row.update(kl_mean=0.0, kl_p99=0.0, top1_agreement=1.0)
    elif stats.kl is not None:
        row.update(kl_mean=stats.kl_mean, kl_p99=stats.kl_quantile(KL_QUANTILE), top1_agreement=stats.top1_agreement)
    return row


def _protocol(dataset, split, seqlen, max_windows, text_tokens, windows, bos, tok, ref_name, batch_size,
              device, store, kl_dtype) -> dict:
    n = windows.shape[0]
    span = text_span(seqlen, bos)
    return {
        "dataset": dataset,
        "split": eval_split(dataset, split),
        "text": "rows of a dataset (or files of a folder) joined with '\\n\\n'; tokenised once, no special tokens",
        "seqlen": seqlen,
        "windows": n,
        "windows_available": text_tokens // span,
        "max_windows": max_windows,
        "text_tokens": text_tokens,
        "tokens_scored": n * (seqlen - 1),
        "bos": bos is not None,
        "bos_rule": (f"each window is BOS ({bos}) + {seqlen - 1} text tokens (the tokenizer adds BOS)"
                     if bos is not None else f"no BOS: each window is {seqlen} text tokens "
                                             "(the tokenizer adds none)"),
        "windowing": "non-overlapping, consecutive, tail dropped; every token after the first of a window is scored",
        "perplexity": "exp(total NLL / tokens scored), log_softmax in fp32",
        "kl": (f"KL(reference || model) per scored token in nats, mean and p99; reference log-probs stored "
               f"in {kl_dtype} and renormalised" if kl_dtype else None),
        "kl_store_bytes": store.nbytes if store is not None else None,
        "reference": ref_name,
        "tokenizer": getattr(tok, "name_or_path", None),
        "batch_size": batch_size,
        "device": str(device),
    }


def versions() -> dict:
    import transformers


    return {"llmq": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}
