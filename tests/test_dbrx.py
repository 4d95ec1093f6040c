"""DBRX: experts whose weights lie in 2D parameters of a submodule, one expert's matrix after another
(`ffn.experts.mlp.w1`, `v1` [E * I, H]: gate and up; `w2` [E * I, H]: down, each expert's stored
[in, out]), and a router whose linear sits inside a module (`ffn.router.layer`).

The reference for a saved checkpoint is built independently of llmq's modules: the stored codes
unpacked here with plain shifts, dequantized in float64 and written back into DBRX's own parameters,
then the original transformers model run in float64.
"""

import copy
import json

import pytest
import torch
import transformers as T

import llmq
from llmq import QuantConfig, QuantLinear, pipeline
from llmq.modules.qexperts import QuantExperts
from conftest import float64_with_stored_linears, quantize_and_save, random_ids, stored_weight64, tiny_model

ARCH = "dbrx"
GROUP = 16
EXPERTS = "transformer.blocks.{}.ffn.experts"
ROUTER = "transformer.blocks.{}.ffn.router.layer"
CALIBRATION = random_ids(n=8, length=32, seed=12)


def _reference(fp_model, folder):
    """The fp model in float64 with every stored weight put back where DBRX keeps it."""
    ref, t = float64_with_stored_linears(fp_model, folder, 4, GROUP)
    for i in range(len(ref.transformer.blocks)):
        mlp = ref.get_submodule(EXPERTS.format(i)).mlp
        for e in range(4):
            rows = slice(e * 32, (e + 1) * 32)
            mlp.w1.data[rows] = stored_weight64(t, f"{EXPERTS.format(i)}.{e}.w1", 4, GROUP)
            mlp.v1.data[rows] = stored_weight64(t, f"{EXPERTS.format(i)}.{e}.v1", 4, GROUP)
            mlp.w2.data[rows] = stored_weight64(t, f"{EXPERTS.format(i)}.{e}.w2", 4, GROUP).t()
    return ref


def test_unrolled_experts_compute_the_original_forward():
    fp = tiny_model(ARCH)
    ids = random_ids(seed=3)
    with torch.no_grad():
        expected = fp(ids).logits
        job = pipeline.plan(fp, QuantConfig(group_size=GROUP), torch.device("cpu"))
        q = fp.get_submodule(EXPERTS.format(0))
        assert isinstance(q, QuantExperts) and q.expert(2).w2.weight.shape == (64, 32)
        assert "ffn.router.layer" in job.config.modules_to_not_convert  # the router's linear is kept
        torch.testing.assert_close(fp(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_rtn_checkpoint_loads_and_computes_its_stored_weights(tmp_path):
    fp = tiny_model(ARCH)
    original = copy.deepcopy(fp)
    router = fp.get_submodule(ROUTER.format(1)).weight.clone()
    ids = random_ids(seed=7)
    model, q_logits, keys = quantize_and_save(fp, QuantConfig(group_size=GROUP, sym=False), tmp_path / "q", ids)
    assert sum(isinstance(m, QuantLinear) for m in model.get_submodule(EXPERTS.format(1)).modules()) == 4 * 3
    assert type(model.get_submodule(ROUTER.format(1))) is torch.nn.Linear
    assert {f"{EXPERTS.format(1)}.{e}.{p}.qweight" for e in range(4) for p in ("w1", "v1", "w2")} <= keys
    assert not any(k.endswith(("mlp.w1", "mlp.v1", "mlp.w2")) for k in keys)
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q_logits)
        ref = _reference(original, tmp_path / "q")(ids).logits
    torch.testing.assert_close(q_logits.double(), ref, atol=2e-4, rtol=1e-4)
    assert torch.equal(loaded.get_submodule(ROUTER.format(1)).weight, router)
    # `llmq info` counts the experts as expert linears and the routers' linears as routers.
    from llmq.info import checkpoint_info

    c = checkpoint_info(tmp_path / "q")["census"]
    assert (c.expert_linears, c.experts_modules, c.linears) == (2 * 4 * 3, 2, 2 * 2)
    assert c.kept["routers"] == 2 * 4 * 64 and not c.other


def test_gptq_calibrates_each_expert_on_its_tokens_and_reloads(tmp_path):
    report = {}
    model = llmq.quantize(tiny_model(ARCH), QuantConfig(method="gptq", group_size=GROUP), dataset=CALIBRATION,
                          progress=False, report=report)
    counts = [json.loads(line.rpartition(": ")[2]) for line in report["experts"] if "routed tokens" in line]
    assert len(counts) == 2 and all(sum(c) == 2 * CALIBRATION.numel() for c in counts)  # top-2
    ids = random_ids(seed=9)
    llmq.save(model, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(tmp_path / "q")(ids).logits, model(ids).logits)


@pytest.mark.parametrize("config", [QuantConfig(group_size=GROUP), QuantConfig(scheme="w8a8")], ids=["w4", "w8a8"])
def test_compressed_tensors_export_reports_that_other_engines_read_dbrx_experts_whole(tmp_path, config):
    from llmq.formats.convert import convert

    model = llmq.quantize(tiny_model(ARCH), config, progress=False)
    llmq.save(model, tmp_path / "native")
    rows = {r.engine: r for r in convert(tmp_path / "native", tmp_path / "ct", "compressed-tensors")}
    assert not rows["vLLM MoE experts (FusedMoE)"].loads and "v1" in rows["vLLM MoE experts (FusedMoE)"].why
    assert not rows["transformers + compressed-tensors"].loads
    ids = random_ids(seed=5)
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(tmp_path / "ct")(ids).logits, model(ids).logits)
