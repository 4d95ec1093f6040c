"""Llama 4: experts that transformers does not decorate, called with every token once per expert,
already multiplied by its routing score (llmq.experts.UNDECORATED).

The reference for a saved checkpoint is built independently of llmq's modules: the stored codes
unpacked here with plain shifts, dequantized in float64, written back into Llama 4's own 3D expert
parameters (gate_up_proj [E, H, 2I]: gate, then up; down_proj [E, I, H]) and linears, and the
original transformers model run in float64. The tiny model (tests/conftest.py) has a dense first
layer and an MoE second one with a shared expert, top-1 routing, chunked and full attention.
"""

import copy
import inspect
import json

import pytest
import torch
import transformers as T

import llmq
from llmq import LlmqError, QuantConfig, QuantLinear, pipeline
from llmq.modules.qexperts import QuantExperts
from conftest import (MORE_CONFIGS, float64_with_stored_linears, model_folder_with_text, quantize_and_save,
                      random_ids, stored_weight64, tiny_model)

ARCH = "llama4_text"
GROUP = 16
EXPERTS = "model.layers.1.feed_forward.experts"
CALIBRATION = random_ids(n=8, length=32, seed=11)


def _reference(fp_model, folder):
    """The fp model in float64 with every stored weight put back where Llama 4 keeps it."""
    ref, t = float64_with_stored_linears(fp_model, folder, 4, GROUP)
    experts = ref.get_submodule(EXPERTS)
    for e in range(experts.gate_up_proj.shape[0]):
        gate_up = torch.cat([stored_weight64(t, f"{EXPERTS}.{e}.{p}", 4, GROUP) for p in ("gate_proj", "up_proj")])
        experts.gate_up_proj.data[e] = gate_up.t()
        experts.down_proj.data[e] = stored_weight64(t, f"{EXPERTS}.{e}.down_proj", 4, GROUP).t()
    return ref


def test_the_tiny_model_has_what_the_tests_rely_on():
    config = MORE_CONFIGS[ARCH]()
    assert config.moe_layers == [1] and config.num_experts_per_tok == 1
    assert config.layer_types == ["chunked_attention", "full_attention"]


def test_unrolled_experts_compute_the_original_forward():
    fp = tiny_model(ARCH)
    ids = random_ids(seed=3)
    with torch.no_grad():
        expected = fp(ids).logits
        pipeline.plan(fp, QuantConfig(group_size=GROUP), torch.device("cpu"))
        q = fp.get_submodule(EXPERTS)
        assert isinstance(q, QuantExperts) and q.scored_copies
        assert [n for n, _ in q.expert(0).named_children()] == ["gate_proj", "up_proj", "down_proj"]
        torch.testing.assert_close(fp(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_scored_copies_that_are_zero_give_zero_and_the_rest_their_expert():
    q = pipeline.plan(tiny_model(ARCH), QuantConfig(group_size=GROUP), torch.device("cpu")).model.get_submodule(
        EXPERTS)
    g = torch.Generator().manual_seed(8)
    tokens, hidden = 5, 64
    x = torch.randn(4, tokens, hidden, generator=g)
    x[torch.rand(4, tokens, generator=g) < 0.5] = 0  # tokens not routed to an expert reach it as zeros
    with torch.no_grad():
        out = q(x.reshape(-1, hidden)).view(4, tokens, hidden)
        for e in range(4):
            p = q.expert(e)
            h = torch.nn.functional.silu(p.gate_proj(x[e])) * p.up_proj(x[e])
            torch.testing.assert_close(out[e], p.down_proj(h), atol=1e-6, rtol=1e-5)
    assert (out[x.eq(0).all(-1)] == 0).all()


def test_each_experts_rows_are_known_by_the_tokens_they_copy():
    # Several processes place an expert's rows in the whole calibration batch by token (LayerExperts.positions).
    q = pipeline.plan(tiny_model(ARCH), QuantConfig(group_size=GROUP), torch.device("cpu")).model.get_submodule(
        EXPERTS)
    routed = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 1], [0, 0, 0, 1, 1]], dtype=torch.bool)
    x = torch.randn(4, 5, 64) * routed[..., None]  # two experts per token
    seen = {}

    def record(e):
        def hook(module, args):
            seen[e] = q.routed_rows.tolist()
        return hook

    for e in range(4):
        q.expert(e).gate_proj.register_forward_pre_hook(record(e))
    with torch.no_grad():
        q(x.reshape(-1, 64))
    assert seen == {e: routed[e].nonzero().flatten().tolist() for e in range(4)}


