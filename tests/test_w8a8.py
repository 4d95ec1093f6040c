"""W8A8: int8 weights and int8 activations, dynamic and static, on tiny models."""

import json

import pytest
import torch

import llmq
from llmq import QuantConfig
from llmq.cli import main
from llmq.errors import LlmqError
from llmq.kernels import cpu_select, int8_linear, quantize_activations
from llmq.kernels.int8 import fixed_cpu_kernel
from llmq.modules.qlinear import QuantLinear
from llmq.modules.w8a8 import W8A8Linear
from llmq.solvers.rtn import rtn_quantize
from conftest import random_ids, tiny_model


def _int8_problem(m, k, n, seed, outlier=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if outlier:
        x[:, 3] *= 40  # an outlier channel, as real activations have
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n, 1, generator=g) * 0.01 + 1e-3
    bias = torch.randn(n, generator=g)
    return x, w, ws, bias


def _reference_codes(x, input_scale=None):
    """Symmetric int8 codes and scales in float64, built without llmq."""
    x = x.double()
    if input_scale is None:
        s = x.abs().amax(-1, keepdim=True) / 127
    else:
        s = input_scale.double().reshape(1, 1)
    return torch.clamp(torch.round(x / s), -128, 127), s


@pytest.mark.parametrize("static", [False, True])
def test_activation_codes_match_a_float64_reference(static):
    x, *_ = _int8_problem(37, 96, 8, seed=torch.seed() % 1000)
    input_scale = torch.tensor([x.abs().max().item() / 127 * 0.5]) if static else None  # clips half the range
    q, s = quantize_activations(x, input_scale)
    ref_q, ref_s = _reference_codes(x, input_scale)
    assert q.dtype == torch.int8
    assert torch.allclose(s.double().expand_as(ref_s), ref_s, rtol=1e-6)
    diff = (q.double() - ref_q).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3  # only exact .5 ties may round apart
    if static:
        assert q.min() == -128 or q.max() == 127  # the clipped values saturate


@pytest.mark.parametrize("m", [1, 5, 33, 130])
@pytest.mark.parametrize("static", [False, True])
def test_int8_linear_cpu_is_exact_against_integer_products(m, static):
    x, w, ws, bias = _int8_problem(m, 64, 48, seed=m)
    input_scale = torch.tensor([x.abs().max().item() / 127]) if static else None
    y = int8_linear(x, w, ws, input_scale, bias, path="intmm")
    q, s = quantize_activations(x, input_scale)
    acc = q.long() @ w.long().t()  # exact integers
    expected = acc.double() * s.double() * ws.double().t() + bias.double()
    assert y.dtype == torch.float32 and y.shape == (m, 48)
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6)


def test_int8_linear_keeps_leading_dims_and_dtype():
    x, w, ws, _ = _int8_problem(6, 64, 16, seed=3)
    y = int8_linear(x.reshape(2, 3, 64).bfloat16(), w, ws)
    assert y.shape == (2, 3, 16) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float().reshape(6, 16), int8_linear(x.bfloat16(), w, ws).float())


def test_int8_linear_refuses_bad_inputs():
    x, w, ws, _ = _int8_problem(2, 64, 16, seed=4)
    with pytest.raises(ValueError, match="int8"):
        int8_linear(x, w.int(), ws)
    with pytest.raises(ValueError, match="input features"):
        int8_linear(x[:, :32], w, ws)
    with pytest.raises(ValueError, match="one value"):
        int8_linear(x, w, ws, torch.ones(2))


def test_int8_linear_traces_under_torch_compile():
    x, w, ws, bias = _int8_problem(8, 64, 16, seed=6)
    f = torch.compile(lambda x: int8_linear(x, w, ws, None, bias), backend="eager", fullgraph=True)
    torch.testing.assert_close(f(x), int8_linear(x, w, ws, None, bias))


