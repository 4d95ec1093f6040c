#!/usr/bin/env python
"""Where quantization time and memory go, on the real offline model by default.

    python scripts/bench_quantize.py [--model PATH] [--method gptq] [--bits 4] [--group-size 64] [--asym]
        [--act-order] [--calib TEXT] [--nsamples 128] [--seqlen 512] [--device cpu] [--threads N]

Reports wall time split into calibration data (tokenising, drawing windows),
Hessian accumulation, GPTQ solves, and the rest of the layer loop (the
calibration forward passes, module swaps, transfers), every phase the method
times (`phases_s`; AWQ: statistics, scale search, clip search, quantization),
plus peak host memory (max RSS). Defaults: SmolLM2-135M (llmq.realmodel), 128 windows of 512 tokens
of emma.txt, the protocol of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import llmq
from llmq.loading import load_model
from llmq.memory import peak_host_memory
from llmq.realmodel import smollm2_path, texts_dir


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="fp model folder (default: the real offline SmolLM2)")
    p.add_argument("--method", default="gptq")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--asym", action="store_true")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ act-order (default: on for gptq, as in QuantConfig)")
    p.add_argument("--calib", default=None, help="calibration spec (default: emma.txt)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    calib = args.calib or str(texts_dir(near=__file__) / "emma.txt")
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model or smollm2_path())
    load_s = time.perf_counter() - t0
    config = llmq.QuantConfig(method=args.method, bits=args.bits, group_size=args.group_size, sym=not args.asym,
                              desc_act=args.act_order)
    report: dict = {}
    llmq.quantize(model, config, dataset=calib, tokenizer=tokenizer, device=args.device, nsamples=args.nsamples,
                  seqlen=args.seqlen, progress=False, report=report)
    layers = report.get("layers", report["total"])
    forward = layers - report.get("hessian", 0.0) - report.get("solve", 0.0)
    result = {
        "method": args.method, "bits": args.bits, "group_size": args.group_size, "sym": not args.asym,
        "act_order": config.desc_act, "clip_search": config.clip_search, "calibration": f"{calib}, {args.nsamples} x {args.seqlen}",
        "model_load_s": round(load_s, 1), "total_s": round(report["total"], 1),
        "calibration_data_s": round(report.get("calibration_data", 0.0), 1),
        "forward_and_rest_s": round(forward, 1), "hessian_s": round(report.get("hessian", 0.0), 1),
        "solve_s": round(report.get("solve", 0.0), 1),
        # Every phase the method times (GPTQ: hessian, solve; AWQ: stats, scales, clip, quantize; ...).
        "phases_s": {k: round(v, 1) for k, v in report.items() if isinstance(v, float) and k != "total"},
        "peak_rss_mib": round(peak_host_memory() / 2**20),
        "threads": torch.get_num_threads(), "device": args.device, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
