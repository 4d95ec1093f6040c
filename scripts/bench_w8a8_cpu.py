#!/usr/bin/env python
"""CPU speed of W8A8 (and weight-only int4) against fp32, in one run: prefill, decode, weight memory.

    python scripts/bench_w8a8_cpu.py [--model FP_FOLDER] [--prefill-tokens 512] [--prompt-tokens 32]
        [--new-tokens 32] [--repeats 5] [--threads N] [--int4] [--gemm-only] [--breakdown] [--json PATH]

First a single-linear table (the dev model's three linear shapes, M = 1, 16,
512: fp32 F.linear against int8_linear, activation quantization and rescale
included), then the whole models.

The real offline SmolLM2-135M (llmq.realmodel) in fp32, and copies quantized in
memory: W8A8 with dynamic per-token activations (round-to-nearest int8
weights; the speed does not depend on how the weights were solved), W8A8 with
static activations (scales from the first 128 tokens of the benchmark's own
input: the speed does not depend on their values), and with --int4 RTN int4
g64 asymmetric weight-only (llmq's default CPU backend).

- prefill: one forward of a batch of 1 x prefill-tokens tokens, no cache, timed
  twice: with the logits of every position (a perplexity forward) and with
  the last position's only (`logits_to_keep=1`, what transformers' generate
  computes for a prompt: the output head then multiplies one row, not 512);
- decode: transformers' greedy generate with the KV cache of new-tokens tokens
  after a prompt of prompt-tokens tokens, decode tokens/s with the prefill
  timed apart;
- every model is built and warmed up first, then each repeat times every model
  in turn (interleaved, so load from other processes falls on all alike);
  medians of --repeats, each repeat printed too;
- weights: bytes of the linears' weights as the forward reads them (for int4
  the kernel's packed form and, for prefill, the checkpoint codes it
  dequantizes from), and of all parameters and buffers.

--breakdown splits one prefill and one decode step of each model into its
decoder linears, the output head (not quantized) and everything else, which
bounds what faster linears can gain (forward hooks; they add microseconds per
linear).

The CPU kernels are chosen by llmq's one-time measurement
(llmq/kernels/cpu_select.py); the choices and their timings are printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import platform
import statistics
import time

import torch

import llmq
from llmq.kernels import cpu_select
from llmq.loading import load_model
from llmq.modules.qlinear import QuantLinear
from llmq.modules.w8a8 import W8A8Linear


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of the decoder linears' weights as read by the forward, bytes of every parameter and buffer)."""
    linear = []
    for name, m in model.named_modules():
        if isinstance(m, W8A8Linear):
            linear += [m.weight, m.weight_scale, m.input_scale]
        elif isinstance(m, QuantLinear):
            state = m.cpu_state
            linear += state.tensors() if state is not None else [m.qweight, m.scales]
        elif isinstance(m, torch.nn.Linear) and ".layers." in name:
            linear.append(m.weight)
    every = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.cpu_state is not None:
            every += m.cpu_state.tensors()
    return _bytes(linear), _bytes(every)


@torch.inference_mode()
def prefill_seconds(model, ids, logits_to_keep: int = 0) -> float:
    """One forward without cache; logits_to_keep=0: every position's logits, 1: the last one's."""
    t0 = time.perf_counter()
    model(ids, use_cache=False, logits_to_keep=logits_to_keep)
    return time.perf_counter() - t0


@torch.inference_mode()
def decode_rate(model, prompt, new_tokens) -> tuple[float, torch.Tensor]:
    """Decode tokens/s with the prefill timed apart: (n - 1) tokens over (time for n) - (time for 1)."""
    kw = dict(do_sample=False, pad_token_id=0)
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
    t1 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    t2 = time.perf_counter()
    return (new_tokens - 1) / max((t2 - t1) - (t1 - t0), 1e-9), out[0, prompt.shape[1]:]


