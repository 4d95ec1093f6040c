"""W8A8 exported as compressed-tensors `int-quantized`, against compressed-tensors' own compressor and
decompressor, and stock transformers (with compressed-tensors installed) loading the export."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import llmq
from llmq import QuantConfig
from llmq.cli import main
from llmq.modules.w8a8 import W8A8Linear
from conftest import random_ids, tiny_model

ct = pytest.importorskip("compressed_tensors", reason="the compressed-tensors package is not installed")


@pytest.fixture
def calibration():
    return random_ids(n=8, length=32, seed=5)


def _export(tmp_path, act, calibration):
    model = llmq.quantize(tiny_model(), QuantConfig(scheme="w8a8", act=act), dataset=calibration, progress=False)
    llmq.save(model, tmp_path / "native")
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "ours"), "--format", "compressed-tensors",
                 "--quiet"]) == 0
    return model, tmp_path / "ours"


def _compressor_export(quantized, act, out):
    """What compressed-tensors writes for the same int8 codes and scales (llm-compressor's save path)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)

    fp = tiny_model()
    static = act == "static"
    weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, dynamic=False, observer="minmax",
                               strategy="channel")
    inputs = QuantizationArgs(num_bits=8, type="int", symmetric=True, dynamic=not static,
                              strategy="tensor" if static else "token", observer="minmax" if static else None)
    apply_quantization_config(fp, QuantizationConfig(config_groups={"group_0": QuantizationScheme(
        targets=["Linear"], weights=weights, input_activations=inputs)}, ignore=["lm_head"]))
    w8a8 = {name for name, layer in quantized.named_modules() if isinstance(layer, W8A8Linear)}
    fp_state = fp.state_dict()
    with torch.no_grad():
        for key, value in quantized.state_dict().items():  # the norms, with any smoothing folded in
            if key.rpartition(".")[0] not in w8a8:
                fp_state[key].copy_(value)
    for name, layer in quantized.named_modules():
        if isinstance(layer, W8A8Linear):
            target = fp.get_submodule(name)
            with torch.no_grad():
                # The dequantized weight: the compressor divides by the scale and rounds back to the codes.
                target.weight.copy_(layer.weight.double() * layer.weight_scale.double())
                target.weight_scale.copy_(layer.weight_scale)
                target.weight_zero_point.zero_()
                if static:
                    target.input_scale.copy_(layer.input_scale)
    compressor = ModelCompressor.from_pretrained_model(fp, "int-quantized")
    compressor.compress_model(fp)
    fp.save_pretrained(out)
    compressor.update_config(out)
    return out


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_export_is_what_the_compressor_writes(tmp_path, act, calibration):
    model, ours = _export(tmp_path, act, calibration)
    theirs = _compressor_export(model, act, tmp_path / "theirs")
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert set(a) == set(b)
    for key in b:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert torch.equal(a["model.layers.0.self_attn.q_proj.weight"], layer.weight)
    cfg_a = json.loads((ours / "config.json").read_text())["quantization_config"]
    cfg_b = json.loads((theirs / "config.json").read_text())["quantization_config"]
    for key in ("quant_method", "format", "quantization_status", "ignore", "kv_cache_scheme"):
        assert cfg_a[key] == cfg_b[key], key
    ga, gb = cfg_a["config_groups"]["group_0"], cfg_b["config_groups"]["group_0"]
    for part in ("weights", "input_activations"):
        for key in ("num_bits", "type", "symmetric", "strategy", "dynamic", "group_size"):
            assert ga[part][key] == gb[part][key], (part, key)
    assert ga["input_activations"]["strategy"] == ("tensor" if act == "static" else "token")
    assert ga["input_activations"]["dynamic"] == (act == "dynamic")
    if act == "static":
        assert a["model.layers.0.self_attn.q_proj.input_scale"].shape == (1,)
    assert a["model.layers.0.self_attn.q_proj.weight_scale"].shape == (64, 1)


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_compressed_tensors_decompressor_gives_llmq_weights(tmp_path, act, calibration):
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    model, ours = _export(tmp_path, act, calibration)
    from transformers.utils.quantization_config import CompressedTensorsConfig

    cfg = json.loads((ours / "config.json").read_text())["quantization_config"]
    compressor = ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(cfg))
    # The package's own load path: a model in compressed form, the stored tensors, then decompress.
    fp = tiny_model()
    apply_quantization_config(fp, compressor.quantization_config)
    compressor.compress_model(fp)
    missing, unexpected = fp.load_state_dict(load_file(ours / "model.safetensors"), strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    compressor.decompress_model(fp)
    for name, layer in model.named_modules():
        if isinstance(layer, W8A8Linear):
            assert torch.equal(fp.get_submodule(name).weight.float(), layer.dequantize_weight()), name


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_stock_transformers_loads_the_export_with_llmq_logits(tmp_path, act, calibration, exact_w8a8_kernel):
    model, ours = _export(tmp_path, act, calibration)
    theirs = AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32)
    for name, layer in model.named_modules():
        if isinstance(layer, W8A8Linear):
            loaded = theirs.get_submodule(name)
            assert torch.equal(loaded.weight, layer.weight) and torch.equal(loaded.weight_scale, layer.weight_scale)
            if act == "static":
                assert torch.equal(loaded.input_scale, layer.input_scale)
    weight_only = tiny_model()
    for name, layer in model.named_modules():
        if isinstance(layer, W8A8Linear):
            weight_only.get_submodule(name).weight.data = layer.dequantize_weight()
    ids = random_ids(seed=3)
    with torch.no_grad():
        expected, got, w_only = model(ids).logits, theirs(ids).logits, weight_only(ids).logits

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    act_noise = rel(expected, w_only)  # what quantizing the activations changes
    assert act_noise > 1e-3
    if act == "static":
        # Same codes, weight scales and input scales: the same function up to float rounding.
        assert rel(got, expected) < 1e-4 * (1 + 100 * act_noise)
    else:
        # compressed-tensors' own forward scales tokens by max|x| / 127.5, vLLM's int8 kernels (and llmq)
        # by max|x| / 127: the activation rounding differs, not the weights.
        assert rel(got, expected) < 2 * act_noise


