"""GPTQ through the whole pipeline on tiny models: act-order checkpoints reload exactly."""

import pytest
import torch

import llmq
from llmq import QuantConfig, QuantLinear
from conftest import random_ids, tiny_model


@pytest.fixture
def calibration():
    # Tiny models have no tokenizer: the pipeline takes pre-tokenized windows.
    return random_ids(n=8, length=32, seed=5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "opt"])
def test_act_order_checkpoint_reloads_with_identical_logits(tmp_path, calibration, arch):
    model = llmq.quantize(tiny_model(arch), QuantConfig(method="gptq", bits=4, group_size=32), calibration,
                          progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.g_idx is not None for m in layers)  # act-order is GPTQ's default
    assert any(not torch.equal(m.g_idx.long(), torch.arange(m.in_features) // 32) for m in layers)
    ids = random_ids(seed=9)
    with torch.no_grad():
        expected = model(ids).logits
    llmq.save(model, tmp_path / "q")
    loaded = llmq.from_pretrained(tmp_path / "q")
    for name, buf in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name].to(buf.dtype), buf), name
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_gptq_is_closer_to_fp_than_rtn_on_calibration_data(calibration):
    ids = calibration
    fp = tiny_model("llama")
    with torch.no_grad():
        ref = fp(ids).logits
    errs = {}
    for method in ("rtn", "gptq"):
        q = llmq.quantize(tiny_model("llama"), QuantConfig(method=method, bits=4, group_size=32), ids,
                          progress=False)
        with torch.no_grad():
            errs[method] = (q(ids).logits - ref).pow(2).mean().item()
    assert errs["gptq"] < errs["rtn"], errs
