"""A quantized model is differentiable in its input (llmq/modules/input_grad.py): dL/dx = dL/dy W."""

import pytest
import torch

import llmq
from llmq import QuantConfig
from llmq.kernels.layout import pack_cols, pack_rows
from llmq.modules import QuantLinear
from llmq.modules.w8a8 import W8A8Linear
from conftest import random_ids, tiny_model


def _quant_linear(bits, group_size, act_order, g):
    """A QuantLinear from random integer codes, and its weight in float64 built from those codes."""
    k, n = 128, 48
    gs = k if group_size == -1 else group_size
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    zeros = torch.randint(0, 2**bits, (n, k // gs), generator=g)
    scales = torch.rand(n, k // gs, generator=g) * 0.02 + 0.001
    g_idx = torch.randperm(k, generator=g) // gs if act_order else torch.arange(k) // gs
    layer = QuantLinear(k, n, bits=bits, group_size=group_size, desc_act=act_order, dtype=torch.float32)
    layer.qweight.copy_(pack_rows(codes.t(), bits))
    layer.qzeros.copy_(pack_cols(zeros.t(), bits))
    layer.scales.copy_(scales.t())
    if act_order:
        layer.g_idx.copy_(g_idx.int())
    layer.post_load()
    return layer, (codes.double() - zeros.double()[:, g_idx]) * scales.double()[:, g_idx]


def _w8a8_linear(static, g):
    k, n = 128, 48
    codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, 1, generator=g) * 0.01 + 1e-3
    layer = W8A8Linear(k, n, static=static)
    layer.weight.copy_(codes)
    layer.weight_scale.copy_(scale)
    if static:
        layer.input_scale.fill_(0.05)
    return layer, codes.double() * scale.double()


LAYERS = [("int4 g32", lambda g: _quant_linear(4, 32, False, g)),
          ("int8 per row", lambda g: _quant_linear(8, -1, False, g)),
          ("int4 act-order", lambda g: _quant_linear(4, 32, True, g)),
          ("w8a8 dynamic", lambda g: _w8a8_linear(False, g)),
          ("w8a8 static", lambda g: _w8a8_linear(True, g))]


@pytest.mark.parametrize("name,make", LAYERS, ids=[name for name, _ in LAYERS])
@pytest.mark.parametrize("rows", [1, 40])  # decode and prefill kernels
def test_the_input_gradient_is_the_output_gradient_times_the_weight(name, make, rows):
    g = torch.Generator().manual_seed(rows + len(name))
    layer, weight = make(g)
    x = torch.randn(2, rows, layer.in_features, generator=g, requires_grad=True)
    grad = torch.randn(2, rows, layer.out_features, generator=g)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(y, layer(x))  # the same kernels compute the output
    (y * grad).sum().backward()
    torch.testing.assert_close(x.grad.double(), grad.double() @ weight, rtol=1e-5, atol=1e-5)


def _dequantized_copy(model):
    """The model with every quantized layer replaced by an nn.Linear of its dequantized weight."""
    import copy

    ref = copy.deepcopy(model)
    for parent in list(ref.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, (QuantLinear, W8A8Linear)):
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight.data = child.dequantize_weight(torch.float32)
                if child.bias is not None:
                    linear.bias.data = child.bias.float()
                setattr(parent, child_name, linear)
    return ref


@pytest.mark.parametrize("arch,config", [
    ("llama", QuantConfig(bits=4, group_size=32, sym=False)),
    ("mixtral", QuantConfig(bits=4, group_size=32, sym=False)),
    ("llama", QuantConfig(scheme="w8a8", smooth="off")),
])
def test_a_quantized_model_gives_its_input_embeddings_a_gradient(tmp_path, arch, config):
    """Through a loaded checkpoint (the experts too): close to the gradient through the same model
    with its dequantized weights in nn.Linear layers (the forwards differ by the kernels' bf16
    rounding, or W8A8's int8 activations)."""
    model = llmq.quantize(tiny_model(arch), config, dataset=random_ids(n=4, length=16, seed=2), progress=False)
    llmq.save(model, tmp_path / "q")
    loaded = llmq.from_pretrained(tmp_path / "q")
    ids = random_ids(n=2, length=10, seed=3)
    grads = []
    for m in (loaded, _dequantized_copy(loaded)):
        embeds = m.get_input_embeddings()(ids).detach().requires_grad_(True)
        m(inputs_embeds=embeds).logits.float().logsumexp(-1).sum().backward()
        grads.append(embeds.grad)
    assert not any(isinstance(m, (QuantLinear, W8A8Linear)) for m in _dequantized_copy(loaded).modules())
    error = ((grads[0] - grads[1]).norm() / grads[1].norm()).item()
    assert error < 0.05, error
