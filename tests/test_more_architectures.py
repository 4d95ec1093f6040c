"""Architectures whose scale groups llmq knows beyond the ones the other tests sweep: parallel
blocks (Cohere, Phi-2), post-norms (OLMo 2), fused projections (GLM-4, GPT-NeoX), other expert
layouts and names (Granite MoE, PhiMoE, GLM-4.5, ERNIE 4.5, Llama 4), norms of (1 + weight) with
linear attention (Qwen3-Next) and DeepSeek's sparse attention (DeepSeek-V3.2, and GLM-5, whose
top-k tokens pass from layer to layer). For each: the groups fold without changing the full-precision function, AWQ and
SmoothQuant W8A8 run on them, and their checkpoints load back exactly. Mamba-attention hybrids
(Bamba, Granite 4.0, Falcon-H1) too, with RTN and GPTQ besides."""

import json

import pytest
import torch

import llmq
from llmq import QuantConfig, QuantLinear, pipeline
from llmq.engine import layer_output, run_layers
from llmq.methods.w8a8 import build_w8a8_units, fold_smoothing
from llmq.modules.w8a8 import W8A8Linear
from conftest import DISCOVERED_CONFIGS, MORE_CONFIGS, random_ids, tiny_model

# The operations folded into, over the decoder layers (the tiny models' two): written out from each
# architecture's modelling code, not from llmq.arch.
FOLDED_INTO = {
    "granite": {"input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"},
    "smollm3": {"input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"},
    "olmo2": {"self_attn.v_proj", "mlp.up_proj"},
    "glm4": {"input_layernorm", "self_attn.v_proj", "post_attention_layernorm"},
    "cohere": {"input_layernorm", "self_attn.v_proj", "mlp.up_proj"},
    "phi": {"input_layernorm", "self_attn.v_proj"},
    "starcoder2": {"input_layernorm", "self_attn.v_proj", "post_attention_layernorm"},
    "gpt_neox": {"input_layernorm", "post_attention_layernorm"},
    "granitemoe": {"input_layernorm", "self_attn.v_proj", "post_attention_layernorm"},
    "phimoe": {"input_layernorm", "self_attn.v_proj", "post_attention_layernorm"} |
              {f"mlp.experts.{e}.w3" for e in range(4)},
    "glm4_moe": {"input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.shared_experts.up_proj",
                 "mlp.up_proj"} |
                {f"mlp.experts.{e}.up_proj" for e in range(4)},
    "ernie4_5_moe": {"input_layernorm", "self_attn.v_proj", "post_attention_layernorm",
                     "mlp.shared_experts.up_proj", "mlp.up_proj"} | {f"mlp.experts.{e}.up_proj" for e in range(4)},
    "qwen3_next": {"input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.shared_expert.up_proj"} |
                  {f"mlp.experts.{e}.up_proj" for e in range(4)},
    **dict.fromkeys(["glm_moe_dsa", "deepseek_v32"], {
        "input_layernorm", "self_attn.q_a_layernorm", "self_attn.kv_a_layernorm", "post_attention_layernorm",
        "mlp.shared_experts.up_proj", "mlp.up_proj"} | {f"mlp.experts.{e}.up_proj" for e in range(4)}),
    "dbrx": {"norm_attn_norm.norm_1", "norm_attn_norm.norm_2"} | {f"ffn.experts.{e}.v1" for e in range(4)},
    "llama4_text": {"input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "feed_forward.up_proj",
                    "feed_forward.shared_expert.up_proj"} | {f"feed_forward.experts.{e}.up_proj" for e in range(4)},
    "bamba": {"input_layernorm", "self_attn.v_proj", "mamba.norm", "pre_ff_layernorm", "feed_forward.up_proj"},
    "granitemoehybrid": {"input_layernorm", "self_attn.v_proj", "mamba.norm", "post_attention_layernorm"},
    "falcon_h1": {"input_layernorm", "self_attn.v_proj", "pre_ff_layernorm", "feed_forward.up_proj"},  # no Mamba norm
    "kimi_linear": {"input_layernorm", "self_attn.forget_gate.f_a_proj", "self_attn.g_a_proj",
                    "self_attn.kv_a_layernorm", "post_attention_layernorm", "mlp.up_proj",
                    "mlp.shared_experts.up_proj"} |
                   {f"mlp.experts.{e}.w3" for e in range(4)},
    "zaya": {"input_layernorm", "post_attention_layernorm"},
    "jamba": {"input_layernorm", "self_attn.v_proj", "pre_ff_layernorm", "feed_forward.up_proj"} |
             {f"feed_forward.experts.{e}.up_proj" for e in range(4)},
}


