"""Correctness of llmq's compiled kernels on a CUDA GPU, in one command.

The test suite checks the kernels' arithmetic under the Triton interpreter on
CPU and compiles them for sm_90 (scripts/compile_kernels.py); this script is
what only a GPU can show. Every check compares with a float64 reference built
from the integer codes:

1. dequant_matmul on every path (auto, split-K, GEMM, dequantize + cuBLAS)
   for rows M in 1, 2, 3, 17, 64, 130, 2048; bits 4 and 8; group sizes 32,
   128, per row and a non-power-of-two size; symmetric and asymmetric zero
   points; act-order gathered in the kernel and re-laid out with
   reorder_act_order; fp16, bf16 and fp32 activations; bias or none; leading
   batch dimensions.
2. Outputs poisoned with NaN before the GEMM and dequantize kernels, so any
   element they fail to write shows.
3. CUDA graphs: dequant_matmul captured for decode and GEMM sizes, replayed
   on new inputs.
4. An act-order QuantLinear, re-laid out in place or looking up its groups.
5. A quantized tiny Llama on CUDA (fp16) against the same model's exact CPU
   forward, eager and under torch.compile; one of its QuantLinear layers
   under torch.compile(fullgraph=True) with inductor.
6. W8A8 (llmq.kernels.int8_linear): every Triton path (auto, split-K, GEMM)
   for rows M in 1, 2, 3, 16, 17, 64, 130, 2048, dynamic and static
   activations, fp16, bf16 and fp32, bias or none, against the exact integer
   products of the codes (int8_reference); the quantization launch's codes
   and scales equal to `quantize_activations` bit for bit; CUDA graphs; W8A8
   tiny Llamas (dynamic and static) on CUDA against their CPU forward, eager
   and under torch.compile.
7. Mixture-of-experts: a tiny Mixtral's experts block quantized weight-only
   (int4 g32) and W8A8 (dynamic, static), its grouped kernels (one launch per
   side over every expert) against the block's loop over experts on CPU,
   for a decode step's few tokens and a prefill's many.
8. Every autotune config of both kernels' paths (split-K, GEMM, GEMV), each
   launched alone on sizes that leave partial tiles.

Checks 1 and 6 also run the forced-only GEMV path ("gemv") at decode sizes.

On CUDA all checks but the CUDA graphs' launch one config per path instead of
autotuning (`pinned`): autotuning compiles every config for each new
specialization, seconds apiece, which the many cases of 1 and 6 would
multiply; 8 covers the configs and the graphs the autotuner.

    python scripts/check_kernels.py            # needs a CUDA GPU
    python scripts/check_kernels.py --quick    # fewer cases

With `--device cpu` under TRITON_INTERPRET=1 it runs checks 1, 2, 6's
kernel checks and 7 on the interpreter (the test suite does this to keep the script working; it proves
nothing about the GPU). Each step stops at its first failed check, and every step runs;
exit status 1 when any step failed.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import time
import traceback

import torch

from llmq.kernels.synthetic import random_layer

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
ROWS = (1, 2, 3, 17, 64, 130, 2048)
GROUP_SIZES = (32, 128, -1, 96)  # 96: not a power of two, looked up per input
INT8_ROWS = (1, 2, 3, 16, 17, 64, 130, 2048)  # 16 | 17: the split-K / GEMM boundary


class CheckFailed(AssertionError):
    pass


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("inf")  # unwritten (poisoned) or overflowed elements
    return ((y.double() - ref).norm() / ref.norm()).item()


def check(label: str, y: torch.Tensor, ref: torch.Tensor, tol: float, log: list) -> None:
    err = relative_error(y, ref)
    log.append((label, err))
    if not err <= tol:
        raise CheckFailed(f"{label}: relative error {err:.3g} > {tol}")


def layer_for(n, k, bits, gs, act_order, sym, dtype, device, seed):
    torch.manual_seed(seed)
    layer, w64 = random_layer(n, k, bits, gs, act_order, dtype, device)
    if sym:  # symmetric checkpoints store the mid-point zero 2^(bits-1)
        from llmq.kernels.layout import pack_cols, unpack_cols, unpack_rows

        codes = unpack_rows(layer["qweight"], bits)
        zeros = unpack_cols(layer["qzeros"], bits)
        groups = zeros.shape[0]
        g = (layer["g_idx"].long() if layer["g_idx"] is not None
             else torch.arange(k, device=device) // (k // groups))
        mid = torch.full_like(zeros, 2 ** (bits - 1))
        layer["qzeros"] = pack_cols(mid, bits)
        w64 = ((codes.double() - mid.double()[g]) * layer["scales"].double()[g]).t()
    return layer, w64


def matmul_cases(quick: bool):
    """(rows, bits, group size, act-order mode, sym, dtype, bias) combinations, covering each axis."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    cases = []
    for i, (bits, gs, act) in enumerate(itertools.product((4, 8), GROUP_SIZES, (None, "gather", "reorder"))):
        if act and gs != 128:
            continue
        for j, m in enumerate(ROWS[::3] if quick else ROWS):
            c = i + j
            cases.append((m, bits, gs, act, c % 2 == 0, dtypes[c % 3], c % 3 != 1))
    return cases


