#!/usr/bin/env python
"""Would asymmetric static activations (a zero point) beat llmq's symmetric ones? A measurement.

    python scripts/w8a8_asym_probe.py [--model DIR] [--calib FILE] [--eval FILE] [--nsamples 32]
        [--seqlen 512] [--windows 40]

The dev model is quantized once the way `--scheme w8a8 --act static --smooth
auto` does it (int8 weights, SmoothQuant folded, symmetric per-tensor input
scales from the calibration min-max). Every linear's input minimum and maximum
are then recorded on the same calibration windows, and the same model is
scored on the same evaluation windows with its activations quantized three ways:

- symmetric: llmq's own W8A8Linear forward, s = max|x| / 127 (the reference row);
- asymmetric everywhere: s = (max - min) / 255, zero point z = -128 - round(min / s),
  q = clamp(round(x / s) + z, -128, 127), x' = (q - z) s;
- asymmetric on down_proj only (the input the per-kind diagnosis in BENCHMARKS.md
  found to dominate the static error), symmetric elsewhere.

The asymmetric rows are fake-quantized in fp32 (x' times the dequantized int8
weight): what an int8 kernel with a zero-point correction would compute, up
to fp32 rounding. Nothing here changes llmq; the numbers decide whether
asymmetric static activations are worth building.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import llmq
from llmq.data import calibration_windows, tokenize, wants_bos
from llmq.eval.metrics import perplexity
from llmq.eval.windows import cut_windows, eval_text
from llmq.modules.w8a8 import W8A8Linear
from llmq.realmodel import texts_dir

TEXTS = texts_dir() or Path("../shared/data/texts")


def input_ranges(model, windows) -> dict:
    """{W8A8Linear: (min, max)} of its input over the windows (one forward per window)."""
    ranges, handles = {}, []

    def record(module, args):
        x = args[0].detach()
        lo, hi = x.min().item(), x.max().item()
        old = ranges.get(module)
        ranges[module] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

    for m in model.modules():
        if isinstance(m, W8A8Linear):
            handles.append(m.register_forward_pre_hook(record))
    try:
        with torch.inference_mode():
            for row in windows:
                model(row[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return ranges


def asymmetric_forward(module: W8A8Linear, lo: float, hi: float):
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # the range holds zero, so zero is exact
    scale = max(hi - lo, 1e-12) / 255.0
    zero = -128 - round(lo / scale)
    weight = module.dequantize_weight()

    def forward(x):
        q = torch.clamp(torch.round(x.float() / scale) + zero, -128, 127)
        return F.linear((q - zero) * scale, weight, module.bias).to(x.dtype)

    return forward


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="fp32 model folder (default: python -m llmq.realmodel)")
    p.add_argument("--calib", default=str(TEXTS / "emma.txt"))
    p.add_argument("--eval", default=str(TEXTS / "prideprejudice.txt"))
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=40)
    args = p.parse_args(argv)
    if args.model is None:
        from llmq.realmodel import smollm2_path

        args.model = str(smollm2_path("float32"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    windows = cut_windows(tokenize(tok, eval_text(args.eval)), args.seqlen,
                          tok.bos_token_id if wants_bos(tok) else None, args.windows)
    calib = calibration_windows(tok, args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    print(f"model {args.model}; calibration {calib.shape[0]} x {calib.shape[1]} tokens of {Path(args.calib).name} "
          f"(seed 0); evaluation {Path(args.eval).name}: {windows.shape[0]} windows x {args.seqlen} tokens, "
          f"ppl = exp(mean NLL of every next-token prediction); torch threads {torch.get_num_threads()}", flush=True)
    fp = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ref = perplexity(fp, windows, progress=False).perplexity
    print(f"{'fp32':<34} ppl {ref:8.3f}", flush=True)
    del fp
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    model = llmq.quantize(model, llmq.QuantConfig(scheme="w8a8", act="static", smooth="auto"), dataset=calib,
                          progress=False)
    ranges = input_ranges(model, calib)
    print(f"quantized (--act static --smooth auto) and input ranges recorded in {time.perf_counter() - t0:.1f} s",
          flush=True)

    def score(name):
        ppl = perplexity(model, windows, progress=False).perplexity
        print(f"{name:<34} ppl {ppl:8.3f}  {100 * (ppl / ref - 1):+7.2f}%", flush=True)

    score("symmetric static (llmq)")
    for only_down in (False, True):
        for name, m in model.named_modules():
            if isinstance(m, W8A8Linear):
                m.__dict__.pop("forward", None)
                if not only_down or name.endswith("down_proj"):
                    m.forward = asymmetric_forward(m, *ranges[m])
        score("asymmetric static on down_proj only" if only_down else "asymmetric static everywhere")
    return 0


if __name__ == "__main__":
    sys.exit(main())