def test_rtn_checkpoint_loads_and_computes_its_stored_weights(tmp_path):
    fp = tiny_model(ARCH)
    original = copy.deepcopy(fp)
    router = fp.get_submodule("model.layers.1.feed_forward.router").weight.clone()
    ids = random_ids(seed=7)
    model, q_logits, keys = quantize_and_save(fp, QuantConfig(group_size=GROUP, sym=False), tmp_path / "q", ids)
    linears = [m for m in model.get_submodule(EXPERTS).modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 4 * 3 and not [n for n, p in model.named_parameters() if p.dim() >= 3]
    assert "feed_forward.router" in model.config.quantization_config["modules_to_not_convert"]
    # Per expert, under the names vLLM's Llama 4 loader reads for quantized experts.
    assert {f"{EXPERTS}.{e}.{p}.qweight" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")} <= keys
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(loaded.get_submodule(EXPERTS), QuantExperts)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q_logits)
        ref = _reference(original, tmp_path / "q")(ids).logits
    torch.testing.assert_close(q_logits.double(), ref, atol=2e-4, rtol=1e-4)
    assert torch.equal(loaded.get_submodule("model.layers.1.feed_forward.router").weight, router)


def test_gptq_counts_each_token_once_and_decodes_as_it_prefills(tmp_path):
    report = {}
    model = llmq.quantize(tiny_model(ARCH), QuantConfig(method="gptq", group_size=GROUP), dataset=CALIBRATION,
                          progress=False, report=report)
    (line,) = report["experts"]
    counts = json.loads(line.rpartition(": ")[2])
    assert line.startswith("layer 1 feed_forward.experts: 4 experts") and sum(counts) == CALIBRATION.numel()
    # One token at a time through the KV cache (each step one scored copy that is not zero) gives the
    # logits of the whole sequence at once.
    ids = random_ids(n=1, length=10, seed=2)
    # transformers renamed past_key_values to cache (5.24; the old name warns until 5.40).
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        whole = model(ids).logits
        cache, steps = None, []
        for i in range(ids.shape[1]):
            out = model(ids[:, i:i + 1], use_cache=True, **{name: cache})
            cache = getattr(out, name)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-4, rtol=1e-4)
    llmq.save(model, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(tmp_path / "q")(ids).logits, whole)


def test_quantize_routers_is_refused_for_the_top_k_router():
    with pytest.raises(LlmqError, match=r"model\.layers\.1\.feed_forward\.router is a Llama4Router: drop "
                                        "--quantize-routers"):
        llmq.quantize(tiny_model(ARCH), QuantConfig(group_size=GROUP, keep_routers=False), progress=False)


