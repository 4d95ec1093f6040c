"""The table of quantization methods: the one list every other part derives from.

Each entry names a module under llmq/methods/ that defines `METHOD`, an
instance of methods.base.Method (what it needs, how it plans a layer, the
layer step the engine drives). The table itself imports nothing of llmq, so
the config, the CLI and the format readers can read the names without pulling
in solvers; a method's module is imported only when it is used.

Adding a method is one module with a METHOD and one `register` call below.

Schemes other than weight-only (W8A8: int8 activations too) have a method
module of their own, which reads `config.method` for how to solve the
weights; `for_config` picks it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class MethodEntry:
    name: str  # the value of QuantConfig.method and --method
    module: str  # dotted module that defines METHOD
    summary: str  # one line for --help
    runs_gptq: bool = False  # solves the codes with GPTQ: reads act-order, static groups, damping, clip search


_TABLE: dict[str, MethodEntry] = {}


def register(entry: MethodEntry) -> None:
    if entry.name in _TABLE and _TABLE[entry.name] != entry:
        raise ValueError(f"method {entry.name!r} is already registered by {_TABLE[entry.name].module}")
    _TABLE[entry.name] = entry


def names() -> tuple[str, ...]:
    """Every method name, in table order."""
    return tuple(_TABLE)


def entries() -> tuple[MethodEntry, ...]:
    return tuple(_TABLE.values())


def runs_gptq(name: str) -> bool:
    """Whether method `name` solves its codes with GPTQ (and so reads GPTQ's settings)."""
    return _TABLE[name].runs_gptq


def get(name: str):
    """The Method object of a registered method (imports its module)."""
    return importlib.import_module(_TABLE[name].module).METHOD


# scheme -> dotted module defining the METHOD that runs it (weight-only: the table above).
_SCHEMES: dict[str, str] = {"w8a8": "llmq.methods.w8a8"}


def for_config(config):
    """The Method object that carries out a QuantConfig: its scheme's, else its method's."""
    module = _SCHEMES.get(getattr(config, "scheme", "weight-only"))
    return importlib.import_module(module).METHOD if module else get(config.method)


register(MethodEntry("rtn", "llmq.methods.rtn", "round-to-nearest, no data"))
register(MethodEntry("gptq", "llmq.methods.gptq", "second-order error correction", runs_gptq=True))
register(MethodEntry("awq", "llmq.methods.awq", "activation-aware scaling"))
register(MethodEntry("awq+gptq", "llmq.methods.awq_gptq", "AWQ scaling then GPTQ codes", runs_gptq=True))
