"""Several processes quantizing one model with torch.distributed (torchrun).

    torchrun --nproc-per-node N -m llmq quantize MODEL OUT --method gptq ...

When the launcher has set the torch.distributed environment (WORLD_SIZE > 1),
`llmq quantize` joins the process group (NCCL on CUDA, gloo on CPU) and:

- each rank takes its share of the calibration windows (rank r: windows
  r, r + N, ...), runs the layers on it, and keeps its share of the next
  layer's inputs;
- GPTQ Hessians are reduced across ranks as sums with their row counts, so
  the reduced Hessian is the mean over every window, as in one process (up
  to floating-point summation order); so are AWQ's statistics (the sums of
  |x| per channel and the Gram matrix of the rows one process would sample,
  each rank contributing those it holds), and W8A8's (per-channel maxima,
  the largest |x| for the percentile observer, and each smoothing or
  clipping candidate's error summed over the rows one process would score).
  An MoE expert's rows are the tokens routed to it, placed in the whole
  batch by those tokens' places, so the rows sampled from them are one
  process's too;
- the linears of a solve group (q/k/v, gate/up; AWQ: a scale group's clip
  searches and quantization, and the points of its scale grid) are solved on
  different ranks at the same time and the results broadcast, so every rank
  continues with the same quantized weights;
- only rank 0 writes the checkpoint; a streamed run records each finished
  layer for --resume with every rank's share of the next layer's inputs in
  the partial folder (which every rank must see: one machine, or a shared
  file system), and resumes with the same number of processes.

Every collective has a timeout (LLMQ_DIST_TIMEOUT seconds, 600 by default):
a rank that dies makes the others stop with a message naming the failure
instead of hanging.
"""

from __future__ import annotations

import datetime
import os
from typing import Callable

import torch

from .errors import InterruptedWork, LlmqError

_TIMEOUT_ENV = "LLMQ_DIST_TIMEOUT"


def launched() -> bool:
    """Whether a launcher (torchrun) asked for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and world() > 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_writer() -> bool:
    """Rank 0 (or the only process) writes the checkpoint and prints."""
    return rank() == 0


def setup(device: str) -> str:
    """Join the process group the launcher described; return the device this rank uses.

    device "auto"/"cuda": rank r takes cuda:LOCAL_RANK and NCCL; "cpu": gloo.
    """
    if not launched() or torch.distributed.is_initialized():
        return device
    if not torch.distributed.is_available():
        raise LlmqError("this torch build has no torch.distributed: run llmq without torchrun")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LlmqError(f"device {device!r} requested but no CUDA GPU is available: use --device cpu")
    timeout = datetime.timedelta(seconds=float(os.environ.get(_TIMEOUT_ENV, "600")))
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    return device if use_cuda else "cpu"


def teardown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# This rank's number of calibration windows in the run under way (my_windows): a linear whose input the
# modeling code flattened to rows ([windows * tokens, K]: OPT's MLP) holds that many windows' rows.
_share = {"windows": 0}


def my_windows(windows: torch.Tensor) -> torch.Tensor:
    """This rank's share of the calibration windows."""
    if not active():
        return windows
    if windows.shape[0] < world():
        raise LlmqError(f"{windows.shape[0]} calibration windows cannot be shared by {world()} processes: "
                        "raise --nsamples or use fewer processes")
    share = windows[rank()::world()]
    _share["windows"] = share.shape[0]
    return share


def _collective(what: str, fn: Callable):
    try:
        return fn()
    except (RuntimeError, torch.distributed.DistBackendError) as e:
        # Not a refusal: a streamed run keeps its finished layers for --resume.
        raise InterruptedWork(f"rank {rank()} of {world()}: {what} failed, another process probably died or hung "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); see its output, and rerun "
                        f"(the collective timeout is {_TIMEOUT_ENV}, in seconds)") from e


def barrier(what: str) -> None:
    """Wait for every process (what: for the message if one of them died)."""
    if active():
        _collective(what, torch.distributed.barrier)


def _object_device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else None


def from_writer(fn: Callable):
    """fn() computed by rank 0 (the writer: file system work, such as finding the folder to resume) and
    given to every process; an LlmqError it raises is raised by every process."""
    if not active():
        return fn()
    box = [None]
    error = None
    if rank() == 0:
        try:
            box[0] = ("value", fn())
        except LlmqError as e:
            error = e
            box[0] = ("error", str(e))
    _collective("sharing the writer's state", lambda: torch.distributed.broadcast_object_list(
        box, src=0, device=_object_device()))
    kind, value = box[0]
    if kind == "error":
        raise error if error is not None else LlmqError(value)
    return value


