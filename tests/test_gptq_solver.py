"""GPTQ solver and Hessian accumulation, on fresh random tensors (no models)."""

from __future__ import annotations

import pytest
import torch

from llmq.errors import LlmqError
from llmq.solvers.gptq import HessianAccumulator, _gptq, gptq_quantize, gptq_quantize_many
from llmq.solvers.rtn import find_qparams, rtn_quantize


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated_inputs(n: int, k: int, gen: torch.Generator, outliers: int = 4) -> torch.Tensor:
    """Rows x = z @ A (random mixing) plus a few large outlier channels."""
    z = torch.randn(n, k, generator=gen)
    A = torch.randn(k, k, generator=gen) / k**0.5
    x = z @ A + 0.1 * torch.randn(n, k, generator=gen)
    cols = torch.randperm(k, generator=gen)[:outliers]
    x[:, cols] *= 15.0
    return x


def _hessian64(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    return 2.0 / x.shape[0] * x.t() @ x


def _out_err(x: torch.Tensor, W: torch.Tensor, Q: torch.Tensor) -> float:
    """||X W^T - X Q^T||_F^2 in float64."""
    return float(((x.double() @ (W.double() - Q.double()).t()) ** 2).sum())


def _dequant64(qw) -> torch.Tensor:
    """Independent float64 dequantization from the integer codes and g_idx."""
    k = qw.codes.shape[1]
    g = qw.g_idx.long() if qw.g_idx is not None else torch.arange(k) // qw.group_size
    s = qw.scales.double()[:, g]
    z = qw.zeros.double()[:, g]
    return (qw.codes.double() - z) * s


# --- HessianAccumulator ------------------------------------------------------

def test_hessian_running_mean_matches_float64():
    gen = _gen(0)
    k = 48
    batches = [torch.randn(2, 37, k, generator=gen), torch.randn(5, k, generator=gen),
               torch.randn(120, k, generator=gen) * 3]
    acc = HessianAccumulator(k)
    for b in batches:
        acc.add_batch(b)
    x = torch.cat([b.reshape(-1, k) for b in batches])
    ref = _hessian64(x)
    assert acc.nsamples == x.shape[0]
    assert acc.hessian.dtype == torch.float32 and acc.hessian.shape == (k, k)
    torch.testing.assert_close(acc.hessian.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("k", [300, 1100])  # 2 bands of rows (150 each), 8 bands of 137 or 138
def test_hessian_by_bands_of_rows_matches_float64(k):
    gen = _gen(2)
    batches = [torch.randn(3, 70, k, generator=gen), torch.randn(400, k, generator=gen) * 2]
    acc = HessianAccumulator(k)
    for b in batches:
        acc.add_batch(b)
    ref = _hessian64(torch.cat([b.reshape(-1, k) for b in batches]))
    # Both triangles, the one multiplied and the one copied from it.
    torch.testing.assert_close(acc.hessian.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_hessian_bf16_mode_within_bf16_tolerance():
    gen = _gen(1)
    k = 64
    batches = [torch.randn(50, k, generator=gen) for _ in range(3)]
    acc = HessianAccumulator(k, input_dtype=torch.bfloat16)
    for b in batches:
        acc.add_batch(b.half())  # any float input dtype
    ref = _hessian64(torch.cat(batches))
    err = (acc.hessian.double() - ref).abs().max() / ref.abs().max()
    assert acc.hessian.dtype == torch.float32
    assert err < 2e-2, err
    # fp16 inputs in the default mode accumulate in fp32 from the fp16 values
    acc32 = HessianAccumulator(k)
    for b in batches:
        acc32.add_batch(b.half())
    ref16 = _hessian64(torch.cat([b.half() for b in batches]))
    torch.testing.assert_close(acc32.hessian.double(), ref16, rtol=1e-5, atol=1e-5 * float(ref16.abs().max()))


def test_hessian_rejects_wrong_width():
    with pytest.raises(LlmqError):
        HessianAccumulator(8).add_batch(torch.randn(3, 9))


# --- GPTQ vs RTN --------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [16, 64, 128])  # 128 = K: one group per row
def test_identity_hessian_reproduces_rtn(bits, sym, group_size):
    gen = _gen(10 + bits + group_size + sym)
    n, k = 24, 128
    W = torch.randn(n, k, generator=gen) * 0.05
    qw, stats = gptq_quantize(W, torch.eye(k), bits=bits, group_size=group_size, sym=sym,
                              scale_dtype=torch.float16, damp=0.0)
    ref = rtn_quantize(W, bits, group_size, sym, torch.float16)
    assert torch.equal(qw.codes, ref.codes)
    assert torch.equal(qw.scales, ref.scales)
    assert torch.equal(qw.zeros, ref.zeros)
    assert qw.g_idx is None and stats.damp == 0.0 and not stats.damp_raised


@pytest.mark.parametrize("clip_search", [False, True])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size,desc_act,static", [
    (32, False, False), (256, False, False), (32, True, False), (256, True, False), (32, True, True)])
def test_gptq_beats_rtn_on_correlated_inputs(sym, group_size, desc_act, static, clip_search):
    """K = 256 spans two blocks of 128, so the lazy trailing update is exercised."""
    gen = _gen(20 + group_size + 2 * sym + 4 * desc_act + 8 * static)
    n, k, rows = 32, 256, 768
    x = _correlated_inputs(rows, k, gen)
    W = torch.randn(n, k, generator=gen) * 0.05
    acc = HessianAccumulator(k)
    acc.add_batch(x)
    qw, stats = gptq_quantize(W, acc.hessian, bits=4, group_size=group_size, sym=sym,
                              scale_dtype=torch.float16, desc_act=desc_act, static_groups=static,
                              clip_search=clip_search)
    rtn = rtn_quantize(W, 4, group_size, sym, torch.float16)
    e_gptq = _out_err(x, W, _dequant64(qw))
    e_rtn = _out_err(x, W, _dequant64(rtn))
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    # output_mse is ||X (W - Q)^T||^2 / (rows N) on the calibration rows
    assert stats.output_mse == pytest.approx(e_gptq / (rows * n), rel=2e-3)
    assert stats.proxy_loss > 0 and stats.dead_columns == 0 and stats.seconds > 0


# --- exactness of what is stored -------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(bits=4, group_size=32, sym=True),
    dict(bits=3, group_size=64, sym=False),
    dict(bits=4, group_size=32, sym=False, desc_act=True),
    dict(bits=8, group_size=128, sym=True, desc_act=True),
    dict(bits=4, group_size=32, sym=True, desc_act=True, static_groups=True),
    dict(bits=4, group_size=96, sym=False, block_size=128),  # a group straddles a block edge
    dict(bits=4, group_size=32, sym=True, clip_search=True),
    dict(bits=4, group_size=32, sym=False, desc_act=True, static_groups=True, clip_search=True),
])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_stored_weight_dequantizes_to_solver_q(kw, scale_dtype):
    gen = _gen(30 + kw["bits"] + kw["group_size"])
    n, k = 20, 192 if kw["group_size"] != 128 else 256
    if kw["group_size"] == 96:
        k = 384
    x = _correlated_inputs(300, k, gen) * (torch.rand(k, generator=gen) * 4 + 0.1)
    W = torch.randn(n, k, generator=gen) * 0.02
    H = _hessian64(x).float()
    (qw,), (stats,), Q = _gptq(W, [n], H, scale_dtype=scale_dtype, return_q=True, **kw)
    assert torch.equal(qw.dequantize(torch.float32), Q)  # bitwise, fp32
    assert torch.equal(_dequant64(qw).float(), Q)  # independent float64 reference
    maxq = 2 ** kw["bits"] - 1
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= maxq
    assert qw.zeros.dtype == torch.int32
    assert int(qw.zeros.min()) >= 0 and int(qw.zeros.max()) <= maxq
    assert qw.scales.dtype == scale_dtype and bool((qw.scales > 0).all())
    assert qw.scales.shape == (n, k // kw["group_size"])


def test_inputs_are_not_modified():
    gen = _gen(40)
    k = 64
    x = _correlated_inputs(200, k, gen)
    x[:, 5] = 0  # a dead column: the solver must fix up its own copy
    H = _hessian64(x).float()
    W = torch.randn(16, k, generator=gen)
    H0, W0 = H.clone(), W.clone()
    gptq_quantize(W, H, bits=4, group_size=32, sym=True, scale_dtype=torch.float16, desc_act=True)
    assert torch.equal(H, H0) and torch.equal(W, W0)


def test_parameter_weight_without_autograd():
    gen = _gen(41)
    lin = torch.nn.Linear(64, 8)
    x = _correlated_inputs(100, 64, gen)
    qw, _ = gptq_quantize(lin.weight, _hessian64(x).float(), bits=4, group_size=64, sym=True,
                          scale_dtype=torch.float16)
    assert not qw.scales.requires_grad and qw.codes.shape == (8, 64)


# --- act-order and static groups -------------------------------------------

def _scaled_channels(rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Inputs whose channel scales vary over three orders of magnitude."""
    scale = 10.0 ** (torch.rand(k, generator=gen) * 3 - 1.5)
    return _correlated_inputs(rows, k, gen, outliers=0) * scale


def test_act_order_group_map_and_dequant():
    gen = _gen(50)
    n, k, g = 16, 128, 32
    x = _scaled_channels(400, k, gen)
    W = torch.randn(n, k, generator=gen) * 0.05
    H = _hessian64(x).float()
    (qw,), _, Q = _gptq(W, [n], H, bits=4, group_size=g, sym=True, scale_dtype=torch.float16,
                        desc_act=True, return_q=True)
    gi = qw.g_idx.long()
    assert gi.shape == (k,) and qw.g_idx.dtype == torch.int32
    assert torch.equal(torch.bincount(gi, minlength=k // g), torch.full((k // g,), g))
    # groups follow decreasing diag(H): group 0 holds the g largest diagonals
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    assert torch.equal(gi[order], torch.arange(k) // g)
    assert not torch.equal(gi, torch.arange(k) // g)  # act-order really permuted
    assert torch.equal(_dequant64(qw).float(), Q)


def test_act_order_helps_or_is_neutral_per_row():
    gen = _gen(51)
    n, k = 32, 128
    x = _scaled_channels(500, k, gen)
    W = torch.randn(n, k, generator=gen) * 0.05
    H = _hessian64(x).float()
    kw = dict(bits=4, group_size=k, sym=True, scale_dtype=torch.float16)
    plain, _ = gptq_quantize(W, H, **kw)
    act, _ = gptq_quantize(W, H, desc_act=True, **kw)
    e_plain = _out_err(x, W, _dequant64(plain))
    e_act = _out_err(x, W, _dequant64(act))
    assert e_act <= 1.02 * e_plain, (e_act, e_plain)


def test_static_groups_use_natural_groups_of_original_weight():
    gen = _gen(52)
    n, k, g = 16, 128, 32
    x = _scaled_channels(400, k, gen)
    W = torch.randn(n, k, generator=gen) * 0.05
    qw, _ = gptq_quantize(W, _hessian64(x).float(), bits=4, group_size=g, sym=False,
                          scale_dtype=torch.float16, desc_act=True, static_groups=True)
    assert torch.equal(qw.g_idx.long(), torch.arange(k) // g)
    s, z = find_qparams(W.reshape(n, k // g, g), 4, False, torch.float16)
    assert torch.equal(qw.scales.float(), s) and torch.equal(qw.zeros, z.to(torch.int32))


# --- dead columns, damping ---------------------------------------------------

def test_dead_columns_quantize_to_zero():
    gen = _gen(60)
    n, k = 16, 64
    x = _correlated_inputs(300, k, gen)
    dead = [3, 40, 41]
    x[:, dead] = 0
    W = torch.randn(n, k, generator=gen)
    for desc_act in (False, True):
        qw, stats = gptq_quantize(W, _hessian64(x).float(), bits=4, group_size=32, sym=False,
                                  scale_dtype=torch.float16, desc_act=desc_act)
        deq = _dequant64(qw)
        assert bool(torch.isfinite(deq).all())
        assert stats.dead_columns == len(dead)
        assert bool((deq[:, dead] == 0).all())
        assert bool((deq.abs().sum(0) > 0).sum() > k - len(dead) - 2)


def test_rank_deficient_hessian_raises_damp():
    gen = _gen(61)
    n, k = 16, 64
    x = torch.randn(8, 16, generator=gen) @ torch.randn(16, k, generator=gen)  # rank 8
    W = torch.randn(n, k, generator=gen)
    qw, stats = gptq_quantize(W, _hessian64(x).float(), bits=4, group_size=32, sym=True,
                              scale_dtype=torch.float16, damp=0.0)
    assert stats.damp_raised and stats.damp > 0
    assert bool(torch.isfinite(_dequant64(qw)).all()) and stats.output_mse >= 0


def test_indefinite_hessian_raises_damp():
    gen = _gen(62)
    k = 48
    x = _correlated_inputs(200, k, gen, outliers=0)
    H = _hessian64(x)
    H -= 1.05 * float(torch.linalg.eigvalsh(H)[0]) * torch.eye(k, dtype=torch.float64)
    H -= 1e-3 * float(torch.diagonal(H).mean()) * torch.eye(k, dtype=torch.float64)  # min eig < 0
    W = torch.randn(8, k, generator=gen)
    qw, stats = gptq_quantize(W, H.float(), bits=4, group_size=48, sym=True,
                              scale_dtype=torch.float16, damp=1e-6)
    assert stats.damp_raised and stats.damp >= 1e-5
    assert bool(torch.isfinite(_dequant64(qw)).all())


def test_output_mse_with_heavy_damping():
    """Heavy damping takes the direct tr(D H D^T) path; the value must not change meaning."""
    gen = _gen(63)
    n, k, rows = 16, 64, 300
    x = _correlated_inputs(rows, k, gen)
    W = torch.randn(n, k, generator=gen) * 0.05
    for damp in (0.01, 30.0):
        qw, stats = gptq_quantize(W, _hessian64(x).float(), bits=4, group_size=32, sym=True,
                                  scale_dtype=torch.float16, damp=damp)
        assert stats.damp == damp and not stats.damp_raised
        assert stats.output_mse == pytest.approx(_out_err(x, W, _dequant64(qw)) / (rows * n), rel=2e-3)


def test_nonfinite_hessian_is_a_clear_error():
    H = torch.eye(32)
    H[1, 2] = float("nan")
    with pytest.raises(LlmqError, match="inf/nan"):
        gptq_quantize(torch.randn(4, 32), H, bits=4, group_size=32, sym=True, scale_dtype=torch.float16)


def test_group_size_must_divide():
    with pytest.raises(LlmqError, match="does not divide"):
        gptq_quantize(torch.randn(4, 96), torch.eye(96), bits=4, group_size=64, sym=True,
                      scale_dtype=torch.float16)


# --- lazy blocks, shared inputs ----------------------------------------------

@pytest.mark.parametrize("group_size", [16, 96])
def test_block_size_does_not_change_the_result(group_size):
    """Lazy batch updates are a reordering of the same arithmetic."""
    gen = _gen(70 + group_size)
    n, k = 24, 192
    x = _correlated_inputs(400, k, gen)
    W = torch.randn(n, k, generator=gen) * 0.05
    H = _hessian64(x).float()
    kw = dict(bits=4, group_size=group_size, sym=False, scale_dtype=torch.float16)
    ref, _ = gptq_quantize(W, H, block_size=k, **kw)
    for b in (32, 128):
        qw, _ = gptq_quantize(W, H, block_size=b, **kw)
        same = (qw.codes == ref.codes).float().mean()
        assert same > 0.995, (b, same)
        e, e_ref = _out_err(x, W, _dequant64(qw)), _out_err(x, W, _dequant64(ref))
        assert abs(e - e_ref) < 0.01 * e_ref


def test_many_equals_separate_calls():
    gen = _gen(80)
    k = 96
    x = _correlated_inputs(300, k, gen)
    H = _hessian64(x).float()
    Ws = [torch.randn(n, k, generator=gen) * 0.05 for n in (32, 8, 8)]
    kw = dict(bits=4, group_size=32, sym=True, scale_dtype=torch.float16, desc_act=True)
    many = gptq_quantize_many(Ws, H, **kw)
    assert len(many) == 3
    for W, (qw, stats) in zip(Ws, many):
        one, one_stats = gptq_quantize(W, H, **kw)
        assert qw.codes.shape == W.shape
        assert (qw.codes == one.codes).float().mean() > 0.995
        assert torch.equal(qw.g_idx, one.g_idx)
        assert stats.output_mse == pytest.approx(one_stats.output_mse, rel=1e-2)
