"""QuantConfig: what to quantize and how, validated once, stored in config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import LlmqError
from .methods import registry

METHODS = registry.names()
SUPPORTED_BITS = (4, 8)
FORMAT_VERSION = 1
QUANT_METHOD = "llmq"


@dataclass
class QuantConfig:
    """How to quantize a model's linear layers.

    Args:
        method: "rtn" (round-to-nearest, no data), "gptq", "awq" or "awq+gptq".
        bits: 4 or 8 bits per weight.
        group_size: input features sharing one scale and zero point; -1 means one
            group per output row. Must divide every quantized layer's in_features.
        sym: symmetric (zero point fixed at 2^(bits-1)) or asymmetric (per-group zero).
        desc_act: GPTQ act-order: quantize columns by decreasing Hessian diagonal;
            the checkpoint then carries a g_idx per layer. None (default): on for
            method "gptq" (it closes much more of the gap, see BENCHMARKS.md), off
            otherwise.
        static_groups: with desc_act, compute each group's scale from the original
            weights before the solve (keeps groups contiguous in the original order).
        damp: GPTQ damping as a fraction of the mean Hessian diagonal.
        clip_search: GPTQ picks each group's range by a shrink search that
            minimises the group's quantization error, instead of plain min-max.
        modules_to_not_convert: name patterns left in full precision. A pattern
            matches a module whose dotted name equals it or ends with ".<pattern>".
            Embeddings and norms are never quantized.
        calibration: what the model was calibrated on (recorded, not interpreted).
    """

    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool | None = None
    static_groups: bool = False
    damp: float = 0.01
    clip_search: bool = True
    modules_to_not_convert: list[str] = field(default_factory=lambda: ["lm_head"])
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in registry.names():
            raise LlmqError(f"unknown method {self.method!r}: choose one of {', '.join(registry.names())}")
        if self.bits not in SUPPORTED_BITS:
            raise LlmqError(f"{self.bits} bits are not supported: choose 4 or 8")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size <= 0):
            raise LlmqError(f"group size {self.group_size!r} is invalid: use a positive divisor of the layers' "
                            "input size (e.g. 32, 64, 128) or -1 for one group per row")
        if self.group_size != -1 and self.group_size % (32 // self.bits) != 0:
            raise LlmqError(f"group size {self.group_size} is not a multiple of {32 // self.bits}, "
                            f"the number of {self.bits}-bit codes in one int32 word")
        if not 0 <= self.damp < 1:
            raise LlmqError(f"damping {self.damp} is out of range: use a fraction such as 0.01")
        if self.desc_act is None:
            self.desc_act = self.method == "gptq"
        if self.static_groups and not self.desc_act:
            self.static_groups = False  # static groups only change anything under act-order
        self.modules_to_not_convert = list(self.modules_to_not_convert or [])

    def group_size_for(self, in_features: int) -> int:
        """The number of input features per group for a layer of this width."""
        return in_features if self.group_size == -1 else self.group_size

    def skips(self, module_name: str) -> bool:
        """True when module_name is left in full precision."""
        return any(module_name == p or module_name.endswith("." + p) for p in self.modules_to_not_convert)

    def to_dict(self) -> dict[str, Any]:
        """The `quantization_config` entry of config.json."""
        from . import __version__

        d = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION}
        d.update(dataclasses.asdict(self))
        d["llmq_version"] = __version__
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        if d.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
            raise LlmqError(f"quantization_config has quant_method {d.get('quant_method')!r}, not {QUANT_METHOD!r}")
        version = d.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise LlmqError(f"checkpoint format version {version} is newer than this llmq understands "
                            f"({FORMAT_VERSION}): upgrade llmq")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
