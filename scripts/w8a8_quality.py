#!/usr/bin/env python
"""W8A8 quality on real weights and real text: fp32, W8A16 and W8A8 variants on identical windows.

    python scripts/w8a8_quality.py [--model DIR] [--calib FILE] [--eval FILE] [--nsamples 32]
        [--seqlen 512] [--seed 0] [--windows 40] [--variants NAME,NAME ...] [--diagnose] [--json PATH]

Defaults follow the dev-model protocol (REAL_DATA.md): SmolLM2-135M-Instruct in
fp32 (`python -m llmq.realmodel`), calibration 32 x 512 tokens of emma.txt
(windows drawn with --seed), evaluation on the first 40 non-overlapping
512-token windows of prideprejudice.txt. Every variant is quantized in memory
from the same fp32 model with llmq.quantize and scored on the same windows in
one run; each row prints as soon as it is done (perplexity, change against
fp32, quantize time).

--diagnose: which linears' static activation scales hurt most. The model is
quantized once with static per-tensor scales (min-max, no smoothing); then, for
each kind of linear (q/k/v, o, gate/up, down), only that kind keeps its static
scale and every other linear quantizes its activations per token.

--asymmetric: would asymmetric static activations (a zero point) beat llmq's
symmetric ones? The model is quantized once as `--act static --smooth auto`
does it, every linear's input minimum and maximum are recorded on the same
calibration windows, and the model is scored with its activations quantized
symmetrically (llmq's own forward, s = max|x| / 127), asymmetrically
everywhere (s = (max - min) / 255, zero point z = -128 - round(min / s),
x' = (clamp(round(x / s) + z, -128, 127) - z) s), and asymmetrically on
down_proj only. The asymmetric rows are fake-quantized in fp32 (x' times the
dequantized int8 weight): what an int8 kernel with a zero-point correction
would compute, up to fp32 rounding.
"""

from __future__ import annotations

import argparse
import copy
import json
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


# name -> QuantConfig arguments (None: the fp32 model itself).
VARIANTS = {
    "fp32": None,
    "w8a16": dict(method="rtn", bits=8, group_size=-1, sym=True),
    "dyn": dict(scheme="w8a8", smooth="off"),
    "dyn-sq0.5": dict(scheme="w8a8", smooth=0.5),
    "dyn-auto": dict(scheme="w8a8", smooth="auto"),
    "dyn-auto-gptq": dict(scheme="w8a8", smooth="auto", method="gptq"),
    "dyn-gptq": dict(scheme="w8a8", smooth="off", method="gptq"),
    "static": dict(scheme="w8a8", act="static", smooth="off"),
    "static-sq0.5": dict(scheme="w8a8", act="static", smooth=0.5),
    "static-auto": dict(scheme="w8a8", act="static", smooth="auto"),
    "static-auto-pct": dict(scheme="w8a8", act="static", smooth="auto", act_observer="percentile"),
    "static-auto-mse": dict(scheme="w8a8", act="static", smooth="auto", act_observer="mse"),
    "static-auto-gptq": dict(scheme="w8a8", act="static", smooth="auto", method="gptq"),
    "static-auto-mse-gptq": dict(scheme="w8a8", act="static", smooth="auto", act_observer="mse", method="gptq"),
}
DEFAULT = ["fp32", "w8a16", "dyn", "dyn-sq0.5", "dyn-auto", "dyn-auto-gptq", "static", "static-sq0.5",
           "static-auto", "static-auto-pct", "static-auto-mse", "static-auto-gptq", "static-auto-mse-gptq"]
KINDS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate/up": ("gate_proj", "up_proj"),
         "down": ("down_proj",)}


