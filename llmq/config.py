"""QuantConfig: what to quantize and how, validated once, stored in config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import LlmqError
from .kernels.layout import codes_per_word, group_width
from .methods import registry
from ._version import __version__

METHODS = registry.names()
SUPPORTED_BITS = (4, 8)
# weight-only: int4/int8 weights, activations in the model dtype. w8a8: int8 weights
# (symmetric, one scale per output row) and int8 activations (symmetric).
SCHEMES = ("weight-only", "w8a8")
W8A8_METHODS = ("rtn", "gptq")
ACT_MODES = ("dynamic", "static")
ACT_OBSERVERS = ("minmax", "percentile", "mse")
DEFAULT_ACT_OBSERVER = "minmax"
SMOOTH_OFF = "off"
MOE_CALIBRATION = ("routed", "all")
FORMAT_VERSION = 1
W8A8_FORMAT_VERSION = 2
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
            otherwise; refused for methods that do not run GPTQ (rtn, awq).
        static_groups: with desc_act, compute each group's scale from the original
            weights before the solve (keeps groups contiguous in the original order);
            refused without desc_act.
        damp: GPTQ damping as a fraction of the mean Hessian diagonal.
        clip_search: GPTQ picks each group's range by a shrink search that
            minimises the group's quantization error, instead of plain min-max.
        modules_to_not_convert: name patterns left in full precision. A pattern
            matches a module whose dotted name equals it or ends with ".<pattern>".
            Embeddings and norms are never quantized.
        calibration: what the model was calibrated on (recorded, not interpreted).
        scheme: "weight-only" (default) or "w8a8": int8 weights (symmetric, per output
            row; bits and group_size then default to 8 and -1 and may not be set
            otherwise) and int8 symmetric activations.
        act: w8a8 only: "dynamic" (one activation scale per token, computed at run time;
            the default) or "static" (one scale per linear input, fixed on calibration data).
        smooth: w8a8 only: SmoothQuant migration strength alpha in [0, 1], "auto" (a
            search per scale group) or "off". None (default): "auto" when the run calibrates
            anyway (static activations or GPTQ weights), "off" for data-free dynamic RTN.
        act_observer: w8a8 static only: how calibration fixes each input's scale
            ("minmax", "percentile" or "mse").
        keep_routers: mixture-of-experts routers (and shared-expert gates) stay in full
            precision: llmq.quantize adds their names to modules_to_not_convert.
        moe_calibration: how GPTQ/AWQ/W8A8 calibrate experts: "routed" (each expert sees the
            tokens its router sends it) or "all" (every calibration token goes through
            every expert; only the routed outputs flow on).
        moe_min_tokens: an expert that receives fewer calibration tokens than this is
            quantized by round-to-nearest instead (W8A8: calibrated on every calibration
            token of its block instead; reported per layer).
    """

    method: str = "rtn"
    bits: int | None = None  # 4 for weight-only, 8 for w8a8
    group_size: int | None = None  # 128 for weight-only, -1 for w8a8
    sym: bool = True
    desc_act: bool | None = None
    static_groups: bool = False
    damp: float = 0.01
    clip_search: bool = True
    modules_to_not_convert: list[str] = field(default_factory=lambda: ["lm_head"])
    calibration: dict[str, Any] = field(default_factory=dict)
    scheme: str = "weight-only"
    act: str | None = None
    smooth: float | str | None = None  # w8a8: resolved to "off", "auto" or alpha; weight-only: None
    act_observer: str | None = None
    keep_routers: bool = True
    moe_calibration: str = "routed"
    moe_min_tokens: int = 16

    def __post_init__(self):
        self._check_types()
        if self.method not in registry.names():
            raise LlmqError(f"unknown method {self.method!r}: choose one of {', '.join(registry.names())}")
        self._check_scheme()
        if self.bits not in SUPPORTED_BITS:
            raise LlmqError(f"{self.bits} bits are not supported: choose 4 or 8")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size <= 0):
            raise LlmqError(f"group size {self.group_size!r} is invalid: use a positive divisor of the layers' "
                            "input size (e.g. 32, 64, 128) or -1 for one group per row")
        if self.group_size != -1 and self.group_size % codes_per_word(self.bits) != 0:
            raise LlmqError(f"group size {self.group_size} is not a multiple of {codes_per_word(self.bits)}, "
                            f"the number of {self.bits}-bit codes in one int32 word")
        if not 0 <= self.damp < 1:
            raise LlmqError(f"damping {self.damp} is out of range: use a fraction such as 0.01")
        if self.desc_act is None:
            self.desc_act = self.method == "gptq"
        elif self.desc_act and not registry.runs_gptq(self.method):
            raise LlmqError(f"act-order orders GPTQ's solve, and --method {self.method} does not run GPTQ: drop "
                            "--act-order or use --method gptq or awq+gptq")
        if self.static_groups and not self.desc_act:
            raise LlmqError("static groups fix the group scales of a GPTQ act-order solve: add --act-order "
                            "(with --method gptq or awq+gptq) or drop --static-groups")
        self.modules_to_not_convert = list(self.modules_to_not_convert or [])
        if self.moe_calibration not in MOE_CALIBRATION:
            raise LlmqError(f"unknown MoE calibration {self.moe_calibration!r}: choose one of "
                            f"{', '.join(MOE_CALIBRATION)}")
        if not isinstance(self.moe_min_tokens, int) or self.moe_min_tokens < 0:
            raise LlmqError(f"moe_min_tokens {self.moe_min_tokens!r} is invalid: use a count >= 0")

    def _check_types(self) -> None:
        """Refuse values of the wrong kind before they are read as something else (the string "false"
        would be a true `sym`; a single string in modules_to_not_convert a list of its letters)."""
        def fail(name, wanted):
            raise LlmqError(f"QuantConfig {name}={getattr(self, name)!r} is invalid: use {wanted}")

        for name in ("sym", "static_groups", "clip_search", "keep_routers"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "True or False")
        if self.desc_act is not None and not isinstance(self.desc_act, bool):
            fail("desc_act", "True, False or None")
        if isinstance(self.group_size, bool):  # True would be the group size 1
            fail("group_size", "an integer such as 128, or -1 for one group per row")
        for name in ("bits", "moe_min_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                fail(name, "an integer")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)):
            fail("damp", "a number such as 0.01")
        if isinstance(self.smooth, bool):  # float(False) would be the strength 0, not "off"
            fail("smooth", "a migration strength in [0, 1], 'auto' or 'off'")
        if isinstance(self.modules_to_not_convert, str) or not all(
                isinstance(p, str) for p in self.modules_to_not_convert or []):
            fail("modules_to_not_convert", "a list of module names, e.g. ['lm_head']")
        if self.calibration is None:
            self.calibration = {}
        if not isinstance(self.calibration, dict):
            fail("calibration", "a dict")

    def _check_scheme(self) -> None:
        """Resolve the scheme's defaults and refuse settings it cannot hold."""
        if self.scheme not in SCHEMES:
            raise LlmqError(f"unknown scheme {self.scheme!r}: choose one of {', '.join(SCHEMES)}")
        if self.scheme == "weight-only":
            for name in ("act", "smooth", "act_observer"):
                if getattr(self, name) is not None:
                    raise LlmqError(f"{name} applies to activation quantization only: add --scheme w8a8 or drop it")
            self.bits = 4 if self.bits is None else self.bits
            self.group_size = 128 if self.group_size is None else self.group_size
            return
        if self.bits not in (None, 8):
            raise LlmqError(f"--scheme w8a8 quantizes weights to 8 bits, not {self.bits}: drop --bits "
                            "or use the weight-only scheme for int4")
        if self.group_size not in (None, -1):
            raise LlmqError(f"--scheme w8a8 uses one weight scale per output row, not groups of {self.group_size} "
                            "(that is what vLLM's int8 kernels take): drop --group-size or pass -1")
        if not self.sym:
            raise LlmqError("--scheme w8a8 stores symmetric int8 weights: drop --asym")
        if self.method not in W8A8_METHODS:
            raise LlmqError(f"--scheme w8a8 supports --method {' or '.join(W8A8_METHODS)}, not {self.method}: "
                            "use --smooth for activation-aware scaling")
        self.bits, self.group_size = 8, -1
        self.act = self.act or "dynamic"
        if self.act not in ACT_MODES:
            raise LlmqError(f"unknown activation mode {self.act!r}: choose dynamic or static")
        if self.act == "static":
            self.act_observer = self.act_observer or DEFAULT_ACT_OBSERVER
            if self.act_observer not in ACT_OBSERVERS:
                raise LlmqError(f"unknown activation observer {self.act_observer!r}: choose one of "
                                f"{', '.join(ACT_OBSERVERS)}")
        elif self.act_observer is not None:
            raise LlmqError("an activation observer applies to --act static only: drop it or add --act static")
        if self.smooth is None:
            # A run that calibrates smooths by default: static per-tensor scales collapse without it
            # (+131% perplexity on the dev model, +2.9% with it; BENCHMARKS.md), and the search costs
            # little beside the calibration pass the run makes anyway. Data-free runs have nothing
            # to measure the activations on.
            self.smooth = "auto" if self.act == "static" or self.method != "rtn" else SMOOTH_OFF
        self.smooth = parse_smooth(self.smooth)

    @property
    def smoothing(self) -> float | str | None:
        """The SmoothQuant setting in force: alpha, "auto", or None when off (and for weight-only)."""
        return None if self.smooth in (None, SMOOTH_OFF) else self.smooth

    @property
    def quantizes_activations(self) -> bool:
        return self.scheme == "w8a8"

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing reads calibration text."""
        return self.method != "rtn" or self.act == "static" or self.smoothing is not None

    def group_size_for(self, in_features: int) -> int:
        """The number of input features per group for a layer of this width."""
        return group_width(self.group_size, in_features)

    def skips(self, module_name: str) -> bool:
        """True when module_name is left in full precision."""
        return any(names_module(p, module_name) for p in self.modules_to_not_convert)

    def to_dict(self) -> dict[str, Any]:
        """The `quantization_config` entry of config.json."""

        # W8A8 checkpoints hold tensors that format version 1 readers would not recognise.
        version = W8A8_FORMAT_VERSION if self.scheme == "w8a8" else FORMAT_VERSION
        d = {"quant_method": QUANT_METHOD, "format_version": version}
        d.update(dataclasses.asdict(self))
        d["llmq_version"] = __version__
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        if d.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
            raise LlmqError(f"quantization_config has quant_method {d.get('quant_method')!r}, not {QUANT_METHOD!r}")
        version = d.get("format_version", FORMAT_VERSION)
        if version > W8A8_FORMAT_VERSION:
            raise LlmqError(f"checkpoint format version {version} is newer than this llmq understands "
                            f"({W8A8_FORMAT_VERSION}): upgrade llmq")
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if d.get("desc_act") and not registry.runs_gptq(d.get("method", "rtn")):
            # rtn/awq checkpoints once recorded a requested act-order that nothing ran (no g_idx stored)
            d["desc_act"] = d["static_groups"] = False
        if d.get("scheme") == "w8a8" and d.get("smooth") is None:
            d["smooth"] = SMOOTH_OFF  # a stored config is resolved: null meant off before "off" was written
        return cls(**d)


def names_module(pattern: str, module_name: str) -> bool:
    """Whether a modules_to_not_convert pattern names a module: its dotted name equals the pattern or
    ends with "." + pattern."""
    return module_name == pattern or module_name.endswith("." + pattern)


def parse_smooth(value) -> float | str:
    """SmoothQuant setting from the command line or a config: "off", "auto" or alpha in [0, 1]."""
    if value in (SMOOTH_OFF, "auto"):
        return value
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise LlmqError(f"--smooth {value!r} is invalid: use a migration strength in [0, 1] (e.g. 0.5), "
                        "auto or off") from None
    if not 0 <= alpha <= 1:
        raise LlmqError(f"--smooth {alpha} is out of range: use a migration strength in [0, 1], auto or off")
    return alpha


# Trailing flags of a short config spec -> the QuantConfig field they switch on.
_SPEC_FLAGS = {"act": "desc_act", "static": "static_groups"}


def parse_config_spec(spec: str) -> QuantConfig:
    """'rtn:4:64:asym' -> QuantConfig(method='rtn', bits=4, group_size=64, sym=False).

    Optional trailing flags: ':act' (GPTQ act-order), ':static' (static groups).
    The short form the benchmark scripts take for the configs they compare.
    """
    parts = spec.split(":")
    flags = parts[4:]
    if (len(parts) < 4 or parts[0] not in registry.names() or parts[3] not in ("sym", "asym")
            or any(f not in _SPEC_FLAGS for f in flags)):
        raise LlmqError(f"bad config spec {spec!r}: write METHOD:BITS:GROUP:sym|asym[:act][:static] with METHOD "
                        f"one of {', '.join(registry.names())}, e.g. rtn:4:64:asym")
    try:
        bits, group = int(parts[1]), int(parts[2])
    except ValueError as e:
        raise LlmqError(f"bad config spec {spec!r}: bits and group size must be integers") from e
    return QuantConfig(method=parts[0], bits=bits, group_size=group, sym=parts[3] == "sym",
                       **{_SPEC_FLAGS[f]: True for f in flags})
