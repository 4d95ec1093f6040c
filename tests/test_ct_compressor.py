"""llmq's compressed-tensors export against compressed-tensors' own compressor, and stock transformers.

The reference is the compressed-tensors package itself: the same integer codes,
scales and zero points are handed to its ModelCompressor (pack-quantized), the
way llm-compressor saves a model, and the two folders are compared tensor by
tensor and key by key. Then stock transformers loads the export.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import llmq
from llmq import QuantConfig, QuantLinear
from llmq.formats.convert import convert
from conftest import random_ids, tiny_model

ct = pytest.importorskip("compressed_tensors", reason="the compressed-tensors package is not installed")


@pytest.fixture(autouse=True)
def _exact_cpu_forward(monkeypatch):
    # Logits are compared with transformers' dense decompressed layers: llmq computes densely too.
    monkeypatch.setattr(QuantLinear, "default_cpu_backend", "dense")


def _llmq_export(tmp_path, sym, bits, group_size, dtype):
    model = llmq.quantize(tiny_model(dtype=dtype), QuantConfig(bits=bits, group_size=group_size, sym=sym),
                          progress=False)
    llmq.save(model, tmp_path / "native")
    convert(tmp_path / "native", tmp_path / "llmq-ct", "compressed-tensors")
    return model, tmp_path / "llmq-ct"


def compressor_export(quantized, bits, group_size, sym, dtype, out):
    """What compressed-tensors writes for quantized's codes, scales and zero points (llm-compressor's save path)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)

    # The compressor quantizes a weight with the scale and zero point it is given: it gets the
    # dequantized weight in float32, where (q - z) * s is exact, so that it recovers exactly
    # llmq's codes; the model then takes its own dtype (exact for the scales, which came from it).
    fp = tiny_model(dtype=dtype).float()
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, dynamic=False, observer="minmax",
                               strategy="channel" if group_size == -1 else "group",
                               group_size=None if group_size == -1 else group_size)
    apply_quantization_config(fp, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=["lm_head"]))
    offset = 1 << (bits - 1)  # compressed-tensors' codes and zero points are signed: unsigned - 2^(b-1)
    for name, layer in quantized.named_modules():
        if isinstance(layer, QuantLinear):
            qw = layer.quantized_weight()
            target = fp.get_submodule(name)
            group = qw.codes.shape[1] // qw.scales.shape[1]
            with torch.no_grad():
                target.weight.copy_((qw.codes.double() - qw.zeros.double().repeat_interleave(group, dim=1))
                                    * qw.scales.double().repeat_interleave(group, dim=1))
                target.weight_scale.copy_(qw.scales.to(dtype))
                target.weight_zero_point.copy_((qw.zeros.long() - offset).to(target.weight_zero_point.dtype))
    compressor = ModelCompressor.from_pretrained_model(fp, "pack-quantized")
    compressor.compress_model(fp)
    fp.to(dtype).save_pretrained(out)
    compressor.update_config(out)
    return out


@pytest.mark.parametrize("sym,bits,group_size,dtype", [
    (False, 4, 32, torch.float32), (False, 4, 32, torch.bfloat16), (True, 4, 32, torch.float16),
    (False, 8, 64, torch.float32), (True, 8, -1, torch.bfloat16), (False, 4, -1, torch.float16)])
def test_export_is_what_the_compressor_writes(tmp_path, sym, bits, group_size, dtype):
    model, ours = _llmq_export(tmp_path, sym, bits, group_size, dtype)
    # The reference: the codes as llmq holds them in memory, not as they were packed.
    qw = model.get_submodule("model.layers.0.mlp.down_proj").quantized_weight()
    assert qw.codes.shape == (64, 128) and (sym or bool((qw.zeros != 1 << (bits - 1)).any()))
    theirs = compressor_export(model, bits, group_size, sym, dtype, tmp_path / "ct-own")
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert any(k.endswith(".weight_zero_point") for k in b) == (not sym)
    for k in b:
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
        assert torch.equal(a[k], b[k]), k
    ours_cfg = json.loads((ours / "config.json").read_text())["quantization_config"]
    theirs_cfg = json.loads((theirs / "config.json").read_text())["quantization_config"]
    assert theirs_cfg.pop("version") == ct.__version__  # the package's version: llmq does not claim one
    assert ours_cfg.pop("llmq")["method"] == "rtn"  # llmq's own record, ignored by compressed-tensors
    assert ours_cfg == theirs_cfg


