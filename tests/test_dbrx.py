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
from safetensors.torch import load_file

import llmq
from llmq import QuantConfig, QuantLinear, pipeline
from llmq.modules.qexperts import QuantExperts
from conftest import random_ids, tiny_model

ARCH = "dbrx"
GROUP = 16
EXPERTS = "transformer.blocks.{}.ffn.experts"
ROUTER = "transformer.blocks.{}.ffn.router.layer"
CALIBRATION = random_ids(n=8, length=32, seed=12)


def _dequant64(t: dict, name: str) -> torch.Tensor:
    """[N, K] float64 weight of the 4-bit module `name`: its codes unpacked with shifts."""
    shifts = torch.arange(8, dtype=torch.int64) * 4
    words = t[f"{name}.qweight"].to(torch.int64) & 0xFFFFFFFF
    q = ((words.unsqueeze(1) >> shifts.view(1, 8, 1)) & 15).reshape(-1, words.shape[1]).double()  # [K, N]
    zwords = t[f"{name}.qzeros"].to(torch.int64) & 0xFFFFFFFF
    z = ((zwords.unsqueeze(2) >> shifts.view(1, 1, 8)) & 15).reshape(zwords.shape[0], -1).double()  # [G, N]
    s = t[f"{name}.scales"].double()
    g = torch.arange(q.shape[0]) // GROUP
    return ((q - z[g]) * s[g]).t()


def _reference(fp_model, folder):
    ref = copy.deepcopy(fp_model).double()
    t = load_file(str(folder / "model.safetensors"))
    for name in sorted({k[: -len(".qweight")] for k in t if k.endswith(".qweight")}):
        if ".experts." not in name:
            ref.get_submodule(name).weight.data = _dequant64(t, name)
    for i in range(len(ref.transformer.blocks)):
        mlp = ref.get_submodule(EXPERTS.format(i)).mlp
        for e in range(4):
            rows = slice(e * 32, (e + 1) * 32)
            mlp.w1.data[rows] = _dequant64(t, f"{EXPERTS.format(i)}.{e}.w1")
            mlp.v1.data[rows] = _dequant64(t, f"{EXPERTS.format(i)}.{e}.v1")
            mlp.w2.data[rows] = _dequant64(t, f"{EXPERTS.format(i)}.{e}.w2").t()
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
    model = llmq.quantize(fp, QuantConfig(group_size=GROUP, sym=False), progress=False)
    assert sum(isinstance(m, QuantLinear) for m in model.get_submodule(EXPERTS.format(1)).modules()) == 4 * 3
    assert type(model.get_submodule(ROUTER.format(1))) is torch.nn.Linear
    ids = random_ids(seed=7)
    with torch.no_grad():
        q_logits = model(ids).logits
    llmq.save(model, tmp_path / "q")
    keys = set(load_file(str(tmp_path / "q" / "model.safetensors")))
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


def test_dequantized_model_is_dbrx_again(tmp_path):
    model = llmq.quantize(tiny_model(ARCH), QuantConfig(group_size=GROUP), progress=False)
    ids = random_ids(seed=4)
    with torch.no_grad():
        expected = model(ids).logits
    llmq.dequantize(model)
    experts = model.get_submodule(EXPERTS.format(0))
    assert type(experts).__name__ == "DbrxExperts" and experts.mlp.w2.shape == (4 * 32, 64)
    model.save_pretrained(tmp_path / "fp")
    plain = T.AutoModelForCausalLM.from_pretrained(tmp_path / "fp")
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, atol=1e-4, rtol=1e-4)


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
