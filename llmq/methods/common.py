"""What every calibrated method does around its solver, inside one decoder layer."""

from __future__ import annotations

from typing import Callable, Iterable

from torch import nn

from ..engine import layer_output
from ..modules.qlinear import QuantLinear
from ..modules.replace import replace_module
from ..qweight import QuantizedWeight


def forward_with_pre_hooks(layer: nn.Module, hooks: Iterable[tuple[str, Callable]], hidden, args, kwargs,
                           after: Callable[[], None] | None = None):
    """Run the layer once with forward pre-hooks on the named modules; return its hidden states.
    after(): run once the forward is done, while the hooks are still in place."""
    handles = [layer.get_submodule(name).register_forward_pre_hook(hook) for name, hook in hooks]
    try:
        out = layer_output(layer(hidden, *args, **kwargs))
        if after is not None:
            after()
        return out
    finally:
        for h in handles:
            h.remove()


def swap_in_quantized(layer: nn.Module, targets: Iterable[tuple[str, str]],
                      solved: dict[str, QuantizedWeight]) -> None:
    """Replace each (local name, full name) linear by a QuantLinear of its solved weight."""
    for local, full in targets:
        if local not in solved:
            raise RuntimeError(f"the forward pass never reached {full}: it cannot be calibrated")
        linear = layer.get_submodule(local)
        replace_module(layer, local, QuantLinear.from_quantized(solved.pop(local), linear.bias))
