"""Architectures planned by discovery, whose own code meets a quantized model head on: initializers and
forwards that read a child linear's `.weight`, and conversion mappings that fuse linears on saving.
Each checkpoint must load and give the quantized model's logits."""

import json

import pytest
import torch
import transformers as T
from torch import nn

import llmq
from llmq import arch, pipeline
from llmq.cli import main
from llmq.config import QuantConfig
from llmq.modules import QUANTIZED_MODULES
from llmq.weight_reads import linears_whose_weight_is_read
from conftest import DISCOVERED_CONFIGS, checkpoint_tensors, model_folder_with_text, random_ids, tiny_model

# The linears each architecture's code reads by weight (kept in full precision), relative to a layer.
READ_BY_WEIGHT = {"mamba": ["mixer.dt_proj"], "hy_v4": ["self_attn.indexer.weights_proj"]}
# Gates whose sizes are not multiples of the codes a 4-bit word holds (8), a small share of the weights:
# kept in int4 runs.
GATES_THAT_DO_NOT_PACK = {
    "gemma3n_text": ["altup.correction_coefs", "altup.modality_router", "altup.prediction_coefs"],
    "inkling2_text": ["self_attn.sink_proj"], "olmo_hybrid": ["linear_attn.a_proj", "linear_attn.b_proj"]}
# Linears whose quantized tensors the architecture's conversion mapping would load under other names.
RENAMED_ON_LOAD = {"inkling2_text": ["self_attn.k_proj.sconv.weight_proj", "self_attn.v_proj.sconv.weight_proj"]}


def _has(module, name):
    try:
        return isinstance(module.get_submodule(name), nn.Module)
    except AttributeError:
        return False


def _layers(model):
    return model.backbone.layers if hasattr(model, "backbone") else model.model.layers


@pytest.mark.parametrize("config", [QuantConfig(group_size=16), QuantConfig(method="gptq", group_size=16),
                                    QuantConfig(scheme="w8a8")], ids=["int4", "gptq", "w8a8"])