def test_w8a8_linear_holds_the_solver_codes():
    w = torch.randn(24, 64)
    qw = rtn_quantize(w, 8, 64, True, torch.float32)
    layer = W8A8Linear.from_quantized(qw, torch.randn(24), input_scale=0.05)
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.shape == (24, 1)
    assert torch.equal(layer.weight.long(), qw.codes.long() - 128)
    assert torch.equal(layer.dequantize_weight(), qw.dequantize())
    assert layer.input_scale.item() == pytest.approx(0.05)
    assert set(layer.state_dict()) == {"weight", "weight_scale", "input_scale", "bias"}


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("kernel", cpu_select.CANDIDATES["w8a8"])
def test_w8a8_linear_follows_weights_replaced_or_written_in_place(static, kernel, monkeypatch):
    """The CPU forward keeps views of the weight buffers: a replaced or rewritten buffer is what runs."""
    monkeypatch.setattr(cpu_select, "_forced", {("w8a8", regime): kernel for regime in cpu_select.REGIMES})
    # int8pack rounds the int8 sums to bf16, dequant sums in fp32, intmm sums exactly (kernels/int8.py).
    tol = {"int8pack": dict(rtol=1e-2, atol=2e-2), "dequant": dict(rtol=1e-4, atol=2e-5)}.get(
        kernel, dict(rtol=1e-5, atol=1e-6))
    g = torch.Generator().manual_seed(11)
    layer = W8A8Linear.from_quantized(rtn_quantize(torch.randn(24, 64, generator=g), 8, 64, True, torch.float32),
                                      input_scale=0.05 if static else None)
    x = torch.randn(2, 5, 64, generator=g)

    def expected():
        return int8_linear(x, layer.weight, layer.weight_scale, layer.input_scale, path="reference")

    torch.testing.assert_close(layer(x), expected(), **tol)
    layer.weight = torch.randint(-127, 128, (24, 64), generator=g, dtype=torch.int8)  # replaced
    torch.testing.assert_close(layer(x), expected(), **tol)
    layer.weight_scale.mul_(3.0)  # written in place
    torch.testing.assert_close(layer(x), expected(), **tol)
    layer.load_state_dict({k: v * 2 if v.is_floating_point() else v for k, v in layer.state_dict().items()})
    torch.testing.assert_close(layer(x), expected(), **tol)


@pytest.fixture
def calibration():
    return random_ids(n=8, length=32, seed=5)


def _linears(model, kind):
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}


# Smoothing is named: its default follows the method, and on this random model, whose held-out tokens
# have embeddings the calibration never saw, static scales fitted to smoothed calibration inputs
# generalise worse than plain ones (real text: BENCHMARKS.md).
@pytest.mark.parametrize("settings", [
    dict(smooth="off"),
    dict(method="gptq", smooth="auto"),
    dict(act="static", smooth="off"),
    dict(method="gptq", act="static", smooth="off"),
])
def test_w8a8_checkpoint_reloads_with_identical_logits(tmp_path, calibration, settings):
    fp = tiny_model("llama")
    ids = random_ids(seed=9)
    with torch.no_grad():
        ref = fp(ids).logits
    model = llmq.quantize(fp, QuantConfig(scheme="w8a8", **settings), dataset=calibration, progress=False)
    layers = _linears(model, W8A8Linear)
    assert len(layers) == 14 and not _linears(model, QuantLinear)  # 7 linears x 2 layers, lm_head kept
    assert all(m.static == (settings.get("act") == "static") for m in layers.values())
    with torch.no_grad():
        expected = model(ids).logits
    assert ((expected - ref).norm() / ref.norm()) < 0.05  # int8 everywhere stays close to fp
    llmq.save(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["scheme"] == "w8a8" and cfg["act"] == settings.get("act", "dynamic") and cfg["bits"] == 8
    loaded = llmq.from_pretrained(tmp_path / "q")
    for name, buf in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], buf), name
    assert isinstance(loaded.model.layers[1].mlp.down_proj, W8A8Linear)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(),
                                  lambda m: m.to(torch.bfloat16).float()])
