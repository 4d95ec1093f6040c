"""The CPU kernels chosen by measurement: the choice is honoured, and every candidate computes the layer.

References are built here, independently: integer products in int64 for W8A8,
float64 weights from the unpacked integer codes for weight-only layers.
"""

import time

import pytest
import torch

from llmq.kernels import cpu as cpu_kernels
from llmq.kernels import cpu_matmul, cpu_select, int8_linear, prepare_cpu
from llmq.kernels import int8 as int8_kernels
from llmq.kernels.layout import pack_cols, pack_rows

PREFILL_M = cpu_select.DECODE_MAX_ROWS + 23
BF16_TOL = 6e-3  # bf16 activations (the int4pack/int8pack kernels, "dequant_bf16")
FP32_TOL = 2e-6  # fp32 products of once-rounded factors, summed in fp32
# intmm: exact int32 sums, two fp32 roundings of the rescale; dequant: fp32 sums; int8pack: sums
# rounded to bf16 by torch's kernel.
W8A8_TOL = {"intmm": 1e-6, "dequant": FP32_TOL, "int8pack": BF16_TOL}


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.delenv(cpu_select.ENV, raising=False)
    cpu_select.reset()
    yield
    for kind in cpu_select.CANDIDATES:
        cpu_select.force(kind, None)
    cpu_select.reset()


