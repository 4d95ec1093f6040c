"""torch.distributed: two gloo processes calibrate one model; the result matches one process."""

import json
import os
import socket
import subprocess
import sys

import numpy
import pytest
import torch
import torch.multiprocessing as mp

import llmq
import llmq.cli
from llmq import distributed
from llmq.errors import LlmqError
from llmq.kernels.layout import unpack_rows
from llmq.methods.awq import shared_input_stats
from llmq.methods.w8a8 import SharedSample
from llmq.outdir import stale_partials
from llmq.solvers.awq import input_stats
from llmq.solvers.gptq import HessianAccumulator, gptq_quantize_many
from llmq.solvers.smoothquant import channel_absmax, search_smoothing, static_scale
from conftest import checkpoint_tensors, model_folder_with_text, random_ids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _by_value(obj):
    """obj with its tensors as numpy arrays, which a queue pickles by value.

    A tensor put on a torch.multiprocessing queue travels as a handle to the
    sender's shared memory; a sender that exits before the receiver has opened
    it leaves an EOFError on the other side. Results cross as values instead.
    """
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_by_value(o) for o in obj)
    return obj


def _as_tensors(obj):
    if isinstance(obj, numpy.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_as_tensors(o) for o in obj)
    return obj


def _spawn_two_ranks(worker, *args) -> list:
    """What worker(rank, 2, port, *args, out) put on the queue in each of two spawned ranks."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(r, 2, port, *args, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = [_as_tensors(out.get(timeout=120)) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return results


def _worker(rank, world, port, rows, weights, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    distributed.setup("cpu")
    try:
        acc = HessianAccumulator(rows[0].shape[-1])
        for batch in rows[rank::world]:  # this rank's share, in batches of different sizes
            acc.add_batch(batch)
        distributed.all_reduce_hessian(acc)
        solved = distributed.solve_shared(
            lambda idx: [("rank", rank, i, gptq_quantize_many([weights[i]], acc.hessian, bits=4, group_size=8,
                                                              sym=True, scale_dtype=torch.float16)[0][0])
                         for i in idx], 3)
        out.put(_by_value((rank, acc.hessian, acc.nsamples, [(r, i, qw.codes) for _, r, i, qw in solved])))
    finally:
        distributed.teardown()


def test_hessians_reduce_to_the_mean_over_every_rank_and_solves_are_shared():
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(n, 16, generator=g) for n in (5, 9, 3, 7, 4)]
    weights = [torch.randn(8, 16, generator=g) for _ in range(3)]
    results = sorted(_spawn_two_ranks(_worker, rows, weights), key=lambda r: r[0])
    x = torch.cat(rows).double()
    reference = 2 * x.T @ x / x.shape[0]  # float64, every row once
    for rank, H, n, solved in results:
        assert n == x.shape[0]
        torch.testing.assert_close(H.double(), reference, rtol=1e-5, atol=1e-6)
        # Linear i was solved on rank i % 2 and every rank holds all three results.
        assert [(r, i) for r, i, _ in solved] == [(0, 0), (1, 1), (0, 2)]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(results[0][3], results[1][3]))



def _stats_worker(rank, world, port, x, max_rows, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    distributed.setup("cpu")
    try:
        stats = shared_input_stats(distributed.my_windows(x), max_rows)
        out.put(_by_value((rank, stats.gram, stats.mean_abs, stats.rows)))
    finally:
        distributed.teardown()


@pytest.mark.parametrize("max_rows", [1000, 37])  # every row, or a sample spread over the whole batch
def test_awq_statistics_reduce_to_those_of_one_process(max_rows):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 11, 6, generator=g) * torch.rand(6, generator=g)  # 5 windows of 11 tokens, 6 channels
    results = _spawn_two_ranks(_stats_worker, x, max_rows)
    rows = x.reshape(-1, 6).double()
    n = rows.shape[0]
    picked = rows if n <= max_rows else rows[torch.linspace(0, n - 1, max_rows).round().long()]
    for _, gram, mean_abs, count in results:  # float64 references over the whole batch
        assert count == picked.shape[0]
        torch.testing.assert_close(gram.double(), picked.T @ picked / count, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mean_abs.double(), rows.abs().mean(0), rtol=1e-6, atol=1e-7)
    one = input_stats(x, max_rows)
    torch.testing.assert_close(results[0][1], one.gram, rtol=1e-5, atol=1e-6)
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][2], results[1][2])


def _expert_rows_worker(rank, world, port, x, routed, max_rows, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    distributed.setup("cpu")
    try:
        mine = distributed.my_windows(x)  # [windows, tokens, K]: this rank's share
        b, t, k = mine.shape
        flat = mine.reshape(-1, k)
        everyone, _ = distributed.global_rows(b, t)
        local = torch.nonzero(torch.isin(everyone, routed)).reshape(-1)  # this rank's routed tokens, in order
        rows, positions = flat[local], everyone[local]
        picked = distributed.spread_rows(rows, max_rows, positions)
        stats = shared_input_stats(rows, max_rows, positions)
        sample = SharedSample(rows, positions)
        out.put(_by_value((rank, rows.shape[0], picked, stats.gram, stats.mean_abs, stats.rows,
                           sample.channel_absmax(), sample.numel())))
    finally:
        distributed.teardown()


@pytest.mark.parametrize("routed", [
    [1, 2, 3, 5, 8, 9, 21, 22, 24, 25, 26, 28, 29],  # tokens of windows 0 and 2 only: rank 1 holds none
    [0, 4, 11, 12, 13, 19, 20, 23, 27, 31, 32, 36, 38, 39],  # every window, scattered over both ranks
])
@pytest.mark.parametrize("max_rows", [1000, 7])  # every row, or a sample spread over all of them
def test_expert_rows_are_spread_as_one_process_picks_them(routed, max_rows):
    # An expert's rows are the tokens routed to it; each rank picks its part of what one process picks.
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 10, 5, generator=g)  # 4 windows of 10 tokens: rank 0 holds windows 0 and 2
    routed = torch.tensor(routed)
    rows = x.reshape(-1, 5)[routed]  # one process: the expert's rows in batch order
    picked = rows if rows.shape[0] <= max_rows else rows[torch.linspace(0, rows.shape[0] - 1, max_rows).round().long()]
    one = input_stats(rows, max_rows)
    results = sorted(_spawn_two_ranks(_expert_rows_worker, x, routed, max_rows), key=lambda r: r[0])
    assert [r[1] for r in results] == [sum((p // 10) % 2 == r for p in routed.tolist()) for r in (0, 1)]
    # Together the ranks pick exactly one process's rows (random rows: each is told apart by its values).
    together = torch.cat([r[2] for r in results])
    assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, picked.tolist()))
    for _, _, _, gram, mean_abs, count, absmax, numel in results:
        assert count == picked.shape[0] and numel == rows.numel()
        torch.testing.assert_close(gram, one.gram, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mean_abs.double(), rows.double().abs().mean(0), rtol=1e-6, atol=1e-7)
        assert torch.equal(absmax, rows.abs().amax(0))


def _quantize_by_two_ranks(src, out, args) -> subprocess.CompletedProcess:
    """`llmq quantize src out *args` by 2 gloo ranks under torchrun (1 thread each); it must succeed."""
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1", LLMQ_DIST_TIMEOUT="120")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(_free_port()), "-m", "llmq", "quantize", str(src), str(out), *args],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _ppl(model, ids):
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return torch.exp(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def _assert_same_perplexity(one, two):
    """The checkpoints in folders one and two score within 0.1% of each other on fresh token windows."""
    ids = random_ids(n=4, length=20, seed=3)
    p1 = _ppl(llmq.from_pretrained(one), ids)
    p2 = _ppl(llmq.from_pretrained(two), ids)
    assert abs(p2 / p1 - 1) < 1e-3


def _identical_codes(one: dict, two: dict, keys) -> float:
    """The fraction of equal codes over the tensors `keys` of two checkpoints' tensors: 4-bit
    `.qweight` words unpacked, W8A8's int8 weights as they are (there must be some)."""
    same = total = 0
    for k in keys:
        a, b = (unpack_rows(one[k], 4), unpack_rows(two[k], 4)) if k.endswith(".qweight") else (one[k], two[k])
        same += (a == b).sum().item()
        total += a.numel()
    assert total
    return same / total


