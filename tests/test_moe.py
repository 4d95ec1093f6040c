"""Mixture-of-experts models: every expert quantized, routers kept, checkpoints that load.

The reference for a saved checkpoint is built independently of llmq's
modules: the stored codes are unpacked here with plain shifts, dequantized in
float64, written back into the architecture's own 3D expert parameters (in
its layout: concatenated or interleaved, transposed or not) and linears, and
the original transformers model runs in float64.
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import llmq
from llmq import LlmqError, QuantConfig, QuantLinear, pipeline
from llmq.modules.qexperts import QuantExperts
from llmq.modules.w8a8 import W8A8Linear
from conftest import TINY_MOE_CONFIGS, checkpoint_tensors, random_ids, stored_weight64, tiny_model

# Per architecture, as its checkpoints store experts on disk: the MoE block's name,
# the per-expert projections that concatenate to gate_up_proj, the down projection,
# whether the 3D parameters are stored [E, in, out], and the router's name.
DISK = {
    "mixtral": ("block_sparse_moe", ("w1", "w3"), "w2", False, "gate"),
    "qwen2_moe": ("mlp", ("gate_proj", "up_proj"), "down_proj", False, "gate"),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj"), "down_proj", False, "gate"),
    "deepseek_v3": ("mlp", ("gate_proj", "up_proj"), "down_proj", False, "gate"),
    "gpt_oss": ("mlp", ("gate_up_proj",), "down_proj", True, "router"),
    "olmoe": ("mlp", ("gate_proj", "up_proj"), "down_proj", False, "gate"),
}
GROUP = 16  # divides every input width of these tiny models (DeepSeek's kv_b_proj reads 16)


def _reference(fp_model, folder, arch, weight64, marker=".qweight"):
    """The fp model in float64 with every quantized weight (modules with a `marker` tensor) replaced
    by weight64(tensors, name): its stored codes, dequantized."""
    block, up_names, down_name, transposed, _ = DISK[arch]
    ref = copy.deepcopy(fp_model).double()
    ref.set_experts_implementation("eager")  # transformers' own per-expert loop: grouped_mm has no float64
    t = load_file(str(folder / "model.safetensors"))
    names = sorted({k[: -len(marker)] for k in t if k.endswith(marker)})
    done = set()
    for name in names:
        if ".experts." not in name:
            linear = ref.get_submodule(name)
            linear.weight.data = weight64(t, name)
            if f"{name}.bias" in t:
                linear.bias.data = t[f"{name}.bias"].double()
            continue
        experts_name = name[: name.index(".experts.") + len(".experts")]
        if experts_name in done:
            continue
        done.add(experts_name)
        experts = ref.get_submodule(experts_name.replace(f".{block}.", ".mlp."))
        for e in range(experts.gate_up_proj.shape[0]):
            up = torch.cat([weight64(t, f"{experts_name}.{e}.{n}") for n in up_names])
            down = weight64(t, f"{experts_name}.{e}.{down_name}")
            experts.gate_up_proj.data[e] = up.t() if transposed else up
            experts.down_proj.data[e] = down.t() if transposed else down
            if experts.has_bias:
                experts.gate_up_proj_bias.data[e] = torch.cat(
                    [t[f"{experts_name}.{e}.{n}.bias"].double() for n in up_names])
                experts.down_proj_bias.data[e] = t[f"{experts_name}.{e}.{down_name}.bias"].double()
    return ref


def _int8_weight64(t: dict, name: str) -> torch.Tensor:
    """[N, K] float64 weight of the W8A8 module `name`: its int8 codes times their per-row scales."""
    assert t[f"{name}.weight"].dtype == torch.int8
    return t[f"{name}.weight"].double() * t[f"{name}.weight_scale"].double()


def _experts_modules(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "gate_up_proj") and hasattr(m, "has_gate")}


@pytest.mark.parametrize("arch", sorted(TINY_MOE_CONFIGS))
def test_rtn_quantizes_every_expert_and_the_checkpoint_loads(tmp_path, arch):
    block, up_names, down_name, _, router = DISK[arch]
    fp = tiny_model(arch)
    original = copy.deepcopy(fp)
    fp_experts = _experts_modules(fp)
    n_experts = {n: m.gate_up_proj.shape[0] for n, m in fp_experts.items()}
    routers = {n.rpartition(".")[0] + f".{router}": fp.get_submodule(n.rpartition(".")[0] + f".{router}").weight.clone()
               for n in fp_experts}
    model = llmq.quantize(fp, QuantConfig(group_size=GROUP, sym=False), progress=False)

    # Every expert's projections are quantized, in every MoE block, and no 3D weight is left.
    qexperts = {n: m for n, m in model.named_modules() if isinstance(m, QuantExperts)}
    assert sorted(qexperts) == sorted(fp_experts)
    for name, q in qexperts.items():
        linears = [m for m in q.modules() if isinstance(m, QuantLinear)]
        assert len(linears) == n_experts[name] * (len(up_names) + 1)
        assert not any(type(m) is torch.nn.Linear for m in q.modules())
    assert not [n for n, p in model.named_parameters() if p.dim() >= 3]
    # Routers untouched and recorded as kept.
    cfg = model.config.quantization_config
    assert f"mlp.{router}" in cfg["modules_to_not_convert"]
    for name, w in routers.items():
        assert torch.equal(model.get_submodule(name).weight, w)

    ids = random_ids(seed=7)
    with torch.no_grad():
        q_logits = model(ids).logits
    llmq.save(model, tmp_path / "q")
    # On disk: the architecture's own per-expert names (what vLLM and transformers expect).
    keys = set(load_file(str(tmp_path / "q" / "model.safetensors")))
    for name in fp_experts:
        disk = name.replace(".mlp.", f".{block}.")
        for e in range(n_experts[name]):
            for proj in up_names + (down_name,):
                assert f"{disk}.{e}.{proj}.qweight" in keys
    assert not any(k.endswith("gate_up_proj") for k in keys)

    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert sum(isinstance(m, QuantExperts) for m in loaded.modules()) == len(fp_experts)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q_logits)  # reloaded == in memory
        ref = _reference(original, tmp_path / "q", arch, lambda t, n: stored_weight64(t, n, 4, GROUP))(ids).logits
    torch.testing.assert_close(q_logits.double(), ref, atol=2e-4, rtol=1e-4)
    for name, w in routers.items():
        assert torch.equal(loaded.get_submodule(name).weight, w)


@pytest.mark.parametrize("arch", sorted(TINY_MOE_CONFIGS))
def test_unrolled_experts_compute_the_original_forward(arch):
    fp = tiny_model(arch)
    ids = random_ids(seed=3)
    with torch.no_grad():
        expected = fp(ids).logits
        pipeline.plan(fp, QuantConfig(group_size=GROUP), torch.device("cpu"))
        assert any(isinstance(m, QuantExperts) for m in fp.modules())
        torch.testing.assert_close(fp(ids).logits, expected, atol=1e-5, rtol=1e-5)


CALIBRATION = random_ids(n=8, length=32, seed=5)  # token windows, as llmq.quantize accepts them


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_gptq_checkpoint_reloads(tmp_path, arch):
    report = {}
    model = llmq.quantize(tiny_model(arch), QuantConfig(method="gptq", group_size=GROUP), dataset=CALIBRATION,
                          progress=False, report=report)
    assert report["experts"] and "routed tokens per expert" in report["experts"][0]
    ids = random_ids(seed=9)
    with torch.no_grad():
        expected = model(ids).logits
    llmq.save(model, tmp_path / "q")
    loaded = llmq.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_info_counts_experts_and_routers(tmp_path):
    from llmq.info import checkpoint_info, format_info

    model = llmq.quantize(tiny_model("qwen2_moe"), QuantConfig(group_size=GROUP), progress=False)
    llmq.save(model, tmp_path / "q")
    info = checkpoint_info(tmp_path / "q")
    c = info["census"]
    # 2 layers x 4 experts x 3 projections; q/k/v/o and the shared expert's 3 linears per layer.
    assert c.expert_linears == 24 and c.experts_modules == 2 and c.linears == 14
    assert c.expert_params == 2 * 4 * 3 * 64 * 32
    # Routers: 4 x 64 top-k gate and the 1 x 64 shared-expert gate per layer.
    assert c.kept["routers"] == 2 * (4 * 64 + 64) and not c.other
    text = format_info(info)
    assert "24 expert linears in 2 experts modules" in text and "routers" in text
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert {"mlp.gate", "mlp.shared_expert_gate"} <= set(cfg["modules_to_not_convert"])


def test_skipped_experts_stay_whole_and_load(tmp_path):
    fp = tiny_model("mixtral")
    model = llmq.quantize(fp, QuantConfig(group_size=GROUP, modules_to_not_convert=["lm_head", "layers.0.mlp.experts"]),
                          progress=False)
    assert not isinstance(model.model.layers[0].mlp.experts, QuantExperts)
    assert isinstance(model.model.layers[1].mlp.experts, QuantExperts)
    ids = random_ids()
    with torch.no_grad():
        expected = model(ids).logits
    llmq.save(model, tmp_path / "q")
    loaded = llmq.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    # The report names the kept experts, and counts both layers' routers as routers.
    from llmq.info import checkpoint_info

    c = checkpoint_info(tmp_path / "q")["census"]
    assert c.other and all(".layers.0." in name and ".experts." in name for name in c.other)
    assert c.kept["routers"] == 2 * fp.config.num_local_experts * fp.config.hidden_size


def test_skipping_one_projection_of_the_experts_is_refused():
    with pytest.raises(LlmqError, match="experts module"):
        llmq.quantize(tiny_model("mixtral"), QuantConfig(group_size=GROUP, modules_to_not_convert=["w2"]),
                      progress=False)


def test_unrecognised_3d_weights_are_refused():
    model = tiny_model("llama")
    model.model.layers[0].mlp.register_parameter("stacked", torch.nn.Parameter(torch.zeros(4, 8, 8)))
    with pytest.raises(LlmqError, match="llama.*3 or more dimensions.*layers.0.mlp.stacked"):
        llmq.quantize(model, QuantConfig(group_size=32), progress=False)


def test_cli_reports_experts_by_kind(tmp_path, capsys):
    from llmq.cli import main

    tiny_model("olmoe").save_pretrained(tmp_path / "fp")
    capsys.readouterr()
    assert main(["quantize", str(tmp_path / "fp"), str(tmp_path / "q"), "--group-size", "16"]) == 0
    out = capsys.readouterr().out
    # 2 layers x 4 experts x (gate, up, down); q/k/v/o per layer.
    assert "8 linears" in out and "24 expert linears in 2 experts modules" in out and "routers" in out
    assert main(["info", str(tmp_path / "q")]) == 0
    assert "24 expert linears in 2 experts modules" in capsys.readouterr().out


def _router_logits(layer, h):
    mlp = layer.mlp
    router = mlp.gate if hasattr(mlp, "gate") else mlp.router
    with torch.no_grad():
        out = router(layer.post_attention_layernorm(h))
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("arch", sorted(TINY_MOE_CONFIGS))
@pytest.mark.parametrize("mode", ["routed", "all"])
def test_awq_scales_experts_and_keeps_routing(tmp_path, arch, mode):
    fp = tiny_model(arch)
    original = copy.deepcopy(fp)
    model = llmq.quantize(fp, QuantConfig(method="awq", group_size=GROUP, moe_calibration=mode),
                          dataset=CALIBRATION, progress=False)
    layer, before = model.model.layers[-1], original.model.layers[-1]
    # The post-attention norm feeds router and experts: AWQ folded its scales into the norm ...
    assert not torch.allclose(layer.post_attention_layernorm.weight, before.post_attention_layernorm.weight)
    # ... and compensated the router (kept in full precision), so routing is unchanged.
    h = torch.randn(6, 64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(_router_logits(layer, h), _router_logits(before, h), atol=1e-5, rtol=1e-5)
    ids = random_ids(seed=9)
    with torch.no_grad():
        expected = model(ids).logits
    llmq.save(model, tmp_path / "q")
    loaded = llmq.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_awq_gives_one_scale_group_over_router_and_all_experts():
    from llmq.arch import arch_spec
    from llmq.methods.awq import build_units

    model = tiny_model("qwen2_moe")
    job = pipeline.plan(model, QuantConfig(method="awq", group_size=GROUP), torch.device("cpu"))
    units = build_units(job.spec, job.layers[0], job.targets[0], model.config)
    pooled = [u for u in units if u.group is not None and u.group.prev == "post_attention_layernorm"]
    assert len(pooled) == 1
    u = pooled[0]
    assert u.linears[:2] == ["mlp.gate", "mlp.shared_expert_gate"]  # routers first: their hook sees all tokens
    assert {f"mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj")} <= set(u.targets)
    assert "mlp.gate" not in u.targets  # kept, only compensated
    per_expert = [u for u in units if u.group is not None and u.group.kind == "linear" and "experts" in u.group.prev]
    assert sorted(u.group.prev for u in per_expert) == [f"mlp.experts.{e}.up_proj" for e in range(4)]
    assert arch_spec(model).awq is not None


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_experts_with_too_few_tokens_fall_back_to_rtn(method):
    from llmq.solvers.rtn import rtn_quantize

    fp = tiny_model("mixtral")
    original = copy.deepcopy(fp)
    report = {}
    model = llmq.quantize(fp, QuantConfig(method=method, group_size=GROUP, moe_min_tokens=10**6),
                          dataset=CALIBRATION, progress=False, report=report)
    assert any("round-to-nearest" in line and "layer 1" in line for line in report["experts"])
    # The down projections (never scaled by AWQ: their group fell back) are plain RTN of the original.
    for e in range(4):
        w = original.model.layers[1].mlp.experts.down_proj[e]
        ref = rtn_quantize(w, 4, GROUP, True, torch.float16).dequantize()
        got = model.model.layers[1].mlp.experts.get_submodule(f"{e}.w2").dequantize_weight(torch.float32)
        assert torch.equal(got, ref)


def test_all_mode_calibrates_every_expert_on_every_token():
    fp = tiny_model("mixtral")
    report = {}
    routed = llmq.quantize(copy.deepcopy(fp), QuantConfig(method="gptq", group_size=GROUP, moe_min_tokens=10**6),
                           dataset=CALIBRATION, progress=False, report=report)
    assert any("round-to-nearest" in line for line in report["experts"])
    report = {}
    all_mode = llmq.quantize(fp, QuantConfig(method="gptq", group_size=GROUP, moe_min_tokens=10**6,
                                             moe_calibration="all"), dataset=CALIBRATION, progress=False,
                             report=report)
    # Every expert saw all 256 calibration tokens: none fell back, whatever the threshold.
    assert not any("round-to-nearest" in line for line in report["experts"])
    a = routed.model.layers[1].mlp.experts.get_submodule("0.w1").qweight
    b = all_mode.model.layers[1].mlp.experts.get_submodule("0.w1").qweight
    assert not torch.equal(a, b)


@pytest.mark.parametrize("arch", sorted(TINY_MOE_CONFIGS))
def test_w8a8_quantizes_every_expert_and_the_checkpoint_loads(tmp_path, arch):
    fp = tiny_model(arch)
    model = llmq.quantize(copy.deepcopy(fp), QuantConfig(scheme="w8a8"), progress=False)
    block, up_names, down_name, transposed, _ = DISK[arch]
    n_experts = {n: m.gate_up_proj.shape[0] for n, m in _experts_modules(fp).items()}
    qexperts = {n: m for n, m in model.named_modules() if isinstance(m, QuantExperts)}
    assert sorted(qexperts) == sorted(n_experts)
    for name, q in qexperts.items():
        assert sum(isinstance(m, W8A8Linear) for m in q.modules()) == n_experts[name] * (len(up_names) + 1)
        assert not any(type(m) in (torch.nn.Linear, QuantLinear) for m in q.modules())
    assert not [n for n, p in model.named_parameters() if p.dim() >= 3]
    ids = random_ids(seed=3)
    with torch.no_grad():
        expected = model(ids).logits
    llmq.save(model, tmp_path / "q")
    # Each expert's stored codes x scales are round-to-nearest int8 of its slice of the original 3D
    # weights (per output row: within half a step), in the layout its architecture stores.
    stored = _reference(fp, tmp_path / "q", arch, _int8_weight64, ".weight_scale")  # W8A16: the int8 weights
    for name, original in _experts_modules(fp).items():
        got = stored.get_submodule(name)
        for ours, theirs in ((got.gate_up_proj, original.gate_up_proj), (got.down_proj, original.down_proj)):
            w = theirs.double().transpose(1, 2) if transposed else theirs.double()  # [E, out, in]
            q = ours.transpose(1, 2) if transposed else ours
            step = w.abs().amax(-1, keepdim=True) / 127
            assert ((q - w).abs() <= step / 2 + 1e-7).all(), name
    loaded = llmq.from_pretrained(tmp_path / "q")
    assert sum(isinstance(m, W8A8Linear) for m in loaded.modules()) == sum(
        isinstance(m, W8A8Linear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
        # Against the architecture's own forward on the int8 weights in float64: what is left is the
        # activation rounding (up to 0.1 where it flips a few routing choices: gpt_oss), far below the
        # distance between unrelated logits (about 1.4).
        w8a16 = stored(ids).logits
    assert ((expected.double() - w8a16).norm() / w8a16.norm()) < 0.2


def test_w8a8_experts_short_of_tokens_are_calibrated_on_every_token():
    fp = tiny_model("mixtral")
    settings = dict(scheme="w8a8", act="static", smooth="auto", method="gptq", moe_min_tokens=10**6)
    report = {}
    routed = llmq.quantize(copy.deepcopy(fp), QuantConfig(**settings), dataset=CALIBRATION, progress=False,
                           report=report)
    assert sum("calibrated on every calibration token" in line for line in report["experts"]) == 2  # per layer
    all_mode = llmq.quantize(copy.deepcopy(fp), QuantConfig(**settings, moe_calibration="all"),
                             dataset=CALIBRATION, progress=False)
    # Layer 0's experts see the same input in both runs: every token of the block, after the forward
    # or during it. So the same smoothing, int8 weights and static scales.
    ours = routed.model.layers[0].mlp.experts.state_dict()
    theirs = all_mode.model.layers[0].mlp.experts.state_dict()
    assert ours.keys() == theirs.keys() and any(k.endswith("input_scale") for k in ours)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    scales = torch.cat([m.input_scale for m in routed.modules() if isinstance(m, W8A8Linear)])
    assert torch.isfinite(scales).all() and (scales > 0).all()


def test_w8a8_keeps_every_experts_module_or_none():
    with pytest.raises(LlmqError, match="every experts module.*model.layers.0.mlp.experts is kept"):
        llmq.quantize(tiny_model("mixtral"), QuantConfig(scheme="w8a8", modules_to_not_convert=[
            "lm_head", "layers.0.mlp.experts"]), progress=False)


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_w8a8_experts_export_to_compressed_tensors_and_read_back(tmp_path, act, capsys):
    from llmq.cli import main

    model = llmq.quantize(tiny_model("mixtral"), QuantConfig(scheme="w8a8", act=act), dataset=CALIBRATION,
                          progress=False)
    llmq.save(model, tmp_path / "native")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "native")]) == 0
    out = capsys.readouterr().out
    assert "quantized         8 linears" in out and "24 expert linears in 2 experts modules" in out  # 2 x 4 x 3
    assert "other kept" not in out
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "ct"), "--format", "compressed-tensors"]) == 0
    report = capsys.readouterr().out
    vllm_moe = next(line for line in report.splitlines() if "vLLM MoE experts" in line)
    assert vllm_moe.split()[0] == ("yes" if act == "dynamic" else "no")
    assert any(line.split()[0] == "no" and "transformers + compressed-tensors" in line
               for line in report.splitlines())
    t = load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert t["model.layers.0.block_sparse_moe.experts.3.w2.weight"].dtype == torch.int8
    assert t["model.layers.0.block_sparse_moe.experts.3.w2.weight_scale"].dtype == torch.float32
    ids = random_ids(seed=5)
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(tmp_path / "ct")(ids).logits, model(ids).logits)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_exports_use_the_per_expert_names_vllm_reads(tmp_path, fmt, arch):
    from llmq.formats.convert import export

    block, up_names, down_name, _, router = DISK[arch]
    model = llmq.quantize(tiny_model(arch), QuantConfig(group_size=GROUP, sym=True, desc_act=False), progress=False)
    ids = random_ids()
    with torch.no_grad():
        expected = model(ids).logits
    rows = export(model, tmp_path / "x", None, fmt)
    keys = set(load_file(str(tmp_path / "x" / "model.safetensors")))
    # vLLM's FusedMoE.make_expert_params_mapping reads `experts.<e>.<ckpt proj name>.` + the format's suffixes.
    weight = "qweight" if fmt == "gptq" else "weight_packed"
    for layer in range(2):
        for e in range(4):
            for proj in up_names + (down_name,):
                assert f"model.layers.{layer}.{block}.experts.{e}.{proj}.{weight}" in keys
    assert f"model.layers.0.{block}.{router}.weight" in keys  # the router, in full precision
    cfg = json.loads((tmp_path / "x" / "config.json").read_text())["quantization_config"]
    if fmt == "compressed-tensors":
        assert f"model.layers.0.{block}.{router}" in cfg["ignore"]
    moe_rows = [r for r in rows if "MoE" in r.engine]
    assert len(moe_rows) == 1 and moe_rows[0].loads
    loaded = llmq.from_pretrained(tmp_path / "x")  # read back through llmq's converter: the same codes
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_asymmetric_compressed_tensors_moe_names_the_vllm_version():
    from llmq.formats.engines import moe_engine_support

    shapes = {"model.layers.0.mlp.experts.0.gate_proj": (32, 64)}
    (row,) = moe_engine_support("compressed-tensors", QuantConfig(sym=False), shapes)
    assert not row.loads and "44025" in row.why and "0.19.0" in row.why
    assert moe_engine_support("compressed-tensors", QuantConfig(), {"model.layers.0.mlp.up_proj": (32, 64)}) == []


def test_gptq_solves_each_experts_gate_and_up_together():
    from llmq import arch

    model = tiny_model("mixtral")
    job = pipeline.plan(model, QuantConfig(method="gptq", group_size=GROUP), torch.device("cpu"))
    groups = arch.sequential_groups(job.spec, job.layers[0], list(job.targets[0]))
    assert ["mlp.experts.0.w1", "mlp.experts.0.w3"] in groups and ["mlp.experts.0.w2"] in groups
    assert sorted(n for g in groups for n in g) == sorted(job.targets[0])  # every linear once


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "gpt_oss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_takes_the_short_path_with_the_loops_bits(arch, dtype):
    """A decode step (one token) goes straight to its top-k experts and calls their QuantLinears
    directly; its output equals the general loop's, bit for bit, which runs the module calls
    (forced here by a forward hook on every projection, which the short path must respect)."""
    model = llmq.quantize(tiny_model(arch), QuantConfig(group_size=GROUP, sym=False), progress=False)
    experts = next(m for m in model.modules() if isinstance(m, QuantExperts)).to(dtype)
    g = torch.Generator().manual_seed(11)
    hidden = experts.expert(0).get_submodule(experts.down_name).out_features
    top_k = 3
    for _ in range(4):
        x = torch.randn(1, hidden, generator=g).to(dtype)
        index = torch.randperm(experts.num_experts, generator=g)[:top_k].view(1, top_k)
        weights = torch.softmax(torch.randn(1, top_k, generator=g), -1).to(dtype)
        index[0, 1] = experts.num_experts  # an expert-parallel sentinel: dropped
        with torch.no_grad():
            fast = experts(x, index, weights)
            calls = []
            hooks = [m.register_forward_hook(lambda *a: calls.append(1))
                     for m in experts.modules() if isinstance(m, QuantLinear)]
            hooked = experts(x, index, weights)  # the short path, through the module calls
            assert len(calls) == (top_k - 1) * (len(experts.up_names) + 1)
            experts.record_tokens = True  # the general loop
            loop = experts(x, index, weights)
            experts.record_tokens = False
            for h in hooks:
                h.remove()
        assert fast.dtype == dtype
        assert torch.equal(fast, hooked) and torch.equal(fast, loop)
        # And against the float64 sum of the routed experts' dequantized projections.
        ref = torch.zeros(1, hidden, dtype=torch.float64)
        for k in (0, 2):
            linears = experts.expert(int(index[0, k]))._modules
            ups = [x.double() @ linears[n].dequantize_weight(torch.float64).t()
                   + (0 if linears[n].bias is None else linears[n].bias.double()) for n in experts.up_names]
            h = experts._activate(torch.cat(ups, -1))
            down = linears[experts.down_name]
            out = h @ down.dequantize_weight(torch.float64).t() + (0 if down.bias is None else down.bias.double())
            ref += weights[0, k].double() * out
        tol = dict(atol=2e-4, rtol=1e-3) if dtype == torch.float32 else dict(atol=0.05, rtol=0.05)
        torch.testing.assert_close(fast.double(), ref, **tol)


def test_a_replaced_forward_is_called_by_the_short_path():
    """accelerate's offloading replaces a module's forward: the short path must call it."""
    model = llmq.quantize(tiny_model("mixtral"), QuantConfig(group_size=GROUP, sym=False), progress=False)
    experts = next(m for m in model.modules() if isinstance(m, QuantExperts))
    calls = []
    for m in experts.modules():
        if isinstance(m, QuantLinear):
            m.forward = (lambda f: (lambda x: calls.append(1) or f(x)))(m.forward)
    hidden = experts.expert(0).get_submodule(experts.down_name).out_features
    with torch.no_grad():
        experts(torch.randn(1, hidden), torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]))
    assert len(calls) == 2 * (len(experts.up_names) + 1)


def test_moe_benchmark_reads_weight_only_and_w8a8_specs():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_moe.py")
    spec = importlib.util.spec_from_file_location("bench_moe", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    c = bench.parse("gptq:4:64:asym:all")
    assert (c.method, c.bits, c.group_size, c.sym, c.moe_calibration) == ("gptq", 4, 64, False, "all")
    c = bench.parse("w8a8:static:auto:gptq:routed")
    assert (c.scheme, c.act, c.smooth, c.method, c.moe_calibration) == ("w8a8", "static", "auto", "gptq", "routed")
    assert bench.parse("w8a8:dynamic:0.5:rtn:routed").smooth == 0.5
    with pytest.raises(LlmqError, match="w8a8:dynamic"):
        bench.parse("gptq:4:64")


def test_gptq_checkpoint_with_some_experts_by_rtn_reloads(tmp_path):
    # Act-order GPTQ experts store g_idx, the ones that fell back to round-to-nearest none: the loader
    # builds each expert's linear as the checkpoint holds it.
    fp = tiny_model("mixtral")
    report = {}
    model = llmq.quantize(fp, QuantConfig(method="gptq", group_size=GROUP, desc_act=True, moe_min_tokens=120),
                          dataset=CALIBRATION, progress=False, report=report)
    assert any("round-to-nearest" in line for line in report["experts"])
    llmq.save(model, tmp_path / "q")
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    experts = {k.rpartition(".")[0] for k in tensors if ".experts." in k and k.endswith(".qweight")}
    with_order = {name for name in experts if f"{name}.g_idx" in tensors}
    assert with_order and with_order != experts  # both kinds in one checkpoint
    ids = random_ids(seed=5)
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(tmp_path / "q")(ids).logits, model(ids).logits)


def test_expert_rows_are_placed_in_the_whole_batch_by_their_tokens(monkeypatch):
    # Rank 1 of 2 holds windows 1, 3, 5 of 6: its local token i of window j is token i % 5 of window
    # 1 + 2 (i // 5) of the batch. An expert's rows are placed by the tokens routed to it.
    from llmq import distributed
    from llmq.moe import ExpertTokens

    fp = tiny_model("mixtral")
    pipeline.plan(fp, QuantConfig(group_size=GROUP), torch.device("cpu"))
    block = fp.model.layers[0].mlp
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda t: t * 2)  # each rank holds 3 windows
    h = torch.randn(3, 5, fp.config.hidden_size, generator=torch.Generator().manual_seed(8))
    experts = ExpertTokens(min_tokens=0).start_layer(0, fp.model.layers[0], h)
    flat = h.reshape(-1, h.shape[-1])
    place = torch.tensor([(1 + 2 * (i // 5)) * 5 + i % 5 for i in range(15)])
    got = {}

    def keep(name):
        def hook(module, args):
            got[name] = (args[0], experts.positions(name, args[0]))
        return hook

    for name in ("mlp.gate", "mlp.experts.0.w1", "mlp.experts.3.w2"):
        fp.model.layers[0].get_submodule(name).register_forward_pre_hook(keep(name))
    with torch.no_grad():
        block(h)
    x, positions = got["mlp.gate"]
    assert torch.equal(positions, place)  # the router reads every token
    x, positions = got["mlp.experts.0.w1"]
    local = [next(i for i in range(15) if torch.equal(flat[i], row)) for row in x]  # each row's own token
    assert 0 < len(local) < 15 and torch.equal(positions, place[local])
    assert got["mlp.experts.3.w2"][1].shape[0] == got["mlp.experts.3.w2"][0].shape[0]
    assert experts.expert_of("mlp.experts.3.w2") == ("mlp.experts", 3) and experts.expert_of("mlp.gate") is None
    with pytest.raises(LlmqError, match="reads 4 rows, not the layer's 15 tokens"):
        experts.positions("mlp.gate", flat[:4])


@pytest.mark.parametrize("skip_first_experts", [False, True])
def test_loader_leaves_out_expert_merges_where_no_full_precision_experts_remain(tmp_path, monkeypatch,
                                                                             skip_first_experts):
    """transformers' MoE converters stack per-expert weights into 3D parameters. Where every experts
    module is quantized there is none to fill, and transformers 5.17 matches their patterns inside
    the quantized tensors' names, so the loader leaves them out; an experts module kept in full
    precision keeps them. The quantizer takes the conversions alone, as transformers 5.17 calls it."""
    from transformers.quantizers import HfQuantizer

    from llmq.hf import LlmqHfQuantizer, _merges_experts

    skip = ["lm_head"] + (["layers.0.mlp.experts"] if skip_first_experts else [])
    model = llmq.quantize(tiny_model("mixtral"), QuantConfig(group_size=GROUP, modules_to_not_convert=skip),
                          progress=False)
    llmq.save(model, tmp_path / "q")
    returned, given = [], []
    original = LlmqHfQuantizer.update_weight_conversions

    def spy(self, weight_conversions, *model_arg):
        given.append(list(weight_conversions))
        returned.append(original(self, weight_conversions, *model_arg))
        return returned[-1]

    monkeypatch.setattr(LlmqHfQuantizer, "update_weight_conversions", spy)
    loaded = llmq.from_pretrained(tmp_path / "q")
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # The last call sets up the loading itself, after the quantized modules are in place.
    assert any(_merges_experts(c) for c in given[-1])  # Mixtral's conversion mapping merges its experts
    assert any(_merges_experts(c) for c in returned[-1]) == skip_first_experts

    # transformers 5.17's call: the conversions alone, to a base method that takes nothing more.
    quantizer = loaded.hf_quantizer
    monkeypatch.setattr(HfQuantizer, "update_weight_conversions", lambda self, weight_conversions: weight_conversions)
    kept = original(quantizer, given[-1])
    assert kept == ([c for c in given[-1] if not _merges_experts(c)] if not skip_first_experts else given[-1])


@pytest.mark.parametrize("arch", list(TINY_MOE_CONFIGS))
def test_quantize_routers_is_refused_where_a_router_is_not_a_linear(arch):
    """transformers 5's top-k routers are modules of their own, not nn.Linear: --quantize-routers would
    leave them in full precision while saying it quantizes them."""
    pattern = r"--quantize-routers quantizes routers that are linear layers, and model\.layers\.\d\.mlp\.\w+ is a "
    with pytest.raises(LlmqError, match=pattern + r"\w+Top[kK]Router: drop --quantize-routers"):
        llmq.quantize(tiny_model(arch), QuantConfig(group_size=32, keep_routers=False), progress=False)


def test_a_stored_config_quantizes_another_model_the_same_way():
    """A checkpoint's config names the routers it kept; quantizing with it again is accepted."""
    first = llmq.quantize(tiny_model("mixtral"), QuantConfig(group_size=32), progress=False)
    stored = QuantConfig.from_dict(first.config.quantization_config)
    assert "mlp.gate" in stored.modules_to_not_convert
    again = llmq.quantize(tiny_model("mixtral", seed=1), stored, progress=False)
    assert isinstance(again.model.layers[0].mlp.experts, QuantExperts)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_the_kept_routers_survive_a_round_trip_through_another_format(tmp_path, fmt):
    from llmq.formats.convert import convert

    model = llmq.quantize(tiny_model("qwen2_moe"), QuantConfig(group_size=32), progress=False)
    llmq.save(model, tmp_path / "native")
    convert(tmp_path / "native", tmp_path / "other", fmt)
    convert(tmp_path / "other", tmp_path / "back", "llmq")
    kept = [json.loads((tmp_path / d / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
            for d in ("native", "back")]
    assert kept[0] == kept[1] == ["lm_head", "mlp.gate", "mlp.shared_expert_gate"]


@pytest.mark.parametrize("arch", ["gpt_oss", "granitemoe"])
@pytest.mark.parametrize("fmt,config", [("gptq", QuantConfig(group_size=GROUP, desc_act=False)),
                                        ("compressed-tensors", QuantConfig(group_size=GROUP)),
                                        ("compressed-tensors", QuantConfig(scheme="w8a8"))])
def test_experts_fused_on_disk_are_reported_as_not_loading_in_vllm(tmp_path, capsys, arch, fmt, config):
    # Their experts are written whole per expert (gate_up_proj), a name vLLM's expert mapping does not read.
    from llmq.cli import main

    model = llmq.quantize(tiny_model(arch), config, progress=False)
    llmq.save(model, tmp_path / "native")
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "out"), "--format", fmt]) == 0
    report = capsys.readouterr().out
    vllm_moe = next(line for line in report.splitlines() if "vLLM MoE experts" in line)
    assert vllm_moe.split()[0] == "no" and "gate_up_proj" in vllm_moe
    suffix = "qweight" if fmt == "gptq" else "weight" if config.scheme == "w8a8" else "weight_packed"
    assert any(k.endswith(f".experts.1.gate_up_proj.{suffix}") for k in checkpoint_tensors(tmp_path / "out"))
    ids = random_ids(seed=8)
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(tmp_path / "out")(ids).logits, model(ids).logits)
