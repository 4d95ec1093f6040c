"""RTN shard by shard: the same checkpoint as the in-memory path, without building the model."""

import json
import re

import pytest
import torch
import transformers as T
from safetensors import safe_open
from safetensors.torch import save_file

import llmq
from llmq.cli import main
from llmq.loading import load_model
from llmq.shards import ShardWriter, SourceShards
from llmq.skeleton import build_skeleton
from conftest import TINY_CONFIGS, checkpoint_tensors, random_ids, tiny_model



def _in_memory(src, out, config):
    model, tokenizer = load_model(str(src))
    llmq.save(llmq.quantize(model, config, progress=False), out, tokenizer)


# (architecture, dtype, sym): every architecture, both storage dtypes, both zero-point kinds.
CASES = [("llama", torch.bfloat16, True), ("mistral", torch.float32, False), ("qwen2", torch.bfloat16, False),
         ("qwen3", torch.float32, True), ("gemma3", torch.bfloat16, True), ("phi3", torch.float16, False),
         ("opt", torch.float32, True)]
assert {c[0] for c in CASES} == set(TINY_CONFIGS)


@pytest.mark.parametrize("arch,dtype,sym", CASES, ids=[c[0] for c in CASES])
def test_shard_rtn_equals_in_memory_rtn(tmp_path, arch, dtype, sym, monkeypatch):
    src = tmp_path / "src"
    tiny_model(arch, seed=3, dtype=dtype).save_pretrained(src, max_shard_size="40KB")  # several input shards
    config = llmq.QuantConfig(method="rtn", bits=4 if sym else 8, group_size=32, sym=sym)
    _in_memory(src, tmp_path / "mem", config)

    # The shard path never builds the model: from_pretrained is off limits.
    def refuse(*a, **k):
        raise AssertionError("from_pretrained called by the shard path")

    with monkeypatch.context() as m:
        m.setattr(T.AutoModelForCausalLM, "from_pretrained", refuse)
        code = main(["quantize", str(src), str(tmp_path / "shard"), "--bits", str(config.bits), "--group-size", "32",
                     "--sym" if sym else "--asym", "--quiet"])
    assert code == 0
    mem, shard = checkpoint_tensors(tmp_path / "mem"), checkpoint_tensors(tmp_path / "shard")
    assert mem.keys() == shard.keys()
    assert any(k.endswith(".qweight") for k in shard)
    for k in mem:
        assert mem[k].dtype == shard[k].dtype and torch.equal(mem[k], shard[k]), k
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "mem" / name).read_text()) == json.loads((tmp_path / "shard" / name).read_text())

    # The checkpoint loads and computes what the in-memory one computes.
    ids = random_ids()
    a = llmq.from_pretrained(tmp_path / "mem")
    b = llmq.from_pretrained(tmp_path / "shard")
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_shard_rtn_writes_several_output_shards_that_load(tmp_path):
    src = tmp_path / "src"
    tiny_model("llama", seed=4).save_pretrained(src)
    config = llmq.QuantConfig(method="rtn", bits=4, group_size=32)
    _in_memory(src, tmp_path / "mem", config)
    from llmq.shard_rtn import quantize_rtn_shards

    quantize_rtn_shards(build_skeleton(src), tmp_path / "shard", config, progress=False, max_shard_size=30_000)
    index = json.loads((tmp_path / "shard" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((tmp_path / "shard" / f).is_file() for f in files)
    assert not list((tmp_path / "shard").glob(".part-*"))
    mem, shard = checkpoint_tensors(tmp_path / "mem"), checkpoint_tensors(tmp_path / "shard")
    assert set(index["weight_map"]) == shard.keys() == mem.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in shard.values())
    ids = random_ids(seed=5)
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(tmp_path / "mem")(ids).logits,
                           llmq.from_pretrained(tmp_path / "shard")(ids).logits)


def test_shard_writer_round_trip_against_safetensors_reader(tmp_path):
    g = torch.Generator().manual_seed(7)
    tensors = {
        "a.bf16": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "b.f32": torch.randn(3, generator=g),
        "c.i32": torch.randint(-2**31, 2**31 - 1, (4, 4), generator=g, dtype=torch.int64).to(torch.int32),
        "d.f16.strided": torch.randn(6, 4, generator=g).to(torch.float16).t(),  # not contiguous
        "e.empty": torch.zeros(0, 3),
        "f.u8": torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8),
    }
    writer = ShardWriter(tmp_path, max_shard_size=64)
    for k, t in tensors.items():
        writer.add(k, t)
    files = writer.finish()
    assert len(files) > 1
    got = checkpoint_tensors(tmp_path)
    assert got.keys() == tensors.keys()
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    # The source reader reads what the writer wrote, tensor by tensor.
    with SourceShards(tmp_path) as src:
        assert set(src.keys()) == set(tensors)
        assert src.nbytes() == sum(t.numel() * t.element_size() for t in tensors.values())
        assert torch.equal(src.read("a.bf16"), tensors["a.bf16"])


