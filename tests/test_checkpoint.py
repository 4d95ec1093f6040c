import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import llmq
from llmq import LlmqError, QuantConfig, QuantLinear
from conftest import random_ids, tiny_model


def _quantized(arch="llama", **cfg):
    return llmq.quantize(tiny_model(arch), QuantConfig(**{"group_size": 32, **cfg}), progress=False)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_save_load_gives_identical_logits(tmp_path, sym, bits):
    model = _quantized(sym=sym, bits=bits)
    ids = random_ids()
    with torch.no_grad():
        expected = model(ids).logits
    llmq.save(model, tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(loaded.model.layers[0].mlp.down_proj, QuantLinear)
    for name, buf in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name].to(buf.dtype), buf), name
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "llmq" and qc["bits"] == bits and qc["sym"] == sym
    assert QuantConfig.from_dict(qc) == QuantConfig(group_size=32, sym=sym, bits=bits)


def test_saving_twice_gives_identical_tensors(tmp_path):
    model = _quantized()
    llmq.save(model, tmp_path / "a")
    llmq.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_sharded_checkpoint_loads(tmp_path):
    model = _quantized()
    llmq.save(model, tmp_path / "q", max_shard_size=50_000)
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(tmp_path / "q")(ids).logits, model(ids).logits)


def test_dtype_and_device_map(tmp_path):
    model = _quantized()
    llmq.save(model, tmp_path / "q")
    bf = llmq.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    assert bf.model.layers[0].self_attn.q_proj.scales.dtype == torch.bfloat16
    assert bf.model.layers[0].self_attn.q_proj.qweight.dtype == torch.int32
    ids = random_ids()
    with torch.no_grad():
        ref = model(ids).logits
        auto = llmq.from_pretrained(tmp_path / "q", device_map="auto")
        assert torch.equal(auto(ids).logits, ref)
        # Disk offload: most of the model lives in the offload folder.
        offloaded = llmq.from_pretrained(tmp_path / "q", device_map="auto", max_memory={"cpu": "60KB"},
                                         offload_folder=str(tmp_path / "offload"))
        assert "disk" in set(offloaded.hf_device_map.values())
        assert torch.allclose(offloaded(ids).logits, ref, atol=1e-5)


def test_act_order_buffers_round_trip(tmp_path):
    model = _quantized()
    # RTN has no act-order: build a layer with a g_idx by hand, and record what a GPTQ act-order run
    # would, so the buffer path is exercised.
    model.config.quantization_config.update(method="gptq", desc_act=True)
    layer = model.model.layers[0].mlp.down_proj
    qw = layer.quantized_weight()
    qw.g_idx = torch.randperm(qw.shape[1]) // qw.group_size
    new = QuantLinear.from_quantized(qw)
    for i, l in enumerate(model.model.layers):
        for name, m in list(l.named_modules()):
            if isinstance(m, QuantLinear):
                q = m.quantized_weight()
                q.g_idx = torch.arange(q.shape[1], dtype=torch.int32) // q.group_size
                parent, _, child = name.rpartition(".")
                setattr(l.get_submodule(parent), child, QuantLinear.from_quantized(q, m.bias))
    model.model.layers[0].mlp.down_proj = new
    ids = random_ids()
    with torch.no_grad():
        ref = model(ids).logits
    llmq.save(model, tmp_path / "q")
    loaded = llmq.from_pretrained(tmp_path / "q")
    assert torch.equal(loaded.model.layers[0].mlp.down_proj.g_idx, new.g_idx)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)


def _tamper(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    llmq.save(_quantized(), tmp_path / "q")
    _tamper(tmp_path / "q", lambda t: t.pop("model.layers.1.self_attn.k_proj.scales"))
    with pytest.raises(LlmqError, match="model.layers.1.self_attn.k_proj.scales"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_missing_unquantized_tensor_is_named(tmp_path):
    llmq.save(_quantized(), tmp_path / "q")
    _tamper(tmp_path / "q", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(LlmqError, match="model.norm.weight"):
        llmq.from_pretrained(tmp_path / "q")


def test_reshaped_tensor_is_named(tmp_path):
    llmq.save(_quantized(), tmp_path / "q")

    def reshape(t):
        t["model.layers.0.mlp.up_proj.qweight"] = t["model.layers.0.mlp.up_proj.qweight"][:-1].clone()

    _tamper(tmp_path / "q", reshape)
    with pytest.raises(LlmqError, match="model.layers.0.mlp.up_proj.qweight.*shape"):
        llmq.from_pretrained(tmp_path / "q")


def test_damaged_file_is_refused(tmp_path):
    llmq.save(_quantized(), tmp_path / "q")
    f = tmp_path / "q" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(LlmqError, match="damaged"):
        llmq.from_pretrained(tmp_path / "q")


def test_from_pretrained_refuses_unquantized(tmp_path):
    tiny_model().save_pretrained(tmp_path / "fp")
    with pytest.raises(LlmqError, match="not quantized"):
        llmq.from_pretrained(tmp_path / "fp")


def test_save_refuses_non_empty_output(tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("x")
    with pytest.raises(LlmqError, match="not empty"):
        llmq.save(_quantized(), tmp_path / "q")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    # overwrite replaces checkpoint folders only: a folder of other files is refused, untouched
    with pytest.raises(LlmqError, match="not a model or checkpoint folder.*keep.txt"):
        llmq.save(_quantized(), tmp_path / "q", overwrite=True)
    assert (tmp_path / "q" / "keep.txt").read_text() == "x"
    (tmp_path / "q" / "keep.txt").unlink()
    llmq.save(_quantized(), tmp_path / "q")
    llmq.save(_quantized(), tmp_path / "q", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model = _quantized()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        llmq.save(model, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_a_stored_act_order_that_rtn_never_ran_is_read_as_off(tmp_path):
    """rtn checkpoints once recorded a requested act-order with no g_idx stored; they load as what they are."""
    model = _quantized()
    llmq.save(model, tmp_path / "q")
    config_file = tmp_path / "q" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"].update(desc_act=True, static_groups=True)
    config_file.write_text(json.dumps(config))
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(tmp_path / "q")(ids).logits, model(ids).logits)