def _spread_norms(model, seed=3):
    # Norm weights start at 1 (0 for the (1 + weight) norms) and biases at 0: randomise them so a
    # fold that forgot an offset or a bias changes the function.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 0.5)


def test_every_architecture_here_has_its_expected_groups():
    assert set(MORE_CONFIGS) <= set(FOLDED_INTO)  # ZAYA1 only where transformers has it


@pytest.mark.parametrize("arch", sorted(MORE_CONFIGS))
def test_folding_factors_into_every_group_leaves_the_fp_function_unchanged(arch):
    model = tiny_model(arch)  # float32: the experts' grouped matmul takes no float64
    _spread_norms(model)
    ids = random_ids(seed=4)
    with torch.no_grad():
        ref = model(ids).logits
    job = pipeline.plan(model, QuantConfig(scheme="w8a8", smooth=0.5), torch.device("cpu"))  # unrolls experts
    g = torch.Generator().manual_seed(1)
    folded = []
    for i, layer in enumerate(job.layers):
        for unit in build_w8a8_units(job.spec, layer, job.targets[i], model.config, smooth=0.5):
            if unit.group is not None:
                k = layer.get_submodule(unit.linears[0]).weight.shape[1]
                fold_smoothing(layer, unit, unit.tie(torch.rand(k, generator=g) * 4 + 0.25))
                folded.append(unit.group.prev)
    assert set(folded) == FOLDED_INTO[arch]
    with torch.no_grad():
        out = model(ids).logits
    # Rounding moves the logits by about 1e-6 of their size; a wrong fold (a missed consumer,
    # offset or bias) by a sizeable fraction of it.
    assert (out - ref).abs().max() < 2e-5 * ref.abs().max()


def _model_and_tokens(arch: str, seed: int):
    """A tiny model, token windows to run and to calibrate on (fresh for each seed), and its logits."""
    fp = tiny_model(arch)
    ids = random_ids(seed=seed)
    calib = torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        return fp, ids, calib, fp(ids).logits


def _assert_close_and_reloads(model, ids, fp_logits, bound: float, folder) -> None:
    """Quantizing moved the logits by less than `bound` of their mean size; the checkpoint gives them back."""
    with torch.no_grad():
        q_logits = model(ids).logits
    assert (q_logits - fp_logits).abs().mean() < bound * fp_logits.abs().mean()
    llmq.save(model, folder)
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(folder)(ids).logits, q_logits)


def _quantized_and_left(model):
    quantized = sum(isinstance(m, (QuantLinear, W8A8Linear)) for m in model.modules())
    left = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    return quantized, left


@pytest.mark.parametrize("arch", sorted(MORE_CONFIGS))
@pytest.mark.parametrize("config", [QuantConfig(method="awq", group_size=32),
                                    QuantConfig(scheme="w8a8", smooth="auto")], ids=["awq", "w8a8-smoothquant"])
def test_calibrated_methods_fold_quantize_and_reload(tmp_path, arch, config):
    fp, ids, calib, fp_logits = _model_and_tokens(arch, seed=6)
    norms_before = {n: p.clone() for n, p in fp.named_parameters() if p.dim() == 1 and "norm" in n}
    model = llmq.quantize(fp, config, dataset=calib, progress=False)
    quantized, left = _quantized_and_left(model)
    # Everything but the head, the routers and the linears the model reads by weight stays in full precision.
    # (Routers are nn.Linear in some transformers releases: Jamba's in 5.17.)
    kept = ("shared_expert_gate", "indexer.weights_proj", "dt_proj", "router.layer", "feed_forward.router")
    assert quantized > 0 and all(n == "lm_head" or n.endswith(kept) or ".mlp.gate." in n  # ZAYA1's router network
                                 for n in left), left
    if FOLDED_INTO[arch] & {"input_layernorm", "post_attention_layernorm"}:
        changed = [n for n, p in model.named_parameters() if n in norms_before and not torch.equal(p, norms_before[n])]
        assert changed, "no scale was folded into a norm"
    # Int4 of random weights on random calibration tokens moves the logits by 2% to 33% of their size
    # (GLM-5's most: its sparse attention picks other tokens); a broken fold by more than their size.
    _assert_close_and_reloads(model, ids, fp_logits, 0.4, tmp_path / arch)


