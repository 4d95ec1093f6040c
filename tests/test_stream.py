"""Streaming calibrated quantization: layers read from the shards when reached, written out at once."""

import json
import os

import pytest
import torch
import transformers as T

import llmq
from llmq import engine, stream
from llmq.activations import ActivationStore
from llmq.cli import main
from llmq.engine import layer_output, run_layers
from llmq.shards import ShardWriter
from llmq.skeleton import build_skeleton
from conftest import (MORE_CONFIGS, TINY_CONFIGS, TINY_MOE_CONFIGS, checkpoint_tensors, model_folder_with_text,
                      random_ids, tiny_model)



def _assert_same_checkpoint(a, b, quantized=".qweight"):
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert ta.keys() == tb.keys() and any(k.endswith(quantized) for k in ta)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


@pytest.mark.parametrize("arch", list(TINY_CONFIGS) + sorted(TINY_MOE_CONFIGS) + ["llama4_text"])
def test_streamed_layer_equals_the_layer_from_pretrained(tmp_path, arch):
    # MoE checkpoints store experts one tensor each; transformers fuses them into 3D weights on load.
    src = tmp_path / "m"
    tiny_model(arch, seed=6, dtype=torch.bfloat16).save_pretrained(src, max_shard_size="50KB")
    reference = T.AutoModelForCausalLM.from_pretrained(src)
    skeleton = build_skeleton(src)
    assert skeleton.blocker is None
    streamer = stream.LayerStreamer(skeleton.model, skeleton, ShardWriter(tmp_path))
    try:
        streamer.load_outer()
        ref_state = dict(reference.named_parameters()) | dict(reference.named_buffers())
        got_state = dict(skeleton.model.named_parameters()) | dict(skeleton.model.named_buffers())
        assert got_state.keys() == ref_state.keys()
        prefix = streamer.prefix + "."
        outer = [k for k in ref_state if not k.startswith(prefix)]
        assert any("rotary" in k or "embed_positions" in k for k in outer)  # buffers built, not read
        for k in outer:
            assert got_state[k].device.type == "cpu" and got_state[k].dtype == ref_state[k].dtype, k
            assert torch.equal(got_state[k], ref_state[k]), k
        for i in range(len(streamer.layers)):
            assert all(p.device.type == "meta" for p in streamer.layers[i].parameters())
            streamer.load(i)
            got = streamer.layers[i].state_dict()
            ref = streamer_ref = {k[len(f"{prefix}{i}."):]: v for k, v in ref_state.items()
                                  if k.startswith(f"{prefix}{i}.")}
            assert got.keys() <= streamer_ref.keys() and len(got) > 4
            for k, v in got.items():
                assert v.dtype == ref[k].dtype and torch.equal(v, ref[k]), (i, k)
            streamer.release(i)
            assert all(p.device.type == "meta" for p in streamer.layers[i].parameters())
    finally:
        streamer.close()


@pytest.mark.parametrize("arch,method", [("llama", "gptq"), ("gemma3", "gptq"), ("opt", "gptq"), ("mistral", "awq"),
                                         ("phi3", "awq+gptq")])
def test_cli_output_identical_with_and_without_streaming(tmp_path, arch, method):
    src = tmp_path / "m"
    text = model_folder_with_text(src, arch)
    common = ["--method", method, "--bits", "4", "--group-size", "32", "--asym", "--dataset", str(text),
              "--nsamples", "6", "--seqlen", "24", "--seed", "3", "--quiet"]
    assert main(["quantize", str(src), str(tmp_path / "mem"), "--no-stream", *common]) == 0
    assert main(["quantize", str(src), str(tmp_path / "stream"), "--stream", *common]) == 0
    _assert_same_checkpoint(tmp_path / "mem", tmp_path / "stream")
    assert (tmp_path / "stream" / "tokenizer.json").is_file()
    ids = random_ids(seed=9)
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(tmp_path / "mem")(ids).logits,
                           llmq.from_pretrained(tmp_path / "stream")(ids).logits)


