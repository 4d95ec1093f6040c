"""The Triton W8A8 kernels under the interpreter, against integer products built in int64.

TRITON_INTERPRET=1 is set (by conftest, and here for running this file alone)
before the kernel module is imported, or the module is reloaded.
"""

import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from llmq.kernels import int8_linear, quantize_activations  # noqa: E402

pytest.importorskip("triton")
from llmq.kernels import triton_int8, triton_tuning  # noqa: E402

if not triton_tuning.INTERPRET:  # imported before TRITON_INTERPRET was set: define the kernels again
    importlib.reload(triton_tuning)
    triton_int8 = importlib.reload(triton_int8)

PATHS = ["splitk", "gemm", "gemv"]


def _weights(n, k, g):
    return torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m", [1, 7, 19])
def test_int32_products_are_exact(path, m):
    # Integer activations with scale 1 and unit weight scales: the output is the
    # int32 accumulator itself, exactly representable in fp32.
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    k, n = 200, 72  # neither a multiple of the tiles: masks are exercised
    x = torch.randint(-128, 128, (m, k), generator=g).float()
    w = _weights(n, k, g)
    y = int8_linear(x, w, torch.ones(n, 1), torch.ones(1), path=path)
    assert torch.equal(y, (x.long() @ w.long().t()).float())


@pytest.mark.parametrize("m", [3, 40])
def test_per_token_codes_equal_the_torch_quantizer(m):
    g = torch.Generator().manual_seed(m)
    k, n = 96, 48
    x = torch.randn(m, k, generator=g) * 2
    x[:, 5] *= 50  # outlier channel
    x[1] = 0  # an all-zero row
    w = _weights(n, k, g)
    q, s = quantize_activations(x)
    acc = q.long() @ w.long().t()
    y = int8_linear(x, w, torch.ones(n, 1), path="gemm")
    # One program per tile: acc * s_x * 1 rounds once in fp32, as torch does.
    assert torch.equal(y, acc.float() * s)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scales_bias_and_dtypes_against_the_integer_reference(path, static, dtype):
    g = torch.Generator().manual_seed(11)
    m, k, n = 9 if path == "splitk" else 33, 128, 64
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    w = _weights(n, k, g)
    ws = torch.rand(n, 1, generator=g) * 0.01 + 1e-3
    bias = torch.randn(n, generator=g)
    input_scale = torch.tensor([x.float().abs().max().item() / 127 * 0.6]) if static else None  # clips
    y = int8_linear(x, w, ws, input_scale, bias, path=path)
    q, s = quantize_activations(x, input_scale)
    expected = (q.long() @ w.long().t()).double() * s.double() * ws.double().t() + bias.double()
    assert y.dtype == dtype and y.shape == (m, n)
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert ((y.double() - expected).abs().max() / expected.abs().max()) < tol
    # The CPU path computes the same thing.
    cpu = int8_linear(x, w, ws, input_scale, bias, path="intmm")
    assert ((y.double() - cpu.double()).abs().max() / expected.abs().max()) < tol


def test_strided_input_and_leading_dims():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 128, generator=g)[..., ::2]  # stride 2 along K
    w = _weights(16, 64, g)
    ws = torch.rand(16, 1, generator=g)
    y = int8_linear(x, w, ws, path="gemm")
    assert y.shape == (2, 3, 16)
    torch.testing.assert_close(y, int8_linear(x.contiguous(), w, ws, path="intmm"), rtol=1e-5, atol=1e-5)
