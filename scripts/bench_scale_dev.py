"""GPTQ (or AWQ, or W8A8) of the dev model in memory, streamed layer by layer, and by 2 torch.distributed ranks (gloo).

Each run is `llmq quantize` in its own process (wall time, CPU time and peak
resident memory of the process tree, from wait4); the checkpoints are then
compared tensor by tensor (streamed against in memory: bit for bit expected;
2 ranks against 1: the fraction of identical 4-bit codes) and scored by
`llmq eval` on identical windows, the fp model first.

usage: LLMQ_TEXTS=../shared/data/texts python scripts/bench_scale_dev.py [--model DIR] [--work DIR]
           [--method gptq|awq|awq+gptq] [--bits 4] [--group-size 64] [--nsamples 128] [--seqlen 512]
           [--eval-windows 40] [--runs memory stream ranks2] [--w8a8 dynamic|static] [--json PATH]

--method picks the weight-only method (asymmetric); --w8a8 ACT quantizes
`--scheme w8a8 --act ACT --smooth auto --method gptq` instead (--method,
--bits and --group-size then do not apply).

--runs picks the runs (all three by default; the in-memory run is always
made, the reference of the comparisons).

The model defaults to the cached SmolLM2 (`python -m llmq.realmodel`); the
calibration text is emma.txt, the evaluation text prideprejudice.txt, both
from $LLMQ_TEXTS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from llmq.formats.convert import read_checkpoint
from llmq.kernels.layout import unpack_rows
from llmq.realmodel import smollm2_path, texts_dir


def timed(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run cmd; wall seconds, CPU seconds and peak RSS (MiB, the largest process of its tree)."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log}")
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def compare(a: Path, b: Path, bits: int) -> dict:
    """Tensor-by-tensor comparison of two checkpoints: identical tensors, and identical codes."""
    ta, tb = read_checkpoint(a).tensors, read_checkpoint(b).tensors
    if set(ta) != set(tb):
        return {"same_names": False}
    identical = sum(torch.equal(ta[k], tb[k]) for k in ta)
    codes_equal = codes_total = 0
    for k in ta:
        if k.endswith(".qweight") or ta[k].dtype == torch.int8:  # weight-only packed codes, or W8A8's
            ca, cb = (unpack_rows(ta[k], bits), unpack_rows(tb[k], bits)) if k.endswith(".qweight") else (ta[k], tb[k])
            codes_equal += int((ca == cb).sum())
            codes_total += ca.numel()
    return {"same_names": True, "tensors": len(ta), "identical_tensors": identical,
            "codes_identical": codes_equal / max(codes_total, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--work", default="/tmp/llmq-bench-scale")
    p.add_argument("--method", choices=["gptq", "awq", "awq+gptq"], default="gptq")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--runs", nargs="+", choices=["memory", "stream", "ranks2"], default=["memory", "stream", "ranks2"])
    p.add_argument("--w8a8", choices=["dynamic", "static"], default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    texts = texts_dir(near=__file__)
    if texts is None:
        raise SystemExit("the offline texts were not found: set LLMQ_TEXTS to the folder holding emma.txt")
    model = args.model or str(smollm2_path())
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    scheme = (["--scheme", "w8a8", "--act", args.w8a8, "--smooth", "auto", "--method", "gptq"] if args.w8a8 else
              ["--method", args.method, "--bits", str(args.bits), "--group-size", str(args.group_size), "--asym"])
    common = [model, *scheme, "--dataset", str(Path(texts) / "emma.txt"), "--nsamples", str(args.nsamples),
              "--seqlen", str(args.seqlen), "--seed", "0", "--quiet"]
    llmq = [sys.executable, "-m", "llmq", "quantize"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "llmq", "quantize"]
    every = {
        "memory": ("in memory", llmq + [common[0], str(work / "mem")] + common[1:] + ["--no-stream"]),
        "stream": ("streamed", llmq + [common[0], str(work / "stream")] + common[1:] + ["--stream"]),
        "ranks2": ("2 gloo ranks", torchrun + [common[0], str(work / "ranks2")] + common[1:] + ["--no-stream"]),
    }
    runs = dict(every[key] for key in every if key == "memory" or key in args.runs)
    what = (f"W8A8 {args.w8a8}, --smooth auto --method gptq" if args.w8a8 else
            f"{args.method.upper()} int{args.bits} g{args.group_size} asym")
    print(f"model {model}; {what}, calibration {args.nsamples} x "
          f"{args.seqlen} tokens of emma.txt (seed 0); evaluation: first {args.eval_windows} windows of "
          f"{args.seqlen} tokens of prideprejudice.txt; torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}", flush=True)
    results = {}
    for name, cmd in runs.items():
        results[name] = timed(cmd, work / f"{name.replace(' ', '_')}.log")
        print(f"{name}: {results[name]}", flush=True)
    outputs = [work / "mem"]
    for key, name, folder in (("stream", "streamed vs in memory", "stream"), ("ranks2", "2 ranks vs 1", "ranks2")):
        if key in args.runs:
            results[name] = compare(work / "mem", work / folder, args.bits)
            outputs.append(work / folder)
            print(f"{name}: {results[name]}", flush=True)

    report = work / "eval.json"
    subprocess.run([sys.executable, "-m", "llmq", "eval", model, *map(str, outputs),
                    "--dataset", str(Path(texts) / "prideprejudice.txt"),
                    "--seqlen", str(args.seqlen), "--max-windows", str(args.eval_windows), "--quiet",
                    "--json", str(report)], check=True)
    results["eval"] = json.loads(report.read_text())
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