@pytest.mark.parametrize("arch,settings", [
    *[(arch, ["--method", "gptq", "--bits", "4", "--group-size", "16"]) for arch in sorted(TINY_MOE_CONFIGS)],
    ("mixtral", ["--method", "awq", "--bits", "4", "--group-size", "16"]),
    ("gpt_oss", ["--method", "awq+gptq", "--bits", "4", "--group-size", "16"]),
    ("qwen3_moe", ["--method", "rtn", "--bits", "8", "--group-size", "-1"]),
    ("mixtral", ["--scheme", "w8a8", "--act", "static", "--smooth", "auto", "--method", "gptq"]),
    ("deepseek_v3", ["--scheme", "w8a8"]),
    # Llama 4: experts without transformers' decorator, fed scored copies of the tokens.
    ("llama4_text", ["--method", "gptq", "--bits", "4", "--group-size", "16"]),
    ("llama4_text", ["--scheme", "w8a8", "--act", "static", "--smooth", "auto", "--method", "gptq"]),
    # Jamba: Mamba and attention layers, a dense MLP and an MoE block.
    ("jamba", ["--method", "gptq", "--bits", "4", "--group-size", "16"]),
    # DBRX: experts stacked in 2D parameters of a submodule, the router's linear inside a module.
    ("dbrx", ["--method", "gptq", "--bits", "4", "--group-size", "16"]),
    # Kimi Linear: linear-attention and latent-attention layers, Mixtral's expert names on disk.
    ("kimi_linear", ["--method", "awq", "--bits", "4", "--group-size", "16"]),
    # GLM-5: each layer's top-k token selection reaches the next layer streamed too.
    ("glm_moe_dsa", ["--method", "gptq", "--bits", "4", "--group-size", "16"]),
    # ZAYA1: each layer's router state reaches the next layer's router streamed too.
    *[("zaya", ["--method", "awq", "--bits", "4", "--group-size", "16"])] * ("zaya" in MORE_CONFIGS),
    # Experts kept whole: written back under their stored per-expert names.
    ("mixtral", ["--method", "gptq", "--bits", "4", "--group-size", "16", "--skip", "mlp.experts"]),
    ("gpt_oss", ["--scheme", "w8a8", "--skip", "mlp.experts"]),
])
def test_moe_streamed_equals_in_memory(tmp_path, arch, settings):
    # Each layer's experts are loaded fused as transformers builds them, unrolled per expert again,
    # and written under the names save_pretrained gives them.
    src = tmp_path / "m"
    text = model_folder_with_text(src, arch)
    skeleton = build_skeleton(src)
    assert skeleton.blocker is None and skeleton.tensor_blocker is not None
    common = [*settings, "--dataset", str(text), "--nsamples", "6", "--seqlen", "24", "--seed", "3", "--quiet"]
    assert main(["quantize", str(src), str(tmp_path / "mem"), "--no-stream", *common]) == 0
    assert main(["quantize", str(src), str(tmp_path / "stream"), "--stream", *common]) == 0
    quantized = ".weight_scale" if "w8a8" in settings else ".qweight"
    _assert_same_checkpoint(tmp_path / "mem", tmp_path / "stream", quantized=quantized)
    tensors = checkpoint_tensors(tmp_path / "stream")
    if arch == "mixtral":  # transformers' `mlp` is `block_sparse_moe` on disk, both ways
        assert any(".block_sparse_moe.experts." in k for k in tensors) and not any(".mlp." in k for k in tensors)
    if "--skip" in settings:
        assert not any(k.endswith(quantized) and ".experts." in k for k in tensors)
    ids = random_ids(seed=9)
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(tmp_path / "mem")(ids).logits,
                           llmq.from_pretrained(tmp_path / "stream")(ids).logits)


def test_moe_streamed_leaves_no_expert_weight_in_memory(tmp_path, monkeypatch):
    # The experts modules as loaded (fused 3D weights, shared by the unrolled views) go back to
    # the meta device with their layer.
    src = tmp_path / "m"
    tiny_model("qwen3_moe", seed=8).save_pretrained(src)
    skeleton = build_skeleton(src)
    streamers = []
    close = stream.LayerStreamer.close
    monkeypatch.setattr(stream.LayerStreamer, "close", lambda self: (streamers.append(self), close(self)))
    stream.quantize_streamed(skeleton, tmp_path / "q", llmq.QuantConfig(method="gptq", group_size=16),
                             dataset=random_ids(n=4, length=16), progress=False)
    [streamer] = streamers
    originals = [m for by_layer in streamer._experts.values() for m in by_layer.values()]
    assert originals and all(p.device.type == "meta" for m in originals for p in m.parameters())
    assert all(p.device.type == "meta" for p in skeleton.model.parameters())