@pytest.mark.parametrize("arch,after", [("glm_moe_dsa", "model.norm")] +
                         [(a, after) for a, after in (("zaya", "model.norm"), ("hy_v4", "model.hc_head"))
                          if a in {**MORE_CONFIGS, **DISCOVERED_CONFIGS}])
def test_a_layers_further_outputs_reach_the_next_layer(arch, after):
    """GLM-5's and Hunyuan V4's second layers reuse the top-k tokens their first selected, and ZAYA1's
    router adds its first layer's router state (handed on positionally by the model), each returned after
    the hidden states: layer by layer, llmq hands them on, and computes what the whole model does."""
    model = tiny_model(arch)
    ids = random_ids(seed=9)
    seen = {}
    model.get_submodule(after).register_forward_pre_hook(lambda module, args: seen.setdefault("hidden", args[0]))
    with torch.no_grad():
        model(ids, use_cache=False)
    out = run_layers(model, ids, lambda i, layer, hidden, args, kwargs: (layer_output(layer(hidden, *args, **kwargs)),
                                                                           ""), device=torch.device("cpu"),
                     progress=False)
    torch.testing.assert_close(out, seen["hidden"], rtol=0, atol=0)


@pytest.mark.parametrize("arch,kept,quantized", [
    ("glm_moe_dsa", "self_attn.indexer.weights_proj", "self_attn.indexer.wq_b"),
    ("jamba", "mamba.dt_proj", "mamba.x_proj"),
])
def test_linears_the_model_reads_by_weight_stay_in_full_precision_and_are_recorded(tmp_path, arch, kept, quantized):
    model = llmq.quantize(tiny_model(arch), QuantConfig(group_size=16), progress=False)
    assert type(model.model.layers[0].get_submodule(kept)) is torch.nn.Linear
    assert isinstance(model.model.layers[0].get_submodule(quantized), QuantLinear)
    llmq.save(model, tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert kept in qc["modules_to_not_convert"]
    ids = random_ids(seed=10)
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(tmp_path / "q")(ids).logits, model(ids).logits)


@pytest.mark.parametrize("arch", ["bamba", "granitemoehybrid", "falcon_h1", "jamba", "kimi_linear"])
@pytest.mark.parametrize("config", [QuantConfig(group_size=16), QuantConfig(method="gptq", group_size=16),
                                    QuantConfig(scheme="w8a8", method="gptq", smooth="off")],
                         ids=["rtn", "gptq", "w8a8-gptq"])
def test_mamba_hybrids_quantize_and_reload(tmp_path, arch, config):
    fp, ids, calib, fp_logits = _model_and_tokens(arch, seed=11)
    model = llmq.quantize(fp, config, dataset=None if config.method == "rtn" else calib, progress=False)
    quantized, left = _quantized_and_left(model)
    # Jamba's Mamba mixer reads dt_proj's weight directly (its fast path): kept. Its router, kept too, is an
    # nn.Linear in transformers 5.17.
    left = [n for n in left if not n.endswith("feed_forward.router")]
    assert quantized > 0 and left == (["model.layers.0.mamba.dt_proj", "lm_head"] if arch == "jamba" else ["lm_head"])
    _assert_close_and_reloads(model, ids, fp_logits, 0.3, tmp_path / arch)


