#!/usr/bin/env python
"""Mixture-of-experts on real weights: perplexity, tokens per expert, time, memory, CPU decode speed.

    python scripts/bench_moe.py [--model DIR] [--quantize gptq:4:64:asym:routed ...] [--nsamples 128]
        [--threads 2] [--decode-tokens 32] [--json PATH]

The model: a Mixtral built offline from SmolLM2-135M-Instruct by
/work/shared/tools/upcycle_moe.py (8 experts, top-2, every expert the layer's
dense MLP plus 2% gaussian noise, random router, seed 0); built into
~/.cache/llmq/smollm2-moe-8x2 when --model is not given and it is missing.

Protocol (BENCHMARKS): calibration on --nsamples windows of 512 tokens of
emma.txt (seed 0), evaluation on the first 40 windows of 512 tokens of
prideprejudice.txt; every model scored on the same windows by
llmq.eval.evaluate, the fp model first (KL and top-1 against it).
Each --quantize is METHOD:BITS:GROUP:sym|asym:routed|all; the time printed is
the whole llmq.quantize call. Tokens per expert and the experts that fell
back to round-to-nearest are printed per layer. Decode speed: greedy
generation of --decode-tokens tokens after a 16-token prompt, batch 1, fp32
MoE against the first int4 model, best of 3.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from llmq.config import QuantConfig
from llmq.errors import LlmqError

DEFAULT = ["rtn:4:64:asym:routed", "gptq:4:64:asym:routed", "gptq:4:64:asym:all"]
UPCYCLE = Path("/work/shared/tools/upcycle_moe.py")


def parse(spec: str) -> QuantConfig:
    parts = spec.split(":")
    if len(parts) != 5 or parts[3] not in ("sym", "asym"):
        raise LlmqError(f"bad --quantize {spec!r}: write METHOD:BITS:GROUP:sym|asym:routed|all")
    return QuantConfig(method=parts[0], bits=int(parts[1]), group_size=int(parts[2]), sym=parts[3] == "sym",
                       moe_calibration=parts[4])


def moe_model(path: str | None) -> str:
    if path:
        return path
    from llmq.realmodel import smollm2_path

    out = Path.home() / ".cache" / "llmq" / "smollm2-moe-8x2"
    if not (out / "config.json").is_file():
        subprocess.run([sys.executable, str(UPCYCLE), str(smollm2_path()), str(out), "--seed", "0"], check=True)
    return str(out)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def decode_tokens_per_s(model, tokenizer, n: int) -> float:
    ids = tokenizer("It is a truth universally acknowledged, that a single man in possession",
                    return_tensors="pt").input_ids[:, :16]
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        dt = time.perf_counter() - t
        best = max(best, (out.shape[1] - ids.shape[1]) / dt)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_moe.py")
    ap.add_argument("--model", default=None)
    ap.add_argument("--quantize", action="append", default=None, metavar="SPEC")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--decode-tokens", type=int, default=32, help="0: skip the decode measurement")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except LlmqError as e:
        print(f"bench_moe.py: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmq.census import model_census
    from llmq.eval import evaluate
    from llmq.pipeline import quantize
    from llmq.realmodel import texts_dir

    torch.set_num_threads(args.threads)
    texts = texts_dir()
    if texts is None:
        raise LlmqError("the texts folder is missing: set LLMQ_TEXTS to the folder holding emma.txt")
    model_path = moe_model(args.model)
    calib = str(texts / "emma.txt")
    specs = args.quantize or DEFAULT
    rows: dict[str, dict] = {}
    kept: dict[str, torch.nn.Module] = {}

    def factory(spec):
        def make():
            config = parse(spec)
            report: dict = {}
            t = time.perf_counter()
            model = quantize(model_path, config, dataset=calib, device="cpu", dtype=torch.float32,
                             nsamples=args.nsamples, seqlen=args.seqlen, seed=0, progress=False, report=report)
            seconds = time.perf_counter() - t
            c = model_census(model, config.bits)
            rows[spec] = {"seconds": seconds, "peak_rss_mib": peak_rss_mib(), "experts": report.get("experts", []),
                          "expert_linears": c.expert_linears, "linears": c.linears, "kept": c.kept,
                          "other_kept": c.other}
            print(f"{spec}: quantized in {seconds:.1f} s, peak RSS so far {peak_rss_mib():.0f} MiB; "
                  + "; ".join(c.lines()), flush=True)
            for line in report.get("experts", []):
                print("  " + line, flush=True)
            if args.decode_tokens and config.bits == 4 and "int4" not in kept:
                kept["int4"] = model
            return model
        return make

    result = evaluate([model_path] + [factory(s) for s in specs], dataset=str(texts / "prideprejudice.txt"),
                      seqlen=args.seqlen, max_windows=args.eval_windows, device="cpu", dtype=torch.float32,
                      names=["fp32"] + specs, progress=False)
    fp = result["models"][0]["perplexity"]
    rtn = {spec.split(":", 1)[1].rsplit(":", 1)[0]: row["perplexity"]
           for spec, row in zip(specs, result["models"][1:]) if spec.startswith("rtn:")}
    print(f"\nmodel {model_path}; calibration: {args.nsamples} x {args.seqlen} tokens of emma.txt (seed 0); "
          f"evaluation: first {args.eval_windows} windows of {args.seqlen} tokens of prideprejudice.txt; "
          f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs")
    print(f"{'model':26s} {'ppl':>8s} {'gap closed':>10s} {'KL':>8s} {'top1':>6s} {'time s':>7s}")
    for name, row in zip(["fp32"] + specs, result["models"]):
        key = name.split(":", 1)[1].rsplit(":", 1)[0] if ":" in name else None
        base = rtn.get(key)
        closed = "" if base is None or name.startswith("rtn:") else f"{(base - row['perplexity']) / (base - fp):.0%}"
        kl, top1 = row.get("kl_mean"), row.get("top1_agreement")
        secs = rows.get(name, {}).get("seconds", float("nan"))
        print(f"{name:26s} {row['perplexity']:8.3f} {closed:>10s} {'' if kl is None else f'{kl:.4f}':>8s} "
              f"{'' if top1 is None else f'{top1:.3f}':>6s} {secs:7.1f}")
    speed = {}
    if args.decode_tokens and "int4" in kept:
        tok = AutoTokenizer.from_pretrained(model_path)
        fp_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        speed["fp32"] = decode_tokens_per_s(fp_model, tok, args.decode_tokens)
        del fp_model
        speed["int4"] = decode_tokens_per_s(kept["int4"], tok, args.decode_tokens)
        print(f"CPU decode, batch 1, {args.decode_tokens} new tokens, best of 3: fp32 {speed['fp32']:.2f} tok/s, "
              f"int4 {speed['int4']:.2f} tok/s ({speed['int4'] / speed['fp32']:.2f}x)")
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    if args.json:
        result.update(quantize=rows, decode_tokens_per_s=speed, peak_rss_mib=peak_rss_mib())
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
