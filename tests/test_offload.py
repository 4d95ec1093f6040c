"""Quantized checkpoints under accelerate's offload (device_map with "disk"): every layer kind computes
what it computes in memory, and offloaded layers keep no quantized weight in memory."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmq
from llmq import QuantConfig, QuantLinear
from conftest import random_ids, tiny_model

CASES = {
    "llama-int4": ("llama", QuantConfig(group_size=32)),  # q/k/v and gate/up share calls at decode
    "opt-int4": ("opt", QuantConfig(group_size=32)),  # linears with biases
    "mixtral-int4": ("mixtral", QuantConfig(group_size=32)),  # experts
    "opt-w8a8": ("opt", QuantConfig(scheme="w8a8")),  # W8A8 groups with biases
}


def _quantized_tensors(model) -> dict[str, torch.Tensor]:
    return {n: b for n, b in model.named_buffers() if n.endswith((".qweight", ".weight_scale"))} | {
        n: p for n, p in model.named_parameters() if p.dtype == torch.int8}


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    arch, qc = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param) / "q"
    llmq.save(llmq.quantize(tiny_model(arch), qc, progress=False), folder)
    model = llmq.from_pretrained(folder)
    ids = random_ids()
    with torch.no_grad():
        return folder, ids, model(ids).logits, model.generate(ids, max_new_tokens=4, do_sample=False)


@pytest.mark.parametrize("load", ["llmq.from_pretrained", "AutoModelForCausalLM, offload_buffers=True",
                                  "AutoModelForCausalLM"])
def test_offloaded_model_computes_as_in_memory(checkpoint, tmp_path, load):
    folder, ids, logits, tokens = checkpoint
    where = dict(device_map={"": "disk"}, offload_folder=str(tmp_path / "offload"))
    if load == "llmq.from_pretrained":
        model = llmq.from_pretrained(folder, **where)  # offloads the quantized buffers by default
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, **where, offload_buffers=load.endswith("True"))
    quantized = _quantized_tensors(model)
    assert quantized
    resident = [n for n, t in quantized.items() if t.device.type != "meta"]
    assert not resident if load != "AutoModelForCausalLM" else resident  # accelerate's default keeps buffers
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), tokens)
    if not resident:  # nor do the CPU kernels' forms of the weights stay after the calls
        assert not [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m._form.cpu is not None]