def check_matmul(device, quick, log):
    from llmq.kernels import dequant_matmul, reorder_act_order

    n, k = (96, 384) if device == "cpu" else (1536, 1152)
    for m, bits, gs, act, sym, dtype, has_bias in matmul_cases(quick):
        layer, w64 = layer_for(n, k, bits, gs, act is not None, sym, dtype, device, seed=m + bits + gs)
        perm = None
        if act == "reorder":
            qweight, perm = reorder_act_order(layer["qweight"], layer["g_idx"], bits=bits, group_size=gs)
            layer = dict(layer, qweight=qweight, g_idx=None)
        lead = (m,) if m % 2 else (2, m // 2)
        x = torch.randn(*lead, k, device=device).to(dtype)
        bias = torch.randn(n, device=device).to(dtype) if has_bias else None
        ref = x.double() @ w64.t() + (0 if bias is None else bias.double())
        xin = x if perm is None else x.index_select(-1, perm)
        for path in ("auto", "splitk", "gemm", "dequant", "gemv"):
            if device == "cpu" and m > 256 and path != "auto":
                continue  # the interpreter runs one program at a time: keep it to the dispatched path
            if path == "gemv" and m > 17:
                continue  # one row per program: a decode path
            y = dequant_matmul(xin, layer["qweight"], layer["qzeros"], layer["scales"], bits=bits, group_size=gs,
                               g_idx=layer["g_idx"], bias=bias, path=path)
            assert y.shape == (*lead, n) and y.dtype == dtype
            label = (f"matmul M={m} b{bits} g{gs} {act or 'plain'} {'sym' if sym else 'asym'} "
                     f"{str(dtype)[6:]} {'bias' if has_bias else 'nobias'} {path}")
            check(label, y, ref, TOL[dtype], log)


def check_poisoned(device, log):
    from llmq.kernels import triton_qmm

    for bits, dtype in itertools.product((4, 8), (torch.float16, torch.bfloat16)):
        layer, w64 = layer_for(200, 384, bits, 128, False, False, dtype, device, seed=bits)
        x = torch.randn(37, 384, device=device).to(dtype)
        out = torch.full((37, 200), float("nan"), dtype=dtype, device=device)
        args = (layer["qweight"], layer["qzeros"], layer["scales"], None, None, bits, 128)
        triton_qmm.qmm_gemm(x, *args, out)
        check(f"poisoned gemm b{bits} {str(dtype)[6:]}", out, x.double() @ w64.t(), TOL[dtype], log)
        w = torch.full((384, 200), float("nan"), dtype=dtype, device=device)
        triton_qmm.dequantize_into(layer["qweight"], layer["qzeros"], layer["scales"], None, bits, 128, w)
        check(f"poisoned dequant b{bits} {str(dtype)[6:]}", w, w64.t(), TOL[dtype], log)


def captured(run):
    """(CUDA graph of run(), its output tensor), captured after a warm-up outside the graph (autotuning
    synchronises, which a capture cannot)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = run()
    return graph, static_y


def check_cuda_graphs(log):
    from llmq.kernels import dequant_matmul

    for m in (1, 64):
        layer, w64 = layer_for(4096, 4096, 4, 128, False, False, torch.float16, "cuda", seed=m)
        static_x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)

        def run():
            return dequant_matmul(static_x, layer["qweight"], layer["qzeros"], layer["scales"], bits=4,
                                  group_size=128)

        graph, static_y = captured(run)
        for step in range(3):
            static_x.copy_(torch.randn(m, 4096, device="cuda", dtype=torch.float16))
            graph.replay()
            torch.cuda.synchronize()
            check(f"cuda graph M={m} replay {step}", static_y, static_x.double() @ w64.t(), TOL[torch.float16], log)


def tiny_quantized_llama(dtype):
    import transformers as T

    import llmq

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
    model = T.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    return llmq.quantize(model, llmq.QuantConfig(method="rtn", bits=4, group_size=64, sym=False), progress=False)


def check_model(compile_model, log):
    """The quantized model on CUDA in fp16 against its exact fp32 forward on CPU (dense dequantized weights)."""
    from llmq.modules.qlinear import set_cpu_backend

    model = tiny_quantized_llama(torch.float32)
    set_cpu_backend(model, "dense")
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits.double()
        model = model.to(device="cuda", dtype=torch.float16)
        forward = torch.compile(model) if compile_model else model
        y = forward(ids.cuda(), use_cache=False).logits
    check(f"tiny llama RTN int4 fp16 on CUDA{' torch.compile' if compile_model else ''}", y.cpu(), ref, 2e-2, log)


def check_act_order_layer(log):
    """QuantLinear with a GPTQ act-order g_idx on CUDA: sorted once in place ("reorder") or looked up
    ("gather"); both against the reference, and the state dict keeps the checkpoint layout."""
    from llmq.modules.qlinear import QuantLinear

    for mode in ("reorder", "gather"):
        layer_tensors, w64 = layer_for(4096, 4096, 4, 128, True, False, torch.float16, "cuda", seed=7)
        layer = QuantLinear(4096, 4096, bits=4, group_size=128, desc_act=True, dtype=torch.float16, device="cuda")
        layer.act_order = mode
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            getattr(layer, name).copy_(layer_tensors[name])
        layer.post_load()
        for m in (1, 64, 300):
            x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
            check(f"act-order QuantLinear {mode} M={m}", layer(x), x.double() @ w64.t(), TOL[torch.float16], log)
        if not torch.equal(layer.state_dict()["qweight"], layer_tensors["qweight"]):
            raise CheckFailed(f"act-order QuantLinear {mode}: state dict does not hold the checkpoint layout")


def check_compiled_layer(log):
    """One QuantLinear under torch.compile(fullgraph=True, inductor): no graph break around the kernel."""
    from llmq.modules.qlinear import QuantLinear

    model = tiny_quantized_llama(torch.float32).to(device="cuda", dtype=torch.float16)
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
    w64 = layer.dequantize_weight(torch.float64)
    compiled = torch.compile(layer, fullgraph=True)
    for m in (1, 40):
        x = torch.randn(m, layer.in_features, device="cuda", dtype=torch.float16)
        check(f"QuantLinear torch.compile(fullgraph) M={m}", compiled(x), x.double() @ w64.t(),
              TOL[torch.float16], log)


def int8_operands(m, n, k, static, dtype, has_bias, device, seed):
    """x [.., K], int8 weight [N, K], fp32 scales [N, 1], static scale [1] or None, bias [N] or None."""
    g = torch.Generator().manual_seed(seed)
    lead = (m,) if m % 2 else (2, m // 2)
    x = (torch.randn(*lead, k, generator=g) * 3).to(dtype)
    x[..., 5] *= 20  # an outlier channel, as real activations have
    weight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    weight_scale = torch.rand(n, 1, generator=g) * 1e-2 + 1e-3
    # Static: a scale that clips the outliers, so the clamp to [-128, 127] is exercised too.
    input_scale = (x.float().abs().amax() / 127 / 4).reshape(1) if static else None
    bias = torch.randn(n, generator=g).to(dtype) if has_bias else None
    return tuple(None if t is None else t.to(device) for t in (x, weight, weight_scale, input_scale, bias))


def int8_expected(x, weight, weight_scale, input_scale, bias):
    """llmq's integer reference for x [..., K] (exact integer products, rescaled in float64)."""
    from llmq.kernels.int8 import int8_reference

    y = int8_reference(x.reshape(-1, x.shape[-1]), weight, weight_scale, input_scale, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def check_int8_matmul(device, quick, log):
    """int8_linear on each Triton path against the exact integer products of the codes; the
    quantization launch against quantize_activations, bit for bit."""
    from llmq.kernels import int8_linear, triton_int8
    from llmq.kernels.int8 import quantize_activations

    n, k = (80, 96) if device == "cpu" else (1536, 1152)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    for i, m in enumerate(INT8_ROWS[::2] if quick else INT8_ROWS):
        for static in (False, True):
            c = 2 * i + static
            dtype, has_bias = dtypes[c % 3], c % 4 < 2
            args = int8_operands(m, n, k, static, dtype, has_bias, device, seed=c)
            ref = int8_expected(*args)
            for path in ("auto", "splitk", "gemm", "gemv"):
                if device == "cpu" and m > 256 and path != "auto":
                    continue  # the interpreter runs one program at a time: keep it to the dispatched path
                if path == "gemv" and m > 17:
                    continue  # one row per program: a decode path
                y = int8_linear(*args, path="triton" if path == "auto" else path)
                assert y.shape == ref.shape and y.dtype == dtype
                label = (f"int8 M={m} {'static' if static else 'dynamic'} {str(dtype)[6:]} "
                         f"{'bias' if has_bias else 'nobias'} {path}")
                check(label, y, ref, TOL[dtype], log)
    for m, static, dtype in ((1, False, torch.float16), (130, False, torch.bfloat16), (130, True, torch.float32)):
        x, _, _, input_scale, _ = int8_operands(m, n, k, static, dtype, False, device, seed=m)
        x = x.reshape(-1, k)
        q, s = triton_int8.quantize_rows(x, input_scale)
        q_ref, s_ref = quantize_activations(x, input_scale)
        label = f"int8 quantize M={m} {'static' if static else 'dynamic'} {str(dtype)[6:]}"
        if not (torch.equal(q, q_ref) and torch.equal(s.reshape(-1), s_ref.reshape(-1))):
            raise CheckFailed(f"{label}: codes or scales differ from quantize_activations")
        log.append((label, 0.0))


def check_int8_cuda_graphs(log):
    from llmq.kernels import int8_linear

    for m in (1, 64):
        x, weight, weight_scale, _, _ = int8_operands(m, 4096, 4096, False, torch.float16, False, "cuda", seed=m)
        static_x = x.clone()

        def run():
            return int8_linear(static_x, weight, weight_scale)

        graph, static_y = captured(run)
        for step in range(3):
            static_x.copy_(torch.randn_like(static_x) * 3)  # int8_operands gives even M two leading dims
            graph.replay()
            torch.cuda.synchronize()
            check(f"int8 cuda graph M={m} replay {step}", static_y,
                  int8_expected(static_x, weight, weight_scale, None, None), TOL[torch.float16], log)


def check_w8a8_model(act, dtype, compile_model, log):
    """A W8A8 tiny Llama on CUDA against the same model's CPU forward (fp32, int8 GEMMs)."""
    import transformers as T

    import llmq

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
    model = T.LlamaForCausalLM(config).eval()
    calibration = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(2))
    model = llmq.quantize(model, llmq.QuantConfig(scheme="w8a8", act=act), dataset=calibration, progress=False)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits.double()
        model = model.to(device="cuda", dtype=dtype)
        forward = torch.compile(model) if compile_model else model
        y = forward(ids.cuda(), use_cache=False).logits
    # In fp32 the codes match the CPU's but where CUDA's float ops round an input across a level;
    # fp16 activations move many codes by one level (1-2e-2 on the CPU's own fp16 forward).
    tol = 1e-2 if dtype == torch.float32 else 6e-2
    label = f"tiny llama W8A8 {act} {str(dtype)[6:]} on CUDA{' torch.compile' if compile_model else ''}"
    check(label, y.cpu(), ref, tol, log)


def check_moe_blocks(device, log):
    """Each grouped MoE kernel against the loop over experts on CPU (fp32), in one experts block."""
    import transformers as T

    import llmq
    from llmq.kernels import cpu_select
    from llmq.modules.qexperts import QuantExperts
    from llmq.modules.qlinear import set_cpu_backend

    def mixtral():  # a config of its own for each model: quantizing records itself in the config
        return T.MixtralForCausalLM(T.MixtralConfig(
            vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)).eval()

    calibration = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(2))
    settings = {"int4 g32": dict(bits=4, group_size=32, sym=False), "W8A8 dynamic": dict(scheme="w8a8"),
                "W8A8 static": dict(scheme="w8a8", act="static")}
    for name, options in settings.items():
        torch.manual_seed(0)
        model = llmq.quantize(mixtral(), llmq.QuantConfig(**options),
                              dataset=calibration, progress=False)
        block = next(m for m in model.modules() if isinstance(m, QuantExperts))
        if "bits" in options:
            set_cpu_backend(block, "dense")  # the loop's reference: each expert's dequantized weight in fp32
        cases = []
        for tokens in (3, 70):
            g = torch.Generator().manual_seed(tokens)
            inputs = (torch.randn(tokens, 128, generator=g),
                      torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(tokens)]),
                      torch.rand(tokens, 2, generator=g))
            cpu_select.force("w8a8", "intmm")  # the exact int8 sums, whatever this processor measures fastest
            try:
                with torch.no_grad():
                    cases.append((tokens, inputs, block(*inputs).double()))  # the loop over experts, CPU kernels
            finally:
                cpu_select.force("w8a8", None)
        block.to(device)
        for tokens, inputs, ref in cases:
            with torch.no_grad():  # the grouped kernels themselves, never the forward's fallback to the loop
                y = block.grouped_forward(*(t.to(device) for t in inputs)).cpu()
            # W8A8 on CUDA: an input that CUDA's float ops round across a level moves one code.
            tol = 1e-2 if device == "cuda" and name.startswith("W8A8") else 1e-4
            check(f"MoE {name} grouped, {tokens} tokens", y, ref, tol, log)


