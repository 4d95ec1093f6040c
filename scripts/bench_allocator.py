#!/usr/bin/env python
"""A streamed `llmq quantize` under four glibc allocator policies: time, peak memory, page faults.

    LLMQ_TEXTS=../shared/data/texts python scripts/bench_allocator.py [--model DIR] [--nsamples 16]
        [--seqlen 512] [--json PATH]

A streamed run sets glibc to give freed blocks from 64 KiB up back to the
system at once (llmq.memory.return_freed_memory_promptly), which keeps its
resident memory flat but makes every larger temporary a fresh mapping,
faulted in page by page. Each policy runs GPTQ int4 g64 asym `--stream` of
the model in its own process (calibration text emma.txt, seed 0):

- "llmq": llmq's setting (64 KiB mmap threshold, no trim);
- "default": glibc's own (its mmap threshold rises as large blocks are freed);
- "threshold-4MiB": the setting with a 4 MiB threshold;
- "trim-per-layer": glibc's own, and `malloc_trim(0)` after each written layer.

Reported per policy: wall and CPU seconds, peak resident memory and minor
page faults of the process (getrusage). Linux with glibc only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from llmq.realmodel import texts_dir

# Run in a child process: patch the policy, quantize, print what getrusage measured.
CHILD = r"""
import ctypes, ctypes.util, json, resource, sys, time
import llmq.memory as memory
import llmq.stream as stream
from llmq.cli import main

policy, argv = sys.argv[1], sys.argv[2:]
if policy in ("default", "trim-per-layer"):
    stream.return_freed_memory_promptly = lambda: False
if policy == "threshold-4MiB":
    memory._MMAP_FROM_BYTES = 4 * 2**20
if policy == "trim-per-layer":
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    release = stream.LayerStreamer.release

    def release_and_trim(self, index, hidden=None):
        release(self, index, hidden)
        libc.malloc_trim(0)

    stream.LayerStreamer.release = release_and_trim
t0 = time.perf_counter()
assert main(argv) == 0
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
                  "peak_rss_mib": usage.ru_maxrss // 1024, "minor_faults": usage.ru_minflt}))
"""

POLICIES = ("llmq", "default", "threshold-4MiB", "trim-per-layer")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(Path.home() / ".cache/llmq/smollm2-moe-8x2"))
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    texts = texts_dir(near=__file__)
    if texts is None:
        raise SystemExit("the offline texts were not found: set LLMQ_TEXTS to the folder holding emma.txt")
    print(f"model {args.model}: GPTQ int4 g64 asym --stream, calibration {args.nsamples} x {args.seqlen} tokens of "
          "emma.txt (seed 0), one process per policy", flush=True)
    results = {}
    for policy in POLICIES:
        with tempfile.TemporaryDirectory() as work:
            cmd = [sys.executable, "-c", CHILD, policy, "quantize", args.model, str(Path(work) / "q"), "--method",
                   "gptq", "--bits", "4", "--group-size", "64", "--asym", "--dataset", str(Path(texts) / "emma.txt"),
                   "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", "0", "--quiet",
                   "--stream"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"policy {policy} failed:\n{out.stderr[-2000:]}")
            results[policy] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{policy:<16} {results[policy]}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
