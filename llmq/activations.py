"""Where the calibration activations wait between decoder layers.

On the device when they fit there (activations_fit), in host memory
otherwise, and in a memory-mapped file on disk when the host cannot hold
them either. The file is unlinked as soon as it is mapped, so nothing is left
behind, even by a killed process.
"""

from __future__ import annotations

import os
import tempfile

import torch

from .memory import available_host_memory
from .units import human_bytes

# A layer's pass on the host needs its input, its output and intermediates:
# activations stay in host memory when this many times their size is available.
HOST_HEADROOM = 4
WHERE = ("device", "host", "disk")


# Activations kept on the device between layers need this many times their own
# size free: the input and output of a layer plus its intermediates.
_ACTIVATION_HEADROOM = 8


def activations_fit(hidden: torch.Tensor, device: torch.device) -> bool:
    """Whether the calibration activations can stay on device between layers."""
    if device.type != "cuda":
        return True  # CPU: the device is the host
    free, _ = torch.cuda.mem_get_info(device)
    return hidden.numel() * hidden.element_size() * _ACTIVATION_HEADROOM <= free


def host_fits(nbytes: int) -> bool:
    available = available_host_memory()
    return available is None or nbytes * HOST_HEADROOM <= available


class ActivationStore:
    """Holds the hidden states between layers: put(hidden) returns them where they wait.

    where: "device", "host", "disk", or None to choose (device if they fit,
    host if it holds them, disk otherwise). folder: where the disk file goes
    (None: the system's temporary folder).
    """

    def __init__(self, like: torch.Tensor, device: torch.device, where: str | None = None,
                 folder: str | os.PathLike | None = None):
        self.nbytes = like.numel() * like.element_size()
        if where is None:
            if device.type != "cpu" and activations_fit(like, device):
                where = "device"
            else:
                where = "host" if host_fits(self.nbytes) else "disk"
        if where not in WHERE:
            raise ValueError(f"activations go to one of {WHERE}, not {where!r}")
        self.where = where
        self.device = device
        self._buffer = None
        if where == "disk":
            fd, path = tempfile.mkstemp(prefix="llmq-activations-", dir=folder)
            try:
                os.ftruncate(fd, self.nbytes)
                self._buffer = torch.from_file(path, shared=True, size=like.numel(), dtype=like.dtype).view(like.shape)
            finally:
                os.close(fd)
                os.unlink(path)  # the mapping stays valid; the file disappears with the process

    def describe(self) -> str:
        place = {"device": f"on {self.device}", "host": "in host memory",
                 "disk": "in a memory-mapped file on disk (host memory is too small)"}[self.where]
        return f"calibration activations: {human_bytes(self.nbytes)} {place}"

    def put(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.where == "device":
            return hidden.to(self.device)
        if self.where == "host":
            return hidden.to("cpu")
        if hidden.shape != self._buffer.shape:
            raise ValueError(f"activations changed shape: {tuple(hidden.shape)} vs {tuple(self._buffer.shape)}")
        self._buffer.copy_(hidden)
        return self._buffer
