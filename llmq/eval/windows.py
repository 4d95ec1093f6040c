"""Evaluation text -> fixed token windows (the GPTQ perplexity protocol)."""

from __future__ import annotations

import torch

from ..data import load_text, start_with_bos, text_span, tokenize, window_bos
from ..errors import LlmqError

# Hub datasets are evaluated on their test split (GPTQ protocol: WikiText-2 raw test).
_HUB_EVAL_SPLIT = {"wikitext2": "test", "c4": "validation", "pileval": "validation"}


def eval_split(spec: str, split: str | None = None) -> str | None:
    """The split a spec is evaluated on: `split` if given, else the test split of
    a named hub dataset; None for local files (they have no splits)."""
    if split is not None:
        return split
    if spec in _HUB_EVAL_SPLIT:
        return _HUB_EVAL_SPLIT[spec]
    if spec.startswith("hf:"):
        return None  # the spec names its own split (default train)
    return None


def eval_text(spec: str, split: str | None = None) -> str:
    """The raw evaluation text of a dataset spec (rows joined with "\\n\\n"); `self` is refused."""
    return load_text(spec, split=eval_split(spec, split), evaluation=True)


def eval_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping token windows of `text`, GPTQ protocol.

    The text is tokenised once, without special tokens, and cut into
    consecutive windows; the incomplete tail is dropped. When
    `wants_bos(tokenizer)` every window is BOS followed by seqlen - 1 text
    tokens, otherwise seqlen text tokens. Either way seqlen - 1 tokens of
    each window are scored (every token after the first).

    Args:
        tokenizer: the reference model's tokenizer.
        text: the whole evaluation text.
        seqlen: tokens per window (>= 2).
        max_windows: keep only the first N windows (None: all).

    Returns:
        LongTensor [n_windows, seqlen] on the CPU.
    """
    return cut_windows(tokenize(tokenizer, text), seqlen, window_bos(tokenizer), max_windows)


def cut_windows(stream: torch.Tensor, seqlen: int, bos: int | None, max_windows: int | None = None) -> torch.Tensor:
    """Cut a token stream [T] into windows [n, seqlen] (see `eval_windows`);
    `bos` is the BOS id to put first in each window, or None."""
    if seqlen < 2:
        raise LlmqError(f"seqlen must be at least 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise LlmqError(f"max_windows must be at least 1, got {max_windows}")
    span = text_span(seqlen, bos)
    n = stream.numel() // span
    if n == 0:
        raise LlmqError(f"the text has {stream.numel()} tokens, fewer than one window of {seqlen}: "
                        "give more text or lower --seqlen")
    if max_windows is not None:
        n = min(n, max_windows)
    return start_with_bos(stream[: n * span].view(n, span), bos)
