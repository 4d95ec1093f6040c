"""Benchmark llmq's dequantize-matmul kernels against F.linear on CUDA.

Protocol: shapes (out x in)
4096x4096, 11008x4096, 4096x11008, 28672x4096, 4096x14336; rows M in 1, 2, 4,
8, 16, 32, 64, 128, 256, 2048. Each point: random codes, zeros and scales
(never zeros), the result checked against a float64 reference first, then
timed next to F.linear on the same x in fp16/bf16 in the same process, twice:
eagerly (triton.testing.do_bench, median: the host's launch work included,
which at small M takes longer than the GPU's) and as CUDA graph replays
(do_bench_cudagraph, median: the GPU's time, as a serving engine that captures
graphs sees it). Reported: both pairs of times, the speedup of each (F.linear
time / ours), and the fraction of the device-copy bandwidth the graph time
reaches (bytes: packed weights + scales + zeros + x + y).

`--w8a8` times the W8A8 int8 kernels (llmq.kernels.int8_linear: activation
quantization, int8 GEMM and rescale, dynamic per-token or `--act static`)
instead, on Llama-3.1-8B's linears (4096x4096 q/o, 1024x4096 k/v, 14336x4096
gate/up, 4096x14336 down) at M = 1, 16, 256, 4096 unless --shapes/--m say
otherwise: next to cuBLAS fp16 F.linear and, for M > 16 (its limit on CUDA),
torch._int_mm's int8 GEMM alone on codes quantized beforehand. Each point is
checked first against llmq's integer reference (exact products of the codes).

Needs a CUDA GPU; without one it says so and exits 0 (interpreter timings mean
nothing). Example:

    python scripts/bench_kernels.py --bits 4 --group-size 128 --dtype float16
    python scripts/bench_kernels.py --shapes 4096x4096 --m 1 16 128 --all-paths
    python scripts/bench_kernels.py --act-order gather; python scripts/bench_kernels.py --act-order reorder
    python scripts/bench_kernels.py --w8a8 [--act static] [--all-paths]
    python scripts/bench_kernels.py --w8a8 --shapes 4096x4096 --m 1 16 --profile

`--profile` adds, under each point, each kernel's GPU time per call
(torch.profiler): where a slow point's time goes.
"""

from __future__ import annotations

import argparse
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F

SHAPES = ["4096x4096", "11008x4096", "4096x11008", "28672x4096", "4096x14336"]
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 2048]
W8A8_SHAPES = ["4096x4096", "1024x4096", "14336x4096", "4096x14336"]  # Llama-3.1-8B
W8A8_ROWS = [1, 16, 256, 4096]
TOL = {torch.float16: 3e-3, torch.bfloat16: 1.2e-2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, choices=(4, 8), default=4)
    p.add_argument("--group-size", type=int, default=128, help="-1 = one group per row")
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    p.add_argument("--act-order", choices=("gather", "reorder"),
                   help="random act-order g_idx; gather: scales and zeros looked up per input in the kernel; "
                        "reorder: reorder_act_order once, then x[..., perm] on each call (timed)")
    p.add_argument("--shapes", nargs="+", help=f"OUTxIN, e.g. 4096x11008 (default {' '.join(SHAPES)}; "
                   f"with --w8a8 {' '.join(W8A8_SHAPES)})")
    p.add_argument("--m", nargs="+", type=int, help=f"rows of x (default {ROWS}; with --w8a8 {W8A8_ROWS})")
    p.add_argument("--all-paths", action="store_true",
                   help="also time each path forced (splitk, gemm, dequant, and gemv to M = 16; with --w8a8 "
                        "splitk, gemm, gemv)")
    p.add_argument("--w8a8", action="store_true", help="the W8A8 int8 kernels instead (see above)")
    p.add_argument("--act", choices=("dynamic", "static"), default="dynamic", help="with --w8a8: activation scales")
    p.add_argument("--profile", action="store_true",
                   help="after each point, the GPU time of each kernel one call launches (torch.profiler)")
    args = p.parse_args(argv)
    args.shapes = args.shapes or (W8A8_SHAPES if args.w8a8 else SHAPES)
    args.m = args.m or (W8A8_ROWS if args.w8a8 else ROWS)
    return args


class Times(NamedTuple):
    eager: float  # ms per call, launched from Python (host work included)
    graph: float  # ms per call in CUDA graph replays (the GPU's time)


def _copy(weights):
    if isinstance(weights, dict):
        return {name: None if t is None else t.clone() for name, t in weights.items()}
    return weights.clone()


