#!/usr/bin/env python
"""Mixture-of-experts on real weights: perplexity, tokens per expert, time, memory, CPU decode speed.

    python scripts/bench_moe.py [--model DIR] [--quantize gptq:4:64:asym:routed ...] [--nsamples 128]
        [--threads 2] [--decode-tokens 32] [--dense-baseline] [--json PATH]

The model: a Mixtral built offline from SmolLM2-135M-Instruct by
/work/shared/tools/upcycle_moe.py (8 experts, top-2, every expert the layer's
dense MLP plus 2% gaussian noise, random router, seed 0); built into
~/.cache/llmq/smollm2-moe-8x2 when --model is not given and it is missing.

Protocol (BENCHMARKS): calibration on --nsamples windows of 512 tokens of
emma.txt (seed 0), evaluation on the first --eval-windows (40) windows of 512
tokens of prideprejudice.txt; every model scored on the same windows by
llmq.eval.metrics.perplexity, in one run, each as soon as it is quantized.
Each --quantize is METHOD:BITS:GROUP:sym|asym:routed|all, or
w8a8:dynamic|static:off|auto|ALPHA:rtn|gptq:routed|all for int8 weights and
activations (--scheme w8a8 --act --smooth --method); the time printed is
the whole llmq.quantize call, wall and CPU (all threads of the process: on a
shared machine the CPU time is the steadier figure). --dense-baseline first
times GPTQ int4 g64 asym of the dense SmolLM2 the MoE was built from, with the
same calibration, in the same process, for the MoE/dense time ratio. Tokens per expert and the experts that fell
back are printed per layer. Decode speed: greedy generation of --decode-tokens
tokens after a 16-token prompt, batch 1, fp32 MoE against the first int4 model
and the first W8A8 model, best of 3. --json is rewritten after each model.
"""

from __future__ import annotations

import argparse
import copy
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
    if len(parts) == 5 and parts[0] == "w8a8":
        _, act, smooth, method, mode = parts
        smooth = smooth if smooth in ("off", "auto") else float(smooth)
        return QuantConfig(scheme="w8a8", act=act, smooth=smooth, method=method, moe_calibration=mode)
    if len(parts) != 5 or parts[3] not in ("sym", "asym"):
        raise LlmqError(f"bad --quantize {spec!r}: write METHOD:BITS:GROUP:sym|asym:routed|all or "
                        "w8a8:dynamic|static:off|auto|ALPHA:rtn|gptq:routed|all")
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


def dense_baseline(calib: str, nsamples: int, seqlen: int) -> dict:
    """Wall and CPU seconds of GPTQ int4 g64 asym on the dense model the MoE was upcycled from."""
    from llmq.loading import load_model
    from llmq.pipeline import quantize
    from llmq.realmodel import smollm2_path

    model, tokenizer = load_model(smollm2_path(), dtype=torch.float32)
    config = QuantConfig(method="gptq", bits=4, group_size=64, sym=False)
    t, cpu = time.perf_counter(), time.process_time()
    quantize(model.eval(), config, dataset=calib, tokenizer=tokenizer, device="cpu",
             nsamples=nsamples, seqlen=seqlen, seed=0, progress=False)
    return {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - cpu}


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
    ap.add_argument("--dense-baseline", action="store_true",
                    help="time GPTQ int4 g64 asym of the dense model first (same calibration)")
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
    from llmq.eval.metrics import perplexity
    from llmq.eval.windows import eval_text, eval_windows
    from llmq.pipeline import quantize
    from llmq.realmodel import texts_dir

    torch.set_num_threads(args.threads)
    texts = texts_dir()
    if texts is None:
        raise LlmqError("the texts folder is missing: set LLMQ_TEXTS to the folder holding emma.txt")
    model_path = moe_model(args.model)
    calib = str(texts / "emma.txt")
    specs = args.quantize or DEFAULT
    tok = AutoTokenizer.from_pretrained(model_path)
    windows = eval_windows(tok, eval_text(str(texts / "prideprejudice.txt")), args.seqlen, args.eval_windows)
    print(f"model {model_path}; calibration: {args.nsamples} x {args.seqlen} tokens of emma.txt (seed 0); "
          f"evaluation: first {windows.shape[0]} windows of {args.seqlen} tokens of prideprejudice.txt; "
          f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs", flush=True)
    # Each model is scored as soon as it exists, so a long run reports as it goes.
    fp_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    t = time.perf_counter()
    fp = perplexity(fp_model, windows).perplexity
    rows: dict[str, dict] = {"fp32": {"perplexity": fp, "eval_seconds": time.perf_counter() - t}}
    print(f"fp32: perplexity {fp:.3f}", flush=True)
    speed = {}
    if args.decode_tokens:
        speed["fp32"] = decode_tokens_per_s(fp_model, tok, args.decode_tokens)
        print(f"fp32: CPU decode {speed['fp32']:.2f} tok/s", flush=True)
    if args.dense_baseline:
        rows["dense gptq:4:64:asym"] = dense_baseline(calib, args.nsamples, args.seqlen)
        print(f"dense gptq:4:64:asym: quantized in {rows['dense gptq:4:64:asym']['seconds']:.1f} s "
              f"({rows['dense gptq:4:64:asym']['cpu_seconds']:.1f} CPU s)", flush=True)
    rtn: dict[str, float] = {}
    for spec in specs:
        config = parse(spec)
        report: dict = {}
        t = time.perf_counter()
        # A copy of the loaded model (loading converts per-expert tensors: minutes on a busy machine);
        # the time is llmq.quantize's alone, as in the dense model's benchmark.
        model = copy.deepcopy(fp_model)
        t, cpu = time.perf_counter(), time.process_time()
        model = quantize(model, config, dataset=calib, tokenizer=tok, device="cpu", nsamples=args.nsamples,
                         seqlen=args.seqlen, seed=0, progress=False, report=report)
        seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - cpu
        c = model_census(model, config.bits)
        ppl = perplexity(model, windows).perplexity
        key = spec.split(":", 1)[1].rsplit(":", 1)[0]
        if config.method == "rtn":
            rtn[key] = ppl
        base = rtn.get(key)
        closed = None if base is None or config.method == "rtn" else (base - ppl) / (base - fp)
        rows[spec] = {"perplexity": ppl, "gap_closed": closed, "seconds": seconds, "cpu_seconds": cpu_seconds,
                      "peak_rss_mib": peak_rss_mib(),
                      "experts": report.get("experts", []), "expert_linears": c.expert_linears,
                      "linears": c.linears, "kept": c.kept, "other_kept": c.other}
        print(f"{spec}: perplexity {ppl:.3f} ({ppl / fp - 1:+.2%} vs fp32)"
              + ("" if closed is None else f", closes {closed:.0%} of RTN's gap")
              + f"; quantized in {seconds:.1f} s ({cpu_seconds:.1f} CPU s); peak RSS so far {peak_rss_mib():.0f} MiB", flush=True)
        for line in c.lines() + report.get("experts", []):
            print("  " + line, flush=True)
        kind = "w8a8" if config.quantizes_activations else f"int{config.bits}"
        if args.decode_tokens and kind in ("int4", "w8a8") and kind not in speed:
            speed[kind] = decode_tokens_per_s(model, tok, args.decode_tokens)
            print(f"{spec}: CPU decode {speed[kind]:.2f} tok/s ({speed[kind] / speed['fp32']:.2f}x fp32)",
                  flush=True)
        del model
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": rows, "decode_tokens_per_s": speed}, f, indent=2, default=str)
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
