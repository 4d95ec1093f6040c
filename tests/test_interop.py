"""Export to gptq / compressed-tensors, import gptq / awq / compressed-tensors.

The reference dequantizers below are written from each format's specification,
in float64, from the raw packed int32 words; they share no code with llmq.
"""

import importlib.util
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import llmq
from llmq import LlmqError, QuantConfig, QuantLinear
from llmq.cli import main
from llmq.formats.convert import convert
from llmq.modules.replace import replace_module
from conftest import checkpoint_tensors, model_folder_with_text, random_ids, tiny_model

HAS_CT = importlib.util.find_spec("compressed_tensors") is not None
needs_ct = pytest.mark.skipif(not HAS_CT, reason="the compressed-tensors package is not installed "
                              "(pip install --no-deps compressed-tensors loguru)")


@pytest.fixture(autouse=True)
def _exact_cpu_forward(monkeypatch):
    # These tests check format conversions against float64 references, so the
    # layers compute exactly (dense); the CPU kernels' own rounding is tested
    # in test_kernels.py.
    monkeypatch.setattr(QuantLinear, "default_cpu_backend", "dense")



def _quantized(sym=True, bits=4, group_size=32, act_order=False, seed=0):
    model = llmq.quantize(tiny_model(seed=seed), QuantConfig(group_size=group_size, sym=sym, bits=bits),
                          progress=False)
    if act_order:  # RTN has no act-order: give every layer a permuted g_idx so the g_idx path is exercised,
        # and record what a GPTQ act-order run would
        model.config.quantization_config.update(method="gptq", desc_act=True)
        g = torch.Generator().manual_seed(5)
        for name, layer in list(model.named_modules()):
            if isinstance(layer, QuantLinear):
                qw = layer.quantized_weight()
                k = qw.shape[1]
                qw.g_idx = (torch.randperm(k, generator=g) // qw.group_size).to(torch.int32)
                replace_module(model, name, QuantLinear.from_quantized(qw, layer.bias))
    return model


def _saved(tmp_path, **kw):
    model = _quantized(**kw)
    llmq.save(model, tmp_path / "native")
    return model, tmp_path / "native"


def _words(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64) & 0xFFFFFFFF  # the unsigned 32-bit words


def _field(words: torch.Tensor, index: torch.Tensor, bits: int) -> torch.Tensor:
    return (words >> (bits * index)) & ((1 << bits) - 1)


def ref_gptq(t: dict, bits: int, v1: bool) -> torch.Tensor:
    """GPTQ spec: qweight [K*b/32, N] along K, qzeros [G, N*b/32] along N (v1: stored z - 1), g_idx [K]."""
    per = 32 // bits
    qweight, qzeros, scales, g_idx = _words(t["qweight"]), _words(t["qzeros"]), t["scales"].double(), t["g_idx"]
    k, n = qweight.shape[0] * per, qweight.shape[1]
    kk = torch.arange(k).view(k, 1)
    nn_ = torch.arange(n).view(1, n)
    q = _field(qweight[kk // per, nn_], kk % per, bits)
    g = g_idx.long().view(k, 1)
    z = _field(qzeros[g, nn_ // per], nn_ % per, bits) + (1 if v1 else 0)
    return ((q - z).double() * scales[g, nn_]).t()  # [N, K]


def ref_ct(t: dict, bits: int, sym: bool) -> torch.Tensor:
    """compressed-tensors spec: weight_packed [N, K*b/32] along K, values q_s + 2^(b-1); zero point [N*b/32, G]."""
    per, off = 32 // bits, 1 << (bits - 1)
    packed, scale = _words(t["weight_packed"]), t["weight_scale"].double()
    n, k = (int(v) for v in t["weight_shape"])
    nn_ = torch.arange(n).view(n, 1)
    kk = torch.arange(k).view(1, k)
    q_s = _field(packed[nn_, kk // per], kk % per, bits) - off
    g = kk // (k // scale.shape[1])
    if sym:
        zp_s = torch.zeros_like(q_s)
    else:
        zp_s = _field(_words(t["weight_zero_point"])[nn_ // per, g], nn_ % per, bits) - off
    return (q_s - zp_s).double() * scale[nn_, g]


def _module_tensors(sd: dict, name: str) -> dict:
    return {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}


def _check_forward(layer: QuantLinear, w_ref: torch.Tensor, bias=None):
    x = torch.randn(3, w_ref.shape[1], generator=torch.Generator().manual_seed(7))
    expected = x.double() @ w_ref.t() + (0 if bias is None else bias.double())
    with torch.no_grad():
        got = layer(x).double()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (got - expected).abs().max()


LAYER = "model.layers.1.mlp.down_proj"


# ---- llmq info -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,sym,act_order", [("gptq", True, True), ("gptq", False, False),
                                               ("compressed-tensors", False, False)])
def test_info_describes_foreign_checkpoints_like_their_native_twin(tmp_path, capsys, fmt, sym, act_order):
    from llmq.info import checkpoint_info

    _, native = _saved(tmp_path, sym=sym, bits=4, group_size=32, act_order=act_order)
    convert(native, tmp_path / "foreign", fmt)
    want, got = checkpoint_info(native), checkpoint_info(tmp_path / "foreign")
    assert got["format"] == fmt and want["format"] == "llmq"
    for key in ("bits", "group_size", "sym", "desc_act", "quantized_layers", "quantized_params", "layers",
                "architecture"):
        assert got[key] == want[key], key
    assert main(["info", str(tmp_path / "foreign")]) == 0
    out = capsys.readouterr().out
    assert f"format            {fmt} (llmq converts it on load)" in out and "int4, group size 32" in out


# ---- gptq --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sym,bits,group_size,act_order", [(True, 4, 32, False), (False, 4, 32, False),
                                                         (True, 8, -1, False), (False, 8, 32, True)])
def test_gptq_round_trip_is_bit_exact(tmp_path, sym, bits, group_size, act_order):
    model, native = _saved(tmp_path, sym=sym, bits=bits, group_size=group_size, act_order=act_order)
    convert(native, tmp_path / "gptq", "gptq")
    convert(tmp_path / "gptq", tmp_path / "back", "llmq")
    a, b = load_file(native / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    back = QuantConfig.from_dict(json.loads((tmp_path / "back" / "config.json").read_text())["quantization_config"])
    assert (back.bits, back.group_size, back.sym, back.desc_act) == (bits, group_size, sym, act_order)


@pytest.mark.parametrize("sym,bits,act_order", [(True, 4, False), (False, 4, True), (True, 8, True)])
def test_gptq_reference_dequantizer_matches_forward(tmp_path, sym, bits, act_order):
    model, native = _saved(tmp_path, sym=sym, bits=bits, act_order=act_order)
    convert(native, tmp_path / "gptq", "gptq")
    cfg = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    sd = load_file(tmp_path / "gptq" / "model.safetensors")
    w_ref = ref_gptq(_module_tensors(sd, LAYER), bits, v1=cfg["checkpoint_format"] == "gptq")
    loaded = llmq.from_pretrained(tmp_path / "gptq")
    layer = loaded.get_submodule(LAYER)
    assert isinstance(layer, QuantLinear) and (layer.g_idx is not None) == act_order
    _check_forward(layer, w_ref)
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_gptq_v1_off_by_one(tmp_path):
    _, native = _saved(tmp_path, sym=True, bits=4)
    convert(native, tmp_path / "v1", "gptq")
    cfg = json.loads((tmp_path / "v1" / "config.json").read_text())["quantization_config"]
    assert cfg["checkpoint_format"] == "gptq" and cfg["sym"] is True
    assert json.loads((tmp_path / "v1" / "quantize_config.json").read_text()) == cfg
    for key in ("bits", "group_size", "desc_act", "sym"):
        assert key in cfg
    sd = load_file(tmp_path / "v1" / "model.safetensors")
    zeros = [v for k, v in sd.items() if k.endswith(".qzeros")]
    assert zeros and all(bool((z == 0x77777777).all()) for z in zeros)


def test_asymmetric_gptq_is_never_v1(tmp_path):
    _, native = _saved(tmp_path, sym=False, bits=4)
    convert(native, tmp_path / "v2", "gptq")
    cfg = json.loads((tmp_path / "v2" / "config.json").read_text())["quantization_config"]
    assert cfg["checkpoint_format"] == "gptq_v2" and cfg["sym"] is False
    a, b = load_file(native / "model.safetensors"), load_file(tmp_path / "v2" / "model.safetensors")
    assert torch.equal(a[f"{LAYER}.qzeros"], b[f"{LAYER}.qzeros"])  # true zero points, as stored natively


def test_gptq_v1_import_adds_one(tmp_path):
    # A v1 checkpoint made elsewhere: zeros stored minus one, g_idx present, no llmq metadata.
    _, native = _saved(tmp_path, sym=False, bits=4)
    convert(native, tmp_path / "v2", "gptq")
    sd = load_file(tmp_path / "v2" / "model.safetensors")
    cfg = json.loads((tmp_path / "v2" / "config.json").read_text())
    for k in list(sd):
        if k.endswith(".qzeros"):
            zz = _field(_words(sd[k]).unsqueeze(-1), torch.arange(8), 4)  # [G, N/8, 8]
            assert bool((zz > 0).all()), "this seed needs zero points > 0 to be written as v1"
            words = ((zz - 1) << (4 * torch.arange(8))).sum(-1)
            sd[k] = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    cfg["quantization_config"]["checkpoint_format"] = "gptq"
    del cfg["quantization_config"]["meta"]
    (tmp_path / "v2" / "config.json").write_text(json.dumps(cfg))
    save_file(sd, tmp_path / "v2" / "model.safetensors", metadata={"format": "pt"})
    convert(tmp_path / "v2", tmp_path / "back", "llmq")
    assert torch.equal(load_file(tmp_path / "back" / "model.safetensors")[f"{LAYER}.qzeros"],
                       load_file(native / "model.safetensors")[f"{LAYER}.qzeros"])


@pytest.mark.parametrize("sym,stated", [(False, None), (True, None), (False, True)])
def test_gptq_symmetry_is_read_from_the_zero_points(tmp_path, sym, stated):
    # A config without "sym" (or with a wrong one) must not make an asymmetric model export as symmetric
    # v1, whose zero points other engines take as implied.
    _, native = _saved(tmp_path, sym=sym, bits=4)
    convert(native, tmp_path / "g", "gptq")
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    cfg["quantization_config"].pop("sym")
    del cfg["quantization_config"]["meta"]
    if stated is not None:
        cfg["quantization_config"]["sym"] = stated
    (tmp_path / "g" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "g" / "quantize_config.json").write_text(json.dumps(cfg["quantization_config"]))
    if stated and not sym:
        with pytest.warns(UserWarning, match="says sym=true"):
            convert(tmp_path / "g", tmp_path / "again", "gptq")
    else:
        convert(tmp_path / "g", tmp_path / "again", "gptq")
    again = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert again["sym"] is sym and again["checkpoint_format"] == ("gptq" if sym else "gptq_v2")
    assert torch.equal(load_file(tmp_path / "again" / "model.safetensors")[f"{LAYER}.qzeros"],
                       load_file(tmp_path / "g" / "model.safetensors")[f"{LAYER}.qzeros"])


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_v1_with_wrapped_zero_points_reads_as_gptqmodel_wrote_it(tmp_path, bits):
    # GPTQModel writes an asymmetric v1 checkpoint by subtracting 1 from every zero point of a 32-bit word
    # at once, so a zero point of 0 wraps and borrows from the one above it; its reader adds them back.
    _, native = _saved(tmp_path, sym=False, bits=bits)
    convert(native, tmp_path / "v1", "gptq")
    sd = load_file(tmp_path / "v1" / "model.safetensors")
    per = 32 // bits
    true_zeros = {}
    for k in [k for k in sd if k.endswith(".qzeros")]:
        fields = _field(_words(sd[k]).unsqueeze(-1), torch.arange(per), bits)  # [G, N/per, per]
        fields[..., ::3] = 0  # zero points of 0 below others in every word: the borrow case
        true_zeros[k] = fields
        true_words = (fields << (bits * torch.arange(per))).sum(-1)
        stored = (true_words - sum(1 << (bits * i) for i in range(per))) % 2**32  # GPTQModel's v2 -> v1
        sd[k] = torch.where(stored >= 2**31, stored - 2**32, stored).to(torch.int32)
    cfg = json.loads((tmp_path / "v1" / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = "gptq"
    (tmp_path / "v1" / "config.json").write_text(json.dumps(cfg))
    save_file(sd, tmp_path / "v1" / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="wrapped -1"):
        convert(tmp_path / "v1", tmp_path / "back", "llmq")
    back = load_file(tmp_path / "back" / "model.safetensors")
    for k, fields in true_zeros.items():
        assert torch.equal(_field(_words(back[k]).unsqueeze(-1), torch.arange(per), bits), fields), k


# ---- compressed-tensors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sym,bits,group_size", [(True, 4, 32), (False, 4, 32), (True, 8, -1), (False, 8, 64)])
def test_compressed_tensors_round_trip_and_reference(tmp_path, sym, bits, group_size):
    model, native = _saved(tmp_path, sym=sym, bits=bits, group_size=group_size)
    convert(native, tmp_path / "ct", "compressed-tensors")
    sd = load_file(tmp_path / "ct" / "model.safetensors")
    assert not any(k.endswith((".qweight", ".qzeros")) for k in sd)
    assert (f"{LAYER}.weight_zero_point" in sd) == (not sym)
    w_ref = ref_ct(_module_tensors(sd, LAYER), bits, sym)
    loaded = llmq.from_pretrained(tmp_path / "ct")
    _check_forward(loaded.get_submodule(LAYER), w_ref)
    convert(tmp_path / "ct", tmp_path / "back", "llmq")
    a, b = load_file(native / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ignore = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == ["lm_head"]


def test_gptq_compressed_tensors_export_reads_back_without_act_order(tmp_path, capsys):
    """GPTQ defaults to act-order, but compressed-tensors holds contiguous groups only: its export must read
    back as plain groups (no g_idx expected), and the layers --skip kept must survive in the metadata."""
    from llmq.info import checkpoint_info

    src = tmp_path / "fp"
    text = model_folder_with_text(src)
    run = ["--method", "gptq", "--bits", "4", "--group-size", "32", "--dataset", str(text), "--nsamples", "8",
           "--seqlen", "64", "--skip", "lm_head", "--skip", "down_proj", "--no-stream", "--quiet"]
    ct, native, back = tmp_path / "ct", tmp_path / "native", tmp_path / "back"
    assert main(["quantize", str(src), str(ct), *run, "--format", "compressed-tensors"]) == 0
    assert main(["quantize", str(src), str(native), *run, "--no-act-order"]) == 0
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(ct)(ids).logits, llmq.from_pretrained(native)(ids).logits)
    info = checkpoint_info(ct)
    assert info["desc_act"] is False and info["modules_to_not_convert"] == ["lm_head", "down_proj"]
    capsys.readouterr()
    assert main(["info", str(ct)]) == 0
    assert "act-order" not in capsys.readouterr().out
    assert main(["convert", str(ct), str(back), "--quiet"]) == 0
    a, b = checkpoint_tensors(native), checkpoint_tensors(back)
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    qc = llmq.from_pretrained(back).config.quantization_config.quant_config
    assert (qc.desc_act, qc.modules_to_not_convert) == (False, ["lm_head", "down_proj"])

    # A folder written by another tool has no llmq record: the ignore list names what stayed in full precision.
    config = json.loads((ct / "config.json").read_text())
    del config["quantization_config"]["llmq"]
    (ct / "config.json").write_text(json.dumps(config))
    assert checkpoint_info(ct)["modules_to_not_convert"] == [
        "lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_act_order_refused_by_compressed_tensors(tmp_path):
    _, native = _saved(tmp_path, act_order=True)
    with pytest.raises(LlmqError, match="act-order.*--format gptq"):
        convert(native, tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct").exists()


_ROTATION = {"type": "hadamard", "apply": [
    {"targets": ["re:.*down_proj$"], "location": "input", "inverse": False, "ignore": []},
    {"targets": ["re:.*down_proj$"], "location": "weight_input", "inverse": True, "ignore": []}]}
_FUSED_ROTATION = {"type": "hadamard", "apply": [
    {"targets": ["re:.*v_proj$"], "location": "weight_output", "inverse": False, "ignore": []},
    {"targets": ["re:.*o_proj$"], "location": "weight_input", "inverse": True, "ignore": []}]}


@pytest.mark.parametrize("edit,message", [
    (lambda q: q.update(transform_config={"config_groups": {"R4": _ROTATION}}), "applies transforms at run time"),
    (lambda q: q.update(kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                                         "symmetric": True}), "quantizes the kv cache"),
    (lambda q: q["config_groups"]["group_0"].update(targets=["Linear", "Embedding"]), "quantizes Embedding modules"),
    (lambda q: q.update(sparsity_config={"format": "sparse-24-bitmask", "sparsity_structure": "2:4"}),
     "stores sparse weights"),
    (lambda q: q.update(transform_config={"config_groups": {"R2": _FUSED_ROTATION}}), None),
    # Targets named exactly, as compressed-tensors also matches them.
    (lambda q: q["config_groups"]["group_0"].update(targets=[f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")]), None),
])
def test_compressed_tensors_needs_that_llmq_does_not_run_are_refused(tmp_path, capsys, edit, message):
    """Read as plain quantized linears these folders compute wrong outputs; transforms fused into the
    weights when they were written need nothing at run time."""
    _, native = _saved(tmp_path)
    ct = tmp_path / "ct"
    convert(native, ct, "compressed-tensors")
    config = json.loads((ct / "config.json").read_text())
    edit(config["quantization_config"])
    (ct / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    for argv in (["info", str(ct)], ["convert", str(ct), str(tmp_path / "back"), "--format", "llmq"]):
        code = main(argv)
        err = capsys.readouterr().err
        if message is None:
            assert code == 0, err
        else:
            assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    if message is not None:
        with pytest.raises(LlmqError, match=message):
            llmq.from_pretrained(ct)
        assert not (tmp_path / "back").exists()


@needs_ct
@pytest.mark.parametrize("sym,bits,group_size", [(True, 4, 32), (False, 4, 32), (True, 8, -1), (False, 8, 64)])
def test_compressed_tensors_package_decompresses_to_the_same_weights(tmp_path, sym, bits, group_size):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    model, native = _saved(tmp_path, sym=sym, bits=bits, group_size=group_size)
    convert(native, tmp_path / "ct", "compressed-tensors")
    qcfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    weights = QuantizationArgs(**qcfg["config_groups"]["group_0"]["weights"])
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    sd = load_file(tmp_path / "ct" / "model.safetensors")
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            w = PackedQuantizationCompressor.decompress(_module_tensors(sd, name), scheme)["weight"]
            assert torch.equal(w, layer.dequantize_weight(w.dtype)), name


@needs_ct
@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, -1)])
def test_stock_transformers_loads_compressed_tensors_export(tmp_path, bits, group_size):
    model, native = _saved(tmp_path, sym=True, bits=bits, group_size=group_size)
    convert(native, tmp_path / "ct", "compressed-tensors")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")  # transformers' own compressed-tensors quantizer
    assert not any(isinstance(m, QuantLinear) for m in stock.modules())
    ids = random_ids()
    with torch.no_grad():
        expected = model(ids).logits
        got = stock(ids).logits
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (got - expected).abs().max()


# ---- awq ---------------------------------------------------------------------------------------------------

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def awq_pack(codes: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM spec: [R, N] 4-bit codes -> int32 [R, N/8]; nibble i of word j holds column 8j + order[i]."""
    r, n = codes.shape
    words = torch.zeros(r, n // 8, dtype=torch.int64)
    for j in range(n // 8):
        for i, col in enumerate(AWQ_ORDER):
            words[:, j] |= codes[:, 8 * j + col].to(torch.int64) << (4 * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize("settings", ["config.json", "quant_config.json"])
def test_awq_import(tmp_path, settings):
    fp = tiny_model("qwen2")  # q/k/v projections with biases
    fp.save_pretrained(tmp_path / "fp")
    sd = load_file(tmp_path / "fp" / "model.safetensors")
    gs = 32
    g = torch.Generator().manual_seed(3)
    known = {}
    for name, m in fp.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            n, k = m.out_features, m.in_features
            codes = torch.randint(0, 16, (k, n), generator=g)
            zeros = torch.randint(0, 16, (k // gs, n), generator=g)
            scales = (torch.rand(k // gs, n, generator=g) * 0.02 + 0.001).half()
            known[name] = (codes, zeros, scales)
            del sd[f"{name}.weight"]
            sd[f"{name}.qweight"], sd[f"{name}.qzeros"], sd[f"{name}.scales"] = awq_pack(codes), awq_pack(zeros), scales
    folder = tmp_path / "awq"
    folder.mkdir()
    cfg = json.loads((tmp_path / "fp" / "config.json").read_text())
    if settings == "config.json":
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": gs, "zero_point": True,
                                      "version": "gemm", "modules_to_not_convert": None}
    else:  # AutoAWQ's first releases: the settings in a side file, under their old names
        (folder / settings).write_text(json.dumps({"zero_point": True, "q_group_size": gs, "w_bit": 4,
                                                   "version": "GEMM"}))
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})

    loaded = llmq.from_pretrained(folder)
    ref = tiny_model("qwen2")
    ref.load_state_dict(fp.state_dict())
    for name, (codes, zeros, scales) in known.items():
        layer = loaded.get_submodule(name)
        qw = layer.quantized_weight()
        assert torch.equal(qw.codes.t().long(), codes) and torch.equal(qw.zeros.t().long(), zeros), name
        assert torch.equal(layer.scales, scales)
        groups = torch.arange(codes.shape[0]) // gs
        w = ((codes - zeros[groups]).double() * scales.double()[groups]).t()  # [N, K]
        _check_forward(layer, w, layer.bias)
        ref.get_submodule(name).weight.data = w.float()
    ids = random_ids()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    convert(folder, tmp_path / "native", "llmq")  # to llmq's own format, no requantization
    qc = json.loads((tmp_path / "native" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "llmq" and qc["method"] == "awq" and qc["sym"] is False
    from llmq.info import checkpoint_info

    info = checkpoint_info(folder)  # from the awq folder's headers and zero points
    assert info["format"] == "awq" and (info["bits"], info["group_size"], info["sym"]) == (4, gs, False)
    assert info["quantized_layers"] == len(known) == checkpoint_info(tmp_path / "native")["quantized_layers"]
    assert info["quantized_params"] == sum(c.numel() for c, _, _ in known.values())


def test_unreadable_awq_variant_is_refused(tmp_path):
    fp = tiny_model()
    fp.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlmqError, match="GEMM"):
        llmq.from_pretrained(tmp_path / "m")


# ---- engines and CLI ---------------------------------------------------------------------------------------

def test_engine_report_follows_vllm_rules():
    from llmq.formats import compressed_tensors, gptq

    shapes = {"a": (4096, 4096), "b": (11008, 4096)}
    rows = {r.engine: r for r in gptq.engine_support(QuantConfig(group_size=128), shapes)}
    assert rows["vLLM (gptq_marlin, fast path)"].loads
    rows = {r.engine: r for r in gptq.engine_support(QuantConfig(group_size=128, sym=False), shapes)}
    assert not rows["vLLM (gptq_marlin, fast path)"].loads and "asymmetric" in rows["vLLM (gptq_marlin, fast path)"].why
    rows = {r.engine: r for r in gptq.engine_support(QuantConfig(group_size=256), shapes)}
    assert "group size 256" in rows["vLLM (gptq_marlin, fast path)"].why
    rows = {r.engine: r for r in gptq.engine_support(QuantConfig(group_size=64), {"c": (576, 576)})}
    assert "576 input features" in rows["vLLM (gptq_marlin, fast path)"].why
    rows = {r.engine: r for r in compressed_tensors.engine_support(QuantConfig(group_size=128, sym=False), shapes)}
    assert rows["vLLM (compressed-tensors WNA16)"].why == "Marlin fast path"


def _gptq_export(tmp_path, kept, quantize_head=False):
    """A tiny llama with the linears `kept` in full precision (and its head quantized), written as gptq:
    (its quantization_config, {engine: row}, every linear's name, the quantized ones)."""
    from llmq.formats import convert as convert_mod
    from llmq.solvers.rtn import rtn_quantize

    model = llmq.quantize(tiny_model(), QuantConfig(group_size=32, modules_to_not_convert=["lm_head", *kept]),
                          progress=False)
    if quantize_head:
        head = model.lm_head
        replace_module(model, "lm_head", QuantLinear.from_quantized(
            rtn_quantize(head.weight.detach(), 4, 32, True, torch.float16)))
        model.config.tie_word_embeddings = False
    llmq.save(model, tmp_path / "native")
    ckpt = convert_mod.read_checkpoint(tmp_path / "native")
    cfg, _, engines = convert_mod.encode(ckpt, "gptq")
    quantized = set(ckpt.layer_shapes())
    return cfg, {r.engine: r for r in engines}, ckpt.model_linears.inside + ckpt.model_linears.outside, quantized


@pytest.mark.parametrize("kept", [
    ["model.layers.0.self_attn.o_proj"],  # one layer's: full names
    ["o_proj"],  # every layer's: names within a layer
    ["model.layers.1.self_attn.q_proj"],  # a member of vLLM's fused q/k/v
])
def test_gptq_export_names_the_linears_it_quantizes_for_each_loader(tmp_path, kept):
    # optimum (transformers) gives every linear of a layer a GPTQ module unless modules_in_block_to_quantize
    # leaves it out (names matched by their ends); vLLM matches its names' parts (substrings).
    cfg, engines, linears, quantized = _gptq_export(tmp_path, kept)
    listed = sum(cfg["modules_in_block_to_quantize"], [])
    layer_linears = [n for n in linears if n.startswith("model.layers.")]
    assert {n for n in layer_linears if any(n.endswith(m) for m in listed)} == quantized
    assert {n for n in layer_linears if any(m in n for m in listed)} == quantized
    assert (listed == sorted({n.split(".", 3)[3] for n in quantized})) == (kept == ["o_proj"])
    assert all(not re.match(rule[2:], n) for rule in cfg["dynamic"] for n in quantized)
    fused_split = "q_proj" in kept[0]
    for engine in ("vLLM (gptq_marlin, fast path)", "vLLM (gptq kernel, --quantization gptq)", "SGLang", "TGI"):
        assert ("quantized whole or not at all" in engines[engine].why) is fused_split, engine
        assert not (fused_split and engines[engine].loads), engine
    assert engines["vLLM (gptq kernel, --quantization gptq)"].loads is not fused_split
    assert engines["transformers (optimum + gptqmodel)"].loads


def test_gptq_export_with_its_head_quantized(tmp_path):
    # GPTQModel writes a quantized head as "lm_head": true, which vLLM reads; optimum would leave it unset.
    cfg, engines, _, quantized = _gptq_export(tmp_path, [], quantize_head=True)
    assert "lm_head" in quantized and cfg["lm_head"] is True and "modules_in_block_to_quantize" not in cfg
    assert not engines["transformers (optimum + gptqmodel)"].loads
    convert(tmp_path / "native", tmp_path / "g", "gptq")
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(tmp_path / "g")(ids).logits,
                           llmq.from_pretrained(tmp_path / "native")(ids).logits)


def test_cli_quantize_format_gptq_and_convert(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "g"
    assert main(["quantize", str(tiny_llama_dir), str(out), "--group-size", "32", "--format", "gptq"]) == 0
    text = capsys.readouterr().out
    assert "gptq_marlin" in text and "not a multiple of 128" in text
    assert json.loads((out / "quantize_config.json").read_text())["checkpoint_format"] == "gptq"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    assert main(["convert", str(out), str(tmp_path / "n"), "--quiet"]) == 0
    assert main(["convert", str(out), str(tmp_path / "n"), "--format", "compressed-tensors"]) == 2
    assert "not empty" in capsys.readouterr().err
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(tmp_path / "n")(ids).logits, llmq.from_pretrained(out)(ids).logits)
