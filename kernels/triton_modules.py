"""Where the Triton kernel modules run, and importing them only when a call needs one.

Each `triton_*` module imports triton at its top, so the kernel front ends import
them here, on the first call that runs a Triton kernel: importing llmq needs
neither triton nor a GPU.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch


def triton_module(name: str) -> ModuleType | None:
    """The kernel module `name` of this package ("triton_qmm", "triton_int8"), or None without triton."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError:
        return None


def runs_triton(device: torch.device, name: str) -> bool:
    """Whether tensors on `device` run the kernels of module `name`: on CUDA, and on CPU under
    TRITON_INTERPRET=1 set before triton was imported."""
    if device.type == "cuda":
        return True
    if device.type != "cpu" or os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    if triton_module(name) is None:
        return False
    # Kernels defined before the variable was set are compiled kernels, which cannot run on CPU.
    return triton_module("triton_tuning").INTERPRET