@pytest.mark.parametrize("arch", sorted(DISCOVERED_CONFIGS))
def test_quantized_checkpoint_loads_with_the_quantized_logits(tmp_path, arch, config):
    # GPTQ runs the model layer by layer on calibration tokens: each layer's inputs are captured and
    # its outputs handed on.
    calibration = random_ids(n=4, length=16, seed=15) if config.method == "gptq" else None
    model = llmq.quantize(tiny_model(arch, seed=4), config, dataset=calibration, progress=False)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QUANTIZED_MODULES)]
    assert len(quantized) >= 6  # attention and MLP linears of both layers at least
    kept = (READ_BY_WEIGHT.get(arch, []) + RENAMED_ON_LOAD.get(arch, [])
            + (GATES_THAT_DO_NOT_PACK.get(arch, []) if config.bits == 4 else []))
    for local in kept:  # in the layers that have it (Hunyuan's second layer reuses the first's indexer)
        found = [layer.get_submodule(local) for layer in _layers(model) if _has(layer, local)]
        assert found and all(type(m) is nn.Linear for m in found)
    ids = random_ids(seed=12)
    with torch.no_grad():
        logits = model(ids).logits
    llmq.save(model, tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert set(kept) <= set(qc["modules_to_not_convert"])
    back = llmq.from_pretrained(tmp_path / "q")
    assert [n for n, m in back.named_modules() if isinstance(m, QUANTIZED_MODULES)] == quantized
    with torch.no_grad():
        assert torch.equal(back(ids).logits, logits)


@pytest.mark.skipif("sarvam_moe" not in DISCOVERED_CONFIGS, reason="this transformers has no Sarvam MoE")
def test_linears_fused_on_disk_are_written_apart_when_quantized(tmp_path):
    """Sarvam's checkpoints hold q/k/v as one `query_key_value`, split on loading and fused again by
    save_pretrained, which cannot concatenate packed codes: the quantized three are written apart under
    their own names, which load as they are, in memory and streamed alike."""
    src = tmp_path / "src"
    text = model_folder_with_text(src, "sarvam_moe")
    assert any(k.endswith("attention.query_key_value.weight") for k in checkpoint_tensors(src))
    common = ["--method", "gptq", "--group-size", "16", "--dataset", str(text), "--nsamples", "4", "--seqlen", "16",
              "--seed", "3", "--quiet"]
    for route in ("--no-stream", "--stream"):
        assert main(["quantize", str(src), str(tmp_path / route), route, *common]) == 0
    memory, streamed = checkpoint_tensors(tmp_path / "--no-stream"), checkpoint_tensors(tmp_path / "--stream")
    assert memory.keys() == streamed.keys() and all(torch.equal(memory[k], streamed[k]) for k in memory)
    for part in ("q_proj", "k_proj", "v_proj"):  # stored under `attention.`, as Sarvam's renaming saves it
        assert f"model.layers.1.attention.{part}.qweight" in memory
    assert not any("query_key_value" in k for k in memory)
    ids = random_ids(seed=13)
    with torch.no_grad():
        logits = llmq.from_pretrained(tmp_path / "--no-stream")(ids).logits
        assert torch.equal(llmq.from_pretrained(tmp_path / "--stream")(ids).logits, logits)
    assert torch.isfinite(logits).all()


class _Reader(nn.Module):
    def __init__(self, flag: bool):
        super().__init__()
        self.flag = flag
        self.cast = nn.Linear(8, 8)
        self.train_only = nn.Linear(8, 8)
        self.flagged = nn.Linear(8, 8)
        self.unflagged = nn.Linear(8, 8)
        self.inner = nn.Module()
        self.inner.proj = nn.Linear(8, 8)
        self.plain = nn.Linear(8, 8)
        self.plain.weight.data.zero_()  # a read in __init__ does not count

    def forward(self, x):
        x = x.to(self.cast.weight.dtype)
        if self.training and x.shape[0] > 1:
            x = x @ self.train_only.weight
        if self.flag:
            x = x @ self.flagged.weight
        else:
            x = x @ self.unflagged.weight
        return self.plain(x) + x @ self.inner.proj.weight


@pytest.mark.parametrize("flag", [True, False])
def test_weight_reads_are_found_where_their_branch_can_run(flag):
    found = linears_whose_weight_is_read(nn.Sequential(_Reader(flag)))
    assert found == sorted(["0.cast", "0.inner.proj", "0.flagged" if flag else "0.unflagged"])


def _on_meta(config_name):
    config_class = getattr(T, config_name, None)
    if config_class is None:
        pytest.skip(f"this transformers has no {config_name}")
    with torch.device("meta"):
        return T.AutoModelForCausalLM.from_config(config_class())


@pytest.mark.parametrize("config_name,where", [
    ("HrmTextConfig", "L_module.layers"),  # two stacks of layers, one of which discovery takes
    ("XLMConfig", "transformer.attentions"),  # attention and MLP linears in two lists
])
def test_discovered_layers_that_leave_most_linears_outside_are_refused(config_name, where):
    with pytest.raises(llmq.LlmqError, match=rf"\(.*{where}.*\) hold \d+% of its linear weights.*"
                                             r"add an entry to llmq.arch.ARCHITECTURES"):
        pipeline.plan(_on_meta(config_name), QuantConfig(group_size=-1), torch.device("cpu"), check_finite=False)


def test_discovery_passes_over_other_modalities_encoders():
    """GIT's image encoder has more layers than its text decoder; the decoder's are the ones taken."""
    assert arch.arch_spec(_on_meta("GitConfig")).layers == "git.encoder.layer"


def test_a_linear_whose_sizes_do_not_pack_is_refused_with_the_way_to_keep_it():
    model = T.AutoModelForCausalLM.from_config(T.LlamaConfig(hidden_size=64, intermediate_size=132, num_hidden_layers=2,
                                                             num_attention_heads=4, vocab_size=256))
    with pytest.raises(llmq.LlmqError, match=r"layer model.layers.0.mlp.gate_proj has shape 132x64; 4-bit packing "
                                             r"needs both sizes to be multiples of 8 \(6 such layer\(s\)\): .* "
                                             r"--skip mlp.down_proj --skip mlp.gate_proj --skip mlp.up_proj "):
        pipeline.plan(model, QuantConfig(group_size=-1), torch.device("cpu"))


def test_a_group_size_that_misses_one_linear_per_layer_names_the_skip_that_keeps_them():
    """As Nemotron-H's shared experts' down_proj (7688 inputs) under groups of 128: one --skip keeps them all."""
    model = T.AutoModelForCausalLM.from_config(T.LlamaConfig(hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                                                             num_attention_heads=4, vocab_size=256))
    config = QuantConfig(group_size=32)
    with pytest.raises(llmq.LlmqError, match=r"group size 32 does not divide layer model.layers.0.mlp.down_proj \(136 "
                                             r"input features; 2 such layer\(s\)\).* --skip mlp.down_proj$"):
        pipeline.plan(model, config, torch.device("cpu"))
    job = pipeline.plan(model, QuantConfig(group_size=32, modules_to_not_convert=["mlp.down_proj"]),
                        torch.device("cpu"))
    assert all("mlp.down_proj" not in local for targets in job.targets.values() for local in targets)


def test_zamba_whose_hybrid_layers_share_one_attention_block_is_refused_with_the_reason():
    with pytest.raises(llmq.LlmqError, match="architecture 'zamba2' is not supported: its hybrid layers run one "
                                             "attention block whose weights they share"):
        pipeline.plan(_on_meta("Zamba2Config"), QuantConfig(group_size=-1), torch.device("cpu"), check_finite=False)


@pytest.mark.parametrize("arch", ["gpt_bigcode", "mamba", "longcat_flash", "gemma3n_text"])
def test_the_transformers_row_of_the_compressed_tensors_report_says_what_stock_transformers_does(tmp_path, arch):
    """GPT-BigCode's and Mamba's weight initializers, which transformers runs after loading, read a
    quantized linear's weight, which its packed linears lack; LongCat-Flash's stacked experts hold slots
    for its identity experts too. Gemma 3n loads, with llmq's logits."""
    from llmq.formats.convert import convert

    if arch not in DISCOVERED_CONFIGS:
        pytest.skip(f"this transformers has no {arch}")
    model = llmq.quantize(tiny_model(arch, seed=3), QuantConfig(group_size=16), progress=False)
    llmq.save(model, tmp_path / "native")
    rows = {r.engine: r for r in convert(tmp_path / "native", tmp_path / "ct", "compressed-tensors")}
    claim = rows["transformers + compressed-tensors"]
    ids = random_ids(seed=14)
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(llmq.from_pretrained(tmp_path / "ct")(ids).logits, expected)
        if claim.loads:
            stock = T.AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
            torch.testing.assert_close(stock(ids).logits, expected, atol=1e-4, rtol=1e-4)
        else:
            assert ("identity experts" if arch == "longcat_flash" else "weight initializer") in claim.why
            with pytest.raises((AttributeError, RuntimeError)):
                T.AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    # From transformers 5.24 (5.17 loads LongCat-Flash's stacked experts).
    before_5_24 = tuple(int(part) for part in T.__version__.split(".")[:2]) < (5, 24)
    assert claim.loads == (arch == "gemma3n_text" or arch == "longcat_flash" and before_5_24)
