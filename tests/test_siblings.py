"""Linears reading one input are multiplied in one CPU kernel call at decode (llmq/modules/siblings.py).

The reference is the same model with the links removed, each linear calling
its own kernel: the outputs must be the same bits, with fewer kernel calls.
"""

import copy

import pytest
import torch

import llmq
from llmq import QuantConfig, QuantLinear
from llmq.kernels import cpu as cpu_kernels
from llmq.modules.qlinear import set_cpu_backend
from llmq.modules.siblings import link_siblings
from conftest import random_ids, tiny_model


def _unlinked(model):
    model = copy.deepcopy(model)
    for m in model.modules():
        m.__dict__.pop("_siblings", None)
    return model


def _count_kernel_calls(monkeypatch, backend, model):
    _decode(_unlinked(model), steps=1)  # the kernel choice's one-time measurement calls kernels too
    calls = []
    kernel = cpu_kernels._KERNELS[backend]
    monkeypatch.setitem(cpu_kernels._KERNELS, backend, lambda x2, state: calls.append(x2.shape[0]) or kernel(x2, state))
    return calls


def _decode(model, steps=3, after_prefill=lambda: None):
    ids = random_ids(n=1, length=20, seed=4)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        after_prefill()
        past, logits = out.past_key_values, [out.logits[:, -1]]
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits.append(out.logits[:, -1])
            tok = out.logits[:, -1:].argmax(-1)
    return torch.cat(logits)


def _model(arch):
    """A tiny model whose k/v projections have 64 outputs: whole blocks of torch's int4 CPU layout."""
    import transformers as T

    torch.manual_seed(0)
    common = dict(vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, num_hidden_layers=2)
    config = {
        "llama": lambda: T.LlamaConfig(hidden_size=128, intermediate_size=128, num_attention_heads=4,
                                       num_key_value_heads=2, **common),
        "qwen2": lambda: T.Qwen2Config(hidden_size=128, intermediate_size=128, num_attention_heads=4,
                                       num_key_value_heads=2, **common),  # biases on q/k/v
        "opt": lambda: T.OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64,
                                   **common),
    }[arch]()
    model = T.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    return model.eval()


# (architecture, groups of one input per layer, linears per layer) for llmq's sequential groups:
# q/k/v and gate/up (OPT: q/k/v only; its fc1 stands alone).
CASES = [("llama", 2, 7), ("qwen2", 2, 7), ("opt", 1, 6)]


@pytest.mark.parametrize("arch,groups,linears", CASES)
@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, False), (8, -1, True)])
def test_decode_multiplies_each_group_in_one_call_with_the_same_bits(monkeypatch, arch, groups, linears, bits,
                                                                    group_size, sym):
    model = llmq.quantize(_model(arch), QuantConfig(bits=bits, group_size=group_size, sym=sym), progress=False)
    layers = model.config.num_hidden_layers
    alone = _unlinked(model)
    backend = "int4pack" if bits == 4 else "int8pack"
    calls = _count_kernel_calls(monkeypatch, backend, model)
    expected = _decode(alone)
    separate = [m for m in calls if m == 1]
    calls.clear()
    got = _decode(model)
    together = [m for m in calls if m == 1]
    assert torch.equal(got, expected)
    steps = 3
    assert len(separate) == steps * layers * linears
    # Each group of g members costs one call instead of g.
    assert len(together) == steps * layers * (linears - sum(len(g) - 1 for g in _groups(model)))
    assert len(together) < len(separate)
    assert sum(1 for m in model.modules() if m.__dict__.get("_siblings") is not None) > 0
    assert len(_groups(model)) == groups


def _groups(model):
    layer = model.model.decoder.layers[0] if hasattr(model.model, "decoder") else model.model.layers[0]
    seen = {id(m.__dict__["_siblings"]): m.__dict__["_siblings"] for m in layer.modules()
            if m.__dict__.get("_siblings") is not None}
    return [g.members for g in seen.values()]


def test_int4_members_that_do_not_fill_whole_blocks_run_alone(monkeypatch):
    """The tiny llama's k/v have 32 outputs, half a block of the int4 layout: q/k/v run one by one
    (same bits), gate/up (128 outputs each) together."""
    model = llmq.quantize(tiny_model("llama"), QuantConfig(bits=4, group_size=32, sym=False), progress=False)
    calls = _count_kernel_calls(monkeypatch, "int4pack", model)
    got = _decode(model, steps=1)
    assert len([m for m in calls if m == 1]) == model.config.num_hidden_layers * 6
    assert torch.equal(got, _decode(_unlinked(model), steps=1))


def test_the_members_weights_are_views_of_the_concatenated_one():
    model = llmq.quantize(_model("llama"), QuantConfig(bits=4, group_size=32, sym=False), progress=False)
    _decode(model, steps=1)
    attn = model.model.layers[0].self_attn
    group = attn.q_proj.__dict__["_siblings"]
    fused = group._fused.state.weight
    for m in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert m.cpu_state.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert fused.shape[0] == sum(m.out_features for m in (attn.q_proj, attn.k_proj, attn.v_proj))


