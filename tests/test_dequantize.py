"""A quantized model back to full-precision modules (llmq.dequantize, transformers' model.dequantize())."""

import pytest
import torch
import transformers

import llmq
from llmq import QuantConfig
from llmq.modules.qexperts import QuantExperts
from llmq.modules.qlinear import QuantLinear, set_cpu_backend
from llmq.modules.w8a8 import W8A8Linear
from conftest import random_ids, tiny_model

QUANTIZED = (QuantLinear, W8A8Linear, QuantExperts)
INT4 = QuantConfig(bits=4, group_size=32, sym=False)


def _quantized_weights(model) -> dict:
    """{linear or expert projection name: the weight it computes with, float32}, in checkpoint names."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, W8A8Linear)):
            out[name] = m.dequantize_weight(torch.float32)
    return out


@pytest.mark.parametrize("arch,config", [
    ("llama", INT4), ("opt", INT4), ("llama", QuantConfig(scheme="w8a8", smooth="off")),
    ("mixtral", INT4), ("qwen3_moe", INT4), ("gpt_oss", INT4), ("qwen2_moe", QuantConfig(bits=8, group_size=-1)),
])
def test_a_dequantized_checkpoint_saves_as_a_plain_model_that_computes_its_weights(tmp_path, arch, config):
    model = llmq.quantize(tiny_model(arch), config, dataset=random_ids(n=4, length=16, seed=2), progress=False)
    llmq.save(model, tmp_path / "q")
    loaded = llmq.from_pretrained(tmp_path / "q")
    set_cpu_backend(loaded, "dense")  # the weights dequantized in fp32: no kernel rounding to tell apart
    ids = random_ids(n=2, length=10, seed=3)
    with torch.no_grad():
        quantized_logits = loaded(ids).logits
    weights = _quantized_weights(loaded)
    fp = loaded.dequantize()  # transformers' call, through llmq's quantizer
    assert fp is loaded and not any(isinstance(m, QUANTIZED) for m in fp.modules())
    assert getattr(fp.config, "quantization_config", None) is None and not fp.is_quantized
    fp.save_pretrained(tmp_path / "fp")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp")  # no quantization config
    assert not any(isinstance(m, QUANTIZED) for m in plain.modules())
    with torch.no_grad():
        fp_logits, plain_logits = fp(ids).logits, plain(ids).logits
    assert torch.equal(fp_logits, plain_logits)
    # The plain model holds the weights the quantized one computed with: the same logits, but for W8A8's
    # int8 activations.
    unrolled = llmq.quantize(plain, QuantConfig(bits=8, group_size=-1), progress=False)  # per-expert linears
    names = {n for n, m in unrolled.named_modules() if isinstance(m, (QuantLinear, W8A8Linear))}
    assert names == set(weights)
    if config.scheme == "w8a8":
        assert ((fp_logits - quantized_logits).norm() / quantized_logits.norm()).item() < 0.05
    else:
        torch.testing.assert_close(fp_logits, quantized_logits, rtol=1e-4, atol=1e-4)


def test_dequantize_in_memory_gives_back_the_weights_of_every_layer():
    model = llmq.quantize(tiny_model("mixtral"), INT4, progress=False)
    weights = _quantized_weights(model)
    experts = {name: m for name, m in model.named_modules() if isinstance(m, QuantExperts)}
    llmq.dequantize(model)
    assert "quantization_config" not in model.config.to_dict()
    for name, w in weights.items():
        if ".experts." in name:  # <block>.experts.<e>.<projection>, stacked back into the fused parameters
            block, _, rest = name.partition(".experts.")
            e, projection = rest.split(".")
            q = experts[block + ".experts"]
            fused = model.get_submodule(block + ".experts")
            param = "down_proj" if projection == q.down_name else "gate_up_proj"
            rows = fused.gate_up_proj.shape[1] // 2
            part = q.up_names.index(projection) if param == "gate_up_proj" else 0
            got = getattr(fused, param)[int(e)][part * rows:(part + 1) * rows] if param == "gate_up_proj" \
                else fused.down_proj[int(e)]
        else:
            got = model.get_submodule(name).weight
        assert torch.equal(got, w), name


@pytest.mark.parametrize("how", ["cast before", "llmq", "transformers"])
def test_the_dequantized_model_has_one_dtype(tmp_path, how):
    """Cast to bf16 after loading, then dequantized; or dequantized into bf16 (llmq's, transformers' call)."""
    llmq.save(llmq.quantize(tiny_model("mixtral"), INT4, progress=False), tmp_path / "q")
    model = llmq.from_pretrained(tmp_path / "q")
    if how == "cast before":
        llmq.dequantize(model.to(torch.bfloat16))
    elif how == "llmq":
        llmq.dequantize(model, torch.bfloat16)
    else:
        model.dequantize(dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert model(random_ids()).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("arch,experts,param,shape", [
    ("llama4_text", "model.layers.1.feed_forward.experts", "gate_up_proj", (4, 64, 64)),  # [E, H, 2I]
    ("dbrx", "transformer.blocks.0.ffn.experts", "mlp.w2", (4 * 32, 64)),  # [E x I, H], each expert's [in, out]
])
def test_experts_without_the_decorator_are_stacked_back_in_their_own_layout(tmp_path, arch, experts, param, shape):
    """Llama 4's and DBRX's experts (llmq.experts.UNDECORATED) return to their classes and parameters,
    and the dequantized model saves and loads as a plain transformers checkpoint."""
    model = llmq.quantize(tiny_model(arch), QuantConfig(group_size=16), progress=False)
    ids = random_ids(seed=4)
    with torch.no_grad():
        expected = model(ids).logits
    llmq.dequantize(model)
    module = model.get_submodule(experts)
    assert not isinstance(module, QuantExperts) and module.get_parameter(param).shape == shape
    model.save_pretrained(tmp_path / "fp")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp")
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, atol=1e-4, rtol=1e-4)

