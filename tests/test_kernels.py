"""Dequantize-matmul kernels and the CPU path against a float64 reference.

Every case draws random integer codes, zero points and scales, packs them with
llmq.kernels.layout (whose bit layout tests/test_packing.py checks against words
built from plain Python integers), and compares with (codes - zeros[g]) *
scales[g] computed in float64 from those same codes, not from any unpacker.

The Triton kernels run under the interpreter: TRITON_INTERPRET=1 is set here,
before the kernel module is imported (or it is reloaded if another module
imported it first), and restored when this module's tests end.
"""

import copy
import importlib
import itertools
import pickle
import subprocess
import sys
import os

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from llmq.kernels.layout import pack_cols, pack_rows  # noqa: E402
from llmq.kernels import (CpuState, cpu_matmul, dequant_matmul, dequantize, prepare_cpu,  # noqa: E402
                          reorder_act_order, uses_triton)
from llmq.kernels import api  # noqa: E402

triton = pytest.importorskip("triton")
from llmq.kernels import triton_qmm, triton_tuning  # noqa: E402

if not triton_tuning.INTERPRET:  # imported before TRITON_INTERPRET was set: define the kernels again
    importlib.reload(triton_tuning)
    triton_qmm = importlib.reload(triton_qmm)


@pytest.fixture(scope="module", autouse=True)
def _restore_interpret_env():
    yield
    if _PREVIOUS_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET


# Norm-relative error bounds. fp16/bf16: the weight is rounded to the
# activation dtype before the dot and the output is rounded once. The
# interpreter converts fp32 -> bf16 by truncation (hardware rounds to
# nearest), which doubles the bf16 error there.
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.2e-2}


def make_layer(n, k, bits, group_size, act_order, seed, scale_dtype=torch.float16, zero=None):
    """Random packed layer plus its float64 dense weight [N, K] from the same codes."""
    gen = torch.Generator().manual_seed(seed)
    gs = k if group_size == -1 else group_size
    groups = k // gs
    codes = torch.randint(0, 2**bits, (k, n), generator=gen)
    if zero is None:
        zeros = torch.randint(0, 2**bits, (groups, n), generator=gen)
    else:
        zeros = torch.full((groups, n), zero)
    scales = ((torch.rand(groups, n, generator=gen) + 0.5) * 0.02).to(scale_dtype)
    if act_order:
        # GPTQ's act-order: a permutation of the inputs, groups of gs consecutive permuted positions.
        position = torch.argsort(torch.randperm(k, generator=gen))
        g = position // gs
        g_idx = g.to(torch.int32)
    else:
        g = torch.arange(k) // gs
        g_idx = None
    w = (codes.double() - zeros.double()[g]) * scales.double()[g]  # [K, N]
    packed = dict(qweight=pack_rows(codes, bits), qzeros=pack_cols(zeros, bits), scales=scales, g_idx=g_idx)
    return packed, w.t()


