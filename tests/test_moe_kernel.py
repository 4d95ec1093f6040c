"""The grouped MoE dequantize-matmul kernel under the Triton interpreter, against float64."""

import pytest
import torch

from llmq.solvers.rtn import rtn_quantize

triton = pytest.importorskip("triton")


def _experts(e, n, k, bits, group_size, seed):
    g = torch.Generator().manual_seed(seed)
    qws = [rtn_quantize(torch.randn(n, k, generator=g), bits, group_size, False, torch.float16) for _ in range(e)]
    stack = lambda name: torch.stack([q.packed()[name] for q in qws])  # noqa: E731
    return qws, stack("qweight"), stack("qzeros"), stack("scales")


def _routing(tokens, e, top_k, g):
    """(slots, counts per expert, expert of each slot) of a random routing that leaves the last expert
    without tokens: tokens sorted by expert, as the QuantExperts forward sorts them."""
    flat = torch.stack([torch.randperm(e - 1, generator=g)[:top_k] for _ in range(tokens)]).reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=e).tolist()
    assert counts[e - 1] == 0
    return order // top_k, counts, flat[order]


@pytest.mark.parametrize("bits,group_size,tokens", [(4, 32, 3), (4, 16, 40), (8, 64, 5)])
def test_grouped_kernel_matches_float64(bits, group_size, tokens):
    from llmq.kernels.triton_moe import grouped_dequant_matmul

    e, n, k, top_k = 4, 64, 64, 2
    qws, qweight, qzeros, scales = _experts(e, n, k, bits, group_size, seed=tokens)
    g = torch.Generator().manual_seed(100 + tokens)
    x = torch.randn(tokens, k, generator=g)
    bias = torch.randn(e, n, generator=g)
    slots, counts, experts_of_slots = _routing(tokens, e, top_k, g)
    out = grouped_dequant_matmul(x, slots, counts, qweight, qzeros, scales, bits=bits, group_size=group_size,
                                 bias=bias)
    # Reference: each slot's row times its expert's weight, dequantized from the integer codes in float64.
    ref = torch.stack([
        x[slots[i]].double() @ ((qws[ex].codes.double() - qws[ex].zeros.double().repeat_interleave(group_size, 1))
                                * qws[ex].scales.double().repeat_interleave(group_size, 1)).t() + bias[ex].double()
        for i, ex in enumerate(experts_of_slots.tolist())])
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def _block_inputs(tokens, seed):
    """(generator, (hidden states, top-2 expert indices, routing weights)) for a tiny model's experts block
    (hidden size 64, 4 experts)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, 64, generator=g)
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(tokens)])
    return g, (hidden, index, torch.rand(tokens, 2, generator=g))


# Llama 4 and DBRX: the gate of an undecorated class, act(gate) * up.
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "qwen2_moe", "llama4_text", "dbrx"])
def test_quant_experts_grouped_forward_matches_the_loop(arch):
    import llmq
    from llmq import QuantConfig
    from llmq.modules.qexperts import QuantExperts
    from conftest import tiny_model

    model = llmq.quantize(tiny_model(arch), QuantConfig(group_size=16, sym=False), progress=False)
    q = next(m for m in model.modules() if isinstance(m, QuantExperts))
    assert q.grouped_kind() == "packed"
    _, (hidden, index, weights) = _block_inputs(7, seed=3)
    from llmq.modules.qlinear import set_cpu_backend

    set_cpu_backend(q, "dense")  # the loop's reference: each expert's dequantized weight, exact in fp32
    with torch.no_grad():
        expected = q(hidden, index, weights)
        got = q.grouped_forward(hidden, index, weights)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_quant_experts_grouped_form_follows_an_experts_buffers_put_in_by_a_hook():
    """An expert's buffers put in by accelerate's set_module_tensor_to_device (its offloading hooks)
    rebuild the stacked form the grouped kernel reads: the grouped forward still matches the loop."""
    from accelerate.utils import set_module_tensor_to_device

    import llmq
    from llmq import QuantConfig
    from llmq.modules.qexperts import QuantExperts
    from llmq.modules.qlinear import set_cpu_backend
    from conftest import tiny_model

    model = llmq.quantize(tiny_model("mixtral"), QuantConfig(group_size=16, sym=False), progress=False)
    q = next(m for m in model.modules() if isinstance(m, QuantExperts))
    set_cpu_backend(q, "dense")
    _, (hidden, index, weights) = _block_inputs(9, seed=4)
    with torch.no_grad():
        q.grouped_forward(hidden, index, weights)  # the stacked form is built
        last = q.expert(q.num_experts - 1)
        donor = q.expert(0)
        for proj in (q.up_names[0], q.down_name):
            for name in ("qweight", "qzeros", "scales"):
                set_module_tensor_to_device(last._modules[proj], name, "cpu",
                                            value=getattr(donor._modules[proj], name).clone())
        expected = q(hidden, index, weights)
        got = q.grouped_forward(hidden, index, weights)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("static,tokens,dtype", [(False, 3, torch.float32), (False, 40, torch.bfloat16),
                                                 (True, 5, torch.float32), (True, 40, torch.float16)])
def test_grouped_int8_kernel_matches_the_integer_reference(static, tokens, dtype):
    from llmq.kernels import quantize_activations
    from llmq.kernels.moe import grouped_int8_matmul

    e, n, k, top_k = 4, 48, 80, 2  # n and k are not multiples of the tiles: the masks are exercised
    g = torch.Generator().manual_seed(200 + tokens)
    w = torch.randint(-127, 128, (e, n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(e, n, generator=g) * 0.01 + 1e-3
    bias = torch.randn(e, n, generator=g)
    x = torch.randn(tokens, k, generator=g) * 2
    x[:, 7] *= 40  # an outlier channel
    x = x.to(dtype)
    input_scale = torch.rand(e, generator=g) * 0.05 + 0.02 if static else None  # clips the outliers
    slots, counts, experts_of_slots = _routing(tokens, e, top_k, g)
    out = grouped_int8_matmul(x, slots, counts, w, ws, input_scale, bias)
    # Reference: each slot's row quantized as int8_linear quantizes it (its token's scale, or its
    # expert's static one), exact integer products, the scales and bias in float64.
    rows = []
    for i, ex in enumerate(experts_of_slots.tolist()):
        q, s = quantize_activations(x[slots[i]].reshape(1, k), None if input_scale is None else input_scale[ex:ex + 1])
        acc = (q.long() @ w[ex].long().t()).double()
        rows.append(acc[0] * s.double().reshape(()) * ws[ex].double() + bias[ex].double())
    ref = torch.stack(rows)
    assert out.dtype == dtype and out.shape == (slots.numel(), n)
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert ((out.double() - ref).abs().max() / ref.abs().max()) < tol


@pytest.mark.parametrize("arch,act", [("mixtral", "dynamic"), ("qwen2_moe", "static"), ("gpt_oss", "static"),
                                     ("llama4_text", "dynamic")])
def test_w8a8_experts_grouped_forward_matches_the_loop(arch, act, exact_w8a8_kernel):
    import llmq
    from llmq import QuantConfig
    from llmq.modules.qexperts import QuantExperts
    from conftest import random_ids, tiny_model

    model = llmq.quantize(tiny_model(arch), QuantConfig(scheme="w8a8", act=act),
                          dataset=random_ids(n=8, length=32, seed=5), progress=False)
    q = next(m for m in model.modules() if isinstance(m, QuantExperts))
    assert q.grouped_kind() == "int8"
    _, (hidden, index, weights) = _block_inputs(11, seed=5)
    with torch.no_grad():
        expected = q(hidden, index, weights)  # the loop over experts: each W8A8Linear on its own (CPU kernels)
        got = q.grouped_forward(hidden, index, weights)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_w8a8_grouped_form_follows_an_expert_written_in_place_and_refuses_unequal_static_scales(exact_w8a8_kernel):
    import llmq
    from llmq import QuantConfig
    from llmq.modules.qexperts import QuantExperts
    from conftest import random_ids, tiny_model

    model = llmq.quantize(tiny_model("mixtral"), QuantConfig(scheme="w8a8", act="static"),
                          dataset=random_ids(n=8, length=32, seed=5), progress=False)
    q = next(m for m in model.modules() if isinstance(m, QuantExperts))
    g, (hidden, index, weights) = _block_inputs(9, seed=6)
    with torch.no_grad():
        q.grouped_forward(hidden, index, weights)  # the stacked form is built
        down = q.expert(1)._modules[q.down_name]
        down.weight.copy_(torch.randint(-127, 128, down.weight.shape, generator=g, dtype=torch.int8))
        torch.testing.assert_close(q.grouped_forward(hidden, index, weights), q(hidden, index, weights),
                                   atol=1e-5, rtol=1e-5)
        # Gate and up of one expert with different static scales cannot share one quantized input.
        up = q.expert(2)._modules[q.up_names[-1]]
        up.input_scale.mul_(2)
        assert q._grouped_form() is None
        with pytest.raises(RuntimeError, match="different input scales"):
            q.grouped_forward(hidden, index, weights)


def test_a_block_no_grouped_kernel_runs_has_no_grouped_form():
    """A block with a full-precision projection among its QuantLinears (or one whose act-order layers the
    kernel does not take) has no grouped kind: the CUDA forward then loops over its experts."""
    import llmq
    from llmq import QuantConfig
    from llmq.modules.qexperts import QuantExperts
    from conftest import tiny_model

    model = llmq.quantize(tiny_model("mixtral"), QuantConfig(group_size=16, sym=False), progress=False)
    q = next(m for m in model.modules() if isinstance(m, QuantExperts))
    assert q.grouped_kind() == "packed" and q._grouped_form() is not None
    down = q.expert(2)._modules[q.down_name]
    setattr(q.expert(2), q.down_name, torch.nn.Linear(down.in_features, down.out_features, bias=False))
    assert q.grouped_kind() is None and q._grouped_form() is None
    _, (hidden, index, weights) = _block_inputs(5, seed=7)
    with pytest.raises(RuntimeError, match="no grouped kernel runs this block"):
        q.grouped_forward(hidden, index, weights)


@pytest.mark.parametrize("scheme", ["weight-only", "w8a8"])
def test_the_stacked_experts_go_with_the_tensors_an_offloading_hook_took_out(scheme):
    """accelerate's offloading hooks put each block's tensors in for its call and replace them by meta
    tensors after it: the stacked copy built in the call must go with them, not stay on the device."""
    import gc

    from accelerate.utils import set_module_tensor_to_device

    import llmq
    from llmq import QuantConfig
    from llmq.modules.qexperts import QuantExperts
    from conftest import tiny_model

    qc = QuantConfig(scheme="w8a8") if scheme == "w8a8" else QuantConfig(group_size=16, sym=False)
    model = llmq.quantize(tiny_model("mixtral"), qc, progress=False)
    q = next(m for m in model.modules() if isinstance(m, QuantExperts))
    assert q._grouped_form() is not None and q._grouped_form() is q._grouped_form()  # kept while its tensors live
    for linear in q._quant_linears():
        for name, tensor in list(linear.named_buffers()):
            if tensor is not None:
                set_module_tensor_to_device(linear, name, "meta")
    gc.collect()
    assert "_grouped" not in q.__dict__
    assert q._grouped_form() is None  # offloaded experts: the loop, whose hooks put each one's tensors in


def test_a_deleted_model_takes_its_stacked_experts_with_it():
    import gc
    import weakref

    import llmq
    from llmq import QuantConfig
    from llmq.modules.qexperts import QuantExperts
    from conftest import tiny_model

    model = llmq.quantize(tiny_model("mixtral"), QuantConfig(group_size=16, sym=False), progress=False)
    q = next(m for m in model.modules() if isinstance(m, QuantExperts))
    assert q._grouped_form() is not None
    expert = weakref.ref(q._quant_linears()[0])
    del model, q
    gc.collect()
    assert expert() is None