def test_a_changed_or_other_input_is_computed_again():
    model = llmq.quantize(_model("llama"), QuantConfig(bits=4, group_size=32, sym=False), progress=False)
    attn = model.model.layers[0].self_attn
    alone = _unlinked(model).model.layers[0].self_attn
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        x = torch.randn(1, 1, 128, generator=g)
        attn.q_proj(x)  # computes k and v too, kept for the same input
        x.add_(1.0)  # changed in place since: its version moved
        assert torch.equal(attn.k_proj(x), alone.k_proj(x))
        other = torch.randn(1, 1, 128, generator=g)
        assert torch.equal(attn.v_proj(other), alone.v_proj(other))
        # Inference tensors have no version counter: the same object is trusted.
        with torch.inference_mode():
            y = torch.randn(2, 1, 128, generator=g)
            assert torch.equal(attn.q_proj(y), alone.q_proj(y))
            assert torch.equal(attn.k_proj(y), alone.k_proj(y))
            assert torch.equal(attn.v_proj(y), alone.v_proj(y))


def test_a_changed_cpu_backend_is_followed_by_the_group(monkeypatch):
    """After set_cpu_backend the group's concatenated form is stale: the members run their new form."""
    model = llmq.quantize(_model("llama"), QuantConfig(bits=4, group_size=32, sym=False), progress=False)
    calls = _count_kernel_calls(monkeypatch, "int4pack", model)
    _decode(model, steps=1)  # builds every group's packed form
    assert calls
    set_cpu_backend(model, "dense")
    calls.clear()
    got = _decode(model, steps=1)
    assert calls == []
    assert torch.equal(got, _decode(_unlinked(model), steps=1))


def test_prefill_runs_each_linear_alone(monkeypatch):
    model = llmq.quantize(_model("llama"), QuantConfig(bits=4, group_size=32, sym=False), progress=False)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 40, 128)
    with torch.no_grad():
        before = attn.q_proj(x)
        assert attn.q_proj.__dict__["_siblings"]._pending is None
        assert torch.equal(before, _unlinked(model).model.layers[0].self_attn.q_proj(x))


def test_loaded_checkpoints_are_linked(tmp_path):
    import transformers

    model = llmq.quantize(_model("llama"), QuantConfig(bits=4, group_size=32, sym=False), progress=False)
    llmq.save(model, tmp_path / "q")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert len(_groups(loaded)) == 2
    assert torch.equal(_decode(loaded), _decode(_unlinked(loaded)))
    assert link_siblings(loaded) == 2 * loaded.config.num_hidden_layers  # linking again is harmless
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, QuantLinear)


def test_each_experts_gate_and_up_run_in_one_call(monkeypatch):
    """Mixtral's experts (w1/w3 of 128 outputs) at decode: one call for gate and up of each routed
    expert; its attention's k/v (32 outputs, half an int4 block) run alone."""
    model = llmq.quantize(tiny_model("mixtral"), QuantConfig(bits=4, group_size=32, sym=False), progress=False)
    calls = _count_kernel_calls(monkeypatch, "int4pack", model)
    got = _decode(model, steps=2, after_prefill=calls.clear)  # prefill: an expert may get one token
    per_step_layer = len(calls) / (2 * model.config.num_hidden_layers)
    top_k = model.config.num_experts_per_tok
    assert per_step_layer == 4 + 2 * top_k  # q, k, v, o; per routed expert: gate and up together, down
    assert torch.equal(got, _decode(_unlinked(model), steps=2))


# W8A8: one quantization and one int8 GEMM per group, at decode and at prefill.

@pytest.fixture(params=["intmm", "int8pack"])
def intmm(monkeypatch, request):
    """A W8A8 CPU kernel that groups run pinned (this processor may measure another faster), its calls
    counted by rows."""
    from llmq.kernels import cpu_select, int8

    cpu_select.force("w8a8", request.param)
    calls = []
    kernel = int8._CPU_KERNELS[request.param]
    monkeypatch.setitem(int8._CPU_KERNELS, request.param,
                        lambda x2, *a: calls.append(x2.shape[0]) or kernel(x2, *a))
    yield calls
    cpu_select.force("w8a8", None)


def test_w8a8_groups_run_alone_under_the_dequant_kernel(monkeypatch):
    from llmq.kernels import cpu_select, int8

    model = _w8a8("llama", static=False)
    cpu_select.force("w8a8", "dequant")
    calls = []
    kernel = int8._CPU_KERNELS["dequant"]
    monkeypatch.setitem(int8._CPU_KERNELS, "dequant", lambda x2, *a: calls.append(x2.shape[0]) or kernel(x2, *a))
    try:
        _decode(model, steps=1)
    finally:
        cpu_select.force("w8a8", None)
    assert len(calls) == 2 * model.config.num_hidden_layers * 7  # prefill and one step, 7 linears each