def test_w8a8_refuses_the_gptq_format(tmp_path, capsys):
    model = llmq.quantize(tiny_model(), QuantConfig(scheme="w8a8"), progress=False)
    llmq.save(model, tmp_path / "q")
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "q"), str(tmp_path / "g"), "--format", "gptq"]) == 2
    assert "activation scales" in capsys.readouterr().err and not (tmp_path / "g").exists()


def test_cli_writes_w8a8_as_compressed_tensors(tmp_path, tiny_llama_dir):
    out = tmp_path / "ct"
    assert main(["quantize", str(tiny_llama_dir), str(out), "--scheme", "w8a8", "--format", "compressed-tensors",
                 "--quiet"]) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "int-quantized" and cfg["config_groups"]["group_0"]["input_activations"]["dynamic"]
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.1.mlp.down_proj.weight"].dtype == torch.int8


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_llmq_reads_the_export_back_with_identical_logits(tmp_path, act, calibration):
    model, ours = _export(tmp_path, act, calibration)
    loaded = llmq.from_pretrained(ours)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, W8A8Linear)
    assert loaded.config.quantization_config.quant_config.act == act
    ids = random_ids(seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_import_keeps_act_order_and_skipped_layers_as_recorded(tmp_path, calibration):
    """Per-row int8 weights have no g_idx: whether the GPTQ solve ran act-order is what llmq's export
    recorded (not gptq's default), and what --skip kept survives; another tool's folder names its kept
    linears in `ignore` and claims no act-order."""
    from llmq.info import checkpoint_info

    config = QuantConfig(scheme="w8a8", method="gptq", desc_act=False, modules_to_not_convert=["lm_head", "down_proj"])
    llmq.save(llmq.quantize(tiny_model(), config, dataset=calibration, progress=False), tmp_path / "native")
    ours = tmp_path / "ours"
    assert main(["convert", str(tmp_path / "native"), str(ours), "--format", "compressed-tensors", "--quiet"]) == 0
    info = checkpoint_info(ours)
    assert (info["method"], info["desc_act"]) == ("gptq", False)
    assert info["modules_to_not_convert"] == ["lm_head", "down_proj"]
    assert main(["convert", str(ours), str(tmp_path / "back"), "--quiet"]) == 0
    back = llmq.from_pretrained(tmp_path / "back").config.quantization_config.quant_config
    assert (back.desc_act, back.modules_to_not_convert) == (False, ["lm_head", "down_proj"])

    cfg = json.loads((ours / "config.json").read_text())
    del cfg["quantization_config"]["llmq"]
    (ours / "config.json").write_text(json.dumps(cfg))
    info = checkpoint_info(ours)
    assert info["desc_act"] is False
    assert info["modules_to_not_convert"] == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