def test_casting_the_model_keeps_the_scales_in_fp32(tmp_path, calibration, cast):
    model = llmq.quantize(tiny_model("llama"), QuantConfig(scheme="w8a8", act="static", smooth="off"),
                          dataset=calibration, progress=False)
    scales = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("_scale")}
    assert len(scales) == 28 and all(v.dtype == torch.float32 for v in scales.values())
    cast(model)
    after = model.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v) for k, v in scales.items())
    llmq.save(model, tmp_path / "q")
    loaded = llmq.from_pretrained(tmp_path / "q").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in scales.items())


def test_w8a8_forward_equals_a_float64_simulation(exact_w8a8_kernel):
    """Each layer computes round(x / s_x) . codes^T * s_x * s_w; rebuild the model's output from that."""
    fp = tiny_model("llama")
    model = llmq.quantize(tiny_model("llama"), QuantConfig(scheme="w8a8"), progress=False)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0]))
             for n, m in _linears(model, W8A8Linear).items()]
    with torch.no_grad():
        model(random_ids(seed=2))
    for h in hooks:
        h.remove()
    for name, layer in _linears(model, W8A8Linear).items():
        x = inputs[name].reshape(-1, layer.in_features)
        q, s = _reference_codes(x)
        expected = (q @ layer.weight.double().t()) * s * layer.weight_scale.double().t()
        with torch.no_grad():
            torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
        w = fp.get_submodule(name).weight.double()
        assert (layer.dequantize_weight().double() - w).abs().max() <= w.abs().amax(1).max() / 127 / 2 + 1e-6


def test_static_scales_are_calibrated_per_input(calibration):
    model = llmq.quantize(tiny_model("llama"), QuantConfig(scheme="w8a8", act="static", smooth="off"),
                          dataset=calibration, progress=False)
    attn = model.model.layers[0].self_attn
    # q/k/v read one input: one scale; o_proj reads another.
    assert attn.q_proj.input_scale == attn.k_proj.input_scale == attn.v_proj.input_scale
    assert attn.o_proj.input_scale != attn.q_proj.input_scale
    assert all(m.input_scale.item() > 0 for m in _linears(model, W8A8Linear).values())


def test_info_shows_the_scheme(tmp_path, calibration, capsys):
    model = llmq.quantize(tiny_model("llama"), QuantConfig(scheme="w8a8", act="static"), dataset=calibration,
                          progress=False)
    llmq.save(model, tmp_path / "q")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "q")]) == 0
    text = capsys.readouterr().out
    assert "w8a8" in text and "static per-tensor" in text and "14 input scales" in text and "14 linears" in text
    assert "SmoothQuant auto" in text  # static activations smooth by default


@pytest.mark.parametrize("argv, message", [
    (["--scheme", "w8a8", "--bits", "4"], "8 bits"),
    (["--scheme", "w8a8", "--group-size", "64"], "one weight scale per output row"),
    (["--scheme", "w8a8", "--act", "static"], "--act static"),
    (["--scheme", "w8a8", "--format", "gptq"], "no activation scales"),
    (["--scheme", "w8a8", "--method", "awq"], "--smooth"),
    (["--scheme", "w8a8", "--asym"], "symmetric"),
    (["--scheme", "w8a8", "--smooth", "2"], "out of range"),
    (["--act", "static"], "--scheme w8a8"),
])
def test_bad_combinations_fail_before_any_work(tmp_path, capsys, argv, message):
    # MODEL does not exist: the error must come from the settings, before the model is read.
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["quantize", str(tmp_path / "no-such-model"), str(out), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("llmq: error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_static_without_data_is_refused_in_python():
    with pytest.raises(LlmqError, match="--act static"):
        llmq.quantize(tiny_model("llama"), QuantConfig(scheme="w8a8", act="static"), progress=False)


def test_cli_quantizes_w8a8(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_llama_dir), str(out), "--scheme", "w8a8", "--no-stream"]) == 0
    # The report counts the int8 layers as quantized, not as full-precision weights kept.
    report = capsys.readouterr().out
    assert "quantized         14 linears" in report and "other kept" not in report
    loaded = llmq.from_pretrained(out)
    assert len(_linears(loaded, W8A8Linear)) == 14


