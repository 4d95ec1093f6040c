"""LongCat-Flash: experts that transformers does not decorate, beside identity ("zero") experts that
hand on the token times its routing weight; its gate_up_proj holds slots for those too, which its
forward never reads (llmq.experts.UNDECORATED, ExpertsFlags.routed).

References are transformers' own LongcatFlashExperts forward and the original model, with the stored
codes unpacked here with plain shifts and dequantized in float64.
"""

import copy

import pytest
import torch
import transformers as T

import llmq
from llmq import QuantConfig, dequantize, pipeline
from llmq.modules.qexperts import QuantExperts
from conftest import DISCOVERED_CONFIGS, float64_with_stored_linears, random_ids, stored_weight64, tiny_model

pytestmark = pytest.mark.skipif("longcat_flash" not in DISCOVERED_CONFIGS,
                                reason="this transformers has no LongCat-Flash")

ARCH = "longcat_flash"
GROUP = 16
EXPERTS = "model.layers.1.mlp.experts"


def _routing(tokens, experts, identities, top_k, seed):
    """Top-k indices over experts and identity experts, each token choosing both kinds, and weights."""
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(experts + identities, generator=g)[:top_k] for _ in range(tokens)])
    index[::3, 0] = experts  # every third token routes to an identity expert
    return index, torch.rand(tokens, top_k, generator=g)


def test_unrolled_experts_compute_the_original_forward_identities_included():
    fp = tiny_model(ARCH)
    original = fp.get_submodule(EXPERTS)
    assert original.gate_up_proj.shape[0] == 8 and original.down_proj.shape[0] == 4
    index, weights = _routing(7, 4, 4, 2, seed=2)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = original(x, index, weights)
        logits = fp(random_ids(seed=4)).logits
        pipeline.plan(fp, QuantConfig(group_size=GROUP), torch.device("cpu"))
        q = fp.get_submodule(EXPERTS)
        assert isinstance(q, QuantExperts) and (q.num_experts, q.identity_experts) == (4, 4)
        torch.testing.assert_close(q(x, index, weights), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(q(x[:1], index[:1], weights[:1]), expected[:1], atol=1e-6, rtol=1e-5)  # decode
        torch.testing.assert_close(fp(random_ids(seed=4)).logits, logits, atol=1e-5, rtol=1e-5)


def test_router_with_a_row_per_identity_expert_too_is_kept():
    model = pipeline.plan(tiny_model(ARCH), QuantConfig(group_size=GROUP), torch.device("cpu")).model
    assert type(model.get_submodule("model.layers.1.mlp.router.classifier")) is torch.nn.Linear


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_checkpoint_loads_and_computes_its_stored_weights(tmp_path, method):
    fp = tiny_model(ARCH, seed=5)
    ids = random_ids(seed=6)
    calibration = random_ids(n=8, length=32, seed=7) if method == "gptq" else None
    model = llmq.quantize(copy.deepcopy(fp), QuantConfig(method=method, group_size=GROUP), dataset=calibration,
                          progress=False)
    with torch.no_grad():
        logits = model(ids).logits
    llmq.save(model, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(tmp_path / "q")(ids).logits, logits)
    # Independently: the original model in float64 with the stored weights; the identity experts' slots
    # are not stored (nothing reads them).
    ref, t = float64_with_stored_linears(fp, tmp_path / "q", 4, GROUP)
    for name in ("model.layers.0.mlp.experts", EXPERTS):  # every layer has an MoE block
        assert not any(f"{name}.{e}." in k for k in t for e in range(4, 8))
        experts = ref.get_submodule(name)
        for e in range(4):
            experts.gate_up_proj.data[e] = torch.cat([stored_weight64(t, f"{name}.{e}.{p}", 4, GROUP)
                                                      for p in ("gate_proj", "up_proj")])
            experts.down_proj.data[e] = stored_weight64(t, f"{name}.{e}.down_proj", 4, GROUP)
    with torch.no_grad():
        torch.testing.assert_close(logits.double(), ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_dequantized_experts_fill_the_identity_slots_with_zeros(tmp_path):
    model = llmq.quantize(tiny_model(ARCH), QuantConfig(group_size=GROUP), progress=False)
    ids = random_ids(seed=8)
    with torch.no_grad():
        logits = model(ids).logits
    dense = dequantize(model)
    experts = dense.get_submodule(EXPERTS)
    assert type(experts).__name__ == "LongcatFlashExperts" and experts.gate_up_proj.shape[0] == 8
    assert experts.gate_up_proj[4:].eq(0).all()
    dense.save_pretrained(tmp_path / "dense")
    with torch.no_grad():
        torch.testing.assert_close(T.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")(ids).logits, logits,
                                   atol=1e-4, rtol=1e-4)

