import pytest
import torch
import transformers as T

import llmq
from llmq import LlmqError, QuantConfig, QuantLinear
from conftest import TINY_CONFIGS, random_ids, tiny_model


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_quantize_save_reload(tmp_path, arch):
    fp = tiny_model(arch)
    ids = random_ids()
    with torch.no_grad():
        fp_logits = fp(ids).logits
    linears = sum(isinstance(m, torch.nn.Linear) for m in fp.modules())
    model = llmq.quantize(fp, QuantConfig(group_size=32), progress=False)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    # Every linear of the decoder layers, nothing else (the head stays).
    assert len(quantized) == linears - 1 and not any("lm_head" in n for n in quantized)
    with torch.no_grad():
        q_logits = model(ids).logits
    assert not torch.equal(q_logits, fp_logits)  # quantization changed something ...
    assert (q_logits - fp_logits).abs().mean() < 0.5 * fp_logits.abs().mean()  # ... but not much
    llmq.save(model, tmp_path / arch)
    loaded = llmq.from_pretrained(tmp_path / arch)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q_logits)


def test_gpt2_conv1d_is_refused_clearly():
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(T.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=256,
                                                              bos_token_id=1, eos_token_id=2))
    with pytest.raises(LlmqError, match="Conv1D"):
        llmq.quantize(model, QuantConfig(group_size=32), progress=False)


def test_unknown_architecture_falls_back_to_discovery(monkeypatch):
    from llmq import arch

    model = tiny_model("llama")
    monkeypatch.setattr(model.config, "model_type", "brand_new_arch")
    spec = arch.arch_spec(model)
    assert spec.layers == "model.layers" and spec.sequential is None
    q = llmq.quantize(model, QuantConfig(group_size=32), progress=False)
    assert isinstance(q.model.layers[1].mlp.up_proj, QuantLinear)


def test_modules_to_not_convert():
    model = llmq.quantize(tiny_model("llama"),
                          QuantConfig(group_size=32, modules_to_not_convert=["lm_head", "mlp.down_proj"]),
                          progress=False)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
