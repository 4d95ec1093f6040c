"""One reusable scratch tensor per (thread, dtype), grown on demand.

The CPU "dequant" kernels write a layer's dense weight into it on every call and
multiply with it at once, so a model of any depth needs one buffer the size of
its largest layer instead of a dense copy of every layer; the int8 activation
codes of a prefill go through one as well. Layers run one after another in a
thread; a buffer never leaves the call that fills it. (Fresh large temporaries
are not free on CPU: the allocator hands memory back and faults it in again.)
"""

from __future__ import annotations

import threading

import torch

_local = threading.local()


def scratch(shape: tuple[int, ...], dtype: torch.dtype, use: str = "") -> torch.Tensor:
    """A CPU tensor of `shape` and `dtype` with undefined contents, valid until the next call with
    the same `dtype` and `use` (callers that need two buffers of one dtype at once name them apart)."""
    buffers = _local.__dict__.setdefault("buffers", {})
    numel = 1
    for d in shape:
        numel *= d
    # A tensor made under inference_mode cannot be written outside it, nor the reverse reused
    # inside it without an extra check per call: one buffer for each mode.
    key = (dtype, use, torch.is_inference_mode_enabled())
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)