@contextlib.contextmanager
def linear_timers(model):
    """Seconds spent in the decoder's linears and in the output head while the block runs,
    timed by forward hooks around each of them: yields {"linears": s, "head": s}."""
    spent = {"linears": 0.0, "head": 0.0}
    start = {}
    head = model.get_output_embeddings()

    def before(module, args):
        start[module] = time.perf_counter()

    def after(module, args, out):
        spent["head" if module is head else "linears"] += time.perf_counter() - start.pop(module)

    handles = []
    for name, m in model.named_modules():
        if m is head or (isinstance(m, (torch.nn.Linear, QuantLinear, W8A8Linear)) and ".layers." in name):
            handles += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
    try:
        yield spent
    finally:
        for h in handles:
            h.remove()


def _split(total: float, spent: dict) -> dict:
    return {"total_ms": 1000 * total, "linears_ms": 1000 * spent["linears"], "head_ms": 1000 * spent["head"],
            "other_ms": 1000 * (total - spent["linears"] - spent["head"])}


@torch.inference_mode()
def prefill_breakdown(model, ids) -> dict:
    """ms of one prefill spent in the decoder's linears, in the output head, and in everything else
    (attention, norms, activations)."""
    with linear_timers(model) as spent:
        total = prefill_seconds(model, ids)
    return _split(total, spent)


@torch.inference_mode()
def decode_breakdown(model, prompt) -> dict:
    """The same split of one decode step: one token after the prompt, with the prompt's KV cache."""
    out = model(prompt, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    # transformers renamed past_key_values to cache (5.24; the old name warns until 5.40).
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with linear_timers(model) as spent:
        t0 = time.perf_counter()
        model(token, use_cache=True, **{name: getattr(out, name)})
        total = time.perf_counter() - t0
    return _split(total, spent)


@torch.inference_mode()
def warm_up(model, ids, prompt) -> None:
    """One prefill and a 2-token decode: the CPU kernels' one-time measurement and first-call costs."""
    model(ids, use_cache=False)
    model.generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)