TUNED_MODULES = ("triton_qmm", "triton_int8")


@contextlib.contextmanager
def pinned(decode_index=0, gemm_index=0):
    """Both GEMM kernels launch one config per path instead of autotuning: the broad checks cover
    many specializations, and autotuning would compile every config for each (seconds apiece on a
    GPU). The configs are checked one by one in check_every_config; autotuning itself is exercised by
    the CUDA graph checks and every point of scripts/bench_kernels.py."""
    import importlib

    modules = [importlib.import_module(f"llmq.kernels.{name}") for name in TUNED_MODULES]
    saved = [(m._PATHS, m._GEMV) for m in modules]
    for m, (paths, gemv) in zip(modules, saved):
        m._PATHS = paths.pinned(paths.decode_configs[decode_index % len(paths.decode_configs)],
                                paths.gemm_configs[gemm_index % len(paths.gemm_configs)])
        m._GEMV = gemv.pinned(gemv.configs[decode_index % len(gemv.configs)])
    try:
        yield
    finally:
        for m, (paths, gemv) in zip(modules, saved):
            m._PATHS, m._GEMV = paths, gemv


def config_label(config) -> str:
    kw = config.kwargs
    return (f"{kw.get('BLOCK_M', 1)}x{kw['BLOCK_N']}x{kw['BLOCK_K']} split {kw['SPLIT_K']} "
            f"w{config.num_warps} s{config.num_stages}")