def test_moe_on_disk_names_fall_back_to_memory_with_reason_and_stream_when_asked(tmp_path, capsys):
    config = T.MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=256)
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "moe")
    skeleton = build_skeleton(tmp_path / "moe")
    # Fused on load: not tensor by tensor, but layer by layer (transformers' loader, one layer's keys).
    assert skeleton.blocker is None
    assert "renames or fuses" in skeleton.tensor_blocker and "experts" in skeleton.tensor_blocker
    assert main(["quantize", str(tmp_path / "moe"), str(tmp_path / "q"), "--group-size", "32"]) == 0
    err = capsys.readouterr().err
    assert "quantizing in memory, not shard by shard" in err and "experts" in err
    assert any(k.endswith(".qweight") for k in checkpoint_tensors(tmp_path / "q"))  # written by the in-memory path
    # --stream: layer by layer, the same checkpoint.
    assert main(["quantize", str(tmp_path / "moe"), str(tmp_path / "q2"), "--group-size", "32", "--stream",
                 "--quiet"]) == 0
    mem, streamed = checkpoint_tensors(tmp_path / "q"), checkpoint_tensors(tmp_path / "q2")
    assert mem.keys() == streamed.keys() and all(torch.equal(mem[k], streamed[k]) for k in mem)


def test_missing_tensor_falls_back(tmp_path):
    # A checkpoint that lacks a tensor would be initialised at random by from_pretrained:
    # the shard path refuses to guess.
    tiny_model("llama").save_pretrained(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if k != "model.norm.weight"}
    save_file(kept, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    assert "lacks 1 tensors" in build_skeleton(tmp_path / "m").blocker


def test_peak_host_memory_reported(tmp_path, tiny_llama_dir, capsys):
    assert main(["quantize", str(tiny_llama_dir), str(tmp_path / "q"), "--group-size", "32"]) == 0
    out = capsys.readouterr().out
    # The figure is this process's peak so far, as the kernel counts it: at least what it holds now.
    m = re.search(r"peak host memory ([\d.]+) (KiB|MiB|GiB)", out)
    assert m, out
    shown = float(m.group(1)) * {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[m.group(2)]
    with open("/proc/self/status") as f:
        rss = int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) * 1024
    assert shown >= 0.95 * rss
    assert main(["quantize", str(tiny_llama_dir), str(tmp_path / "q2"), "--group-size", "32", "--no-stream"]) == 0
    assert "peak host memory" in capsys.readouterr().out
    assert checkpoint_tensors(tmp_path / "q").keys() == checkpoint_tensors(tmp_path / "q2").keys()


@pytest.mark.parametrize("stop_at", [1, 2])  # killed while writing the second or the third file
def test_a_writer_interrupted_while_finishing_resumes_to_the_same_files(tmp_path, monkeypatch, stop_at):
    import shutil

    g = torch.Generator().manual_seed(4)
    tensors = {f"t{i}": torch.randn(5, 3, generator=g) for i in range(6)}

    def write(folder):
        folder.mkdir()
        writer = ShardWriter(folder, max_shard_size=120)
        for k, t in tensors.items():
            writer.add(k, t)
        return writer

    reference = write(tmp_path / "ref")
    files = [p.name for p in reference.finish()]
    assert len(files) == 3
    writer = write(tmp_path / "run")
    state = writer.state()
    copies, copy = [], shutil.copyfileobj

    def dies_midway(src, dst, length=0):
        copies.append(1)
        if len(copies) > stop_at:
            dst.write(src.read(7))  # a part of the data, then the process is gone
            raise KeyboardInterrupt
        copy(src, dst, length)

    monkeypatch.setattr(shutil, "copyfileobj", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        writer.finish()
    monkeypatch.setattr(shutil, "copyfileobj", copy)
    assert sum(p.name.endswith(".data") for p in (tmp_path / "run").iterdir()) == 3 - stop_at  # whole files' removed
    resumed = ShardWriter.resume(tmp_path / "run", state)
    assert [p.name for p in resumed.finish()] == files
    for name in files + ["model.safetensors.index.json"]:
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert not any(p.name.endswith(".data") for p in (tmp_path / "run").iterdir())


def test_a_writer_whose_recorded_data_is_gone_is_refused_in_one_line(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_size=120)
    writer.add("t", torch.randn(5, 3))
    state = writer.state()
    writer._file.close()
    (tmp_path / state["parts"][0]["data"]).unlink()
    with pytest.raises(llmq.LlmqError, match="is shorter than the interrupted run recorded: the folder is damaged"):
        ShardWriter.resume(tmp_path, state)