# --- SmoothQuant ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, smooth", [
    (dict(), "off"),  # data-free: no activations to measure
    (dict(act="static"), "auto"),  # per-tensor scales collapse without smoothing on real text
    (dict(method="gptq"), "auto"),
    (dict(act="static", smooth="off"), "off"),
    (dict(method="gptq", smooth=0.5), 0.5),
])
def test_smoothing_defaults_to_auto_when_the_run_calibrates(settings, smooth):
    config = QuantConfig(scheme="w8a8", **settings)
    assert config.smooth == smooth and config.smoothing == (None if smooth == "off" else smooth)
    assert config.needs_calibration == (smooth != "off" or settings.get("act") == "static")
    stored = json.loads(json.dumps(config.to_dict()))  # config.json holds the resolved setting
    assert QuantConfig.from_dict(stored).smooth == smooth


def test_a_checkpoint_that_stored_smoothing_off_as_null_reads_as_off():
    stored = {**QuantConfig(scheme="w8a8", act="static", smooth="off").to_dict(), "smooth": None}
    assert QuantConfig.from_dict(stored).smooth == "off"


def test_default_static_run_folds_smoothing_into_the_norms(calibration):
    fp = _outlier_model()
    model = llmq.quantize(_outlier_model(), QuantConfig(scheme="w8a8", act="static"), dataset=calibration,
                          progress=False)
    for name in ("input_layernorm", "post_attention_layernorm"):
        before = fp.model.layers[0].get_submodule(name).weight
        after = model.model.layers[0].get_submodule(name).weight
        assert not torch.allclose(before, after), name


from llmq import arch, pipeline  # noqa: E402
from llmq.methods.w8a8 import build_w8a8_units, fold_smoothing  # noqa: E402
from llmq.kernels.int8 import int8_reference  # noqa: E402
from llmq.solvers.smoothquant import (channel_absmax, int8_weight_codes, search_smoothing,  # noqa: E402
                                      smoothing_factors, static_scale, w8a8_product)


@pytest.mark.parametrize("name, kept", [("llama", None), ("qwen3", None), ("gemma3", None), ("opt", None),
                                         ("mixtral", None), ("qwen2_moe", None), ("qwen2_moe", "mlp.experts")])
def test_folding_smoothing_factors_leaves_the_fp_function_unchanged(name, kept):
    """Every unit's factors folded into the operation before it: the same logits. With MoE experts
    quantized, the post-attention norm's group spans the router and every expert; with experts kept
    whole (`kept`), which read that norm's output unscaled, nothing is folded into it."""
    model = tiny_model(name)
    ids = random_ids(seed=4)
    with torch.no_grad():
        ref = model(ids).logits
    skip = ["lm_head"] + ([kept] if kept else [])
    job = pipeline.plan(model, QuantConfig(scheme="w8a8", smooth=0.5, modules_to_not_convert=skip),
                        torch.device("cpu"))  # unrolls the experts it quantizes
    g = torch.Generator().manual_seed(1)
    groups = 0
    for i, layer in enumerate(job.layers):
        for unit in build_w8a8_units(job.spec, layer, job.targets[i], model.config, smooth=0.5):
            if unit.group is None:
                continue
            k = layer.get_submodule(unit.linears[0]).weight.shape[1]
            s = unit.tie(torch.rand(k, generator=g) * 4 + 0.25)  # factors far from 1
            fold_smoothing(layer, unit, s)
            groups += 1
    with torch.no_grad():
        out = model(ids).logits
    assert groups >= 2 * len(job.layers)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_grouped_query_attention_smooths_v_to_o_with_tied_factors():
    model = tiny_model("llama")  # 4 query heads, 2 key-value heads
    layer = arch.decoder_layers(model)[1][0]
    units = build_w8a8_units(arch.arch_spec(model), layer, {n: n for n in arch.layer_linears(layer)},
                             model.config, smooth=0.5)
    vo = next(u for u in units if u.linears == ["self_attn.o_proj"])
    assert vo.group.prev == "self_attn.v_proj" and vo.kv_repeat == 2 and vo.head_dim == 16
    v = torch.arange(64.0)
    tied = vo.tie(v).reshape(2, 2, 16)  # [kv head, query head of the group, channel]
    assert torch.equal(tied[:, 0], tied[:, 1]) and torch.equal(tied[0, 0], torch.arange(16.0) + 16)


