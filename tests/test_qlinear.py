import pytest
import torch

from llmq.kernels.layout import pack_cols, pack_rows
from llmq.modules import QuantLinear
from llmq.solvers.rtn import rtn_quantize


def _reference(x, codes, zeros, scales, g_idx, bias):
    # float64 reference from integer codes: W[n, k] = (codes[n, k] - z[n, g(k)]) * s[n, g(k)]
    w = (codes.double() - zeros.double()[:, g_idx]) * scales.double()[:, g_idx]
    y = x.double() @ w.t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 96, -1])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_matches_float64_reference(bits, group_size, act_order, with_bias):
    g = torch.Generator().manual_seed(bits + group_size + 3 * act_order + 7 * with_bias)
    k, n = 192, 40
    gs = k if group_size == -1 else group_size
    groups = k // gs
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    zeros = torch.randint(0, 2**bits, (n, groups), generator=g)
    scales = (torch.rand(n, groups, generator=g) * 0.02 + 0.001).to(torch.float16)
    g_idx = torch.randperm(k, generator=g) // gs if act_order else torch.arange(k) // gs
    bias = torch.randn(n, generator=g).to(torch.float16) if with_bias else None
    layer = QuantLinear(k, n, bits=bits, group_size=group_size, bias=with_bias, desc_act=act_order,
                        dtype=torch.float16)
    layer.qweight.copy_(pack_rows(codes.t(), bits))
    layer.qzeros.copy_(pack_cols(zeros.t(), bits))
    layer.scales.copy_(scales.t())
    if act_order:
        layer.g_idx.copy_(g_idx.int())
    if with_bias:
        layer.bias.data.copy_(bias)
    x = torch.randn(3, 5, k, generator=g)
    y = layer(x)
    assert y.shape == (3, 5, n)
    ref = _reference(x, codes, zeros, scales, g_idx, bias)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


def test_from_quantized_round_trips_codes():
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    qw = rtn_quantize(w, 4, 32, False, torch.bfloat16)
    layer = QuantLinear.from_quantized(qw)
    back = layer.quantized_weight()
    assert torch.equal(back.codes.long(), qw.codes.long())
    assert torch.equal(back.zeros.long(), qw.zeros.long())
    assert torch.equal(back.scales, qw.scales)
    assert layer.scales.dtype == torch.bfloat16


def test_unpackable_shape_is_refused():
    with pytest.raises(ValueError, match="cannot be packed"):
        QuantLinear(60, 16, bits=4, group_size=-1)


def test_quantized_model_under_torch_compile_on_cpu():
    """torch.compile of a quantized model on CPU: same logits as eager, no recompile storm per layer."""
    from torch._dynamo.utils import counters

    import llmq
    from conftest import random_ids, tiny_model

    model = llmq.quantize(tiny_model("llama"), llmq.QuantConfig(method="rtn", bits=4, group_size=32), progress=False)
    ids = random_ids()
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
        compiled = torch.compile(model, backend="aot_eager")(ids, use_cache=False).logits
    torch.testing.assert_close(compiled, eager)
    reasons = [reason for group in counters.values() for reason in group]
    assert not [r for r in reasons if "recompile limit" in str(r)], "a frame recompiled past dynamo's limit"


def _layer_tensors(k, n, bits, gs, seed):
    """Checkpoint tensors of a random act-order layer, and its float64 reference's inputs."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    zeros = torch.randint(0, 2**bits, (n, k // gs), generator=g)
    scales = torch.rand(n, k // gs, generator=g) * 0.02 + 0.001
    g_idx = torch.randperm(k, generator=g) // gs
    tensors = {"qweight": pack_rows(codes.t(), bits), "qzeros": pack_cols(zeros.t(), bits),
               "scales": scales.t().contiguous(), "g_idx": g_idx.int()}
    return tensors, (codes, zeros, scales, g_idx)


def test_cpu_form_is_built_at_placement_and_follows_buffers_put_in_from_outside(monkeypatch):
    """The CPU form is decided when the layer is placed (post_load, a move that gives new tensors),
    not on its calls; buffers put in by accelerate's set_module_tensor_to_device (what its
    offloading hooks do before each call) replace it."""
    from accelerate.utils import set_module_tensor_to_device

    import llmq.modules.qlinear as qlinear_module

    builds = []
    real_prepare = qlinear_module.prepare_cpu
    monkeypatch.setattr(qlinear_module, "prepare_cpu", lambda *a, **kw: builds.append(a) or real_prepare(*a, **kw))
    k, n = 128, 32
    first, first_ref = _layer_tensors(k, n, 4, 32, seed=11)
    layer = QuantLinear(k, n, bits=4, group_size=32, desc_act=True, dtype=torch.float32)
    layer.set_cpu_backend("dense")  # exact in float32: the reference is float64 from the codes
    for name, tensor in first.items():
        getattr(layer, name).copy_(tensor)
    layer.post_load()
    assert len(builds) == 1, "not built when placed"
    x = torch.randn(2, 5, k, generator=torch.Generator().manual_seed(12))
    for _ in range(2):
        torch.testing.assert_close(layer(x).double(), _reference(x, *first_ref, None), rtol=1e-4, atol=1e-4)
    assert len(builds) == 1, "built again on a call"
    layer.to("cpu")  # same tensors: nothing to decide
    assert len(builds) == 1
    layer._apply(lambda t: t.clone())  # new tensors, as a move gives: decided again at the move
    assert len(builds) == 2
    torch.testing.assert_close(layer(x).double(), _reference(x, *first_ref, None), rtol=1e-4, atol=1e-4)
    assert len(builds) == 2
    second, second_ref = _layer_tensors(k, n, 4, 32, seed=13)
    for name, tensor in second.items():
        set_module_tensor_to_device(layer, name, "cpu", value=tensor)
    torch.testing.assert_close(layer(x).double(), _reference(x, *second_ref, None), rtol=1e-4, atol=1e-4)
    assert torch.equal(layer.state_dict()["qweight"], second["qweight"])