def _w8a8(arch, static):
    config = QuantConfig(scheme="w8a8", act="static" if static else "dynamic")
    return llmq.quantize(_model(arch), config, dataset=random_ids(n=4, length=32, seed=7) if static else None,
                         progress=False)


@pytest.mark.parametrize("arch,groups,linears", CASES)
@pytest.mark.parametrize("static", [False, True])
def test_w8a8_groups_run_one_gemm_with_the_same_bits(intmm, arch, groups, linears, static):
    model = _w8a8(arch, static)
    alone = _unlinked(model)
    intmm.clear()  # the calibration's own int8 GEMMs
    expected = _decode(alone)
    separate = list(intmm)
    intmm.clear()
    got = _decode(model)
    assert torch.equal(got, expected)
    layers, steps = model.config.num_hidden_layers, 3
    saved = sum(len(g) - 1 for g in _groups(model))
    assert len(_groups(model)) == groups
    # Prefill (20 rows) and each decode step alike: a group of g members costs one GEMM instead of g.
    assert len(separate) == (steps + 1) * layers * linears
    assert len(intmm) == (steps + 1) * layers * (linears - saved)
    assert sorted(set(intmm)) == [1, 20]


def test_w8a8_members_buffers_are_views_and_saved_as_their_own(intmm, tmp_path):
    import transformers
    from safetensors.torch import load_file

    model = _w8a8("llama", static=True)
    _decode(model, steps=1)
    attn = model.model.layers[0].self_attn
    fused = attn.q_proj.__dict__["_siblings"]._fused
    members = (attn.q_proj, attn.k_proj, attn.v_proj)
    for m in members:
        assert m.weight._base is fused.weight.codes and m.weight_scale._base is fused.weight.scale
    assert all(t._base is None for t in model.state_dict().values())
    llmq.save(model, tmp_path / "q")
    saved = {}
    for f in (tmp_path / "q").glob("*.safetensors"):
        saved.update(load_file(f))
    prefix = "model.layers.0.self_attn."
    for name, m in zip(("q_proj", "k_proj", "v_proj"), members):
        assert torch.equal(saved[prefix + name + ".weight"], m.weight)
        assert torch.equal(saved[prefix + name + ".weight_scale"], m.weight_scale)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert len(_groups(loaded)) == 2
    assert torch.equal(_decode(loaded), _decode(_unlinked(model)))


def test_w8a8_replaced_or_changed_buffers_are_concatenated_again(intmm):
    model = _w8a8("qwen2", static=True)  # biases on q/k/v
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 3, 128, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        g = torch.Generator().manual_seed(6)
        attn.k_proj.weight = torch.randint(-127, 128, attn.k_proj.weight.shape, generator=g, dtype=torch.int8)
        attn.v_proj.bias.add_(1.0)
        alone = _unlinked(model).model.layers[0].self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            assert torch.equal(getattr(attn, name)(x), getattr(alone, name)(x))
        # Static scales that differ cannot share one quantization: each member runs alone.
        attn.v_proj.input_scale.mul_(2.0)
        intmm.clear()
        alone = _unlinked(model).model.layers[0].self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            assert torch.equal(getattr(attn, name)(x), getattr(alone, name)(x))
        assert len(intmm) == 6
        # One member quantizing per token, the others with their static scale: alone too.
        attn.v_proj.input_scale = None
        intmm.clear()
        alone = _unlinked(model).model.layers[0].self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            assert torch.equal(getattr(attn, name)(x), getattr(alone, name)(x))
        assert len(intmm) == 6
        # All per token: together again.
        attn.q_proj.input_scale = attn.k_proj.input_scale = None
        intmm.clear()
        alone = _unlinked(model).model.layers[0].self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            assert torch.equal(getattr(attn, name)(x), getattr(alone, name)(x))
        assert len(intmm) == 4


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, False), (8, -1, True)])
def test_checkpoint_tensors_copied_in_place_are_what_the_model_computes_with(tmp_path, arch, bits, group_size, sym):
    """Writing a checkpoint's tensors over a loaded model's (its state dict's tensors, in place) after
    prefill and decode have built the CPU forms, fused groups and experts' forms from the old ones."""
    config = QuantConfig(bits=bits, group_size=group_size, sym=sym)
    for seed, name in ((0, "a"), (1, "b")):
        fp = _model(arch) if arch == "llama" else tiny_model(arch, seed=seed)
        if arch == "llama":
            with torch.no_grad():
                for p in fp.parameters():
                    p.add_(torch.randn_like(p), alpha=0.01 * seed)
        llmq.save(llmq.quantize(fp, config, progress=False), tmp_path / name)
    a, b = llmq.from_pretrained(tmp_path / "a"), llmq.from_pretrained(tmp_path / "b")
    expected = _decode(b)
    assert not torch.equal(_decode(a), expected)  # the forms of a's values are built
    other = b.state_dict()
    with torch.no_grad():
        for key, tensor in a.state_dict().items():
            tensor.copy_(other[key])
    assert torch.equal(_decode(a), expected)