def test_compressed_tensors_exports_load_in_stock_transformers_per_expert(tmp_path, capsys):
    # transformers' compressed-tensors loading puts one Llama4TextMLP per expert in place of the fused
    # experts, under the names llmq writes (and vLLM reads).
    from llmq.cli import main
    from llmq.modules.w8a8 import W8A8Linear

    for scheme in ("w4", "w8a8"):
        model = llmq.quantize(tiny_model(ARCH), QuantConfig(group_size=GROUP) if scheme == "w4" else
                              QuantConfig(scheme="w8a8"), progress=False)
        llmq.save(model, tmp_path / scheme)
        capsys.readouterr()
        assert main(["convert", str(tmp_path / scheme), str(tmp_path / f"{scheme}-ct"),
                     "--format", "compressed-tensors"]) == 0
        lines = [line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines()]
        rows = [rest for verdict, rest in (ln for ln in lines if len(ln) == 2) if verdict == "yes"]
        for engine in ("vLLM MoE experts (FusedMoE)", "transformers + compressed-tensors"):
            assert any(row.startswith(engine) for row in rows), (scheme, engine)
        ids = random_ids(seed=5)
        stock = T.AutoModelForCausalLM.from_pretrained(tmp_path / f"{scheme}-ct", dtype=torch.float32)
        with torch.no_grad():
            expected = model(ids).logits
            assert torch.equal(llmq.from_pretrained(tmp_path / f"{scheme}-ct")(ids).logits, expected)
            if scheme == "w4":
                torch.testing.assert_close(stock(ids).logits, expected, atol=1e-4, rtol=1e-4)
        if scheme == "w8a8":  # the same int8 weights and scales (its activation rounding is its own)
            for e in range(4):
                for p in ("gate_proj", "up_proj", "down_proj"):
                    ours = model.get_submodule(f"{EXPERTS}.{e}.{p}")
                    theirs = stock.get_submodule(f"{EXPERTS}.{e}.{p}")
                    assert isinstance(ours, W8A8Linear) and torch.equal(theirs.weight, ours.weight)
                    assert torch.equal(theirs.weight_scale, ours.weight_scale)


def test_a_multimodal_checkpoint_is_refused_with_the_way_to_its_language_model(tmp_path):
    from llmq.cli import main

    text = {k: v for k, v in MORE_CONFIGS[ARCH]().to_dict().items() if k not in ("architectures", "model_type")}
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=16, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64)
    torch.manual_seed(0)
    T.Llama4ForConditionalGeneration(T.Llama4Config(text_config=text, vision_config=vision)).save_pretrained(
        tmp_path / "vlm")
    with pytest.raises(LlmqError, match=r"multi_modal_projector, vision_model.*Llama4ForCausalLM.*"
                                        r"save_pretrained\(DST\)"):
        llmq.quantize(str(tmp_path / "vlm"), QuantConfig(group_size=GROUP), progress=False)
    assert main(["quantize", str(tmp_path / "vlm"), str(tmp_path / "q"), "--group-size", "16"]) == 2
    assert not (tmp_path / "q").exists()
    # The fix the message gives: the language model alone quantizes.
    T.AutoModelForCausalLM.from_pretrained(tmp_path / "vlm").save_pretrained(tmp_path / "text")
    assert main(["quantize", str(tmp_path / "text"), str(tmp_path / "q"), "--group-size", "16"]) == 0
    assert isinstance(llmq.from_pretrained(tmp_path / "q").get_submodule(EXPERTS), QuantExperts)


def test_all_mode_sends_every_token_through_every_expert():
    report = {}
    model = llmq.quantize(tiny_model(ARCH), QuantConfig(method="gptq", group_size=GROUP, moe_min_tokens=10**6,
                                                        moe_calibration="all"),
                          dataset=CALIBRATION, progress=False, report=report)
    assert not any("round-to-nearest" in line for line in report["experts"])
    assert isinstance(model.get_submodule(EXPERTS), QuantExperts)


def test_cli_quantizes_a_folder_streamed(tmp_path):
    from llmq.cli import main

    text = model_folder_with_text(tmp_path / "m", ARCH)
    assert main(["quantize", str(tmp_path / "m"), str(tmp_path / "q"), "--method", "gptq", "--group-size", "16",
                 "--dataset", str(text), "--nsamples", "6", "--seqlen", "24", "--stream", "--quiet"]) == 0
    assert isinstance(llmq.from_pretrained(tmp_path / "q").get_submodule(EXPERTS), QuantExperts)
