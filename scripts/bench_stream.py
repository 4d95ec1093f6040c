#!/usr/bin/env python
"""Peak host memory and wall time of quantizing a large checkpoint, streamed and in memory.

    python scripts/bench_stream.py make DIR [--hidden 3072] [--intermediate 8192] [--layers 26] [--vocab 32000]
    python scripts/bench_stream.py run DIR OUT --method rtn|gptq [--stream | --no-stream] [--nsamples 8]
        [--seqlen 256] [--group-size 128] [--json PATH]

`make` writes a Llama-shaped checkpoint with random bf16 weights, one tensor at
a time (the script itself never holds the model), in 2 GB shards with an index.

`run` quantizes it in this process (int4, group size 128; GPTQ calibrates on
random token windows, as the checkpoint has no tokenizer) and prints one JSON
line: wall time, peak host memory (max RSS of this process, from getrusage),
the checkpoint's size and the ratio of the two. Run each measurement in a
process of its own so that peaks do not mix.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import torch


def make(args) -> None:
    from transformers import LlamaConfig

    from llmq.shards import ShardWriter

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                         num_key_value_heads=args.hidden // 128, vocab_size=args.vocab, dtype="bfloat16",
                         tie_word_embeddings=False)
    config.save_pretrained(out)
    g = torch.Generator().manual_seed(0)
    h, i = args.hidden, args.intermediate
    shapes = {"model.embed_tokens.weight": (args.vocab, h)}
    for n in range(args.layers):
        p = f"model.layers.{n}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
                   p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i)}
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (args.vocab, h)}
    writer = ShardWriter(out, max_shard_size=2 * 10**9)
    for name, shape in shapes.items():
        if len(shape) == 1:
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        writer.add(name, t.to(torch.bfloat16))
    writer.finish()
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(json.dumps({"checkpoint": str(out), "bytes": size, "gib": round(size / 2**30, 2)}))


def run(args) -> None:
    import llmq
    from llmq.memory import peak_host_memory
    from llmq.skeleton import build_skeleton

    if args.threads:
        torch.set_num_threads(args.threads)
    src = Path(args.dir)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    config = llmq.QuantConfig(method=args.method, bits=4, group_size=args.group_size)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    windows = torch.randint(3, vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    shutil.rmtree(args.out, ignore_errors=True)
    t0 = time.perf_counter()
    if args.stream:
        skeleton = build_skeleton(src)
        assert skeleton.blocker is None, skeleton.blocker
        if args.method == "rtn":
            from llmq.shard_rtn import quantize_rtn_shards

            quantize_rtn_shards(skeleton, args.out, config, device="cpu", progress=False)
        else:
            from llmq.stream import quantize_streamed

            quantize_streamed(skeleton, args.out, config, dataset=windows, device="cpu", progress=False)
    else:
        from llmq.loading import load_model

        model, _ = load_model(str(src))
        model = llmq.quantize(model, config, dataset=None if args.method == "rtn" else windows, device="cpu",
                              progress=False)
        llmq.save(model, args.out)
    wall = time.perf_counter() - t0
    peak = peak_host_memory()
    result = {
        "method": args.method, "stream": args.stream, "bits": 4, "group_size": args.group_size,
        "calibration": None if args.method == "rtn" else f"{args.nsamples} x {args.seqlen} random tokens",
        "checkpoint_gib": round(size / 2**30, 3), "wall_s": round(wall, 1),
        "peak_host_gib": round(peak / 2**30, 3), "peak_over_checkpoint": round(peak / size, 3),
        "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("dir")
    m.add_argument("--hidden", type=int, default=3072)
    m.add_argument("--intermediate", type=int, default=8192)
    m.add_argument("--layers", type=int, default=26)
    m.add_argument("--vocab", type=int, default=32000)
    r = sub.add_parser("run")
    r.add_argument("dir")
    r.add_argument("out")
    r.add_argument("--method", choices=["rtn", "gptq"], default="rtn")
    r.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    r.add_argument("--nsamples", type=int, default=8)
    r.add_argument("--seqlen", type=int, default=256)
    r.add_argument("--group-size", type=int, default=128)
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--json", default=None)
    args = p.parse_args()
    make(args) if args.cmd == "make" else run(args)
    sys.exit(0)


if __name__ == "__main__":
    main()
