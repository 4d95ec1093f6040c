"""AWQ: scale folding is exact, the searches score what they claim, AWQ beats RTN on
outlier inputs, and the method runs end to end on tiny models of several architectures."""

import pytest
import torch
import transformers as T

import llmq
from llmq import arch
from llmq.config import QuantConfig
from llmq.engine import layer_output, run_layers
from llmq.errors import LlmqError
from llmq.methods.awq import AWQLayerStep, build_units, fold_into_prev
from llmq.solvers.awq import fake_quantize, input_stats, scale_gram, search_clip, search_scales
from llmq.solvers.rtn import rtn_quantize
from conftest import random_ids, tiny_model

F16 = torch.float16


def _spread_norms(model, seed=3):
    # Random init leaves norm weights at 1 (0 for Gemma) and biases at 0: randomise them so a
    # fold that forgot the Gemma offset or a bias would change the function.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 0.5)


@torch.no_grad()
def fold_scales(layer, group, linears, s):
    """Divide the output of group.prev by s (the step's fold) and multiply the linears' input columns by s."""
    fold_into_prev(layer.get_submodule(group.prev), group, s)
    for name in linears:
        w = layer.get_submodule(name).weight
        w.data = (w.float() * s).to(w.dtype)


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "gemma3", "opt", "phi3"])
def test_folding_scales_leaves_logits_unchanged(name):
    model = tiny_model(name, dtype=torch.float64)
    _spread_norms(model)
    ids = random_ids(n=2, length=16)
    with torch.no_grad():
        ref = model(ids).logits
    spec = arch.arch_spec(model)
    _, layers = arch.decoder_layers(model)
    g = torch.Generator().manual_seed(7)
    folded = 0
    for layer in layers:
        targets = {n: n for n in arch.layer_linears(layer)}
        for unit in build_units(spec, layer, targets, model.config):
            if unit.group is None:
                continue
            k = layer.get_submodule(unit.linears[0]).in_features
            s = torch.exp(torch.randn(k, generator=g, dtype=torch.float64))  # spans about e^-3 .. e^3
            fold_scales(layer, unit.group, unit.linears, s)
            folded += 1
    assert folded >= 2 * len(layers)
    with torch.no_grad():
        out = model(ids).logits
    # The norms compute in fp32 even in a float64 model (observed differences up to 6e-7
    # on logits of order 1); a wrong fold moves logits by far more than 1e-1.
    assert (out - ref).abs().max() < 2e-6


def test_scale_groups_used_per_architecture():
    cases = {
        "llama": ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"],  # GQA: no v -> o
        "opt": ["self_attn_layer_norm", "self_attn.v_proj", "final_layer_norm"],
        "gemma3": ["input_layernorm", "pre_feedforward_layernorm", "mlp.up_proj"],
        "phi3": ["input_layernorm", "post_attention_layernorm"],
    }
    for name, prevs in cases.items():
        model = tiny_model(name)
        _, layers = arch.decoder_layers(model)
        targets = {n: n for n in arch.layer_linears(layers[0])}
        units = build_units(arch.arch_spec(model), layers[0], targets, model.config)
        assert [u.group.prev for u in units if u.group is not None] == prevs
        # Every linear is quantized exactly once.
        assert sorted(n for u in units for n in u.targets) == sorted(targets)


def _outlier_layer(seed=0, n=512, k=128, out=96):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    x[:, 5] *= 40.0  # one channel carries outliers, as in real LLM activations
    x[:, 77] *= 15.0
    w = torch.randn(out, k, generator=g) * 0.05
    return x, w


def _output_error64(x, w, w_hat):
    return ((x.double() @ (w.double() - w_hat.double()).t()) ** 2).sum().item()


@pytest.mark.parametrize("sym", [True, False])
def test_fake_quantize_is_round_to_nearest_exactly(sym):
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(9))
    w[0, :32] = 0.0  # an all-zero group
    w[1, 32:64] = -torch.rand(32)  # a group with no positive weight
    for bits, gs in [(4, 32), (8, 96)]:
        assert torch.equal(fake_quantize(w, bits, gs, sym, F16), rtn_quantize(w, bits, gs, sym, F16).dequantize())


