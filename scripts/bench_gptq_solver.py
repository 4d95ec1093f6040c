"""Rough timings of the GPTQ solver and the Hessian accumulation.

Usage: python scripts/bench_gptq_solver.py [--device cpu|cuda] [--rows 65536]
Shapes are SmolLM2-135M's (hidden 576, MLP 1536). Numbers on a shared machine are rough.
"""

from __future__ import annotations

import argparse
import time

import torch

from llmq.solvers.gptq import HessianAccumulator, gptq_quantize
from llmq.solvers.rtn import rtn_quantize


def _time(fn, device, reps=3):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--shapes", default="1536x576,576x1536", help="NxK list (weight [N, K])")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}")

    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        x = torch.randn(4096, k, device=device) @ torch.randn(k, k, device=device) / k**0.5
        H = HessianAccumulator(k, device=device)
        H.add_batch(x)
        W = torch.randn(n, k, device=device) * 0.02
        for g, act in ((128 if k % 128 == 0 else 64, False), (k, False), (64, True)):
            t = _time(lambda: gptq_quantize(W, H.hessian, bits=4, group_size=g, sym=True,
                                            scale_dtype=torch.float16, desc_act=act), device)
            print(f"gptq_quantize W[{n},{k}] g{g} desc_act={act}: {t * 1e3:.0f} ms")
        t = _time(lambda: rtn_quantize(W, 4, 64, True, torch.float16), device)
        print(f"rtn_quantize  W[{n},{k}] g64: {t * 1e3:.1f} ms")

    k = 1536
    x = torch.randn(args.rows, k, device=device)
    for name, dt, xin in (("fp32 input, fp32", None, x), ("bf16 input, fp32 mode", None, x.bfloat16()),
                          ("bf16 input, bf16 mode", torch.bfloat16, x.bfloat16())):
        acc = HessianAccumulator(k, device=device, input_dtype=dt)
        t = _time(lambda: acc.add_batch(xin), device)
        print(f"add_batch [{args.rows}, {k}] {name}: {t * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