def test_an_architecture_whose_names_do_not_round_trip_is_refused_before_any_work(monkeypatch):
    """transformers 5.24's DeepSeek-V4 mapping renames every `.norm.` on load, the final norm's too,
    which it saves under its own name: no checkpoint of it would load, so llmq refuses up front."""
    from transformers import conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    real = conversion_mapping.get_model_conversion_mapping
    monkeypatch.setattr(conversion_mapping, "get_model_conversion_mapping",
                        lambda model, **kw: [*real(model, **kw), WeightRenaming(r"\.norm\.", ".kv_norm.")])
    with pytest.raises(llmq.LlmqError, match=r"saves 'model.norm.weight' .* as 'model.norm.weight' and loads that "
                                             r"back as 'model.kv_norm.weight'"):
        llmq.quantize(tiny_model("llama"), QuantConfig(method="gptq", group_size=32),
                      dataset=random_ids(n=4, length=16), progress=False)


def test_falcons_linears_which_write_out_the_product_are_quantized(tmp_path):
    """Falcon's FalconLinear is an nn.Linear subclass whose own forward computes x W^T + b: quantized like
    a linear (llmq.arch.PLAIN_LINEAR_SUBCLASSES)."""
    import transformers as T

    torch.manual_seed(0)
    fp = T.AutoModelForCausalLM.from_config(T.FalconConfig(hidden_size=64, num_hidden_layers=2,
                                                           num_attention_heads=4, vocab_size=256)).eval()
    with torch.no_grad():
        for p in fp.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    assert type(fp.transformer.h[0].self_attention.query_key_value).__name__ == "FalconLinear"
    ids = random_ids(seed=12)
    with torch.no_grad():
        fp_logits = fp(ids).logits
    calib = torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(13))
    model = llmq.quantize(fp, QuantConfig(method="gptq", group_size=16), dataset=calib, progress=False)
    quantized, left = _quantized_and_left(model)
    assert quantized == 2 * 4 and not [n for n, m in model.named_modules() if type(m).__name__ == "FalconLinear"]
    _assert_close_and_reloads(model, ids, fp_logits, 0.3, tmp_path / "falcon")


def test_a_linear_with_a_forward_of_its_own_is_refused_by_name():
    class ScaledLinear(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = tiny_model("llama")
    old = model.model.layers[1].mlp.up_proj
    model.model.layers[1].mlp.up_proj = ScaledLinear(old.in_features, old.out_features, bias=False)
    with pytest.raises(llmq.LlmqError, match=r"layer model\.layers\.1\.mlp\.up_proj is a ScaledLinear, an nn\.Linear "
                                             r"with a forward of its own.*--skip model\.layers\.1\.mlp\.up_proj"):
        llmq.quantize(model, QuantConfig(group_size=16), progress=False)


@pytest.mark.parametrize("fmt,config", [("gptq", QuantConfig(group_size=16, desc_act=False)),
                                        ("compressed-tensors", QuantConfig(scheme="w8a8"))])
def test_exports_keep_no_quantized_linear_stored_under_another_name(tmp_path, fmt, config):
    """Kimi Linear stores `mlp.` as `block_sparse_moe.` and its forget gate's projections outside
    `forget_gate`: matched by their stored names, they are quantized, not kept, in every export."""
    from llmq.formats.convert import convert

    model = llmq.quantize(tiny_model("kimi_linear"), config, progress=False)
    llmq.save(model, tmp_path / "native")
    convert(tmp_path / "native", tmp_path / "out", fmt)
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    quantized = {n for n, m in model.named_modules() if isinstance(m, (QuantLinear, W8A8Linear))}
    assert {"model.layers.0.mlp.gate_proj", "model.layers.0.self_attn.forget_gate.f_a_proj"} <= quantized
    if fmt == "gptq":  # every decoder linear quantized: no list of the quantized ones needed
        assert "modules_in_block_to_quantize" not in qc
    else:
        assert not quantized & set(qc["ignore"]) and "lm_head" in qc["ignore"]
    ids = random_ids(seed=14)
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(tmp_path / "out")(ids).logits, model(ids).logits)


def test_rwkv_is_refused_with_the_reason():
    import transformers as T

    model = T.AutoModelForCausalLM.from_config(T.RwkvConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                                            attention_hidden_size=64, intermediate_size=128))
    with pytest.raises(llmq.LlmqError, match="architecture 'rwkv' is not supported: its blocks hand a recurrent state"):
        llmq.quantize(model, QuantConfig(group_size=16), progress=False)