@pytest.mark.parametrize("settings", [
    [],  # round-to-nearest weights, dynamic activations: no calibration pass
    ["--act", "static", "--smooth", "auto", "--method", "gptq"],
])
def test_w8a8_streamed_equals_in_memory(tmp_path, settings):
    src = tmp_path / "m"
    text = model_folder_with_text(src, "llama")
    common = ["--scheme", "w8a8", *settings, "--dataset", str(text), "--nsamples", "6", "--seqlen", "24",
              "--seed", "3", "--quiet"]
    assert main(["quantize", str(src), str(tmp_path / "mem"), "--no-stream", *common]) == 0
    assert main(["quantize", str(src), str(tmp_path / "stream"), "--stream", *common]) == 0
    _assert_same_checkpoint(tmp_path / "mem", tmp_path / "stream", quantized=".weight_scale")
    tensors = checkpoint_tensors(tmp_path / "stream")
    assert any(v.dtype == torch.int8 for v in tensors.values())
    assert any(k.endswith(".input_scale") for k in tensors) == ("static" in settings)
    ids = random_ids(seed=9)
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(tmp_path / "mem")(ids).logits,
                           llmq.from_pretrained(tmp_path / "stream")(ids).logits)


def test_w8a8_streams_layer_by_layer_never_shard_by_shard(tmp_path):
    src = tmp_path / "m"
    tiny_model("llama", seed=8).save_pretrained(src)
    skeleton = build_skeleton(src)
    w8a8 = llmq.QuantConfig(scheme="w8a8")  # rtn weights, as the weight-only rtn that goes by shards
    assert stream.choose_route(skeleton, w8a8, stream=True) == ("stream", None)
    assert stream.choose_route(skeleton, w8a8)[0] != "shards"
    static = llmq.QuantConfig(scheme="w8a8", act="static")
    with pytest.raises(llmq.LlmqError, match="--act static"):
        stream.quantize_streamed(skeleton, tmp_path / "q", static, progress=False)
    assert not (tmp_path / "q").exists()
    stream.quantize_streamed(skeleton, tmp_path / "q", static, dataset=random_ids(n=4, length=16), progress=False)
    assert all(p.device.type == "meta" for p in skeleton.model.parameters())
    model = llmq.from_pretrained(tmp_path / "q")
    linears = [m for m in model.modules() if isinstance(m, llmq.modules.w8a8.W8A8Linear)]
    assert linears and all(m.static for m in linears)


def test_streamed_rtn_equals_in_memory_rtn_and_frees_every_layer(tmp_path):
    src = tmp_path / "m"
    tiny_model("qwen3", seed=4, dtype=torch.bfloat16).save_pretrained(src)
    config = llmq.QuantConfig(method="rtn", bits=8, group_size=16)
    model, _ = llmq.loading.load_model(str(src))
    llmq.save(llmq.quantize(model, config, progress=False), tmp_path / "mem")
    skeleton = build_skeleton(src)
    stream.quantize_streamed(skeleton, tmp_path / "stream", config, progress=False)
    _assert_same_checkpoint(tmp_path / "mem", tmp_path / "stream")
    _, layers = llmq.arch.decoder_layers(skeleton.model)
    assert all(t.device.type == "meta" for layer in layers for t in layer.state_dict().values())


def test_automatic_streaming_when_host_memory_is_short(tmp_path, monkeypatch, capsys):
    src = tmp_path / "m"
    text = model_folder_with_text(src)
    skeleton = build_skeleton(src)
    gptq = llmq.QuantConfig(method="gptq", group_size=32)
    monkeypatch.setattr(stream, "available_host_memory", lambda: 100 * 2**30)
    assert stream.choose_route(skeleton, gptq) == ("memory", None)
    monkeypatch.setattr(stream, "available_host_memory", lambda: skeleton.model_bytes())
    route, note = stream.choose_route(skeleton, gptq)
    assert route == "stream" and "streaming the model layer by layer" in note
    assert stream.choose_route(skeleton, gptq, stream=False) == ("memory", None)
    assert stream.choose_route(skeleton, llmq.QuantConfig(method="rtn"))[0] == "shards"
    code = main(["quantize", str(src), str(tmp_path / "q"), "--method", "gptq", "--group-size", "32",
                 "--dataset", str(text), "--nsamples", "4", "--seqlen", "16"])
    assert code == 0
    err = capsys.readouterr().err
    assert "note: streaming the model layer by layer" in err and "calibration activations:" in err


