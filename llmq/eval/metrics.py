"""Scoring one model on token windows: NLL, and KL / top-1 against a reference."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .refstore import RefStore

# Positions per chunk when turning logits into log-probs: bounds the fp32
# temporaries to chunk x vocab (512 x 128k x 4 B = 256 MB) whatever seqlen is.
CHUNK = 512
# Auto batch size keeps one batch of fp32 logits under this many bytes.
LOGITS_BUDGET = 1 << 30
MAX_AUTO_BATCH = 8


@dataclass
class Stats:
    """What scoring a model on windows gives.

    nll: total negative log-likelihood in nats over the scored tokens (float64 sum).
    tokens: scored tokens (windows x (seqlen - 1)).
    kl: per-token KL(reference || model) in nats, float64 [tokens], when a
        reference was given (else None).
    top1_agreement: fraction of scored positions where the model's most likely
        next token is the reference's (None without a reference).
    """

    nll: float
    tokens: int
    windows: int
    kl: torch.Tensor | None = field(default=None, repr=False)
    top1_agreement: float | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def kl_mean(self) -> float | None:
        return None if self.kl is None else float(self.kl.mean())

    def kl_quantile(self, q: float) -> float | None:
        """The q-quantile (0..1) of the per-token KL, linear interpolation."""
        if self.kl is None:
            return None
        import numpy as np

        return float(np.quantile(self.kl.numpy(), q))


def vocab_size(model: nn.Module) -> int:
    """Width of the model's logits (output embedding rows, else config.vocab_size)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2 and weight.device.type != "meta":
        return weight.shape[0]
    out_features = getattr(head, "out_features", None)
    if out_features is not None:
        return int(out_features)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.vocab_size)


def auto_batch_size(seqlen: int, vocab: int) -> int:
    """Windows per forward pass: as many as keep the fp32 logits under
    LOGITS_BUDGET, between 1 and MAX_AUTO_BATCH."""
    return max(1, min(MAX_AUTO_BATCH, LOGITS_BUDGET // (seqlen * vocab * 4)))


def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int | None = None, device=None,
               reference: RefStore | None = None, record: RefStore | None = None,
               progress: bool = False, desc: str | None = None) -> Stats:
    """Score `model` on `windows` (GPTQ protocol: every token after the first of a window).

    Args:
        model: a causal LM returning `.logits` [B, T, vocab].
        windows: LongTensor [n, seqlen] (see `eval_windows`).
        batch_size: windows per forward pass (None: `auto_batch_size`).
        device: where the windows go (default: the model's device). The model
            is not moved.
        reference: a store holding another model's log-probs on the same
            windows; per-token KL(reference || model) and top-1 agreement are
            computed against it.
        record: a store to write this model's log-probs into (to serve as the
            reference of later models).
        progress: show a progress bar over windows; desc labels it.

    Returns:
        Stats. Logits are taken to fp32 before log_softmax, sums are float64.
    """
    n, seqlen = windows.shape
    device = torch.device(device) if device is not None else next(model.parameters()).device
    vocab = vocab_size(model)
    batch_size = batch_size or auto_batch_size(seqlen, vocab)
    for store in (reference, record):
        if store is not None and store.shape != (n, seqlen - 1, vocab):
            raise ValueError(f"store shape {store.shape} does not fit {n} windows of {seqlen} at vocab {vocab}")
    nll = 0.0
    kls, agree = [], 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=n, desc=desc, unit="win", disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            for first in range(0, n, batch_size):
                ids = windows[first:first + batch_size].to(device)
                logits = model(input_ids=ids, use_cache=False).logits
                for b in range(ids.shape[0]):
                    w = first + b
                    for start in range(0, seqlen - 1, CHUNK):
                        stop = min(start + CHUNK, seqlen - 1)
                        # Position t predicts token t + 1.
                        logp = torch.log_softmax(logits[b, start:stop].float(), dim=-1)
                        target = ids[b, start + 1:stop + 1]
                        nll -= logp.gather(-1, target[:, None]).double().sum().item()
                        if record is not None:
                            record.write(w, start, logp)
                        if reference is not None:
                            ref = reference.read(w, start, stop, device)
                            # p log(p/q), with 0 where p == 0 (also for q == 0 there).
                            term = torch.where(ref > -math.inf, ref.exp() * (ref - logp), 0.0)
                            kls.append(term.double().sum(-1).cpu())
                            agree += int((logp.argmax(-1).cpu() == reference.top1[w, start:stop]).sum())
                del logits
                bar.update(ids.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    tokens = n * (seqlen - 1)
    if reference is None:
        return Stats(nll=nll, tokens=tokens, windows=n)
    return Stats(nll=nll, tokens=tokens, windows=n, kl=torch.cat(kls), top1_agreement=agree / tokens)
