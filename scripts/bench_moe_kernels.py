"""Time llmq's grouped MoE kernels on CUDA against the full-precision experts block, in one run.

One experts block shaped like Qwen3-30B-A3B's (hidden 2048, 128 experts of
768, top 8; --hidden, --intermediate, --experts, --top-k change it), random
weights, taken from a one-layer Qwen3-MoE model: the block in fp16 through
transformers' own experts forward, and the same block quantized by llmq
(round-to-nearest): weight-only int4 g128 (the grouped dequantize-matmul) and
W8A8 with dynamic activations (the grouped int8 kernel). At each number of
tokens T (1, 16, 256, 2048 unless --tokens says otherwise) with random
routing, each quantized block's output is checked against the fp16 block's
first (relative error printed; a value past --max-error stops the run), then
each is timed with triton.testing.do_bench (median). Reported: microseconds,
the speedup over fp16, and the bytes of the experts' weights as each reads
them.

Needs a CUDA GPU; without one it says so and exits 0 (interpreter timings mean
nothing). Example:

    python scripts/bench_moe_kernels.py
    python scripts/bench_moe_kernels.py --experts 64 --intermediate 1408 --top-k 6 --tokens 1 64
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

SETTINGS = {"int4 g128": dict(bits=4, group_size=128), "W8A8 dynamic": dict(scheme="w8a8")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=768, help="each expert's inner size")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 256, 2048])
    p.add_argument("--max-error", type=float, default=0.3,
                   help="largest relative error against fp16 accepted (random weights: int4 RTN about 0.2)")
    return p.parse_args(argv)


def experts_blocks(args, device):
    """(the fp16 experts block, {setting: the same block quantized by llmq}) on device."""
    import transformers as T

    import llmq
    from llmq.modules.qexperts import QuantExperts

    torch.manual_seed(0)
    config = T.Qwen3MoeConfig(vocab_size=256, hidden_size=args.hidden, moe_intermediate_size=args.intermediate,
                              intermediate_size=args.intermediate, num_experts=args.experts,
                              num_experts_per_tok=args.top_k, num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=32)
    # Initialised once (about 600 M random parameters on the host at the default shape) and copied for
    # each setting, since quantize replaces the model's modules in place.
    model = T.Qwen3MoeForCausalLM(config).eval()
    quantized = {}
    for name, options in SETTINGS.items():
        q = llmq.quantize(copy.deepcopy(model), llmq.QuantConfig(**options), device=device, progress=False)
        quantized[name] = next(m for m in q.modules() if isinstance(m, QuantExperts)).to(device)
    fp = model.model.layers[0].mlp.experts.to(device=device, dtype=torch.float16)
    return fp, quantized


def weight_bytes(block) -> int:
    return sum(t.numel() * t.element_size() for t in list(block.parameters()) + list(block.buffers()))


def bench(args, do_bench, device="cuda") -> int:
    """The table. device "cpu" under TRITON_INTERPRET=1 only keeps the script working (the test suite
    runs it so); its timings mean nothing."""
    fp, quantized = experts_blocks(args, device)
    dtype = torch.float16 if device == "cuda" else torch.float32
    fp = fp.to(dtype)
    print(f"experts block: hidden {args.hidden}, {args.experts} experts of {args.intermediate}, top {args.top_k}; "
          f"x in {str(dtype)[6:]}; weights MiB: fp {weight_bytes(fp) / 2**20:.1f}, "
          + ", ".join(f"{name} {weight_bytes(q) / 2**20:.1f}" for name, q in quantized.items()))
    print(f"{'tokens':>6} {'fp us':>9} " + " ".join(f"{name + ' us':>16} {'speedup':>7} {'rel.err':>7}"
                                                   for name in quantized))
    g = torch.Generator().manual_seed(1)
    for tokens in args.tokens:
        x = torch.randn(tokens, args.hidden, generator=g).to(device=device, dtype=dtype)
        index = torch.rand(tokens, args.experts, generator=g).topk(args.top_k, dim=-1).indices.to(device)
        weights = torch.softmax(torch.randn(tokens, args.top_k, generator=g), dim=-1).to(device=device, dtype=dtype)
        with torch.no_grad():
            ref = fp(x, index, weights).double()
            t_fp = do_bench(lambda: fp(x, index, weights), return_mode="median")
            row = f"{tokens:>6} {t_fp * 1e3:>9.1f} "
            for name, q in quantized.items():
                err = ((q.grouped_forward(x, index, weights).double() - ref).norm() / ref.norm()).item()
                if not err <= args.max_error:
                    print(f"FAILED check: {name}, {tokens} tokens: relative error {err:.3g} > {args.max_error}")
                    return 1
                t = do_bench(lambda: q.grouped_forward(x, index, weights), return_mode="median")
                row += f"{t * 1e3:>16.1f} {t_fp / t:>7.2f} {err:>7.1e} "
            print(row, flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_moe_kernels: no CUDA GPU found; these timings need one.")
        return 0
    from triton.testing import do_bench

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    return bench(args, do_bench)


if __name__ == "__main__":
    sys.exit(main())
