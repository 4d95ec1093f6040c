"""Host time per call of the torch custom ops llmq's kernels are registered as, against calling the
same function directly, as eager calls do.

dequant_matmul and int8_linear are custom ops (`llmq::dequant_matmul`, `llmq::int8_linear`) so that
torch.compile traces them; eager calls skip the op and call the function the op wraps. This times
both on a tiny layer (8 x 32, one row) on CPU, where the arithmetic is negligible, so the difference
is the op's dispatch: host work that an eager forward pays on every linear, on a GPU as on a CPU.

    python scripts/bench_dispatch.py [--calls 5000] [--repeats 5] [--threads 1]

Reported per front end: microseconds per call through the op and directly (medians over the
repeats), and their difference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import timeit

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=5000, help="calls per timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def per_call_us(fn, calls: int, repeats: int) -> float:
    fn()
    return statistics.median(timeit.repeat(fn, number=calls, repeat=repeats)) / calls * 1e6


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from llmq.kernels import api, int8
    from llmq.kernels.synthetic import random_layer

    torch.manual_seed(0)
    layer, _ = random_layer(8, 32, 4, 32, False, torch.float32, "cpu")
    x = torch.randn(1, 32)
    quantized = (x, layer["qweight"], layer["qzeros"], layer["scales"], None, None, 4, 32, "auto")
    weight = torch.randint(-127, 128, (8, 32), dtype=torch.int8)
    w8a8 = (x, weight, torch.rand(8, 1) * 1e-2, None, None, "auto")
    cases = {"dequant_matmul": (api._dequant_matmul_op, api._on_device, quantized),
             "int8_linear": (int8._int8_linear_op, int8._on_device, w8a8)}
    print(f"torch {torch.__version__}, {args.threads} thread(s); {args.calls} calls x {args.repeats} repeats; "
          "microseconds per call")
    print(f"{'front end':<16} {'custom op':>9} {'direct':>7} {'dispatch':>8}")
    for name, (op, direct, call_args) in cases.items():
        t_op = per_call_us(lambda: op(*call_args), args.calls, args.repeats)
        t_direct = per_call_us(lambda: direct(*call_args), args.calls, args.repeats)
        print(f"{name:<16} {t_op:>9.1f} {t_direct:>7.1f} {t_op - t_direct:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
