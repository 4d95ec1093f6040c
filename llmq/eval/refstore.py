"""The reference model's next-token log-probabilities, kept on disk between models.

Exact KL divergence needs the reference's whole distribution at every scored
position: tokens_scored x vocab values, far too many for memory on a real
run (WikiText-2 test at seqlen 2048 with a 32k vocabulary: about 290k
positions, 18 GB in float16). They go to a numpy memmap in a private
temporary folder, written window by window while the reference is scored and
read back window by window for each later model, then deleted.

Disk cost: tokens_scored * vocab * 2 bytes in float16 (4 in float32); e.g.
20 windows of 512 tokens at vocab 49152 take 1.0 GB.

float16 keeps about 3 significant digits. The reader renormalises the
stored values (log_softmax again), so the stored distribution is an exact
distribution P' close to P; the KL error is then of second order (rounding
error times the log-ratio of the two models), not of first order.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import LlmqError

STORE_DTYPES = {"float16": np.float16, "float32": np.float32}
_PREFIX = "llmq-eval-ref-"
_STORE = re.compile(rf"^{_PREFIX}(\d+)-")


def check_store_dir(dir: str | os.PathLike | None) -> Path:
    """The folder the store goes in (default: the system temp dir), checked to exist and be writable."""
    parent = Path(dir) if dir is not None else Path(tempfile.gettempdir())
    if not parent.is_dir():
        raise LlmqError(f"--tmp-dir {parent} is not an existing folder: create it or point --tmp-dir elsewhere")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".llmq-write-probe-", dir=parent))
    except OSError as e:
        raise LlmqError(f"cannot write the reference log-probs to {parent} ({e.strerror}): point --tmp-dir at a "
                        "writable folder, or pass --no-kl") from e
    return parent


def remove_stale_stores(parent: Path) -> list[Path]:
    """Remove the stores that killed runs (SIGKILL, power loss) left in parent, saying so on stderr."""
    from ..outdir import pid_alive

    removed = []
    for entry in sorted(parent.iterdir()):
        m = _STORE.match(entry.name)
        if m and entry.is_dir() and not pid_alive(int(m[1])):
            size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry)
                print(f"llmq: note: removed {entry} ({size / 2**30:.2f} GiB), the reference log-probs of an "
                      "interrupted eval", file=sys.stderr)
    return removed
_HEADROOM = 256 << 20  # leave this much of the disk free


class RefStore:
    """Disk-backed array [windows, positions, vocab] of reference log-probs,
    plus the reference's top-1 token per position (int64, in memory).

    Use as a context manager, or call `close()`: the folder is removed.
    """

    def __init__(self, windows: int, positions: int, vocab: int, *, dtype: str = "float16",
                 dir: str | os.PathLike | None = None):
        if dtype not in STORE_DTYPES:
            raise LlmqError(f"reference log-probs dtype must be one of {', '.join(STORE_DTYPES)}, not {dtype!r}")
        self.shape = (windows, positions, vocab)
        self.dtype = dtype
        np_dtype = STORE_DTYPES[dtype]
        self.nbytes = windows * positions * vocab * np.dtype(np_dtype).itemsize
        parent = check_store_dir(dir)
        remove_stale_stores(parent)
        free = shutil.disk_usage(parent).free
        if self.nbytes + _HEADROOM > free:
            raise LlmqError(
                f"the reference log-probs for KL divergence need {self.nbytes / 2**30:.1f} GiB in {parent}, "
                f"which has {free / 2**30:.1f} GiB free: point --tmp-dir at a larger disk, lower --max-windows, "
                "or pass --no-kl")
        # The pid in the name lets a later run tell a killed run's store from a live one.
        self.folder = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=parent))
        try:
            self._logprobs = np.memmap(self.folder / "logprobs.bin", dtype=np_dtype, mode="w+", shape=self.shape)
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        self.top1 = torch.zeros(windows, positions, dtype=torch.long)

    def write(self, window: int, start: int, logprobs: torch.Tensor) -> None:
        """Store log-probs [P, vocab] (fp32) of positions start..start+P of a window."""
        stop = start + logprobs.shape[0]
        self._logprobs[window, start:stop] = logprobs.detach().cpu().numpy()
        self.top1[window, start:stop] = logprobs.argmax(dim=-1).cpu()

    def read(self, window: int, start: int, stop: int, device=None) -> torch.Tensor:
        """Renormalised reference log-probs [stop-start, vocab] float32 of one window."""
        stored = torch.from_numpy(np.array(self._logprobs[window, start:stop], dtype=np.float32))
        return torch.log_softmax(stored.to(device), dim=-1)

    def close(self) -> None:
        """Delete the on-disk data (idempotent)."""
        self._logprobs = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "RefStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
