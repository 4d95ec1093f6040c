"""gptq / awq / compressed-tensors folders load into QuantLinear without a native copy on disk.

The reference is the converted path: `llmq convert` to a native folder, then a
native load. The in-flight load must give the same buffers, bit for bit, and
the same logits, while no temporary folder is created and nothing is converted
to disk.
"""

import json
import tempfile

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmq
from llmq import QuantConfig, QuantLinear
from llmq.formats import convert as convert_module
from llmq.formats.convert import convert
from llmq.modules.replace import replace_module
from conftest import random_ids, tiny_model
from test_interop import awq_pack


def _native(tmp_path, sym, bits, group_size, act_order=False, dtype=torch.float32, arch="llama"):
    model = llmq.quantize(tiny_model(arch, dtype=dtype), QuantConfig(bits=bits, group_size=group_size, sym=sym),
                          progress=False)
    if act_order:  # a permuted g_idx on every layer, as GPTQ's act-order writes, and its config
        model.config.quantization_config.update(method="gptq", desc_act=True)
        g = torch.Generator().manual_seed(5)
        for name, layer in list(model.named_modules()):
            if isinstance(layer, QuantLinear):
                qw = layer.quantized_weight()
                qw.g_idx = (torch.randperm(qw.shape[1], generator=g) // qw.group_size).to(torch.int32)
                replace_module(model, name, QuantLinear.from_quantized(qw, layer.bias))
    llmq.save(model, tmp_path / "native")
    return tmp_path / "native"


def _awq_folder(native, out):
    """An AutoAWQ GEMM folder holding the native folder's codes (4-bit, no act-order)."""
    from llmq.kernels.layout import unpack_cols, unpack_rows

    sd = load_file(native / "model.safetensors")
    for k in [k for k in sd if k.endswith(".qweight")]:
        name = k[: -len(".qweight")]
        sd[f"{name}.qweight"] = awq_pack(unpack_rows(sd[k], 4))  # [K, N] codes
        sd[f"{name}.qzeros"] = awq_pack(unpack_cols(sd[f"{name}.qzeros"], 4))  # [G, N] zero points
    out.mkdir()
    cfg = json.loads((native / "config.json").read_text())
    gs = cfg["quantization_config"]["group_size"]
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": gs, "zero_point": True,
                                  "version": "gemm"}
    (out / "config.json").write_text(json.dumps(cfg))
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return out


CASES = {
    "gptq-v1-sym": dict(fmt="gptq", sym=True, bits=4, group_size=32),
    "gptq-v2-asym": dict(fmt="gptq", sym=False, bits=4, group_size=32),
    "gptq-act-order-8bit": dict(fmt="gptq", sym=False, bits=8, group_size=32, act_order=True),
    "ct-sym": dict(fmt="compressed-tensors", sym=True, bits=4, group_size=32),
    "ct-asym-channel": dict(fmt="compressed-tensors", sym=False, bits=8, group_size=-1),
    "ct-asym-bf16": dict(fmt="compressed-tensors", sym=False, bits=4, group_size=64, dtype=torch.bfloat16),
    "awq": dict(fmt="awq", sym=False, bits=4, group_size=32),
    "moe-gptq": dict(fmt="gptq", sym=False, bits=4, group_size=32, arch="mixtral"),  # experts as 3D tensors
    "moe-ct": dict(fmt="compressed-tensors", sym=True, bits=4, group_size=32, arch="qwen3_moe"),
}


def _foreign(tmp_path, fmt, **kw):
    native = _native(tmp_path, **kw)
    if fmt == "awq":
        return _awq_folder(native, tmp_path / "awq")
    convert(native, tmp_path / fmt, fmt)
    return tmp_path / fmt


def _load_in_flight(folder, monkeypatch, **kw):
    """llmq.from_pretrained(folder), failing on any temporary folder or native conversion."""
    with monkeypatch.context() as m:
        def refuse(*args, **kwargs):
            raise AssertionError("a foreign checkpoint was copied to disk while loading")

        for name in ("mkdtemp", "TemporaryDirectory", "NamedTemporaryFile", "mkstemp"):
            m.setattr(tempfile, name, refuse)
        for name in ("convert", "write_folder"):
            m.setattr(convert_module, name, refuse)
        return llmq.from_pretrained(folder, output_loading_info=True, **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_in_flight_load_equals_the_converted_path(tmp_path, monkeypatch, case):
    folder = _foreign(tmp_path, **CASES[case])
    before = sorted(p.name for p in tmp_path.iterdir())
    model, info = _load_in_flight(folder, monkeypatch)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written next to the checkpoint
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    assert model.config.quantization_config.foreign is None  # the load's converters are released

    convert(folder, tmp_path / "converted", "llmq")
    reference = llmq.from_pretrained(tmp_path / "converted")
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("case", ["gptq-v1-sym", "ct-asym-channel", "awq"])
def test_in_flight_load_with_device_map_and_disk_offload(tmp_path, monkeypatch, case):
    folder = _foreign(tmp_path, **CASES[case])
    convert(folder, tmp_path / "converted", "llmq")
    ids = random_ids()
    with torch.no_grad():
        expected = llmq.from_pretrained(tmp_path / "converted")(ids).logits
        on_cpu, _ = _load_in_flight(folder, monkeypatch, device_map="cpu")
        assert {p.device.type for p in on_cpu.state_dict().values()} == {"cpu"}
        assert torch.equal(on_cpu(ids).logits, expected)
        offloaded, _ = _load_in_flight(folder, monkeypatch, device_map="auto", max_memory={"cpu": "60KB"},
                                       offload_folder=str(tmp_path / "offload"))
        assert "disk" in set(offloaded.hf_device_map.values())
        assert torch.equal(offloaded(ids).logits, expected)


@pytest.mark.parametrize("case", list(CASES))
def test_a_model_loaded_in_flight_saves_as_native_llmq(tmp_path, monkeypatch, case):
    # Saved with save_pretrained, the file holds what `llmq convert` writes, tensor for tensor: the load's
    # re-layouts are not undone (a compressed-tensors one, undone, wrote its tensors under a bare name).
    folder = _foreign(tmp_path, **CASES[case])
    model, _ = _load_in_flight(folder, monkeypatch)
    model.save_pretrained(tmp_path / "saved")
    qcfg = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "llmq" and not any(k.startswith("_") for k in qcfg)
    convert(folder, tmp_path / "converted", "llmq")
    saved, converted = load_file(tmp_path / "saved" / "model.safetensors"), {}
    for f in (tmp_path / "converted").glob("*.safetensors"):
        converted.update(load_file(f))
    assert saved.keys() == converted.keys()
    for k in converted:
        assert torch.equal(saved[k], converted[k]), k
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(tmp_path / "saved")(ids).logits, model(ids).logits)
