#!/usr/bin/env python
"""Greedy decode speed and memory of a quantized model against its fp model, in one run.

    python scripts/bench_e2e.py [--model FP_FOLDER] [--quantized CHECKPOINT | --quantize rtn:4:64:asym]
        [--prompt-tokens 32] [--new-tokens 64] [--device cpu|cuda] [--dtype float16] [--threads N]
        [--json PATH]

Defaults: the real offline SmolLM2-135M (llmq.realmodel) in fp32 against an
in-memory RTN int4 g64 asymmetric copy. Both decode the same prompt greedily
with the KV cache (transformers' generate, no sampling); reported: tokens/s of
the decode phase (prefill timed apart), the memory each model's weights take
while it runs (parameters and buffers, plus on CPU the converted copies the
int4/int8 kernels read), on CUDA the peak allocated memory during decode, and
how many of the first generated tokens agree.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time

import torch

import llmq
from llmq.loading import load_model


def _model_bytes(model) -> int:
    """Bytes of the tensors the model's forward reads: parameters, buffers, CPU kernel forms."""
    from llmq.modules.qlinear import QuantLinear

    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        state = m.cpu_state if isinstance(m, QuantLinear) else None
        if state is not None:
            tensors += state.tensors()
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def decode(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    cuda = prompt.device.type == "cuda"
    model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up (and CPU kernel preparation)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    best_prefill, best_decode, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, do_sample=False, min_new_tokens=1)
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        best_prefill = min(best_prefill, t1 - t0)
        best_decode = min(best_decode, (t2 - t1) - (t1 - t0))
    result = {"tokens": out[0, prompt.shape[1]:].tolist(), "prefill_s": best_prefill,
              "decode_tokens_per_s": (new_tokens - 1) / best_decode}
    if cuda:
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--quantized", default=None, help="llmq checkpoint of --model")
    p.add_argument("--quantize", default="rtn:4:64:asym", help="METHOD:BITS:GROUP:sym|asym, in memory")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (both models run there, one at a time)")
    p.add_argument("--dtype", default=None, help="model dtype, e.g. float16 (default: the checkpoint's)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from llmq.realmodel import smollm2_path

        args.model = str(smollm2_path())
    dtype = getattr(torch, args.dtype) if args.dtype else "auto"
    fp, tokenizer = load_model(args.model, dtype=dtype)
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be"
    prompt = tokenizer(text, return_tensors="pt").input_ids[:, : args.prompt_tokens].to(args.device)
    fp = fp.to(args.device).eval()
    results = {"fp": {**decode(fp, prompt, args.new_tokens, args.repeats), "bytes": _model_bytes(fp)}}
    del fp
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    if args.quantized:
        q = llmq.from_pretrained(args.quantized, dtype=dtype)
        label = args.quantized
    else:
        method, bits, group, sym = args.quantize.split(":")
        model, _ = load_model(args.model, dtype=dtype)
        q = llmq.quantize(model, llmq.QuantConfig(method=method, bits=int(bits), group_size=int(group),
                                                  sym=sym == "sym"), progress=False)
        label = args.quantize
    q = q.to(args.device).eval()
    results["quantized"] = {"label": label, **decode(q, prompt, args.new_tokens, args.repeats),
                            "bytes": _model_bytes(q)}
    a, b = results["fp"]["tokens"], results["quantized"]["tokens"]
    agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    summary = {
        "model": args.model, "quantized": label, "prompt_tokens": prompt.shape[1], "new_tokens": args.new_tokens,
        "fp_tokens_per_s": round(results["fp"]["decode_tokens_per_s"], 2),
        "quantized_tokens_per_s": round(results["quantized"]["decode_tokens_per_s"], 2),
        "speedup": round(results["quantized"]["decode_tokens_per_s"] / results["fp"]["decode_tokens_per_s"], 2),
        "fp_prefill_s": round(results["fp"]["prefill_s"], 4),
        "quantized_prefill_s": round(results["quantized"]["prefill_s"], 4),
        "fp_weights_mib": round(results["fp"]["bytes"] / 2**20, 1),
        "quantized_weights_mib": round(results["quantized"]["bytes"] / 2**20, 1),
        "first_tokens_identical": agree, "device": args.device, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(),
    }
    if "peak_allocated_bytes" in results["fp"]:
        for name in ("fp", "quantized"):
            summary[f"{name}_peak_allocated_mib"] = round(results[name]["peak_allocated_bytes"] / 2**20, 1)
    print(json.dumps(summary, indent=1))
    print("fp       :", tokenizer.decode(a[:24]))
    print("quantized:", tokenizer.decode(b[:24]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