def check_every_config(device, log):
    """Each autotune config of both kernels and both paths, at sizes that leave partial tiles in M, N
    and K: the autotuner may pick any of them."""
    from llmq.kernels import dequant_matmul, int8_linear, triton_int8, triton_qmm

    n, k = 1000, 1152  # 1000: no BLOCK_N divides it; 1152 = 9 * 128: partial K tiles of 256

    def configs_of(module, path):
        return {"splitk": module._PATHS.decode_configs, "gemm": module._PATHS.gemm_configs,
                "gemv": module._GEMV.configs}[path]

    cases = ((3, "splitk"), (130, "gemm"), (1, "gemv"))
    for i in range(max(len(configs_of(triton_qmm, path)) for _, path in cases)):
        bits, gs, dtype = (4, 128, torch.float16) if i % 2 == 0 else (8, 32, torch.bfloat16)
        layer, w64 = layer_for(n, k, bits, gs, False, False, dtype, device, seed=i)
        with pinned(i, i):
            for m, path in cases:
                configs = configs_of(triton_qmm, path)
                if i >= len(configs):
                    continue
                x = torch.randn(m, k, device=device).to(dtype)
                y = dequant_matmul(x, layer["qweight"], layer["qzeros"], layer["scales"], bits=bits, group_size=gs,
                                   path=path)
                check(f"matmul config {config_label(configs[i])} b{bits} g{gs}", y, x.double() @ w64.t(),
                      TOL[dtype], log)
    for i in range(max(len(configs_of(triton_int8, path)) for _, path in cases)):
        static = i % 2 == 1
        with pinned(i, i):
            for m, path in cases:
                configs = configs_of(triton_int8, path)
                if i >= len(configs):
                    continue
                args = int8_operands(m, n, k, static, torch.float16, True, device, seed=i)
                check(f"int8 config {config_label(configs[i])} {'static' if static else 'dynamic'}",
                      int8_linear(*args, path=path), int8_expected(*args), TOL[torch.float16], log)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="fewer matmul cases")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("check_kernels: no CUDA GPU found; run it on one (or --device cpu under TRITON_INTERPRET=1).")
        return 1
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("check_kernels: --device cpu runs the kernels on the interpreter: set TRITON_INTERPRET=1.")
        return 1
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    log: list[tuple[str, float]] = []
    # On CUDA every check but the CUDA graphs' runs pinned (see pinned); the graphs autotune.
    def pinned_step(fn, *fn_args):
        def run():
            with pinned() if args.device == "cuda" else contextlib.nullcontext():
                fn(*fn_args)
        return run

    def w8a8_models():
        for act, dtype in itertools.product(("dynamic", "static"), (torch.float32, torch.float16)):
            check_w8a8_model(act, dtype, False, log)

    steps = [("int8 matmul", pinned_step(check_int8_matmul, args.device, args.quick, log)),
             ("matmul", pinned_step(check_matmul, args.device, args.quick, log)),
             ("poisoned outputs", pinned_step(check_poisoned, args.device, log)),
             ("MoE grouped kernels", pinned_step(check_moe_blocks, args.device, log))]
    if args.device == "cuda":  # the slowest last: torch.compile runs inductor's own compiler
        steps[1:1] = [("every tile config", lambda: check_every_config(args.device, log))]
        steps += [("cuda graphs", lambda: check_cuda_graphs(log)),
                  ("int8 cuda graphs", lambda: check_int8_cuda_graphs(log)),
                  ("act-order layer", pinned_step(check_act_order_layer, log)),
                  ("model", pinned_step(check_model, False, log)),
                  ("W8A8 model", pinned_step(w8a8_models)),
                  ("torch.compile layer", pinned_step(check_compiled_layer, log)),
                  ("torch.compile model", pinned_step(check_model, True, log)),
                  ("W8A8 torch.compile model", pinned_step(check_w8a8_model, "dynamic", torch.float16, True, log))]
    failed = []
    for name, step in steps:  # every step runs, so that one look at a GPU shows every failure
        start, began = len(log), time.perf_counter()
        try:
            step()
        except CheckFailed as e:
            failed.append(name)
            print(f"FAILED {name}: {e}", flush=True)
            continue
        except Exception:  # a kernel that does not compile or launch: report it, go on with the next step
            failed.append(name)
            print(f"FAILED {name}: raised\n{traceback.format_exc()}", flush=True)
            continue
        worst = max(log[start:], key=lambda r: r[1])
        print(f"ok  {name}: {len(log) - start} checks in {time.perf_counter() - began:.0f} s, "
              f"worst relative error {worst[1]:.2e} ({worst[0]})", flush=True)
    if failed:
        print(f"{len(failed)} of {len(steps)} steps FAILED: {', '.join(failed)}")
        return 1
    print(f"all {len(log)} checks passed")
    return 0

if __name__ == "__main__":
    sys.exit(main())