def test_search_error_matches_direct_float64_computation():
    x, w = _outlier_layer()
    stats = input_stats(x)
    res = search_scales([w], stats, bits=4, group_size=32, sym=False, scale_dtype=F16)
    s = res.scales.double()
    qw = rtn_quantize((w.double() * s).float(), 4, 32, False, F16)
    # Independent reference from the integer codes: (X / s) Q(W s)^T.
    deq = (qw.codes.double() - qw.zeros.double().repeat_interleave(32, 1)) * qw.scales.double().repeat_interleave(32, 1)
    direct = ((x.double() @ w.double().t() - (x.double() / s) @ deq.t()) ** 2).sum().item() / x.shape[0]
    assert res.error == pytest.approx(direct, rel=1e-3)
    q0 = rtn_quantize(w, 4, 32, False, F16).dequantize(torch.float64)
    assert res.rtn_error == pytest.approx(_output_error64(x, w, q0) / x.shape[0], rel=1e-3)


def test_scale_search_spread_over_processes_chooses_as_one():
    # Two "ranks" score alternate grid points, as distributed.solve_shared deals them out: the same
    # errors, so the same choice (the searched errors differ by far more than their rounding).
    x, w = _outlier_layer(seed=3)
    stats = input_stats(x)
    calls = []

    def evaluate(score, n):
        calls.extend(range(n))
        shares = {r: dict(zip(range(r, n, 2), score(list(range(r, n, 2))))) for r in (1, 0)}
        return [shares[i % 2][i] for i in range(n)]

    one = search_scales([w], stats, bits=4, group_size=32, sym=False, scale_dtype=F16)
    spread = search_scales([w], stats, bits=4, group_size=32, sym=False, scale_dtype=F16, evaluate=evaluate)
    assert calls == list(range(20)) and one.alpha > 0
    assert (spread.alpha, spread.error, spread.rtn_error) == (one.alpha, one.error, one.rtn_error)
    assert torch.equal(spread.scales, one.scales)


@pytest.mark.parametrize("sym,group", [(False, 32), (True, 32), (False, -1)])
def test_awq_beats_rtn_with_an_outlier_channel(sym, group):
    x, w = _outlier_layer(seed=1)
    gs = w.shape[1] if group == -1 else group
    stats = input_stats(x)
    res = search_scales([w], stats, bits=4, group_size=gs, sym=sym, scale_dtype=F16)
    s = res.scales
    clipped = search_clip(w * s, scale_gram(stats.gram, s), bits=4, group_size=gs, sym=sym, scale_dtype=F16).weight
    awq = rtn_quantize(clipped, 4, gs, sym, F16).dequantize(torch.float64) / s.double()
    rtn = rtn_quantize(w, 4, gs, sym, F16).dequantize(torch.float64)
    # Fresh inputs from the same distribution: the gain is not fitted to the calibration rows.
    x_new, _ = _outlier_layer(seed=2)
    assert res.alpha > 0
    assert _output_error64(x_new, w, awq) < 0.7 * _output_error64(x_new, w, rtn)


def test_clip_search_keeps_the_best_shrink_of_each_group():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 64, generator=g)
    w = torch.randn(8, 64, generator=g) ** 3  # heavy tails: clipping pays off in some groups
    stats = input_stats(x)
    res = search_clip(w, stats.gram, bits=4, group_size=16, sym=False, scale_dtype=F16, grid=20)
    assert res.error <= res.rtn_error
    assert res.shrink.shape == (8, 4) and (res.shrink <= 1).all() and (res.shrink >= 0.5).all()
    assert (res.shrink < 1).any()
    # Brute force in float64: each (row, group)'s share of the output error for every factor.
    xd = x.double().reshape(256, 4, 16)
    best = torch.zeros(8, 4, dtype=torch.float64)
    best[:] = float("inf")
    for f in torch.linspace(1.0, 0.5, 20).tolist():
        wg = w.reshape(8, 4, 16)
        lo, hi = wg.amin(-1, keepdim=True).clamp(max=0) * f, wg.amax(-1, keepdim=True).clamp(min=0) * f
        q = rtn_quantize(torch.minimum(torch.maximum(wg, lo), hi).reshape(8, 64), 4, 16, False, F16)
        d = (w.double() - q.dequantize(torch.float64)).reshape(8, 4, 16)
        err = (torch.einsum("ngi,tgi->tng", d, xd) ** 2).mean(0)
        best = torch.minimum(best, err)
    assert res.error == pytest.approx(best.sum().item(), rel=1e-3)


