#!/usr/bin/env python
"""Greedy decode speed and memory of a quantized model against its fp model, in one run.

    python scripts/bench_e2e.py [--model FP_FOLDER | --random-config NAME|CONFIG.json]
        [--quantized CHECKPOINT | --quantize rtn:4:64:asym | --quantize w8a8]
        [--prompt-tokens 32] [--new-tokens 64] [--device cpu|cuda] [--dtype float16] [--threads N]
        [--json PATH]

Defaults: the real offline SmolLM2-135M (llmq.realmodel) in fp32 against an
in-memory RTN int4 g64 asymmetric copy. Both decode the same prompt greedily
with the KV cache (transformers' generate, no sampling); reported: tokens/s of
the decode phase (the tokens after the first, timed inside each generate call
as each token is chosen; the prefill is the time to the first), the memory each model's weights take
while it runs (parameters and buffers, plus on CPU the converted copies the
int4/int8 kernels read), on CUDA the peak allocated memory during decode, and
how many of the first generated tokens agree.

`--random-config` times a model of that shape with random weights (seeded, the
same for both copies) and a random prompt instead, where no real checkpoint is
at hand (a GPU machine with no hub access): a name from RANDOM_CONFIGS or a
transformers config.json. `--quantize w8a8` is W8A8 with dynamic activations,
round-to-nearest weights and no smoothing (no calibration data needed).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import llmq
from llmq.config import parse_config_spec
from llmq.loading import load_model

# Shapes of public models, for --random-config: speed depends on the shapes alone.
RANDOM_CONFIGS = {
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=8192),
}


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


class _TokenClock(StoppingCriteria):
    """Stops nothing; notes the time at which each new token is chosen, so that one generate call
    splits into its prefill (up to the first token) and its decode (the tokens after it)."""

    def __init__(self, cuda: bool):
        self.cuda, self.times = cuda, []

    def __call__(self, input_ids, scores, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def decode(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    cuda = prompt.device.type == "cuda"
    model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up (and CPU kernel preparation)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    best_prefill, best_decode, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        clock = _TokenClock(cuda)
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([clock]))
        best_prefill = min(best_prefill, clock.times[0] - t0)
        best_decode = min(best_decode, clock.times[-1] - clock.times[0])
    result = {"tokens": out[0, prompt.shape[1]:].tolist(), "prefill_s": best_prefill,
              "decode_tokens_per_s": (new_tokens - 1) / best_decode}
    if cuda:
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return result


def random_model(name: str, dtype):
    """A model of config `name` (RANDOM_CONFIGS or a config.json path) with seeded random weights."""
    import transformers as T

    if name in RANDOM_CONFIGS:
        options = dict(RANDOM_CONFIGS[name])
        config = T.AutoConfig.for_model(options.pop("model_type"), **options)
    else:
        config = T.AutoConfig.from_pretrained(name)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config)
    return model if dtype == "auto" else model.to(dtype)


def quant_config(spec: str) -> llmq.QuantConfig:
    if spec == "w8a8":
        return llmq.QuantConfig(scheme="w8a8", act="dynamic")
    return parse_config_spec(spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--random-config", default=None,
                   help=f"random weights of this shape instead ({', '.join(RANDOM_CONFIGS)} or a config.json)")
    p.add_argument("--quantized", default=None, help="llmq checkpoint of --model")
    p.add_argument("--quantize", default="rtn:4:64:asym",
                   help="METHOD:BITS:GROUP:sym|asym (llmq.config.parse_config_spec) or w8a8, in memory")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (both models run there, one at a time)")
    p.add_argument("--dtype", default=None, help="model dtype, e.g. float16 (default: the checkpoint's)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2: the decode phase is the tokens after the first")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_e2e: no CUDA GPU found for --device cuda. Nothing to do.")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else "auto"
    if args.random_config:
        args.model = f"random weights, {args.random_config}"
        tokenizer = None

        base = random_model(args.random_config, dtype)
        fp = copy.deepcopy(base)  # faster than drawing the weights again

        def model_to_quantize():
            return base
        g = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, fp.config.vocab_size, (1, args.prompt_tokens), generator=g).to(args.device)
    else:
        if args.model is None:
            from llmq.realmodel import smollm2_path

            args.model = str(smollm2_path())

        def model_to_quantize():
            return load_model(args.model, dtype=dtype)[0]

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
        q = llmq.quantize(model_to_quantize(), quant_config(args.quantize), progress=False)
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
    if tokenizer is not None:
        print("fp       :", tokenizer.decode(a[:24]))
        print("quantized:", tokenizer.decode(b[:24]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