def test_float32_scales_are_narrowed_back_on_import(tmp_path):
    _, ours = _llmq_export(tmp_path, False, 4, 32, torch.float32)
    assert load_file(ours / "model.safetensors")["model.layers.0.mlp.down_proj.weight_scale"].dtype == torch.float32
    convert(ours, tmp_path / "back", "llmq")
    a, b = load_file(tmp_path / "native" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# The first transformers release whose default compressed-tensors load refuses asymmetric checkpoints.
ASYMMETRIC_LOAD_BROKEN_SINCE = (5, 24)


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


def test_stock_transformers_default_load_of_asymmetric_output(tmp_path):
    """An upstream bug, asserted so that this test fails the day it is fixed.

    From transformers 5.24 (with compressed-tensors 0.20) the loading skeleton is
    built by compressing a meta model, and on the meta device the pack-quantized
    compressor leaves the zero point unpacked [N, G], while the same compressor
    writes it packed [N*b/32, G] (and vLLM reads it so): transformers refuses the
    size mismatch, for the package's own output too. Up to 5.23 the default load
    decompresses them with llmq's logits. When the refusal stops, drop the
    `dequantize=True` advice from README's format table and from
    compressed_tensors.engine_support.
    """
    model, ours = _llmq_export(tmp_path, False, 4, 32, torch.float32)
    theirs = compressor_export(model, 4, 32, False, torch.float32, tmp_path / "ct-own")
    ids = random_ids()
    for folder in (theirs, ours):
        if _transformers_version() >= ASYMMETRIC_LOAD_BROKEN_SINCE:
            with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
                AutoModelForCausalLM.from_pretrained(folder)
        else:
            with torch.no_grad():
                expected, got = model(ids).logits, AutoModelForCausalLM.from_pretrained(folder)(ids).logits
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (folder, (got - expected).abs().max())


@pytest.mark.parametrize("sym,bits,group_size", [(False, 4, 32), (False, 8, -1), (True, 4, 32)])
def test_stock_transformers_dequantize_load_gives_llmq_logits(tmp_path, sym, bits, group_size):
    from transformers import CompressedTensorsConfig

    model, ours = _llmq_export(tmp_path, sym, bits, group_size, torch.float32)
    stock = AutoModelForCausalLM.from_pretrained(ours, quantization_config=CompressedTensorsConfig(dequantize=True))
    assert not any(isinstance(m, QuantLinear) for m in stock.modules())
    ids = random_ids()
    with torch.no_grad():
        expected, got = model(ids).logits, stock(ids).logits
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (got - expected).abs().max()


def test_llmq_loads_the_compressors_output_with_its_logits(tmp_path):
    from transformers import CompressedTensorsConfig

    model, _ = _llmq_export(tmp_path, False, 4, 32, torch.float32)
    theirs = compressor_export(model, 4, 32, False, torch.float32, tmp_path / "ct-own")
    stock = AutoModelForCausalLM.from_pretrained(theirs, quantization_config=CompressedTensorsConfig(dequantize=True))
    loaded = llmq.from_pretrained(theirs)
    assert isinstance(loaded.get_submodule("model.layers.0.mlp.down_proj"), QuantLinear)
    ids = random_ids()
    with torch.no_grad():
        expected, got = stock(ids).logits, loaded(ids).logits
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "granitemoe",
                                  "phimoe", "glm4_moe", "ernie4_5_moe", "qwen3_next", "llama4_text", "jamba",
                                  "kimi_linear", "dbrx"])
def test_the_report_on_stock_transformers_tells_what_loading_moe_experts_gives(tmp_path, arch):
    """The export report's transformers row says yes exactly where stock transformers' load computes
    llmq's logits: it gathers per-expert tensors through its conversion mapping, which gpt-oss,
    Granite MoE and DBRX (experts fused on disk) lack, so their experts would load unset, with no error; Llama 4's
    experts, fused on disk too, its quantizer replaces by one module per expert. Kimi Linear's q/k/v
    conv kernels, concatenated on load, stop the compressed-tensors loading of transformers 5.24."""
    import transformers

    # From transformers 5.24 (5.17 loads it).
    kimi_stops = arch == "kimi_linear" and tuple(map(int, transformers.__version__.split(".")[:2])) >= (5, 24)
    model = llmq.quantize(tiny_model(arch), QuantConfig(group_size=16), progress=False)
    llmq.save(model, tmp_path / "native")
    rows = {r.engine: r for r in convert(tmp_path / "native", tmp_path / "ct", "compressed-tensors")}
    # No quantized linear is listed as kept, under the model's name or the one it is stored under
    # (Kimi Linear stores `mlp.` as `block_sparse_moe.`, which once kept its dense MLP).
    ignore = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["ignore"]
    assert not {n for n, m in model.named_modules() if isinstance(m, QuantLinear)} & set(ignore)
    assert "lm_head" in ignore
    try:
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    except RuntimeError as e:
        assert kimi_stops and "conversion of the weights" in str(e)
        same = False
    else:
        ids = random_ids()
        with torch.no_grad():
            same = torch.allclose(stock(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert rows["transformers + compressed-tensors"].loads == same == (
        arch not in ("gpt_oss", "granitemoe", "dbrx") and not kimi_stops)
