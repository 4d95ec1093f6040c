#!/usr/bin/env python
"""AWQ on the real offline model: quantization time and perplexity beside fp and RTN.

    python scripts/bench_awq.py [--quantize awq:4:64:asym ...] [--threads 2] [--json PATH]

Protocol (BENCHMARKS): SmolLM2-135M-Instruct (llmq.realmodel.smollm2_path(), fp32),
calibration on 128 windows of 512 tokens of emma.txt (seed 0), evaluation on the
first 40 windows of 512 tokens of prideprejudice.txt; all models scored on the
same windows by llmq.eval.evaluate, the fp model first (KL and top-1 against it).
Each --quantize is METHOD:BITS:GROUP:sym|asym; the time printed for it is the
whole llmq.quantize call (load, calibration text, every layer), in seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from llmq.errors import LlmqError

DEFAULT = ["rtn:4:64:asym", "awq:4:64:asym", "awq+gptq:4:64:asym", "rtn:4:-1:asym", "awq:4:-1:asym"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_awq.py")
    ap.add_argument("--quantize", action="append", default=None, metavar="SPEC",
                    help=f"METHOD:BITS:GROUP:sym|asym (repeatable; default {' '.join(DEFAULT)})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except LlmqError as e:
        print(f"bench_awq.py: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from llmq.eval import evaluate
    from llmq.pipeline import quantize
    from llmq.realmodel import smollm2_path, texts_dir
    from llmq.config import parse_config_spec

    torch.set_num_threads(args.threads)
    texts = texts_dir(near=__file__)
    if texts is None:
        raise LlmqError("the texts folder is missing: set LLMQ_TEXTS to the folder holding emma.txt")
    model_path = str(smollm2_path())
    calib = str(texts / "emma.txt")
    specs = args.quantize or DEFAULT
    seconds: dict[str, float] = {}

    def factory(spec):
        def make():
            config = parse_config_spec(spec)
            t = time.perf_counter()
            model = quantize(model_path, config, dataset=calib, device="cpu", dtype=torch.float32,
                             nsamples=args.nsamples, seqlen=args.seqlen, seed=0, progress=True)
            seconds[spec] = time.perf_counter() - t
            print(f"{spec}: quantized in {seconds[spec]:.1f} s", flush=True)
            return model
        return make

    result = evaluate([model_path] + [factory(s) for s in specs], dataset=str(texts / "prideprejudice.txt"),
                      seqlen=args.seqlen, max_windows=args.eval_windows, device="cpu", dtype=torch.float32,
                      names=["fp32"] + specs, progress=False)
    fp = result["models"][0]["perplexity"]
    rtn = {spec.split(":", 1)[1]: row["perplexity"] for spec, row in zip(specs, result["models"][1:])
           if spec.startswith("rtn:")}
    print(f"\ncalibration: {args.nsamples} x {args.seqlen} tokens of emma.txt; evaluation: first "
          f"{args.eval_windows} windows of {args.seqlen} tokens of prideprejudice.txt; "
          f"torch {torch.__version__}, {args.threads} threads")
    print(f"{'model':24s} {'ppl':>8s} {'gap closed':>10s} {'KL':>8s} {'top1':>6s} {'time s':>7s}")
    for name, row in zip(["fp32"] + specs, result["models"]):
        base = rtn.get(name.split(":", 1)[1]) if ":" in name else None
        closed = "" if base is None or name.startswith("rtn:") else f"{(base - row['perplexity']) / (base - fp):.0%}"
        kl = row.get("kl_mean")
        top1 = row.get("top1_agreement")
        print(f"{name:24s} {row['perplexity']:8.3f} {closed:>10s} {'' if kl is None else f'{kl:.4f}':>8s} "
              f"{'' if top1 is None else f'{top1:.3f}':>6s} {seconds.get(name, float('nan')):7.1f}")
    from llmq.memory import peak_host_memory

    result["peak_host_mib"] = round(peak_host_memory() / 2**20)  # max RSS of the whole run
    print(f"peak host memory (max RSS of the run): {result['peak_host_mib']} MiB")
    if args.json:
        result["quantize_seconds"] = seconds
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
