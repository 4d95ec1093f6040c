import pytest
import torch

from llmq.solvers.rtn import find_qparams, rtn_quantize


def _groups(w, gs):
    n, k = w.shape
    return w.double().reshape(n, k // gs, gs)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 192])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_error_within_half_step(bits, sym, group_size, scale_dtype):
    torch.manual_seed(bits * 100 + group_size)
    w = torch.randn(48, 192) * torch.rand(48, 1) * 0.1
    w[0, :group_size] += 0.3  # an all-positive-leaning group
    qw = rtn_quantize(w, bits, group_size, sym, scale_dtype)
    assert qw.codes.min() >= 0 and qw.codes.max() <= 2**bits - 1
    # Reference dequantization in float64 from the integer codes.
    s = qw.scales.double().repeat_interleave(group_size, dim=1)
    z = qw.zeros.double().repeat_interleave(group_size, dim=1)
    deq = (qw.codes.double() - z) * s
    err = (deq - w.double()).abs()
    half_step = s / 2
    # Scales are rounded to their storage dtype, which may move the clamped
    # extremes by one rounding of the scale.
    slack = s * torch.finfo(scale_dtype).eps * 2**bits
    assert bool((err <= half_step + slack + 1e-12).all())
    if sym:
        assert bool((qw.zeros == 2 ** (bits - 1)).all())
    else:
        assert qw.zeros.min() >= 0 and qw.zeros.max() <= 2**bits - 1


def test_symmetric_range_uses_extra_negative_code():
    w = torch.tensor([[-8.0, 1.0, 2.0, 3.0, -1.0, 5.0, -6.0, 7.0]])
    scale, zero = find_qparams(w, 4, True, torch.float32)
    assert float(scale) == pytest.approx(1.0)  # -8 fits with s = 1, so does 7
    assert float(zero) == 8
    qw = rtn_quantize(w, 4, 8, True, torch.float32)
    assert torch.equal(qw.dequantize(), w)


def test_asymmetric_zero_is_exact_integer_and_zero_is_representable():
    torch.manual_seed(0)
    w = torch.rand(16, 64) + 0.1  # all positive: zero point at the bottom
    qw = rtn_quantize(w, 4, 32, False, torch.float16)
    assert bool((qw.zeros == 0).all())
    # Mixed signs, with exact zeros scattered through every group (as pruned or padded
    # weights are): the integer zero point lies inside the code range, so every exact
    # 0 is stored as the zero-point code and dequantizes to exactly 0.
    w2 = torch.randn(16, 64)
    holes = torch.rand(16, 64) < 0.2
    w2[holes] = 0.0
    qw2 = rtn_quantize(w2, 4, 32, False, torch.float16)
    assert qw2.zeros.dtype == torch.int32
    assert qw2.zeros.min() >= 0 and qw2.zeros.max() <= 15
    zeros_at = qw2.zeros.repeat_interleave(32, dim=1)
    assert torch.equal(qw2.codes[holes].long(), zeros_at[holes].long())
    deq = (qw2.codes.double() - zeros_at.double()) * qw2.scales.double().repeat_interleave(32, dim=1)
    assert bool((deq[holes] == 0).all())
    assert bool((qw2.dequantize()[holes] == 0).all())


def test_all_zero_group_is_exact():
    w = torch.zeros(8, 32)
    w[1] = torch.randn(32)
    for sym in (True, False):
        qw = rtn_quantize(w, 4, 32, sym, torch.float16)
        assert torch.isfinite(qw.scales.float()).all()
        assert bool((qw.dequantize()[0] == 0).all())


@pytest.mark.parametrize("bits,sym,size", [(8, True, 1e-4), (8, False, 1e-4), (4, True, 1e-5), (4, False, 1e-7)])
def test_groups_of_tiny_weights_keep_their_values(bits, sym, size):
    # Scales below fp16's smallest normal value (6.1e-5) are subnormal, or its smallest positive value:
    # such groups were given scale 1, every weight quantized to 0.
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(bits)).double() * size
    qw = rtn_quantize(w.float(), bits, 32, sym, torch.float16)
    assert bool((qw.scales > 0).all()) and bool((qw.scales.float() < 1e-4).all())
    deq = (qw.codes.double() - qw.zeros.double().repeat_interleave(32, 1)) * qw.scales.double().repeat_interleave(32, 1)
    assert (deq - w).norm() / w.norm() < (0.02 if bits == 8 else 0.3)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        rtn_quantize(torch.randn(8, 96), 4, 64, True, torch.float16)