@pytest.mark.parametrize("method,stream", [("gptq", "--stream"), ("gptq", "--no-stream"), ("awq", "--stream"),
                                           ("awq+gptq", "--no-stream")])
def test_two_gloo_ranks_match_one_process(tmp_path, method, stream):
    src = tmp_path / "m"
    text = model_folder_with_text(src, "llama")
    args = ["--method", method, "--bits", "4", "--group-size", "32", "--dataset", str(text), "--nsamples", "8",
            "--seqlen", "24", "--device", "cpu", "--quiet", stream]
    assert llmq.cli.main(["quantize", str(src), str(tmp_path / "one"), *args]) == 0
    _quantize_by_two_ranks(src, tmp_path / "two", args)
    one, two = checkpoint_tensors(tmp_path / "one"), checkpoint_tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    assert _identical_codes(one, two, [k for k in one if k.endswith(".qweight")]) > 0.95
    for k in one:
        if k.endswith("layernorm.weight") and method.startswith("awq"):
            torch.testing.assert_close(one[k], two[k], msg=k)  # AWQ's scales folded in: equal up to rounding
        elif not k.endswith((".qweight", ".scales", ".qzeros", ".g_idx")):
            assert torch.equal(one[k], two[k]), k  # untouched tensors are copied exactly
    _assert_same_perplexity(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("arch,settings", [
    ("llama", ["--method", "rtn", "--stream"]),
    ("mixtral", ["--scheme", "w8a8", "--smooth", "off", "--stream"]),
])
def test_a_streamed_run_without_calibration_by_two_ranks_is_one_processs(tmp_path, arch, settings):
    """Rank 0 does it alone; the others stop at once (no collective waits for them)."""
    src = tmp_path / "m"
    model_folder_with_text(src, arch)
    args = ["--bits", "8", "--group-size", "-1", "--device", "cpu", "--quiet", *settings]
    assert llmq.cli.main(["quantize", str(src), str(tmp_path / "one"), *args]) == 0
    _quantize_by_two_ranks(src, tmp_path / "two", args)
    one, two = checkpoint_tensors(tmp_path / "one"), checkpoint_tensors(tmp_path / "two")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.parametrize("arch,settings", [
    ("opt", ["--method", "awq", "--bits", "4", "--group-size", "32"]),  # fc1/fc2 read rows [windows * tokens, H]
    ("deepseek_v3", ["--scheme", "w8a8", "--act", "static", "--smooth", "auto"]),  # kv_b_proj: [w, 1, tokens, K]
])
def test_linears_whose_inputs_the_model_flattens_are_calibrated_by_two_ranks_as_by_one(tmp_path, arch, settings):
    src = tmp_path / "m"
    text = model_folder_with_text(src, arch)
    args = ["--dataset", str(text), "--nsamples", "8", "--seqlen", "24", "--device", "cpu", "--quiet", *settings]
    assert llmq.cli.main(["quantize", str(src), str(tmp_path / "one"), *args]) == 0
    _quantize_by_two_ranks(src, tmp_path / "two", args)
    one, two = checkpoint_tensors(tmp_path / "one"), checkpoint_tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    codes = [k for k in one if k.endswith(".qweight") or one[k].dtype == torch.int8]
    assert _identical_codes(one, two, codes) > 0.95
    _assert_same_perplexity(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("settings", [
    ["--act", "static", "--smooth", "auto", "--method", "gptq", "--no-stream"],
    ["--act", "static", "--act-observer", "percentile", "--smooth", "0.5", "--stream"],
    ["--smooth", "auto", "--stream"],  # dynamic activations
])
def test_w8a8_with_two_gloo_ranks_matches_one_process(tmp_path, settings):
    src = tmp_path / "m"
    text = model_folder_with_text(src, "llama")
    args = ["--scheme", "w8a8", *settings, "--dataset", str(text), "--nsamples", "8", "--seqlen", "24",
            "--device", "cpu", "--quiet"]
    assert llmq.cli.main(["quantize", str(src), str(tmp_path / "one"), *args]) == 0
    _quantize_by_two_ranks(src, tmp_path / "two", args)
    one, two = checkpoint_tensors(tmp_path / "one"), checkpoint_tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    assert _identical_codes(one, two, [k for k in one if one[k].dtype == torch.int8]) > 0.95
    scales = [k for k in one if k.endswith(".input_scale")]
    assert bool(scales) == ("static" in settings)
    for k in scales:  # the same maxima (or percentile), of activations equal up to summation order
        torch.testing.assert_close(one[k], two[k], rtol=1e-2, atol=0)
    _assert_same_perplexity(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("arch,mode", [("mixtral", "routed"), ("qwen3_moe", "all")])
def test_moe_gptq_with_two_gloo_ranks_matches_one_process(tmp_path, capsys, arch, mode):
    # Every rank runs every expert (with no tokens where none was routed to it there), so the experts'
    # Hessians reduce in one order; the fallback rule and the reported counts take every rank's tokens.
    # Act-order and the range search are off: each turns a last-bit difference of a Hessian (the ranks' sums
    # add up in another order) into another column order or another clipping of a whole group, and layer 0's
    # few such changes move layer 1's inputs, and a routed token near a tie between two experts with them
    # (how many depends on the processor's float kernels). test_two_gloo_ranks_match_one_process covers both.
    # 32 windows give each expert more routed tokens than it has inputs: with fewer, its Hessian is near
    # singular, and GPTQ turns the ranks' last-bit differences into up to a quarter of changed codes.
    src = tmp_path / "m"
    text = model_folder_with_text(src, arch)
    args = ["--method", "gptq", "--bits", "4", "--group-size", "16", "--dataset", str(text), "--nsamples", "32",
            "--seqlen", "24", "--device", "cpu", "--moe-calibration", mode, "--moe-min-tokens", "24", "--stream",
            "--no-act-order", "--no-clip-search"]
    capsys.readouterr()
    assert llmq.cli.main(["quantize", str(src), str(tmp_path / "one"), *args]) == 0
    printed = capsys.readouterr().out
    r = _quantize_by_two_ranks(src, tmp_path / "two", args)
    # Tokens per expert over every rank's windows: layer 0 routes the same embeddings alike.
    counts = [[line for line in out.splitlines() if line.startswith("layer 0")] for out in (printed, r.stdout)]
    assert counts[0] and counts[0] == counts[1]
    one, two = checkpoint_tensors(tmp_path / "one"), checkpoint_tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    assert _identical_codes(one, two, [k for k in one if k.endswith(".qweight") and ".experts." in k]) > 0.95
    _assert_same_perplexity(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("arch,settings", [
    ("mixtral", ["--method", "awq", "--bits", "4", "--group-size", "16"]),
    ("qwen2_moe", ["--method", "awq+gptq", "--bits", "4", "--group-size", "16", "--moe-calibration", "all",
                   "--no-stream"]),
    ("qwen3_moe", ["--scheme", "w8a8", "--act", "static", "--smooth", "auto", "--method", "gptq"]),
    # Dynamic activations, on enough tokens that the smoothing search scores a sample of each expert's rows.
    ("mixtral", ["--scheme", "w8a8", "--smooth", "auto", "--nsamples", "48"]),
    # Llama 4's experts see scored copies of the tokens: their rows are placed by the tokens they copy.
    ("llama4_text", ["--method", "awq", "--bits", "4", "--group-size", "16"]),
    ("llama4_text", ["--scheme", "w8a8", "--smooth", "auto", "--nsamples", "48"]),
])
def test_moe_awq_and_w8a8_with_two_gloo_ranks_match_one_process(tmp_path, arch, settings):
    # The experts' statistics take every rank's routed rows (a rank may hold none of an expert's); the
    # router's and the shared expert's inputs, flattened to rows by the MoE block, are placed in the
    # batch by the layer's windows. Experts with too few tokens fall back alike on every rank.
    src = tmp_path / "m"
    text = model_folder_with_text(src, arch)
    args = ["--dataset", str(text), "--nsamples", "8", "--seqlen", "24", "--device", "cpu", "--moe-min-tokens", "24",
            "--quiet", *settings]  # a later --nsamples in settings wins
    assert llmq.cli.main(["quantize", str(src), str(tmp_path / "one"), *args]) == 0
    _quantize_by_two_ranks(src, tmp_path / "two", args)
    one, two = checkpoint_tensors(tmp_path / "one"), checkpoint_tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    codes = [k for k in one if ".experts." in k and (k.endswith(".qweight") or one[k].dtype == torch.int8)]
    assert _identical_codes(one, two, codes) > 0.95
    for k in one:
        if k.endswith(".input_scale"):  # the same maxima, of activations equal up to summation order
            torch.testing.assert_close(one[k], two[k], rtol=1e-2, atol=0)
    _assert_same_perplexity(tmp_path / "one", tmp_path / "two")


def test_too_few_windows_for_the_processes_are_refused(monkeypatch):
    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setattr(distributed, "active", lambda: True)
    with pytest.raises(LlmqError, match="cannot be shared by 2 processes"):
        distributed.my_windows(torch.zeros(1, 4, dtype=torch.long))


def _w8a8_stats(x, weights):
    """What W8A8 calibration reads from x: channel maxima, the three observers, the smoothing search."""
    out = [x.channel_absmax() if isinstance(x, SharedSample) else channel_absmax(x)] + [static_scale(x, observer, weights) for observer in ("minmax", "percentile", "mse")]
    for static in (False, True):
        res = search_smoothing(x, weights, static=static)
        out += [res.alpha, res.scales]
    return out


def _w8a8_worker(rank, world, port, x, weights, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    distributed.setup("cpu")
    try:
        out.put(_by_value((rank, _w8a8_stats(SharedSample(distributed.my_windows(x)), weights))))
    finally:
        distributed.teardown()


@pytest.mark.parametrize("windows,tokens", [(5, 11), (8, 100)])  # every row scored, or 512 of 800
def test_w8a8_statistics_across_processes_are_those_of_one_process(windows, tokens):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(windows, tokens, 24, generator=g) * torch.rand(24, generator=g)
    x[..., [3, 17]] *= 40  # outlier channels, which smoothing moves into the weights
    x[windows - 1, 2, 5] = 900.0  # one extreme value, on the second rank's share: the percentile clips it
    weights = [torch.randn(16, 24, generator=g), torch.randn(8, 24, generator=g)]
    one = _w8a8_stats(x, weights)  # one process, the whole batch
    assert (one[2] < one[1]) == (x.numel() > 1e4)  # the percentile clips the extreme value in enough elements
    for _, got in _spawn_two_ranks(_w8a8_worker, x, weights):
        assert len(got) == len(one)
        for a, b in zip(got, one):
            if isinstance(b, torch.Tensor):
                assert torch.equal(a, b), (a, b)
            else:
                assert a == b  # the same smoothing strength (or None: no smoothing)


def _dying_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LLMQ_DIST_TIMEOUT="20")
    distributed.setup("cpu")
    if rank == 1:
        os._exit(9)  # dies without a word, as a killed process does
    acc = HessianAccumulator(4)
    acc.add_batch(torch.ones(3, 4))
    try:
        distributed.all_reduce_hessian(acc)
        out.put("no error")
    except LlmqError as e:
        out.put(str(e))


def test_a_dead_rank_makes_the_others_stop_with_a_message():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_dying_worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    message = out.get(timeout=180)
    for p in procs:
        p.join(60)
    assert "rank 0 of 2: reducing a Hessian failed, another process probably died" in message


def _torchrun(argv, **env_extra):
    env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1", LLMQ_DIST_TIMEOUT="120", **env_extra)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(_free_port()), "-m", "llmq", "quantize", *argv],
                          env=env, capture_output=True, text=True, timeout=600)


def test_resume_under_torchrun_equals_an_uninterrupted_run(tmp_path, capsys):
    src = tmp_path / "m"
    text = model_folder_with_text(src, "qwen3")
    args = ["--method", "gptq", "--bits", "4", "--group-size", "32", "--dataset", str(text), "--nsamples", "8",
            "--seqlen", "24", "--device", "cpu", "--stream", "--quiet"]
    r = _torchrun([str(src), str(tmp_path / "ref"), *args])
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "q"
    r = _torchrun([str(src), str(out), *args], LLMQ_TEST_SIGNAL_AT="layer-0:SIGKILL")  # every rank dies there
    assert r.returncode != 0 and not out.exists()
    [partial] = stale_partials(out)
    assert json.loads((partial / "resume.json").read_text())["layers_done"] == 1
    assert sorted(p.name for p in partial.glob("resume-hidden-*")) == [
        "resume-hidden-00001-rank0.safetensors", "resume-hidden-00001-rank1.safetensors"]  # each rank's share

    capsys.readouterr()
    assert llmq.cli.main(["quantize", str(src), str(out), *args, "--resume"]) == 2  # one process: other shares
    assert "number of processes (was 2, now 1)" in capsys.readouterr().err and stale_partials(out) == [partial]

    r = _torchrun([str(src), str(out), *args, "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert stale_partials(out) == [] and not list(out.glob("resume*"))
    ref, got = checkpoint_tensors(tmp_path / "ref"), checkpoint_tensors(out)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def _two_ranks(argv, **rank1_env):
    """`llmq quantize` in two processes joined by the torch.distributed environment (as a launcher sets it),
    rank 1 with rank1_env on top; returns both processes' results."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1", LLMQ_DIST_TIMEOUT="120",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE="2", **(rank1_env if rank == 1 else {}))
        procs.append(subprocess.Popen([sys.executable, "-m", "llmq", "quantize", *argv], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return [(p.wait(timeout=600), p.stderr.read()) for p in procs]


def test_a_rank_killed_mid_run_stops_the_other_with_one_line_and_the_run_resumes(tmp_path):
    src = tmp_path / "m"
    text = model_folder_with_text(src, "llama")
    args = ["--method", "gptq", "--bits", "4", "--group-size", "32", "--dataset", str(text), "--nsamples", "8",
            "--seqlen", "24", "--device", "cpu", "--stream", "--quiet"]
    assert [code for code, _ in _two_ranks([str(src), str(tmp_path / "ref"), *args])] == [0, 0]
    out = tmp_path / "q"
    (code0, err0), (code1, _) = _two_ranks([str(src), str(out), *args], LLMQ_TEST_SIGNAL_AT="layer-0:SIGKILL")
    assert code1 == -9  # rank 1 died after layer 0, without a word
    lines = [line for line in err0.splitlines() if line.startswith("llmq:")]
    assert code0 == 2 and len(lines) == 1, err0  # rank 0 did not hang: one line, exit 2
    assert lines[0].startswith("llmq: error: rank 0 of 2:") and "another process probably died" in lines[0]
    [partial] = stale_partials(out)  # kept for --resume
    assert json.loads((partial / "resume.json").read_text())["layers_done"] == 1
    assert [code for code, _ in _two_ranks([str(src), str(out), *args, "--resume"])] == [0, 0]
    ref, got = checkpoint_tensors(tmp_path / "ref"), checkpoint_tensors(out)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