def test_smoothing_factors_follow_the_formula():
    g = torch.Generator().manual_seed(2)
    act = torch.rand(32, generator=g) * 10
    ws = [torch.randn(8, 32, generator=g), torch.randn(4, 32, generator=g)]
    s = smoothing_factors(act, ws, 0.3)
    wmax = torch.cat(ws).abs().amax(0)
    torch.testing.assert_close(s, act.pow(0.3) / wmax.pow(0.7))


@pytest.mark.parametrize("static", [False, True])
def test_smoothing_search_never_scores_worse_than_no_smoothing(static):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 64, generator=g)
    x[:, [5, 17]] *= 60  # outlier channels
    w = [torch.randn(48, 64, generator=g)]
    res = search_smoothing(x, w, static=static)
    assert res.error <= res.plain_error
    assert res.alpha is not None and res.error < 0.5 * res.plain_error  # outliers: smoothing pays


@pytest.mark.parametrize("static", [False, True])
def test_smoothing_search_scores_the_w8a8_output_error(static):
    g = torch.Generator().manual_seed(13)
    x = torch.randn(256, 64, generator=g)
    x[:, [2, 9]] *= 40
    w = torch.randn(48, 64, generator=g)
    res = search_smoothing(x, [w], static=static)

    def error(s):  # float64 from the integer reference, independently of the search's own code
        xs, ws = x / s, w * s
        input_scale = (xs.abs().max() / 127).reshape(1) if static else None
        codes, scale = int8_weight_codes(ws)
        return ((int8_reference(xs, codes, scale, input_scale) - x.double() @ w.double().t()) ** 2).sum().item()

    assert res.plain_error == pytest.approx(error(torch.ones(64)), rel=1e-4)
    s = smoothing_factors(x.abs().amax(0), [w], res.alpha)
    assert res.error == pytest.approx(error(s), rel=1e-4)


@pytest.mark.parametrize("settings", [dict(act="static"), dict(method="gptq")])
def test_the_calibration_pass_feeds_on_what_the_quantized_layer_computes(monkeypatch, calibration, settings,
                                                                        exact_w8a8_kernel):
    """Each layer's output in the calibration pass, the next layer's calibration input, is what the
    layer computes once quantized: every target, the first of its unit too, computes as W8A8Linear."""
    from llmq.engine import layer_output
    from llmq.methods.w8a8 import W8A8LayerStep

    gaps = []
    step = W8A8LayerStep.__call__

    def checked(self, index, layer, hidden, args, kwargs):
        out, note = step(self, index, layer, hidden, args, kwargs)
        with torch.no_grad():
            again = layer_output(layer(hidden, *args, **kwargs))  # its targets are W8A8Linear now
        gaps.append(((out - again).norm() / again.norm()).item())
        return out, note

    monkeypatch.setattr(W8A8LayerStep, "__call__", checked)
    llmq.quantize(_outlier_model(), QuantConfig(scheme="w8a8", **settings), dataset=calibration, progress=False)
    # Rounding alone moves a few activation codes (about 1e-4 here); a linear run in full precision, 1e-2.
    assert len(gaps) == 2 and max(gaps) < 1e-3, gaps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_absmax_is_the_largest_magnitude_per_channel(dtype):
    g = torch.Generator().manual_seed(14)
    x = (torch.randn(3, 50, 24, generator=g) * torch.rand(24, generator=g) * 9).to(dtype)
    x[1, 7, 5] = -100.0  # a channel whose extreme is negative
    got = channel_absmax(x)
    assert got.dtype == torch.float32 and got[5] == 100.0
    assert torch.equal(got.double(), x.double().abs().reshape(-1, 24).max(0).values)


