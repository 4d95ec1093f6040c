"""Which serving engines will load an exported checkpoint, and why not.

The rules are the published constraints of each engine's loader (vLLM's
gptq_marlin / marlin_utils / compressed_tensors_wNa16 code, transformers'
quantizers), checked against the layer shapes of the checkpoint. They state
what the formats promise; the only engine exercised by llmq's own tests is
stock transformers with the compressed-tensors package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import QuantConfig

# vLLM's Marlin kernels (gptq_marlin and the compressed-tensors WNA16 scheme):
# output features per tensor-parallel shard must be a multiple of
# GPTQ_MARLIN_MIN_THREAD_N, input features a multiple of GPTQ_MARLIN_MIN_THREAD_K.
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MARLIN_MIN_N = 64
MARLIN_MIN_K = 128


@dataclass
class EngineSupport:
    engine: str
    loads: bool
    why: str

    def line(self) -> str:
        return f"  {'yes' if self.loads else 'no ':4} {self.engine:34} {self.why}"


def marlin_shape_problem(shapes: dict[str, tuple[int, int]], group_size: int) -> str | None:
    """Why Marlin refuses one of these [N, K] layer shapes (at tensor parallel 1), or None."""
    for name, (n, k) in sorted(shapes.items()):
        if n % MARLIN_MIN_N:
            return f"{name} has {n} output features, not a multiple of {MARLIN_MIN_N}"
        if k % MARLIN_MIN_K:
            return f"{name} has {k} input features, not a multiple of {MARLIN_MIN_K}"
    return None


def marlin_problem(qc: QuantConfig, shapes: dict[str, tuple[int, int]], zero_points_ok: bool) -> str | None:
    if qc.bits not in (4, 8):
        return f"{qc.bits}-bit weights"
    if not qc.sym and not zero_points_ok:
        return "asymmetric (its GPTQ path has no zero points)"
    if qc.group_size not in MARLIN_GROUP_SIZES:
        return f"group size {qc.group_size} (Marlin takes -1, 32, 64, 128)"
    return marlin_shape_problem(shapes, qc.group_size)


def format_report(title: str, rows: list[EngineSupport]) -> str:
    lines = [f"{title} (from the engines' published loader rules; not run here):"]
    lines += [r.line() for r in rows]
    return "\n".join(lines)


# The per-expert projections vLLM's expert mapping reads (FusedMoE.make_expert_params_mapping).
_VLLM_EXPERT_NAMES = ("w1", "w2", "w3", "gate_proj", "up_proj", "down_proj")


def expert_name_vllm_skips(names) -> str | None:
    """A per-expert projection name among the layer names that vLLM's expert mapping does not read, or
    None: the fused `gate_up_proj` that llmq writes per expert for architectures storing their experts
    fused (gpt-oss, Granite MoE), or DBRX's `v1`. Those architectures' vLLM loaders read their experts
    whole, as stored."""
    for name in names:
        match = re.search(r"\.experts\.\d+\.(\w+)$", name)
        if match and match.group(1) not in _VLLM_EXPERT_NAMES:
            return match.group(1)
    return None


def how_transformers_gathers_experts(model_type: str | None, experts_classes=(), method: str = "") -> str | None:
    """How transformers loads per-expert tensors (`experts.<e>.<proj>.weight`) of a checkpoint in
    quantization format `method` into a model whose experts modules are of `experts_classes`: "merges"
    (its checkpoint conversion mapping stacks them into the fused experts), "per-expert" (its quantizers
    put one module per expert in place of the fused one, as for Llama 4's experts), or None: it has no
    way (gpt-oss and Granite MoE store their experts fused on disk) and loads the experts unset, with no
    error."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter
    from transformers.quantizers import base

    patched = getattr(base, "MODULES_TO_PATCH_FOR_QUANTIZATION", {})  # class name -> its per-expert stand-in

    if any(method in (str(getattr(m, "value", m)) for m in patched[c]["quantization_methods"])
           for c in experts_classes if c in patched):
        return "per-expert"
    mapping = get_checkpoint_conversion_mapping(model_type) if model_type else None
    merging = [c for c in mapping or () if isinstance(c, WeightConverter)
               and any(".experts.*." in p for p in c.source_patterns)]
    return "merges" if merging else None


def transformers_code_stops(config: dict, linears, experts_classes=()) -> str | None:
    """Why stock transformers stops loading this model's compressed-tensors checkpoint with packed weights
    for a reason in its modelling code, or None. config: the checkpoint's config.json; linears: the
    quantized linears' names; experts_classes: the class names of its experts modules.

    - Its `_init_weights`, which transformers runs after loading, reads a quantized linear's weight
      (llmq.weight_reads.linears_read_by_initializer), which packed linears do not have.
    - Its experts have identity experts beside them whose slots the stacked weights must hold
      (LongCat-Flash; llmq.experts.ExpertsFlags.routed): the stored experts stack to fewer."""
    import transformers

    from ..experts import UNDECORATED
    from ..weight_reads import linears_read_by_initializer

    identities = [c for c in experts_classes if c in UNDECORATED and UNDECORATED[c].routed]
    if identities and _transformers_at_least(_STOPS_ON_IDENTITY_SLOTS):
        return (f"transformers stacks the stored experts into {identities[0]}'s gate_up_proj, which also holds "
                "slots for its identity experts, and stops on the size (5.17 loads it)")
    cls = next((getattr(transformers, a, None) for a in config.get("architectures") or ()), None)
    read = linears_read_by_initializer(cls) if isinstance(cls, type) else frozenset()
    hit = next((name for name in sorted(linears) if name.rpartition(".")[2] in read), None)
    if hit is not None:
        return (f"its weight initializer, which transformers runs after loading, reads the weight of "
                f"{hit.rpartition('.')[2]} ({hit}), which compressed-tensors' packed linears do not have")
    return None


# The first transformers releases seen stopping on fused layer tensors (fused_layer_tensors) and on
# stacked experts with identity-expert slots (transformers_code_stops); 5.17 loads both.
_STOPS_ON_FUSED_LAYER_TENSORS = (5, 24)
_STOPS_ON_IDENTITY_SLOTS = (5, 24)


def _transformers_at_least(version: tuple[int, int]) -> bool:
    import transformers

    return tuple(int(part) for part in transformers.__version__.split(".")[:2]) >= version


def fused_layer_tensors(model_type: str | None) -> str | None:
    """A tensor that transformers' conversion mapping for model_type builds from several stored ones
    outside the experts (Kimi Linear's q/k/v conv kernels), where the installed transformers' compressed-
    tensors loading finds none of the stored parts ("Concatenate on tensors destined for ... Ckpt contains:
    0", transformers 5.24 with compressed-tensors 0.20) and stops; else None (transformers 5.17 loads them)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    if not _transformers_at_least(_STOPS_ON_FUSED_LAYER_TENSORS):
        return None

    for c in (get_checkpoint_conversion_mapping(model_type) if model_type else None) or ():
        if isinstance(c, WeightConverter) and not any("experts" in p for p in c.source_patterns):
            return c.target_patterns[0]
    return None


def moe_engine_support(fmt: str, qc: QuantConfig, shapes: dict[str, tuple[int, int]]) -> list[EngineSupport]:
    """Rows for mixture-of-experts experts (names `<block>.experts.<e>.<proj>.*`), or none.

    vLLM reads each expert's tensors by the checkpoint's per-expert names
    (FusedMoE.make_expert_params_mapping: Mixtral w1/w3/w2, others
    gate_proj/up_proj/down_proj) into its fused MoE layer.
    """
    if not any(".experts." in name for name in shapes):
        return []
    engine = "vLLM MoE experts (FusedMoE)"
    skipped = expert_name_vllm_skips(shapes)
    if skipped is not None:
        return [EngineSupport(engine, False, f"llmq writes each expert's {skipped} under that name, which vLLM's "
                                             "expert mapping does not read (w1/w3/w2 or gate_proj/up_proj/"
                                             "down_proj), and its loaders for architectures storing experts fused "
                                             "(gpt-oss, Granite MoE, DBRX) read them only whole: load the folder "
                                             "with llmq")]
    if fmt == "compressed-tensors":
        if qc.sym:
            return [EngineSupport(engine, True, "symmetric WNA16 experts (Marlin MoE or the moe_wna16 kernel)")]
        return [EngineSupport(engine, False, "asymmetric experts load only in vLLM releases with PR #44025 (merged "
                                             "2026-05-29); vLLM 0.19.0 stops with 'Only symmetric quantization is "
                                             "supported for MoE': export with --sym for older vLLM")]
    if qc.sym:
        return [EngineSupport(engine, True, "symmetric GPTQ experts: gptq_marlin MoE, or moe_wna16 where Marlin "
                                            "refuses the layer")]
    return [EngineSupport(engine, True, "asymmetric GPTQ experts: not on Marlin; vLLM falls back to the moe_wna16 "
                                        "kernel, which reads zero points (from vLLM's gptq configs; the first release "
                                        "doing so not checked here)")]