def _rel_err(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def _int8_problem(m, k, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2
    x[:, 3] *= 40  # an outlier channel
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n, 1, generator=g) * 1e-2 + 1e-3
    bias = torch.randn(n, generator=g)
    return x, w, ws, bias


def _integer_reference(x, w, ws, bias, input_scale):
    """W8A8 in float64 from int64 products; codes from float64 scales, built without llmq."""
    xd = x.double()
    s = xd.abs().amax(-1, keepdim=True) / 127 if input_scale is None else input_scale.double().reshape(1, 1)
    q = torch.clamp(torch.round(xd / s), -128, 127).long()
    return (q @ w.long().t()).double() * s * ws.double().t() + bias.double()


def _weight_only_layer(n, k, bits, gs, seed):
    """(prepare_cpu's inputs, float64 weight [N, K]) from random integer codes."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if gs == -1 else k // gs
    codes = torch.randint(0, 2**bits, (k, n), generator=g)
    zeros = torch.full((groups, n), 128) if bits == 8 else torch.randint(0, 16, (groups, n), generator=g)
    scales = torch.rand(groups, n, generator=g) * 1e-2 + 1e-3
    width = k if gs == -1 else gs
    w = (codes.double() - zeros.double().repeat_interleave(width, 0)) * scales.double().repeat_interleave(width, 0)
    return (pack_rows(codes, bits), pack_cols(zeros, bits), scales), w.t()


def test_first_use_measures_once_and_takes_the_fastest():
    calls = []

    def benchmarks(regime):
        calls.append(regime)
        return {"intmm": lambda: time.sleep(0.003), "dequant": lambda: None}

    assert cpu_select.choice("w8a8", 1, benchmarks) == "dequant"
    assert cpu_select.choice("w8a8", 3, benchmarks) == "dequant"
    assert calls == ["decode"]  # measured once for the regime, then remembered
    assert cpu_select.choice("w8a8", PREFILL_M, benchmarks) == "dequant"
    assert calls == ["decode", "prefill"]
    report = cpu_select.report()
    assert report["w8a8.decode"]["kernel"] == "dequant"
    assert report["w8a8.decode"]["seconds"]["intmm"] > report["w8a8.decode"]["seconds"]["dequant"]


def test_environment_override_is_honoured_without_measuring(monkeypatch):
    monkeypatch.setenv(cpu_select.ENV, "w8a8.prefill=dequant, w8a8.decode=intmm, int4=dequant_bf16")
    ran = []
    for name, f in list(int8_kernels._CPU_KERNELS.items()):
        monkeypatch.setitem(int8_kernels._CPU_KERNELS, name, lambda *a, f=f, name=name: ran.append(name) or f(*a))
    x, w, ws, bias = _int8_problem(PREFILL_M, 64, 32, seed=1)
    for m in (PREFILL_M, 1):
        y = int8_linear(x[:m], w, ws, None, bias)
        assert _rel_err(y, _integer_reference(x[:m], w, ws, bias, None)) < FP32_TOL
    assert ran == ["dequant", "intmm"]
    (qweight, qzeros, scales), _ = _weight_only_layer(32, 128, 4, 64, seed=2)
    state = prepare_cpu(qweight, qzeros, scales, None, 4, 64, torch.float32)
    assert cpu_kernels.cpu_kernel(state, 1) == cpu_kernels.cpu_kernel(state, PREFILL_M) == "dequant_bf16"
    assert cpu_select.report()["w8a8.prefill"]["seconds"] == {}  # nothing was timed


@pytest.mark.parametrize("value, message", [("w8a8=fast", "not a w8a8 CPU kernel"),
                                            ("int4.warm=dequant", "kind.regime=name"),
                                            ("int3=dequant", "unknown kernel kind")])
def test_bad_override_is_refused(monkeypatch, value, message):
    monkeypatch.setenv(cpu_select.ENV, value)
    x, w, ws, _ = _int8_problem(2, 64, 16, seed=3)
    with pytest.raises(ValueError, match=message):
        int8_linear(x, w, ws)


def test_forced_kernel_is_honoured_and_lifted(monkeypatch):
    ran = []
    for name, f in list(cpu_kernels._KERNELS.items()):
        monkeypatch.setitem(cpu_kernels._KERNELS, name, lambda *a, f=f, name=name: ran.append(name) or f(*a))
    (qweight, qzeros, scales), w = _weight_only_layer(48, 128, 4, 32, seed=4)
    state = prepare_cpu(qweight, qzeros, scales, None, 4, 32, torch.float32)
    x = torch.randn(5, 128)
    cpu_select.force("int4", "dequant")
    assert _rel_err(cpu_matmul(x, state), x.double() @ w.t()) < FP32_TOL
    cpu_select.force("int4", "int4pack", regime="decode")
    cpu_matmul(x, state)
    cpu_select.force("int4", None)
    assert ran == ["dequant", "int4pack"]
    with pytest.raises(ValueError, match="not a int4 CPU kernel"):
        cpu_select.force("int4", "intmm")


@pytest.mark.parametrize("path", cpu_select.CANDIDATES["w8a8"])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("m", [1, 7, PREFILL_M])
def test_every_w8a8_candidate_matches_integer_products(path, static, m):
    x, w, ws, bias = _int8_problem(m, 96, 48, seed=m + 10 * static)
    x[m // 2] = 0  # an all-zero row
    input_scale = torch.tensor([x.abs().max().item() / 127 * 0.5]) if static else None  # clips
    expected = _integer_reference(x, w, ws, bias, input_scale)
    y = int8_linear(x.reshape(1, m, 96), w, ws, input_scale, bias, path=path)
    assert y.shape == (1, m, 48) and y.dtype == torch.float32
    assert _rel_err(y.reshape(m, 48), expected) < W8A8_TOL[path]


@pytest.mark.parametrize("k", [4, 17, 100])
def test_widths_torchs_int8_kernel_cannot_take_run_another_kernel(k):
    x, w, ws, bias = _int8_problem(3, k, 48, seed=k)
    y = int8_linear(x, w, ws, None, bias, path="int8pack")
    assert _rel_err(y, _integer_reference(x, w, ws, bias, None)) < FP32_TOL
    (qweight, qzeros, scales), _ = _weight_only_layer(48, 4 * 25, 8, -1, seed=1)  # K = 100
    assert prepare_cpu(qweight, qzeros, scales, None, 8, -1, torch.float32).backend == "dense"


@pytest.mark.parametrize("path", cpu_select.CANDIDATES["w8a8"])
@pytest.mark.parametrize("m", [1, PREFILL_M])
def test_every_w8a8_candidate_gives_a_nan_a_finite_code_under_a_static_scale(path, m):
    x, w, ws, bias = _int8_problem(m, 96, 48, seed=50 + m)
    x[0, 5] = float("nan")
    input_scale = torch.tensor([x.nan_to_num().abs().max().item() / 127])
    y = int8_linear(x, w, ws, input_scale, bias, path=path)
    assert torch.isfinite(y).all()
    x[0, 5] = 0.0  # the code the int8 conversion gives a NaN
    assert _rel_err(y, _integer_reference(x, w, ws, bias, input_scale)) < W8A8_TOL[path]


@pytest.mark.parametrize("bits, gs", [(4, 64), (4, -1), (8, -1)])
@pytest.mark.parametrize("m", [1, PREFILL_M])
def test_every_weight_only_candidate_matches_float64(bits, gs, m):
    n, k = 64, 256
    (qweight, qzeros, scales), w = _weight_only_layer(n, k, bits, gs, seed=bits + m)
    state = prepare_cpu(qweight, qzeros, scales, None, bits, gs, torch.float32)
    x = torch.randn(2, m, k)
    bias = torch.randn(n)
    expected = (x.double() @ w.t() + bias.double()).reshape(2 * m, n)
    for kernel in cpu_select.CANDIDATES["int4" if bits == 4 else "int8"]:
        y = cpu_matmul(x, state, bias, kernel=kernel)
        assert y.shape == (2, m, n) and y.dtype == torch.float32
        tol = FP32_TOL if kernel == "dequant" else BF16_TOL
        assert _rel_err(y.reshape(2 * m, n), expected) < tol, kernel


def test_act_order_layers_run_their_kernel():
    (qweight, qzeros, scales), _ = _weight_only_layer(32, 128, 4, 32, seed=5)
    g_idx = (torch.arange(128) // 32).flip(0).int()  # groups in reverse order: inputs permuted
    state = prepare_cpu(qweight, qzeros, scales, g_idx, 4, 32, torch.float32)
    assert state.perm is not None and cpu_kernels.cpu_kernel(state, PREFILL_M) == "int4pack"
    with pytest.raises(ValueError, match="act-order"):
        cpu_matmul(torch.randn(2, 128), state, kernel="dequant")


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("m", [1, PREFILL_M])
def test_w8a8_module_forward_matches_integer_products(static, m):
    from llmq.modules.w8a8 import W8A8Linear

    x, w, ws, bias = _int8_problem(m, 96, 48, seed=30 + m)
    input_scale = torch.tensor([x.abs().max().item() / 127 * 0.5]) if static else None
    layer = W8A8Linear(96, 48, static=static, bias=True)
    layer.weight.copy_(w)
    layer.weight_scale.copy_(ws)
    layer.bias.data.copy_(bias)
    if static:
        layer.input_scale.copy_(input_scale)
    expected = _integer_reference(x, w, ws, bias, input_scale)
    with torch.inference_mode():
        y = layer(x.reshape(1, m, 96))
    assert y.shape == (1, m, 48)
    assert _rel_err(y.reshape(m, 48), expected) < W8A8_TOL[int8_kernels.cpu_kernel(m)]


def test_dequant_buffers_serve_calls_inside_and_outside_inference_mode():
    (qweight, qzeros, scales), w = _weight_only_layer(32, 128, 4, 64, seed=6)
    state = prepare_cpu(qweight, qzeros, scales, None, 4, 64, torch.float32)
    x = torch.randn(3, 128)
    with torch.inference_mode():
        inside = cpu_matmul(x, state, kernel="dequant")
    outside = cpu_matmul(x, state, kernel="dequant")
    assert torch.equal(inside, outside) and _rel_err(outside, x.double() @ w.t()) < FP32_TOL


def test_nothing_is_measured_at_import_or_load():
    import subprocess
    import sys

    code = ("import torch, llmq\n"
            "from llmq.kernels import cpu_select, prepare_cpu\n"
            "from llmq.kernels.layout import pack_cols, pack_rows\n"
            "prepare_cpu(pack_rows(torch.zeros(64, 32, dtype=torch.int32), 4), pack_cols(torch.zeros(1, 32), 4),\n"
            "            torch.ones(1, 32), None, 4, 64, torch.float32)\n"
            "assert cpu_select.report() == {}, cpu_select.report()\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_a_hopeless_candidate_runs_once(monkeypatch):
    clock = [0.0]  # a clock the candidates advance: the test does not depend on the machine's load
    monkeypatch.setattr(cpu_select.time, "perf_counter", lambda: clock[0])
    runs = {"fast": 0, "slower": 0, "hopeless": 0}
    cost = {"fast": 1.0, "slower": cpu_select.HOPELESS * 0.9, "hopeless": cpu_select.HOPELESS * 1.1}

    def candidate(name):
        def run():
            runs[name] += 1
            clock[0] += cost[name]
        return run

    seconds = cpu_select._time({name: candidate(name) for name in cost}, rounds=4)
    assert runs == {"fast": 5, "slower": 5, "hopeless": 1}  # warm-up and 4 rounds; the warm-up alone
    assert seconds == cost


@pytest.mark.parametrize("flags, kernel", [({"avx2": True}, "dequant"), ({"avx2": True, "avx512_vnni": True}, "intmm"),
                                           ({"avx_vnni": True}, "intmm"), ({"amx_int8": True}, "intmm"),
                                           ({}, "dequant")])
def test_the_fixed_w8a8_kernel_follows_the_int8_dot_product_instructions(monkeypatch, flags, kernel):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)
    int8_kernels.fixed_cpu_kernel.cache_clear()
    try:
        assert int8_kernels.fixed_cpu_kernel() == kernel
    finally:
        int8_kernels.fixed_cpu_kernel.cache_clear()