def load_fp32(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


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
    """A forward quantizing the input with a zero point over [lo, hi] (fake-quantized in fp32)."""
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
    p.add_argument("--seed", type=int, default=0, help="draws the calibration windows")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--variants", default=",".join(DEFAULT), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--diagnose", action="store_true", help="per-kind static activation sensitivity")
    p.add_argument("--asymmetric", action="store_true", help="asymmetric static activations against symmetric")
    p.add_argument("--json", default=None)
    p.add_argument("--fp-ppl", type=float, default=None,
                   help="skip scoring fp32 and compare against this fp32 perplexity (from an earlier run of "
                        "the same protocol), to split the variants over several processes")
    p.add_argument("--diagnose-windows", type=int, default=None, help="windows for --diagnose (default: all)")
    args = p.parse_args(argv)
    if args.model is None:
        from llmq.realmodel import smollm2_path

        args.model = str(smollm2_path("float32"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    stream = tokenize(tok, eval_text(args.eval))
    windows = cut_windows(stream, args.seqlen, tok.bos_token_id if wants_bos(tok) else None, args.windows)
    print(f"model {args.model}; calibration {args.nsamples} x {args.seqlen} tokens of {Path(args.calib).name} "
          f"(seed {args.seed}); evaluation {Path(args.eval).name}: {windows.shape[0]} windows x {args.seqlen} tokens, "
          f"ppl = exp(mean NLL of every next-token prediction); torch threads {torch.get_num_threads()}",
          flush=True)
    rows = []
    ref = None

    def score(name, model, seconds, on=None):
        nonlocal ref
        stats = perplexity(model, windows if on is None else on, progress=False)
        ppl = stats.perplexity
        ref = ppl if ref is None else ref
        rows.append(dict(variant=name, perplexity=ppl, vs_fp=ppl / ref - 1, quantize_seconds=seconds))
        print(f"{name:<24} ppl {ppl:8.3f}  {100 * (ppl / ref - 1):+7.2f}%  (quantize {seconds:6.1f} s)", flush=True)

    names = [v for v in args.variants.split(",") if v]
    if "fp32" in names:
        names.remove("fp32")
    if args.fp_ppl is None:
        names.insert(0, "fp32")  # the reference first
    else:
        ref = args.fp_ppl
        print(f"fp32 perplexity given: {ref}", flush=True)
    for name in names:
        if name not in VARIANTS:
            print(f"unknown variant {name!r}", file=sys.stderr)
            return 2
        model = load_fp32(args.model)
        t0 = time.perf_counter()
        if VARIANTS[name] is not None:
            model = llmq.quantize(model, llmq.QuantConfig(**VARIANTS[name]), dataset=args.calib, tokenizer=tok,
                                  nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, progress=False)
        score(name, model, time.perf_counter() - t0)
        del model
    if args.diagnose:
        base = llmq.quantize(load_fp32(args.model), llmq.QuantConfig(scheme="w8a8", act="static", smooth="off"),
                             dataset=args.calib, tokenizer=tok, nsamples=args.nsamples, seqlen=args.seqlen,
                             seed=args.seed, progress=False)
        few = windows if args.diagnose_windows is None else windows[: args.diagnose_windows]
        if args.diagnose_windows is not None:
            fp = perplexity(load_fp32(args.model), few, progress=False).perplexity
            print(f"diagnosis on the first {few.shape[0]} windows: fp32 ppl {fp:.3f}", flush=True)
            ref = fp
            score("static everywhere", base, 0.0, few)
        for kind, suffixes in KINDS.items():
            model = copy.deepcopy(base)
            for n, m in model.named_modules():
                if isinstance(m, W8A8Linear) and not n.endswith(suffixes):
                    m.input_scale = None  # per-token for every other linear
            score(f"static only on {kind}", model, 0.0, few)
    if args.asymmetric:
        calib = calibration_windows(tok, args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
        model = llmq.quantize(load_fp32(args.model), llmq.QuantConfig(scheme="w8a8", act="static", smooth="auto"),
                              dataset=calib, progress=False)
        ranges = input_ranges(model, calib)
        score("symmetric static (llmq)", model, 0.0)
        for only_down in (False, True):
            for n, m in model.named_modules():
                if isinstance(m, W8A8Linear):
                    m.__dict__.pop("forward", None)
                    if not only_down or n.endswith("down_proj"):
                        m.forward = asymmetric_forward(m, *ranges[m])
            score("asymmetric on down_proj" if only_down else "asymmetric everywhere", model, 0.0)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(model=args.model, windows=windows.shape[0], seqlen=args.seqlen,
                                                   rows=rows), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
