"""Whether modules' tensors are offloaded by accelerate's hooks."""

from __future__ import annotations

from torch import nn


def offloaded(modules: list[nn.Module]) -> bool:
    """Whether a module's tensors are offloaded: accelerate's disk or CPU offload keeps them on the meta
    device and brings each module's own in only for its own forward, so modules cannot share a call
    (siblings' one kernel call, the experts' grouped kernel) then."""
    return any(t is not None and t.device.type == "meta"
               for m in modules for t in (*m._parameters.values(), *m._buffers.values()))