@pytest.mark.parametrize("sym", [True, False])
def test_search_qparams_never_worse_than_min_max(sym):
    from llmq.solvers.rtn import dequantize, quantize, search_qparams

    torch.manual_seed(3)
    w = torch.randn(64, 6, 32) * torch.rand(64, 6, 1)
    w[0, 0, 0] = 8.0  # an outlier: clipping it pays for every other weight of its group

    def err(s, z):
        q = quantize(w, s.unsqueeze(-1), z.unsqueeze(-1), 4)
        return (dequantize(q, s.unsqueeze(-1), z.unsqueeze(-1)) - w).abs().pow(2.4).sum(-1)

    s0, z0 = find_qparams(w, 4, sym, torch.float16)
    s1, z1 = search_qparams(w, 4, sym, torch.float16)
    assert bool((err(s1, z1) <= err(s0, z0) + 1e-6).all())
    assert err(s1, z1)[0, 0] < err(s0, z0)[0, 0]
    assert bool((s1 <= s0 * (1 + 1e-3)).all())  # ranges only ever shrink
    if sym:
        assert bool((z1 == 8).all())


def test_search_qparams_in_row_chunks_equals_one_pass(monkeypatch):
    # The range search goes over large weights in row chunks to bound its memory; rows
    # are independent, so the result is the same as in one pass, bit for bit.
    from llmq.solvers import rtn

    g = torch.Generator().manual_seed(11)
    w = torch.randn(37, 3, 16, generator=g) * torch.rand(37, 3, 1, generator=g)
    one = rtn.search_qparams(w, 4, False, torch.float16)
    monkeypatch.setattr(rtn, "SEARCH_CHUNK_ELEMENTS", 50 * 48 * 5)  # 5 rows per chunk
    chunked = rtn.search_qparams(w, 4, False, torch.float16)
    assert torch.equal(one[0], chunked[0]) and torch.equal(one[1], chunked[1])
    monkeypatch.setattr(rtn, "SEARCH_CHUNK_ELEMENTS", 1)  # one row per chunk
    single = rtn.search_qparams(w, 4, True, torch.float16)
    monkeypatch.setattr(rtn, "SEARCH_CHUNK_ELEMENTS", 1 << 30)
    assert all(torch.equal(a, b) for a, b in zip(single, rtn.search_qparams(w, 4, True, torch.float16)))


@pytest.mark.parametrize("sym", [False, True])
def test_search_qparams_picks_the_shrink_with_the_least_float64_error(sym):
    # Reference: every shrink of the grid quantized by the plain min-max rule, its error
    # sum |w - dequant|^2.4 computed in float64; the search must pick the minimiser
    # wherever it is clear of the runner-up (fp32 summation may order near-ties differently).
    from llmq.solvers import rtn

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    w = (torch.randn(96, 32, generator=g) * torch.rand(96, 1, generator=g)).t()  # a transposed view, as GPTQ passes
    scale, zero = rtn.search_qparams(w, 4, sym, torch.float16)
    shrinks = torch.linspace(1.0, 0.5, 50)
    errs, params = [], []
    for p in shrinks:
        s, z = rtn.find_qparams(w * p, 4, sym, torch.float16)
        q = torch.clamp(torch.round(w.double() / s.double()[:, None]) + z.double()[:, None], 0, 15)
        errs.append(((q - z.double()[:, None]) * s.double()[:, None] - w.double()).abs().pow(2.4).sum(-1))
        params.append((s, z))
    errs = torch.stack(errs)  # [P, groups]
    top2 = errs.topk(2, dim=0, largest=False)
    clear = (top2.values[1] - top2.values[0]) > 1e-5 * top2.values[0]
    assert int(clear.sum()) > w.shape[0] // 2
    for col in clear.nonzero().flatten().tolist():
        s, z = params[int(top2.indices[0, col])]
        assert scale[col] == s[col] and zero[col] == z[col]
