"""What a quantized model holds, by kind: the numbers `llmq quantize` and `llmq info` print.

Both read {tensor name: (shape, dtype)}: a model's state dict or a checkpoint's
safetensors headers, so the two reports agree. Quantized modules are those
with a `.qweight` (weight-only) or a `.weight` beside a `.weight_scale`
(W8A8); a module under `experts.<e>.` is an expert projection.
Every other tensor is counted as kept in full precision under one kind:
routers (2D weights beside quantized experts in an MoE block), embeddings and
head, norms and biases (1D), and other weights, which are also named, so
nothing is left in full precision silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .kernels.layout import codes_per_word
from .qweight import PACKED_TENSORS, quantized_module_names, w8a8_module_names

_EXPERT = re.compile(r"\.experts\.\d+\.")
_EXPERTS_MODULE = re.compile(r"\.experts\.")  # per-expert tensors, or fused ones ("experts.gate_up_proj")


@dataclass
class Census:
    linears: int = 0
    linear_params: int = 0
    expert_linears: int = 0
    expert_params: int = 0
    experts_modules: int = 0
    kept: dict[str, int] = field(default_factory=dict)  # kind -> parameters
    other: list[str] = field(default_factory=list)  # names of the "other" kept weights

    @property
    def quantized_params(self) -> int:
        return self.linear_params + self.expert_params

    def lines(self) -> list[str]:
        q = f"{self.linears} linears ({self.linear_params / 1e6:.2f} M weights)"
        if self.expert_linears:
            q += (f", {self.expert_linears} expert linears in {self.experts_modules} experts modules "
                  f"({self.expert_params / 1e6:.2f} M weights)")
        kept = ", ".join(f"{kind} {n / 1e6:.3f} M" for kind, n in self.kept.items() if n) or "-"
        out = [f"quantized         {q}", f"kept full prec.   {kept}"]
        if self.other:
            shown = ", ".join(self.other[:8]) + (f" and {len(self.other) - 8} more" if len(self.other) > 8 else "")
            out.append(f"other kept        {shown}")
        return out


W8A8_TENSORS = ("weight", "weight_scale", "input_scale")


def _quantized(header: dict[str, tuple], bits: int) -> dict[str, tuple[int, tuple[str, ...]]]:
    """{module: (weights it holds, its tensors' leaf names)} of the quantized modules."""
    out = {}
    for name in quantized_module_names(header):
        k_packed, n = header[f"{name}.qweight"][0]
        out[name] = (k_packed * codes_per_word(bits) * n, PACKED_TENSORS)
    for name in w8a8_module_names(header):
        n, k = header[f"{name}.weight"][0]
        out[name] = (n * k, W8A8_TENSORS)
    return out


def expert_blocks(shapes: dict[str, list[int]]) -> set[str]:
    """The MoE blocks (module names) holding quantized experts, from tensor names."""
    blocks = set()
    for key in shapes:
        match = _EXPERT.search(key)
        if match and (key.endswith(".qweight") or key.endswith(".weight_scale")):
            blocks.add(key[: match.start()])
    return blocks


def router_names(shapes: dict[str, list[int]]) -> list[str]:
    """Modules kept in full precision beside quantized experts (routers, shared-expert gates):
    a 2D weight directly under an MoE block, or (DBRX's `router.layer`) one level further down
    with a row per expert."""
    blocks = expert_blocks(shapes)
    experts = _experts_per_block(shapes)
    return sorted(key[: -len(".weight")] for key, shape in shapes.items()
                  if key.endswith(".weight") and _is_router(key[: -len(".weight")], shape, blocks, experts))


def _experts_per_block(shapes) -> dict[str, int]:
    """{MoE block: its number of experts}, from the per-expert tensor names."""
    count: dict[str, int] = {}
    for key in shapes:
        match = re.search(r"\.experts\.(\d+)\.", key)
        if match:
            block = key[: match.start()]
            count[block] = max(count.get(block, 0), int(match.group(1)) + 1)
    return count


def _is_router(module: str, shape, blocks, experts: dict[str, int]) -> bool:
    if len(shape) != 2:
        return False
    parent = module.rpartition(".")[0]
    if parent in blocks:
        return True
    grandparent = parent.rpartition(".")[0]
    return grandparent in blocks and shape[0] == experts.get(grandparent)


def census(header: dict[str, tuple], bits: int) -> Census:
    """Count quantized and kept parameters from {tensor name: (shape, dtype)}."""
    quantized = _quantized(header, bits)
    # A GPTQ checkpoint may quantize its output head (GPTQModel's lm_head=true): then only embeddings are kept.
    embeddings = "embeddings" if any(n.rpartition(".")[2] == "lm_head" for n in quantized) else "embeddings and head"
    c = Census(kept={"routers": 0, embeddings: 0, "norms and biases": 0, "other": 0})
    expert_parents = set()
    for name in sorted(quantized):
        params = quantized[name][0]
        match = _EXPERT.search(name)
        if match:
            c.expert_linears += 1
            c.expert_params += params
            expert_parents.add(name[: match.start()])  # the MoE block holding the experts
        else:
            c.linears += 1
            c.linear_params += params
    c.experts_modules = len(expert_parents)
    # A block's router is a router whether its experts were quantized or kept (--skip): the kept
    # experts are named under "other", the router is not.
    expert_parents |= {key[: match.start()] for key in header if (match := _EXPERTS_MODULE.search(key))}
    experts = _experts_per_block(header)
    for key, (shape, _) in header.items():
        module, _, leaf = key.rpartition(".")
        if module in quantized and leaf in quantized[module][1]:
            continue
        numel = 1
        for d in shape:
            numel *= d
        if len(shape) <= 1:
            kind = "norms and biases"
        elif _is_router(module, shape, expert_parents, experts):
            kind = "routers"
        elif any(word in key for word in ("embed", "lm_head", "wte", "wpe")):
            kind = embeddings
        else:
            kind = "other"
            c.other.append(key)
        c.kept[kind] += numel
    return c


def model_census(model, bits: int) -> Census:
    """The census of a model in memory: its state dict, less the tensors tied to another one (a tied
    head is the embedding, and the checkpoint, which `folder_census` and `llmq info` read, holds it once)."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    return census({k: (list(v.shape), v.dtype) for k, v in model.state_dict().items() if k not in tied}, bits)


def folder_census(folder, bits: int) -> Census:
    """The census of a checkpoint folder llmq wrote (its safetensors headers: a streamed run's model
    is no longer in memory)."""
    from .folder_io import checkpoint_files, read_header

    return census(read_header(checkpoint_files(folder)), bits)