def test_stream_refused_where_it_cannot_work(tmp_path, capsys):
    src = tmp_path / "m"
    model_folder_with_text(src)
    code = main(["quantize", str(src), str(tmp_path / "q"), "--method", "gptq", "--dataset", "self", "--stream",
                 "--quiet"])
    assert code == 2 and not (tmp_path / "q").exists()
    assert "samples text from the whole model" in capsys.readouterr().err


def test_activations_on_disk_give_the_same_output_and_leave_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    model = tiny_model("llama")
    ids = random_ids(n=3, length=10)

    def plain(i, layer, hidden, args, kwargs):
        return layer_output(layer(hidden, *args, **kwargs)), ""

    on_host = run_layers(model, ids, plain, device=torch.device("cpu"), progress=False, activations="host")
    on_disk = run_layers(model, ids, plain, device=torch.device("cpu"), progress=False, activations="disk")
    assert torch.equal(on_host, on_disk)
    assert os.listdir(tmp_path) == []
    store = ActivationStore(torch.zeros(2, 3, 4), torch.device("cpu"), "disk", folder=tmp_path)
    assert "memory-mapped file" in store.describe() and os.listdir(tmp_path) == []
    x = torch.randn(2, 3, 4)
    assert torch.equal(store.put(x), x)


def test_activations_go_to_disk_when_the_host_cannot_hold_them(monkeypatch):
    from llmq import activations

    monkeypatch.setattr(activations, "available_host_memory", lambda: 1000)
    store = ActivationStore(torch.zeros(100, 10), torch.device("cpu"))
    assert store.where == "disk"
    monkeypatch.setattr(activations, "available_host_memory", lambda: 10**9)
    assert ActivationStore(torch.zeros(100, 10), torch.device("cpu")).where == "host"
    assert engine.activations_fit(torch.zeros(4, 4), torch.device("cpu"))


def test_streamed_gptq_leaves_no_weight_in_memory(tmp_path):
    # Outer tensors go once the layers' inputs are captured, each layer once it is written.
    src = tmp_path / "m"
    tiny_model("llama", seed=8).save_pretrained(src)
    skeleton = build_skeleton(src)
    stream.quantize_streamed(skeleton, tmp_path / "q", llmq.QuantConfig(method="gptq", group_size=32),
                             dataset=random_ids(n=4, length=16), progress=False)
    assert all(p.device.type == "meta" for p in skeleton.model.parameters())
    assert llmq.from_pretrained(tmp_path / "q") is not None


@pytest.mark.parametrize("arch", ["mixtral", "gemma3"])  # the tiny Gemma 3 ties its head to the embedding
def test_streamed_run_reports_what_the_in_memory_run_reports(tmp_path, capsys, arch):
    # What is quantized and kept, by kind, and the experts that fell back: nothing silent when streaming.
    src = tmp_path / "m"
    text = model_folder_with_text(src, arch)
    common = ["--method", "gptq", "--bits", "4", "--group-size", "16", "--dataset", str(text), "--nsamples", "2",
              "--seqlen", "24", "--seed", "3", "--moe-min-tokens", "30"]
    reports = []
    for route, out in (("--no-stream", "mem"), ("--stream", "stream")):
        capsys.readouterr()
        assert main(["quantize", str(src), str(tmp_path / out), route, *common]) == 0
        reports.append([line for line in capsys.readouterr().out.splitlines() if not line.startswith("wrote ")])
    assert reports[0] == reports[1]
    if arch == "mixtral":
        assert any(line.startswith("quantized ") and "expert linears" in line for line in reports[1])
        assert any("quantized by round-to-nearest" in line for line in reports[1])