def gemm_table(repeats: int) -> list[dict]:
    """One linear of the dev model's shapes: fp32 F.linear against int8_linear (quantize x per token,
    torch._int_mm, rescale) at M = 1, 16, 512; median ms of `repeats` after a warm-up."""
    import torch.nn.functional as F

    from llmq.kernels import int8_linear

    g = torch.Generator().manual_seed(0)
    rows = []
    for n, k in ((1536, 576), (576, 1536), (576, 576)):
        w = torch.randn(n, k, generator=g)
        wq = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        ws = torch.rand(n, 1, generator=g)
        for m in (1, 16, 512):
            x = torch.randn(m, k, generator=g)
            t = {}
            for name, f in (("fp32", lambda: F.linear(x, w)), ("int8", lambda: int8_linear(x, wq, ws))):
                f()
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    f()
                    times.append(time.perf_counter() - t0)
                t[name] = 1000 * statistics.median(times)
            rows.append(dict(n=n, k=k, m=m, fp32_ms=t["fp32"], int8_ms=t["int8"], speedup=t["fp32"] / t["int8"]))
            print(f"  linear {k:>5} -> {n:<5} M={m:<4} fp32 {t['fp32']:8.3f} ms  int8 {t['int8']:8.3f} ms  "
                  f"{t['fp32'] / t['int8']:5.2f}x", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--int4", action="store_true", help="also RTN int4 g64 asymmetric weight-only")
    p.add_argument("--json", default=None)
    p.add_argument("--gemm-only", action="store_true", help="only the single-linear table (seconds)")
    p.add_argument("--breakdown", action="store_true",
                   help="also split a prefill into decoder linears, output head and the rest")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from llmq.realmodel import smollm2_path

        args.model = str(smollm2_path("float32"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (1, args.prefill_tokens), generator=g)
    prompt = ids[:, : args.prompt_tokens]
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; prefill 1 x {args.prefill_tokens} tokens, decode {args.new_tokens} tokens after "
          f"{args.prompt_tokens}, median of {args.repeats}", flush=True)

    gemm = gemm_table(max(args.repeats, 9))
    if args.gemm_only:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(args=vars(args), gemm=gemm), f, indent=2)
        return 0
    variants = [("fp32", lambda m: m),
                ("w8a8 dynamic", lambda m: llmq.quantize(m, llmq.QuantConfig(scheme="w8a8"), progress=False)),
                ("w8a8 static", lambda m: llmq.quantize(m, llmq.QuantConfig(scheme="w8a8", act="static"),
                                                         dataset=ids[:, :128], progress=False))]
    if args.int4:
        variants.append(("int4 g64 weight-only", lambda m: llmq.quantize(
            m, llmq.QuantConfig(bits=4, group_size=64, sym=False), progress=False)))
    models = {}
    for name, make in variants:
        model, _ = load_model(args.model, "float32")
        models[name] = make(model.eval())
        warm_up(models[name], ids, prompt)
    # Interleaved: every repeat times each model once, so load that comes and goes on a shared
    # machine falls on all of them alike.
    pre = {name: [] for name in models}
    last = {name: [] for name in models}
    rate = {name: [] for name in models}
    tokens = {}
    for _ in range(args.repeats):
        for name, model in models.items():
            pre[name].append(prefill_seconds(model, ids))
            last[name].append(prefill_seconds(model, ids, logits_to_keep=1))
            r, tokens[name] = decode_rate(model, prompt, args.new_tokens)
            rate[name].append(r)
    rows = []
    base = (1000 * statistics.median(pre["fp32"]), statistics.median(rate["fp32"]),
            1000 * statistics.median(last["fp32"]))
    for name, model in models.items():
        p, tps = 1000 * statistics.median(pre[name]), statistics.median(rate[name])
        pl = 1000 * statistics.median(last[name])
        lin, total = weight_bytes(model)
        row = dict(model=name, prefill_ms=p, prefill_speedup=base[0] / p,
                   prefill_last_logits_ms=pl, prefill_last_logits_speedup=base[2] / pl, decode_tokens_per_s=tps,
                   decode_speedup=tps / base[1], linear_weight_bytes=lin, all_bytes=total,
                   same_tokens=int((tokens[name] == tokens["fp32"]).sum()),
                   prefill_ms_each=[1000 * t for t in pre[name]],
                   prefill_last_logits_ms_each=[1000 * t for t in last[name]], decode_tokens_per_s_each=rate[name])
        rows.append(row)
        print(f"{name:<22} prefill {p:8.1f} ms ({row['prefill_speedup']:.2f}x), last logits only {pl:8.1f} ms "
              f"({row['prefill_last_logits_speedup']:.2f}x)  decode {tps:7.1f} tok/s "
              f"({row['decode_speedup']:.2f}x)  linear weights {lin / 2**20:6.1f} MiB, all {total / 2**20:6.1f} MiB"
              f"  tokens equal to fp32 {row['same_tokens']}/{args.new_tokens}", flush=True)
        print(f"{'':<22} each repeat: prefill ms " + " ".join(f"{1000 * t:.0f}" for t in pre[name])
              + "; last logits only ms " + " ".join(f"{1000 * t:.0f}" for t in last[name])
              + "; decode tok/s " + " ".join(f"{r:.1f}" for r in rate[name]), flush=True)
    if args.breakdown:
        for what, key, split in (("one prefill", "breakdown", lambda m: prefill_breakdown(m, ids)),
                                 ("one decode step", "decode_breakdown", lambda m: decode_breakdown(m, prompt))):
            print(f"{what}, timed by hooks around the linears (median of --repeats):")
            for row, (name, model) in zip(rows, models.items()):
                parts = [split(model) for _ in range(args.repeats)]
                row[key] = b = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
                print(f"  {name:<22} total {b['total_ms']:8.2f} ms: decoder linears {b['linears_ms']:8.2f}, "
                      f"output head {b['head_ms']:7.2f}, everything else {b['other_ms']:7.2f}", flush=True)
            fp = rows[0][key]
            print(f"  fp32 {what.removeprefix('one ')} with decoder linears that cost nothing would be "
                  f"{fp['total_ms'] / (fp['total_ms'] - fp['linears_ms']):.2f}x faster", flush=True)
    kernels = cpu_select.report()
    print("CPU kernels chosen by measurement (best seconds of each candidate on its representative layer):")
    for key, entry in kernels.items():
        timed = ", ".join(f"{name} {1000 * s:.3f} ms" for name, s in entry["seconds"].items()) or "not timed (pinned)"
        print(f"  {key:<14} {entry['kernel']:<13} {timed}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), gemm=gemm, rows=rows, kernels=kernels), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