@pytest.mark.parametrize("scale_dtype,tol", [(torch.float32, 2e-6), (F16, 1e-3)])
def test_one_pass_output_equals_the_quantized_layers(scale_dtype, tol):
    # Equal head counts, so v -> o is scaled: v_proj is quantized before o_proj's scales are
    # known and its group scales are divided afterwards; the output the step hands to the
    # next layer must be what the final QuantLinear modules compute. With fp16 scales the
    # divided scales are rounded again (relative 2^-11), hence the looser bound.
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, vocab_size=256)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    ids = random_ids(n=3, length=16)
    config = QuantConfig(method="awq", bits=4, group_size=32, sym=False)
    _, layers = arch.decoder_layers(model)
    spec = arch.arch_spec(model)
    units = {i: build_units(spec, layer, {n: n for n in arch.layer_linears(layer)}, model.config)
             for i, layer in enumerate(layers)}
    assert any(u.group is not None and u.group.prev == "self_attn.v_proj" for u in units[0])
    step = AWQLayerStep(config, units, scale_dtype)
    out = run_layers(model, ids, step, device=torch.device("cpu"), progress=False)
    # The dense CPU backend computes x @ W^T with the dequantized weight, as the step did;
    # the int4 CPU kernel rounds activations and would hide what is compared here.
    llmq.modules.qlinear.set_cpu_backend(model, "dense")
    seen = {}
    hook = layers[-1].register_forward_hook(lambda m, a, o: seen.setdefault("out", layer_output(o)))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    hook.remove()
    assert isinstance(layers[0].self_attn.v_proj, llmq.QuantLinear)
    assert (seen["out"] - out).abs().max() < tol * out.abs().max()


@pytest.mark.parametrize("name,method", [("llama", "awq"), ("qwen2", "awq"), ("gemma3", "awq"), ("opt", "awq"),
                                         ("llama", "awq+gptq")])
def test_end_to_end_and_reload(name, method, tmp_path):
    model = tiny_model(name)
    ids = random_ids(n=2, length=16)
    with torch.no_grad():
        ref = model(ids).logits
    config = QuantConfig(method=method, bits=4, group_size=32, sym=False)
    # Tiny models have no tokenizer: hand the pipeline calibration windows directly.
    llmq.quantize(model, config, random_ids(n=8, length=32, seed=5), device="cpu", progress=False)
    linears = [m for m in model.modules() if isinstance(m, llmq.QuantLinear)]
    assert len(linears) == 2 * len(arch.layer_linears(tiny_model(name).get_submodule(
        arch.arch_spec(model).layers)[0]))
    with torch.no_grad():
        quant = model(ids).logits
    assert not torch.equal(quant, ref)
    assert (quant - ref).norm() < 0.5 * ref.norm()
    llmq.save(model, tmp_path / "q")
    loaded = llmq.from_pretrained(tmp_path / "q")
    assert loaded.config.quantization_config.quant_config.method == method
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, quant)


def test_architecture_without_scale_groups_is_refused(monkeypatch):
    model = tiny_model("llama")
    spec = arch.ARCHITECTURES["llama"]
    monkeypatch.setitem(arch.ARCHITECTURES, "llama", arch.ArchSpec(layers=spec.layers, sequential=spec.sequential))
    with pytest.raises(LlmqError, match="AWQ needs the scale groups of architecture 'llama'"):
        llmq.quantize(model, QuantConfig(method="awq", group_size=32), device="cpu", progress=False)