def make_x(lead, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(*lead, k, generator=gen).to(dtype)


def make_bias(n, dtype, seed):
    gen = torch.Generator().manual_seed(seed + 2)
    return torch.randn(n, generator=gen).to(dtype)


def reference(x, w, bias):
    y = x.double() @ w.t()
    return y if bias is None else y + bias.double()


def assert_close(y, ref, tol):
    assert y.shape == ref.shape
    assert torch.isfinite(y).all(), "non-finite output (unwritten or poisoned elements)"
    err = (y.double() - ref)
    rms = ref.pow(2).mean().sqrt()
    assert err.norm() / ref.norm() <= tol, f"relative error {(err.norm() / ref.norm()).item():.3g} > {tol}"
    # A few wrong elements barely move the norm: bound every element too.
    assert err.abs().max() <= 8 * tol * rms, f"max error {err.abs().max().item():.3g} vs rms {rms.item():.3g}"


# A covering subset of the full product: every M (so every dispatch path), bits,
# group size, act-order, dtype, bias and leading-dims choice appears several
# times; cycling the secondary axes against the primary ones keeps it ~40 cases.
_SHAPES = [(1,), (2,), (3,), (17,), (64,), (130,), (2, 3), (4, 16)]  # leading dims of x
_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cases():
    cases = []
    primary = itertools.product((4, 8), (32, 64, 128, -1, 16), (False, True))
    for i, (bits, gs, act) in enumerate(primary):
        for j in range(2):
            c = 2 * i + j
            lead = _SHAPES[c % len(_SHAPES)]
            dtype = _DTYPES[(c // 2 + j) % 3]
            k = 384 if gs == 128 else 192
            cases.append(pytest.param(lead, 72, k, bits, gs, act, dtype, c % 3 != 0, c,
                                      id=f"x{'x'.join(map(str, lead))}-N72-K{k}-b{bits}-g{gs}"
                                         f"{'-act' if act else ''}-{str(dtype)[6:]}{'-bias' if c % 3 else ''}"))
    return cases


@pytest.mark.parametrize("lead,n,k,bits,gs,act,dtype,has_bias,seed", _cases())
def test_dequant_matmul_interpreter(lead, n, k, bits, gs, act, dtype, has_bias, seed):
    assert uses_triton(torch.device("cpu"))
    p, w = make_layer(n, k, bits, gs, act, seed)
    x = make_x(lead, k, dtype, seed)
    bias = make_bias(n, dtype, seed) if has_bias else None
    y = dequant_matmul(x, p["qweight"], p["qzeros"], p["scales"], bits=bits, group_size=gs,
                       g_idx=p["g_idx"], bias=bias)
    assert y.dtype == dtype
    assert_close(y, reference(x, w, bias), TOL[dtype])


@pytest.mark.parametrize("path", ["splitk", "gemm", "dequant", "gemv"])
@pytest.mark.parametrize("m", [3, 130])
def test_every_path_at_small_and_large_m(path, m):
    seed = 100 + m
    p, w = make_layer(64, 256, 4, 64, True, seed)
    x = make_x((m,), 256, torch.float16, seed)
    bias = make_bias(64, torch.float16, seed)
    y = dequant_matmul(x, p["qweight"], p["qzeros"], p["scales"], bits=4, group_size=64, g_idx=p["g_idx"],
                       bias=bias, path=path)
    assert_close(y, reference(x, w, bias), TOL[torch.float16])


# K = 200 is not a multiple of the interpreter's BLOCK_K (32), so the last K
# tile is partial. Group sizes pick each way a tile finds its zeros and scales:
# 8 (several whole groups per tile, the last one past K), 40 (a group size
# that is no power of two: looked up per input), 200 (one group per tile).
@pytest.mark.parametrize("path", ["splitk", "gemm", "dequant", "gemv"])
@pytest.mark.parametrize("bits,gs", [(4, 8), (8, 8), (4, 40), (8, -1)])
def test_partial_k_tiles_and_every_group_layout(path, bits, gs):
    seed = 300 + bits + gs
    p, w = make_layer(48, 200, bits, gs, False, seed)
    x = make_x((5,), 200, torch.float32, seed)
    y = dequant_matmul(x, p["qweight"], p["qzeros"], p["scales"], bits=bits, group_size=gs, path=path)
    assert_close(y, reference(x, w, None), TOL[torch.float32])


@pytest.mark.parametrize("path", ["splitk", "gemm", "dequant", "gemv"])
@pytest.mark.parametrize("bits", [4, 8])
def test_act_order_reordered_once_runs_without_g_idx(path, bits):
    """reorder_act_order's sorted qweight on x[..., perm] computes the act-order layer, g_idx-free."""
    seed = 400 + bits
    p, w = make_layer(48, 256, bits, 64, True, seed)
    qweight_sorted, perm = reorder_act_order(p["qweight"], p["g_idx"], bits=bits, group_size=64)
    assert perm is not None and not torch.equal(qweight_sorted, p["qweight"])
    x = make_x((3, 2), 256, torch.float16, seed)
    y = dequant_matmul(x.index_select(-1, perm), qweight_sorted, p["qzeros"], p["scales"], bits=bits,
                       group_size=64, path=path)
    assert_close(y, reference(x, w, None), TOL[torch.float16])


def test_reorder_act_order_leaves_what_it_cannot_sort():
    p, _ = make_layer(48, 256, 4, 64, False, 410)
    assert reorder_act_order(p["qweight"], None, bits=4, group_size=64) == (p["qweight"], None)
    in_order = (torch.arange(256) // 64).to(torch.int32)
    assert reorder_act_order(p["qweight"], in_order, bits=4, group_size=64) == (p["qweight"], None)
    # Groups of unequal size cannot become contiguous runs of group_size.
    uneven = torch.randint(0, 4, (256,), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    assert reorder_act_order(p["qweight"], uneven, bits=4, group_size=64) is None


def test_dispatch_by_m():
    assert [api.pick_path(m) for m in (1, 16, 17, 128, 129, 4096)] == [
        "splitk", "splitk", "gemm", "gemm", "dequant", "dequant"]


@pytest.mark.parametrize("dtype", _DTYPES)
def test_poisoned_outputs_are_overwritten(dtype):
    """The GEMM and dequantize kernels must write every element of their NaN-filled buffers."""
    p, w = make_layer(40, 96, 8, 32, False, 7)
    x = make_x((37,), 96, dtype, 7)
    args = (p["qweight"], p["qzeros"], p["scales"], None, None, 8, 32)
    out = torch.full((37, 40), float("nan"), dtype=dtype)
    triton_qmm.qmm_gemm(x, *args, out)
    assert_close(out, reference(x, w, None), TOL[dtype])
    wk = torch.full((96, 40), float("nan"), dtype=dtype)
    triton_qmm.dequantize_into(p["qweight"], p["qzeros"], p["scales"], None, 8, 32, wk)
    assert torch.isfinite(wk).all()
    assert_close(wk.double().t(), w, TOL[dtype])


def test_splitk_adds_into_accumulator():
    """The split-K kernel adds (atomics) into its fp32 buffer: a non-zero start shows up exactly."""
    p, w = make_layer(40, 96, 4, 32, False, 8)
    x = make_x((2,), 96, torch.float32, 8)
    start = torch.randn(2, 40)
    acc = start.clone()
    triton_qmm.qmm_splitk(x, p["qweight"], p["qzeros"], p["scales"], None, None, 4, 32, acc)
    assert_close(acc, reference(x, w, None) + start.double(), TOL[torch.float32])


def test_non_contiguous_x_and_empty_batch():
    p, w = make_layer(72, 192, 4, 64, False, 9)
    x = make_x((5,), 2 * 192, torch.float32, 9)[:, ::2]  # stride 2 along K
    y = dequant_matmul(x, p["qweight"], p["qzeros"], p["scales"], bits=4, group_size=64)
    assert_close(y, reference(x, w, None), TOL[torch.float32])
    empty = dequant_matmul(x[:0], p["qweight"], p["qzeros"], p["scales"], bits=4, group_size=64)
    assert empty.shape == (0, 72)


def test_torch_reference_path():
    """What runs on CPU without the interpreter (and on other devices)."""
    p, w = make_layer(72, 192, 8, 64, True, 10, scale_dtype=torch.bfloat16)
    x = make_x((3, 5), 192, torch.float32, 10)
    bias = make_bias(72, torch.float32, 10)
    y = api._reference(x, p["qweight"], p["qzeros"], p["scales"], p["g_idx"], bias, 8, 64)
    assert_close(y, reference(x, w, bias), TOL[torch.float32])
    dense = dequantize(p["qweight"], p["qzeros"], p["scales"], bits=8, group_size=64, g_idx=p["g_idx"])
    assert torch.equal(dense.double(), w.float().double())


def test_uses_triton_follows_environment(monkeypatch):
    assert uses_triton(torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not uses_triton(torch.device("cpu"))
    assert uses_triton(torch.device("cuda"))


@pytest.mark.parametrize("change,message", [
    (dict(bits=3), "bits 4 and 8"),
    (dict(group_size=100), "does not divide"),
    (dict(x=torch.randn(2, 100)), "input features"),
    (dict(qzeros=torch.zeros(4, 5, dtype=torch.int32)), "qzeros"),
    (dict(scales=torch.zeros(2, 72)), "scales"),
    (dict(scales=torch.zeros(3, 72, dtype=torch.int32)), "scales"),
    (dict(g_idx=torch.zeros(100, dtype=torch.int32)), "g_idx"),
    (dict(bias=torch.zeros(71)), "bias"),
    (dict(x=torch.randn(2, 192).to(torch.int32)), "float16"),
    (dict(path="fast"), "path"),
])
def test_rejects_bad_inputs(change, message):
    p, _ = make_layer(72, 192, 4, 64, False, 11)
    kwargs = dict(x=torch.randn(2, 192), qweight=p["qweight"], qzeros=p["qzeros"], scales=p["scales"], bits=4,
                  group_size=64)
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        dequant_matmul(**kwargs)


def test_custom_op_fake_and_compile():
    p, w = make_layer(72, 192, 4, 64, True, 12)
    x = make_x((2, 3), 192, torch.float32, 12)
    bias = make_bias(72, torch.float32, 12)
    args = (x, p["qweight"], p["qzeros"], p["scales"], p["g_idx"], bias, 4, 64, "auto")
    torch.library.opcheck(torch.ops.llmq.dequant_matmul.default, args,
                          test_utils=("test_schema", "test_faketensor"))

    def f(x):
        return dequant_matmul(x, p["qweight"], p["qzeros"], p["scales"], bits=4, group_size=64,
                              g_idx=p["g_idx"], bias=bias) * 2

    y = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    assert_close(y, 2 * reference(x, w, bias), TOL[torch.float32])


# CPU path -----------------------------------------------------------------

# The int4/int8 kernels take bf16 activations; their error is bf16's.
CPU_KERNEL_TOL = 6e-3


@pytest.mark.parametrize("n,k,bits,gs,act,zero,backend", [
    (96, 192, 4, 32, False, None, "int4pack"),
    (96, 192, 4, 64, True, None, "int4pack"),
    (96, 384, 4, 128, False, None, "int4pack"),
    (96, 384, 4, 128, True, None, "int4pack"),
    (96, 192, 4, -1, False, None, "int4pack"),   # 192 = 3 x 64: scales repeated over sub-groups
    (32, 512, 4, 512, False, None, "int4pack"),  # group 512 -> kernel group 256
    (72, 192, 4, 64, False, None, "dense"),      # N not a multiple of 16
    (96, 192, 4, 16, False, None, "dense"),      # group below the kernel's 32
    (72, 192, 8, -1, False, 128, "int8pack"),    # symmetric per-row int8
    (72, 192, 8, -1, True, 128, "int8pack"),
    (72, 192, 8, -1, False, None, "dense"),      # asymmetric: q - z leaves int8
    (72, 192, 8, 64, False, 128, "dense"),       # grouped int8
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path(n, k, bits, gs, act, zero, backend, dtype):
    seed = n + k + bits + gs
    p, w = make_layer(n, k, bits, gs, act, seed, zero=zero)
    state = prepare_cpu(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], bits, gs, dtype)
    assert isinstance(state, CpuState) and state.backend == backend
    tol = TOL[dtype] if backend == "dense" else max(TOL[dtype], CPU_KERNEL_TOL)
    for lead in [(1,), (2, 3), (17,)]:
        x = make_x(lead, k, dtype, seed)
        bias = make_bias(n, dtype, seed)
        y = cpu_matmul(x, state, bias)
        assert y.dtype == dtype
        assert_close(y, reference(x, w, bias), tol)


def test_cpu_prefill_dense_and_act_order_general_groups():
    p, w = make_layer(96, 192, 4, 64, True, 13)
    state = prepare_cpu(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], 4, 64, torch.float32,
                        prefill_dense=True)
    assert state.backend == "int4pack" and state.dense_weight is not None
    for m in (1, state.dense_rows, 33):
        x = make_x((m,), 192, torch.float32, m)
        assert_close(cpu_matmul(x, state), reference(x, w, None), CPU_KERNEL_TOL)
    # Groups of unequal size cannot be made contiguous runs of group_size: dense.
    g_idx = torch.randint(0, 3, (192,), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    uneven = prepare_cpu(p["qweight"], p["qzeros"], p["scales"], g_idx, 4, 64, torch.float32)
    assert uneven.backend == "dense"


def test_cpu_backend_that_does_not_fit():
    p, _ = make_layer(72, 192, 4, 64, False, 14)
    with pytest.raises(ValueError, match="divisible by 16"):
        prepare_cpu(p["qweight"], p["qzeros"], p["scales"], None, 4, 64, torch.float32, backend="int4pack")
    with pytest.raises(ValueError, match="bits 8"):
        prepare_cpu(p["qweight"], p["qzeros"], p["scales"], None, 4, 64, torch.float32, backend="int8pack")


def test_cpu_dense_backend_on_request():
    p, w = make_layer(96, 192, 4, 64, True, 15)
    state = prepare_cpu(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], 4, 64, torch.float32, backend="dense")
    assert state.backend == "dense" and state.weight.dtype == torch.float32
    x = make_x((2, 5), 192, torch.float32, 15)
    assert_close(cpu_matmul(x, state), reference(x, w, None), TOL[torch.float32])


def test_import_needs_no_triton_and_sets_nothing():
    """Importing llmq.kernels imports no triton, sets no env var; without triton the reference runs."""
    code = (
        "import os, sys\n"
        "env = dict(os.environ)\n"
        "import torch, llmq.kernels as K\n"
        "assert 'triton' not in sys.modules, 'triton imported eagerly'\n"
        "assert dict(os.environ) == env\n"
        "sys.modules['triton'] = None  # as if not installed\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "assert not K.uses_triton(torch.device('cpu'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_cuda_check_script_runs_on_the_interpreter():
    """scripts/check_kernels.py (the GPU correctness run) stays runnable: its matmul, poisoned-output,
    int8 and MoE checks pass on the interpreter."""
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "check_kernels.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, script, "--device", "cpu", "--quick"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "ok  matmul" in run.stdout and "ok  poisoned outputs" in run.stdout and "checks passed" in run.stdout
    assert "ok  int8 matmul" in run.stdout and "ok  MoE grouped kernels" in run.stdout


def _gpu_benchmark_on_the_interpreter(module: str, body: str) -> subprocess.CompletedProcess:
    """Run `body` in a process of its own under TRITON_INTERPRET=1, with scripts/`module` imported as B and
    `timer` standing in for triton's do_bench (interpreter timings mean nothing); it must exit 0."""
    script = os.path.join(os.path.dirname(__file__), "..", "scripts")
    code = (
        "import sys, time, torch\n"
        f"sys.path.insert(0, {script!r})\n"
        f"import {module} as B\n"
        "def timer(f, return_mode=None):\n"
        "    start = time.perf_counter(); f(); return (time.perf_counter() - start) * 1e3\n"
    ) + body
    run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TRITON_INTERPRET="1"),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_w8a8_gpu_benchmark_runs_on_the_interpreter():
    """scripts/bench_kernels.py --w8a8 (the int8 GEMM against cuBLAS, run on a GPU) stays runnable:
    its correctness check passes and it prints a row for each path and M on the interpreter."""
    run = _gpu_benchmark_on_the_interpreter(
        "bench_kernels",
        "for act in ('dynamic', 'static'):\n"
        "    args = B.parse_args(['--w8a8', '--shapes', '40x64', '--m', '1', '20', '--all-paths', '--act', act])\n"
        "    assert B.bench_w8a8(args, torch.float16, B.Timer(timer, graphs=False), device='cpu') == 0\n")
    rows = [line.split() for line in run.stdout.splitlines() if line.strip().startswith("40x64")]
    assert len(rows) == 2 * (4 + 3), run.stdout  # (act) x (triton, splitk, gemm, and gemv at M = 1 only)
    assert {(r[1], r[2]) for r in rows} == {("1", "splitk"), ("1", "gemm"), ("1", "gemv"), ("20", "splitk"),
                                            ("20", "gemm")}


def test_gpu_checks_script_runs_every_step_under_its_limit(tmp_path):
    """scripts/gpu_checks.sh (the one command a lent GPU runs) writes each step's output and exit
    status, goes on past a failed step, and stops a step at its limit."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="",
               LLMQ_GPU_LIMITS="60 120 120 120 0.05 120 120 120")
    run = subprocess.run(["bash", "scripts/gpu_checks.sh"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    steps = {p.stem: p.read_text().splitlines() for p in tmp_path.glob("*.txt")}
    assert set(steps) == {"env", "check", "w8a8_dynamic", "w8a8_static", "int4", "moe", "profile", "e2e"}
    assert "device none" in steps["env"] and steps["env"][-1] == "exit status 0"
    assert "no CUDA GPU found" in "\n".join(steps["check"]) and steps["check"][-1] == "exit status 1"
    for name in ("w8a8_dynamic", "w8a8_static"):
        assert "no CUDA GPU found" in "\n".join(steps[name]) and steps[name][-1] == "exit status 0"
    assert steps["int4"][-1] == "exit status 124"  # 50 ms: too short to import torch
    for name in ("moe", "profile", "e2e"):
        assert "no CUDA GPU found" in "\n".join(steps[name]) and steps[name][-1] == "exit status 0"


def test_gpu_checks_script_runs_the_named_steps_and_refuses_unknown_ones(tmp_path):
    """LLMQ_GPU_STEPS runs only the steps it names (a second, shorter command on a GPU reruns those that
    ran out of time); a step or limit list it cannot read stops the script with status 2 before any step."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")

    def run(out, **extra):
        return subprocess.run(["bash", "scripts/gpu_checks.sh"], cwd=root, env={**env, "OUT": str(out), **extra},
                              capture_output=True, text=True, timeout=300)

    chosen = run(tmp_path / "chosen", LLMQ_GPU_STEPS="env")
    assert chosen.returncode == 0, chosen.stdout[-3000:] + chosen.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "chosen").iterdir()) == ["env.txt"]
    unknown = run(tmp_path / "unknown", LLMQ_GPU_STEPS="env int3")
    assert unknown.returncode == 2 and "no step named int3" in unknown.stderr
    short = run(tmp_path / "short", LLMQ_GPU_LIMITS="60 60")
    assert short.returncode == 2 and "needs 8 numbers" in short.stderr
    assert not (tmp_path / "unknown").exists() and not (tmp_path / "short").exists()


def test_moe_gpu_benchmark_runs_on_the_interpreter():
    """scripts/bench_moe_kernels.py (the grouped MoE kernels against the fp16 experts block, run on a
    GPU) stays runnable: its checks pass and it prints a row per number of tokens on the interpreter."""
    run = _gpu_benchmark_on_the_interpreter(
        "bench_moe_kernels",
        "args = B.parse_args(['--hidden', '128', '--intermediate', '128', '--experts', '4', '--top-k', '2',\n"
        "                     '--tokens', '1', '20'])\n"
        "sys.exit(B.bench(args, timer, device='cpu'))\n")
    rows = [line.split() for line in run.stdout.splitlines() if line.split() and line.split()[0] in ("1", "20")]
    assert len(rows) == 2 and all(len(r) == 8 for r in rows)  # tokens, fp, then time, speedup, error per kernel
    assert all(float(r[4]) < 0.3 and float(r[7]) < 0.05 for r in rows)  # int4 and W8A8 against fp


def test_checkout_root_on_sys_path_loads_the_kernels_once():
    """transformers probes `import kernels`; from a checkout root that finds this repository's
    kernels/ folder, which must not define the modules or register the custom op a second time."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import sys\n"
        f"sys.path.insert(0, {root!r})\n"
        "import transformers\n"
        "from transformers import LlamaConfig  # noqa: F401  (imports the probe)\n"
        "import llmq.kernels\n"
        "shadow = [m for m in sys.modules if m.startswith('kernels.')]\n"
        "assert not shadow, shadow\n"
        "assert 'kernels' not in sys.modules or not hasattr(sys.modules['kernels'], 'dequant_matmul')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# QuantLinear's act-order re-layout --------------------------------------------

def _act_order_quantlinear(seed, act_order="reorder"):
    from llmq.modules import QuantLinear

    p, w = make_layer(64, 256, 4, 64, True, seed)
    layer = QuantLinear(256, 64, bits=4, group_size=64, desc_act=True, dtype=torch.float32)
    layer.act_order = act_order
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        getattr(layer, name).copy_(p[name])
    layer.post_load()
    return layer, p, w


def test_quantlinear_sorts_act_order_once_and_keeps_the_checkpoint_layout(tmp_path):
    layer, p, w = _act_order_quantlinear(500)
    original = p["qweight"].clone()
    x = make_x((2, 3), 256, torch.float32, 500)
    ref = reference(x, w, None)
    assert_close(layer.kernel_forward(x), ref, TOL[torch.float32])
    assert layer.perm is not None and not torch.equal(layer.qweight, original), "rows not sorted in place"
    sorted_codes, perm = layer.qweight.clone(), layer.perm
    assert_close(layer.kernel_forward(x), ref, TOL[torch.float32])
    assert layer.perm is perm and torch.equal(layer.qweight, sorted_codes), "sorted twice"
    # What leaves the layer is the checkpoint layout: state dict (so every save), codes, CPU path.
    wrapped = torch.nn.Sequential(layer)
    assert torch.equal(wrapped.state_dict()["0.qweight"], original)
    assert "0.perm" not in wrapped.state_dict()
    assert torch.equal(layer.checkpoint_qweight(), original)
    assert torch.equal(layer.quantized_weight().dequantize(torch.float64), w)
    assert_close(layer(x), ref, CPU_KERNEL_TOL)
    # Moved or copied (new tensors, same layout): still right, not re-sorted.
    layer._apply(lambda t: t.clone())
    assert_close(layer.kernel_forward(x), ref, TOL[torch.float32])
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert copied.perm is not None
        assert_close(copied.kernel_forward(x), ref, TOL[torch.float32])
        assert torch.equal(copied.state_dict()["qweight"], original)
    # Replaced by checkpoint-layout codes, as a loader or an offloading hook does: sorted again.
    layer._buffers["qweight"] = original.clone()
    assert_close(layer.kernel_forward(x), ref, TOL[torch.float32])
    # load_state_dict of the checkpoint tensors into the sorted layer.
    layer.load_state_dict({k[2:]: v for k, v in wrapped.state_dict().items()})
    assert layer.perm is None and torch.equal(layer.qweight, original)
    assert_close(layer.kernel_forward(x), ref, TOL[torch.float32])


def test_quantlinear_sorted_when_placed_on_its_device_and_after_an_offloading_hook():
    """Moved to a new device the layer decides its kernel layout at the move (on CUDA: sorted
    then; the interpreter's CPU runs sort on the first kernel call); buffers that accelerate's
    set_module_tensor_to_device puts in (its offloading hooks, before each call) hold the
    checkpoint layout of other weights and are sorted again."""
    from accelerate.utils import set_module_tensor_to_device

    layer, p, w = _act_order_quantlinear(502)
    assert layer.perm is None and torch.equal(layer.qweight, p["qweight"]), "sorted on CPU"
    x = make_x((4,), 256, torch.float32, 502)
    assert_close(layer.kernel_forward(x), reference(x, w, None), TOL[torch.float32])
    assert layer.perm is not None
    other, w_other = make_layer(64, 256, 4, 64, True, 503)
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        set_module_tensor_to_device(layer, name, "cpu", value=other[name].clone())
    assert layer.perm is None, "the old sort order outlived its codes"
    assert_close(layer.kernel_forward(x), reference(x, w_other, None), TOL[torch.float32])
    assert layer.perm is not None
    assert torch.equal(layer.state_dict()["qweight"], other["qweight"])
    assert_close(layer(x), reference(x, w_other, None), CPU_KERNEL_TOL)


def test_quantlinear_gather_mode_keeps_the_buffers():
    layer, p, w = _act_order_quantlinear(501, act_order="gather")
    x = make_x((5,), 256, torch.float16, 501)
    assert_close(layer.kernel_forward(x), reference(x, w, None), TOL[torch.float16])
    assert layer.perm is None and torch.equal(layer.qweight, p["qweight"])
