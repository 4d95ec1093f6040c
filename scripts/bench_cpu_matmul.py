#!/usr/bin/env python
"""The CPU's matmul rates by number format, at the dev model's linear shapes: what each format could gain.

    python scripts/bench_cpu_matmul.py [--threads N] [--repeats 30] [--rows 1 512]

For each shape (in -> out) and number of rows M, the median ms of:

- fp32:  F.linear in float32 (the unquantized model);
- bf16, fp16: F.linear with inputs and weight already in that format (the
  arithmetic alone: a quantized layer would also pay the casts and the
  weight's rebuild);
- int8:  torch._int_mm of int8 codes and the fp32 rescale by one activation
  scale and per-row weight scales (llmq's W8A8 prefill path, quantization of
  the input not included);
- int8pack: torch's weight-only int8 kernel (`_weight_int8pack_mm`) fed the
  int8 activation codes in bfloat16, and the fp32 rescale (llmq's W8A8
  "int8pack" kernel, quantization of the input not included);
- onednn-u8: oneDNN's fused int8 linear (`torch.ops.onednn.qlinear_pointwise`
  on a prepacked weight, rescale included), which takes uint8 activations
  with a zero point; skipped where this torch build lacks it.

Every candidate is run interleaved with the others, repeat by repeat. After
each row, the integer formats' largest error against the exact int64 sums,
relative to the largest sum: a fast kernel that saturates (oneDNN's u8 x s8
products on a processor without VNNI) shows there.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = ((576, 1536), (1536, 576), (576, 576), (576, 3072))  # (in, out) of the dev model's linears


def candidates(m: int, k: int, n: int, g: torch.Generator) -> tuple[dict, torch.Tensor]:
    """(a function running each format once, the integer formats' exact result in float64)."""
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g)
    codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale_row = torch.rand(1, n, generator=g) * 1e-2
    qx = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    x_scale = 0.05
    qx_bf16, ones = qx.bfloat16(), torch.ones(n, dtype=torch.bfloat16)  # codes are exact in bf16
    runs = {
        "fp32": lambda: F.linear(x, w),
        "bf16": (lambda xb, wb: lambda: F.linear(xb, wb))(x.bfloat16(), w.bfloat16()),
        "fp16": (lambda xh, wh: lambda: F.linear(xh, wh))(x.half(), w.half()),
        "int8": lambda: torch._int_mm(qx, codes.t()).float().mul_(x_scale * scale_row),
        "int8pack": lambda: torch.mul(torch._weight_int8pack_mm(qx_bf16, codes, ones), x_scale * scale_row),
    }
    onednn = getattr(torch.ops, "onednn", None)
    if onednn is not None and hasattr(onednn, "qlinear_prepack"):
        packed = onednn.qlinear_prepack(codes, [m, k])
        qu8 = (qx.short() + 128).to(torch.uint8)
        zeros = torch.zeros(n, dtype=torch.int32)
        scales = scale_row.reshape(-1)
        runs["onednn-u8"] = lambda: onednn.qlinear_pointwise(qu8, x_scale, 128, packed, scales, zeros, None, 1.0, 0,
                                                             torch.float32, "none", [], "")
    exact = (qx.long() @ codes.long().t()).double() * x_scale * scale_row.double()
    return runs, exact


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 512])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} (ms; x = fp32 / it)")
    g = torch.Generator().manual_seed(0)
    for m in args.rows:
        for k, n in SHAPES:
            runs, exact = candidates(m, k, n, g)
            times = {name: [] for name in runs}
            for run in runs.values():
                run()  # warm-up: first-call allocations, oneDNN primitive creation
            for _ in range(args.repeats):
                for name, run in runs.items():
                    t0 = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - t0)
            ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
            cells = "  ".join(f"{name} {v:7.3f} ({ms['fp32'] / v:4.2f}x)" for name, v in ms.items())
            print(f"{k:>5} -> {n:<5} M={m:<4} {cells}", flush=True)
            errors = {name: ((runs[name]().double() - exact).abs().max() / exact.abs().max()).item()
                      for name in ("int8", "int8pack", "onednn-u8") if name in runs}
            print(f"{'':>22}error: " + "  ".join(f"{name} {err:.1e}" for name, err in errors.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