def all_reduce_hessian(acc) -> None:
    """Turn a rank's HessianAccumulator (mean over its rows) into the mean over every rank's rows."""
    if not active():
        return
    H = acc.hessian
    count = torch.tensor([float(acc.nsamples)], dtype=torch.float64, device=H.device)
    H.mul_(acc.nsamples)  # the sum over this rank's rows
    _collective("reducing a Hessian", lambda: torch.distributed.all_reduce(H))
    _collective("reducing a row count", lambda: torch.distributed.all_reduce(count))
    total = int(count.item())
    if total:
        H.div_(total)
    acc.nsamples = total


def global_rows(windows: int, tokens: int, device=None) -> tuple[torch.Tensor, int]:
    """(the index of each of this rank's rows in the whole batch, the whole batch's row count).

    This rank holds `windows` calibration windows of `tokens` tokens each (its
    share, my_windows: window j here is window rank + j * world of the whole
    batch), flattened window by window; one process holds the whole batch.
    """
    total = int(all_reduce_sum(torch.tensor([float(windows)], dtype=torch.float64, device=device)).item())
    starts = (rank() + torch.arange(windows, device=device) * world()) * tokens
    return (starts[:, None] + torch.arange(tokens, device=device)[None, :]).reshape(-1), total * tokens


def spread_rows(x: torch.Tensor, max_rows: int, positions: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's rows among those one process holding the whole batch picks: at most max_rows rows
    evenly spread over it (torch.linspace(0, n - 1, max_rows).round() of its n rows in batch order),
    or all of them.

    x: this rank's share [windows, tokens, K] (my_windows), or the same rows in another shape, window
    after window ([windows * tokens, K] where the modeling code flattened them; [windows, heads, tokens,
    K]), or any rows [m, K] with `positions`, the index of each of them in the whole batch's order,
    ascending (an expert's routed tokens: its n rows are every rank's, ordered by position). The
    result [m', K], in this rank's order.
    """
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if positions is None:
        windows = x.shape[0] if x.dim() == 3 else _share["windows"]
        if not windows or rows.shape[0] % windows:
            raise LlmqError(f"statistics across processes need a linear's input to hold whole calibration "
                            f"windows, got {tuple(x.shape)} for {windows} windows: run without torchrun")
        where, n = global_rows(windows, rows.shape[0] // windows, device=x.device)
        everyone = None  # every position 0 .. n - 1 is some rank's row
    else:
        where = positions.to(device=x.device, dtype=torch.long)
        everyone = all_gather_varying(where)
        n = everyone.numel()
    if n > max_rows:
        picked = torch.linspace(0, n - 1, max_rows, device=x.device).round().long()
        if everyone is not None:
            picked = torch.sort(everyone).values[picked]  # the positions of the picked rows
        rows = rows[torch.isin(where, picked)]
    return rows


def _all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    if not active():
        return t
    device = _object_device()  # NCCL reduces CUDA tensors only: a host tensor goes there and back
    work = t if device is None or t.device == device else t.to(device)
    reduce_op = getattr(torch.distributed.ReduceOp, op)
    _collective("reducing statistics", lambda: torch.distributed.all_reduce(work, op=reduce_op))
    if work is not t:
        t.copy_(work)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of t over the ranks, in place."""
    return _all_reduce(t, "SUM")


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of t over the ranks, in place."""
    return _all_reduce(t, "MAX")


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's t [n, ...] (the same shape on every rank), concatenated in rank order."""
    if not active():
        return t
    parts = [torch.empty_like(t) for _ in range(world())]
    _collective("gathering statistics", lambda: torch.distributed.all_gather(parts, t.contiguous()))
    return torch.cat(parts)


def all_gather_varying(t: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D t (of any length), concatenated in rank order."""
    if not active():
        return t
    count = torch.tensor([t.numel()], dtype=torch.long, device=t.device)
    counts = all_gather_rows(count).tolist()
    padded = t.new_zeros(max(counts))
    padded[: t.numel()] = t
    parts = all_gather_rows(padded).reshape(len(counts), -1)
    return torch.cat([part[:c] for part, c in zip(parts, counts)])


def solve_shared(solve: Callable[[list[int]], list], n: int) -> list:
    """Results of solve(indices) for indices 0..n-1, each computed on one rank and broadcast.

    solve(indices) returns one result per index, in order. Item i is solved
    on rank i % world; every rank gets every result.
    """
    if not active():
        return solve(list(range(n)))
    mine = [i for i in range(n) if i % world() == rank()]
    local = dict(zip(mine, solve(mine))) if mine else {}
    device = _object_device()
    results = []
    for i in range(n):
        box = [local.get(i)]
        _collective("sharing a solved layer",
                    lambda: torch.distributed.broadcast_object_list(box, src=i % world(), device=device))
        results.append(box[0])
    return results