def _nbytes(weights) -> int:
    tensors = weights.values() if isinstance(weights, dict) else [weights]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Timer:
    """Medians of fn(weights) called eagerly (do_bench, which flushes the L2 cache before each call)
    and replayed in a CUDA graph. The graph cycles through copies of the weights that together
    exceed the L2 cache four times, so that no call finds its weights cached (a 4096 x 4096 fp16
    weight, 32 MiB, would otherwise stay in an H200's 60 MiB L2 across replays)."""

    def __init__(self, do_bench, graphs: bool = True):
        self.do_bench, self.graphs = do_bench, graphs

    def __call__(self, fn, weights) -> Times:
        def first():
            return fn(weights)

        first()  # autotuning synchronises, which neither timing may include nor a capture allow
        eager = self.do_bench(first, return_mode="median")
        if not self.graphs:  # the interpreter (tests): no graphs
            return Times(eager, eager)
        l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
        copies = [weights] + [_copy(weights) for _ in range(min(63, -(-4 * l2 // _nbytes(weights)) - 1))]
        calls = len(copies) * max(1, min(2000, int(10 / max(eager, 1e-3))) // len(copies))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for w in copies:
                fn(w)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for i in range(calls):
                    fn(copies[i % len(copies)])
            graph.replay()
            times = []
            for _ in range(7):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                graph.replay()
                end.record(stream)
                end.synchronize()
                times.append(start.elapsed_time(end) / calls)
        torch.cuda.current_stream().wait_stream(stream)
        del graph, copies
        return Times(eager, sorted(times)[len(times) // 2])


def print_profile(fn, calls: int = 20) -> None:
    """The GPU microseconds per call of each kernel fn launches (its quantization, zeroing, GEMM,
    cast...), from torch.profiler over `calls` eager calls: where a point's time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [(e.device_time_total / calls, e.count // calls, e.key) for e in prof.key_averages()
               if e.device_time_total > 0]
    for us, per_call, name in sorted(kernels, reverse=True):
        print(f"{'':>18}{us:>9.1f} us  x{per_call}  {name[:90]}")


def reordered(layer, bits, group_size):
    """The layer after reorder_act_order, and the permutation x needs."""
    from llmq.kernels import reorder_act_order

    qweight, perm = reorder_act_order(layer["qweight"], layer["g_idx"], bits=bits, group_size=group_size)
    return dict(layer, qweight=qweight, g_idx=None), perm


def copy_bandwidth(do_bench):
    """Bytes/s of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def layer_bytes(layer, m, n, k, dtype):
    size = torch.finfo(dtype).bits // 8
    packed = sum(t.numel() * t.element_size() for t in layer.values() if t is not None)
    return packed + m * k * size + m * n * size


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU found; these kernels are only timed on CUDA "
              "(interpreter timings mean nothing). Nothing to do.")
        return 0
    from triton.testing import do_bench

    from llmq.kernels import dequant_matmul
    from llmq.kernels.api import pick_path
    from llmq.kernels.synthetic import random_layer

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(do_bench)
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth: {bandwidth / 1e12:.2f} TB/s")
    if args.w8a8:
        return bench_w8a8(args, dtype, Timer(do_bench))
    print(f"bits {args.bits}  group_size {args.group_size}  {args.dtype}  act_order {args.act_order}")
    paths = ["auto"] + (["splitk", "gemm", "dequant", "gemv"] if args.all_paths else [])
    timer = Timer(do_bench)
    print(f"{'shape':>11} {'M':>5} {'path':>8} {'ours us':>8} {'F.linear':>8} {'speedup':>7} {'graph us':>8} "
          f"{'F.linear':>8} {'speedup':>7} {'GB/s':>6} {'% bw':>5}  rel.err   (graph: CUDA graph replay)")
    for shape in args.shapes:
        n, k = (int(v) for v in shape.lower().split("x"))
        layer, w64 = random_layer(n, k, args.bits, args.group_size, args.act_order is not None, dtype, "cuda")
        perm = None
        if args.act_order == "reorder":
            layer, perm = reordered(layer, args.bits, args.group_size)
        w_fp = w64.to(dtype)
        for m in args.m:
            x = torch.randn(m, k, device="cuda").to(dtype)
            ref = x.double() @ w64.t()
            t_fp = timer(lambda w: F.linear(x, w), w_fp)
            for path in paths:
                if path == "gemv" and m > 16:
                    continue  # one row per program: a decode path
                def ours(w=layer):
                    xin = x if perm is None else x.index_select(-1, perm)
                    return dequant_matmul(xin, w["qweight"], w["qzeros"], w["scales"], bits=args.bits,
                                          group_size=args.group_size, g_idx=w["g_idx"], path=path)
                y = ours()
                err = ((y.double() - ref).norm() / ref.norm()).item()
                if not (err <= TOL[dtype]):
                    print(f"FAILED check: {shape} M={m} path={path} relative error {err:.3g} > {TOL[dtype]}")
                    return 1
                t = timer(ours, layer)
                rate = layer_bytes(layer, m, n, k, dtype) / (t.graph * 1e-3)
                name = pick_path(m) if path == "auto" else path
                print(f"{shape:>11} {m:>5} {name:>8} {t.eager * 1e3:>8.1f} {t_fp.eager * 1e3:>8.1f} "
                      f"{t_fp.eager / t.eager:>7.2f} {t.graph * 1e3:>8.1f} {t_fp.graph * 1e3:>8.1f} "
                      f"{t_fp.graph / t.graph:>7.2f} {rate / 1e9:>6.0f} {100 * rate / bandwidth:>5.0f}  {err:.1e}",
                      flush=True)
                if args.profile:
                    print_profile(ours)
        del layer, w64, w_fp
        torch.cuda.empty_cache()
    return 0


def bench_w8a8(args, dtype, timer, device="cuda") -> int:
    """The --w8a8 table. device "cpu" under TRITON_INTERPRET=1 only keeps the script working (the
    test suite runs it so); its timings mean nothing."""
    from llmq.kernels import int8_linear
    from llmq.kernels.int8 import int8_reference, quantize_activations

    paths = ["triton"] + (["splitk", "gemm", "gemv"] if args.all_paths else [])
    print(f"W8A8 int8, {args.act} activations, x in {args.dtype}; TOPS = 2 M N K / graph time; "
          "graph: CUDA graph replay")
    print(f"{'shape':>11} {'M':>5} {'path':>7} {'ours us':>8} {'cuBLAS':>8} {'speedup':>7} {'graph us':>8} "
          f"{'cuBLAS':>8} {'speedup':>7} {'_int_mm':>8} {'TOPS':>6}  rel.err")
    for shape in args.shapes:
        n, k = (int(v) for v in shape.lower().split("x"))
        weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
        weight_scale = torch.rand(n, 1, device=device) * 1e-3 + 1e-4
        w_fp = (weight.float() * weight_scale).to(dtype)
        for m in args.m:
            x = (torch.randn(m, k, device=device) * 3).to(dtype)
            input_scale = (x.float().abs().amax() / 127).reshape(1) if args.act == "static" else None
            ref = int8_reference(x, weight, weight_scale, input_scale)
            q = quantize_activations(x, input_scale)[0]
            t_fp = timer(lambda w: F.linear(x, w), w_fp)
            # torch._int_mm refuses M <= 16 on CUDA; timed on the codes alone (no quantize, no rescale).
            t_mm = (timer(lambda w: torch._int_mm(q, w.t()), weight).graph
                    if m > 16 and n % 8 == 0 and k % 8 == 0 else float("nan"))
            for path in paths:
                if path == "gemv" and m > 16:
                    continue  # one row per program: a decode path
                def ours(w=weight):
                    return int8_linear(x, w, weight_scale, input_scale, path=path)
                err = ((ours().double() - ref).norm() / ref.norm()).item()
                if not (err <= TOL[dtype]):
                    print(f"FAILED check: {shape} M={m} path={path} relative error {err:.3g} > {TOL[dtype]}")
                    return 1
                t = timer(ours, weight)
                name = ("splitk" if m <= 16 else "gemm") if path == "triton" else path
                print(f"{shape:>11} {m:>5} {name:>7} {t.eager * 1e3:>8.1f} {t_fp.eager * 1e3:>8.1f} "
                      f"{t_fp.eager / t.eager:>7.2f} {t.graph * 1e3:>8.1f} {t_fp.graph * 1e3:>8.1f} "
                      f"{t_fp.graph / t.graph:>7.2f} {t_mm * 1e3:>8.1f} {2 * m * n * k / (t.graph * 1e-3) / 1e12:>6.1f}"
                      f"  {err:.1e}", flush=True)
                if args.profile and device == "cuda":
                    print_profile(ours)
        del weight, w_fp
        if device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