def test_int8_weight_codes_are_the_stored_codes():
    g = torch.Generator().manual_seed(11)
    w = torch.randn(40, 96, generator=g) * torch.rand(40, 1, generator=g)
    w[3] = -w[3].abs()  # a row whose largest magnitude is negative takes the extra code
    codes, scale = int8_weight_codes(w)
    w64 = w.double()  # symmetric: the smallest scale keeping max and min inside [-128, 127] steps
    ref_scale = torch.maximum(w64.amax(1).clamp(min=0) / 127, -w64.amin(1).clamp(max=0) / 128).float()
    torch.testing.assert_close(scale.squeeze(1), ref_scale, rtol=0, atol=0)
    ref_codes = torch.round(w64 / ref_scale.double()[:, None]).clamp(-128, 127)
    assert codes.dtype == torch.int8 and torch.equal(codes.long(), ref_codes.long())
    assert codes[3].min() == -128


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("rows", [5, 300])  # few rows take the decode kernel on CPU
def test_w8a8_product_is_the_integer_product(static, rows):
    g = torch.Generator().manual_seed(12 + rows)
    x = torch.randn(rows, 96, generator=g) * 3
    w = torch.randn(40, 96, generator=g)
    input_scale = torch.tensor([0.02]) if static else None  # clips: |x| reaches past 127 steps
    codes, scale = int8_weight_codes(w)
    expected = int8_reference(x, codes, scale, input_scale)  # int64 products, float64 rescale
    y = w8a8_product(x, w, input_scale).double()
    if fixed_cpu_kernel() == "intmm":  # exact int32 sums
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    else:  # fp32 products of the once-rounded factors, summed in fp32
        assert ((y - expected).abs().max() / expected.abs().max()).item() < 2e-6


def _outlier_model():
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:  # activation outliers on a few channels, as real LLMs have
            layer.input_layernorm.weight[[3, 40]] *= 25
            layer.post_attention_layernorm.weight[[7]] *= 25
    return model


def test_smoothquant_reduces_w8a8_error_on_outlier_channels(calibration):
    ids = random_ids(seed=8, n=4, length=32)
    with torch.no_grad():
        ref = _outlier_model()(ids).logits
    errs = {}
    for smooth in ("off", 0.5, "auto"):
        q = llmq.quantize(_outlier_model(), QuantConfig(scheme="w8a8", act="static", smooth=smooth),
                          dataset=calibration, progress=False)
        with torch.no_grad():
            errs[smooth] = ((q(ids).logits - ref).norm() / ref.norm()).item()
    assert errs[0.5] < errs["off"] and errs["auto"] < errs["off"], errs


def test_smoothed_gptq_checkpoint_reloads(tmp_path, calibration):
    model = llmq.quantize(_outlier_model(), QuantConfig(scheme="w8a8", smooth="auto", method="gptq"),
                          dataset=calibration, progress=False)
    ids = random_ids(seed=9)
    with torch.no_grad():
        expected = model(ids).logits
    llmq.save(model, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["smooth"] == "auto"
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(tmp_path / "q")(ids).logits, expected)


def test_smoothing_needs_scale_groups(calibration):
    model = tiny_model("llama")
    model.config.model_type = "unknown-arch"  # discovered layers, no scale groups
    with pytest.raises(LlmqError, match="--smooth off"):
        llmq.quantize(model, QuantConfig(scheme="w8a8", smooth=0.5), dataset=calibration, progress=False)


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_static_observers(observer):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4096, 32, generator=g)
    x[0, 0] = 400.0  # one extreme value
    w = [torch.randn(16, 32, generator=g)]
    scale = static_scale(x, observer, w)
    if observer == "minmax":
        assert scale.item() == pytest.approx(400.0 / 127)
    elif observer == "percentile":
        assert scale.item() < 400.0 / 127 / 4  # the lone outlier is clipped
    else:
        from llmq.solvers.smoothquant import fake_quantize_activations

        def out_err(sc):
            return ((fake_quantize_activations(x, sc) - x) @ w[0].t()).pow(2).sum()

        minmax = torch.tensor([400.0 / 127])
        assert scale.item() < minmax.item() and out_err(scale) < out_err(minmax)

