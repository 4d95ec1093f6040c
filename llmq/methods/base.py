"""The interface every method implements, and the job it works on.

A quantization is resolved once into a Job (the model's architecture spec,
its decoder layers, the linears to quantize per layer) and handed to the
method, which

1. check(job): refuses what it cannot do, before any calibration text is read;
2. plan_layer(job, index, layer, targets): groups one layer's targets the way
   its layer step wants them (GPTQ: linears sharing an input; AWQ: scale units);
3. layer_step(job, plans): returns the LayerStep the engine drives over the
   layers (engine.run_layers with calibration windows when needs_calibration,
   engine.each_layer without).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import arch
from ..config import QuantConfig


@dataclass
class Job:
    """One quantization, resolved once: everything a method needs about the model."""

    model: nn.Module
    config: QuantConfig
    spec: arch.ArchSpec
    layers: nn.ModuleList  # the decoder layers (spec.layers)
    # layer index -> {name relative to the layer: full dotted name}, in module order
    targets: dict[int, dict[str, str]]
    scale_dtype: torch.dtype
    device: torch.device


class LayerStep:
    """Called by the engine for each decoder layer (already on the device).

    __call__(index, layer, hidden, args, kwargs) -> (output hidden states, a short
    status for the progress bar). Without calibration, hidden is None and the
    output is None.
    """

    def __init__(self):
        self.timings: dict[str, float] = {}  # seconds per phase, reported by llmq.quantize
        self.damp_raised: list[str] = []  # "name (damp x)" of linears whose Hessian needed more damping

    def __call__(self, index: int, layer: nn.Module, hidden, args: tuple, kwargs: dict):
        raise NotImplementedError

    def note_damping(self, name: str, stats) -> None:
        """Record `name` when its GPTQ solve (stats: GPTQStats, or None for another solver) raised the damping."""
        if stats is not None and stats.damp_raised:
            self.damp_raised.append(f"{name} (damp {stats.damp:g})")


class Method:
    """A quantization method; each module under llmq/methods/ defines one as METHOD.

    Subclasses set name and needs_calibration and override layer_step, and
    plan_layer / check where the defaults do not fit.
    """

    name: str = ""
    needs_calibration: bool = True

    def calibrates(self, config: QuantConfig) -> bool:
        """Whether this run needs calibration windows (default: needs_calibration)."""
        return self.needs_calibration

    def check_data(self, config: QuantConfig, dataset) -> None:
        """Raise LlmqError, before any work, when the run needs calibration data it was not given
        (dataset None: the method's default windows)."""

    def check(self, job: Job) -> None:
        """Raise LlmqError for a model or config the method cannot handle."""

    def plan_layer(self, job: Job, index: int, layer: nn.Module, targets: dict[str, str]) -> Any:
        """Default: the architecture's sequential groups, each a list of (local, full name)."""
        return [[(local, targets[local]) for local in group]
                for group in arch.sequential_groups(job.spec, layer, list(targets))]

    def layer_step(self, job: Job, plans: dict[int, Any]) -> LayerStep:
        raise NotImplementedError
