"""Per-architecture facts, as data, keyed by `config.model_type`.

An entry says where the decoder layers are and in which order GPTQ should
quantize a layer's linears (true-sequential groups: linears in one group read
the same input). Architectures without an entry fall back to discovery: the
longest ModuleList of identical blocks that hold nn.Linear children, with each
linear in a group of its own (quantized in the order the forward reaches it).

An entry may also list AWQ's scale groups: which previous operation (an input
norm, or a linear whose output reaches the group only through elementwise
products) feeds which linears, so that per-channel scales can be folded into
it without changing the full-precision function. Architectures without them
cannot run AWQ.

Adding an architecture is one entry in ARCHITECTURES.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from .errors import LlmqError


@dataclass(frozen=True)
class ScaleGroup:
    """One AWQ scale group inside a decoder layer (names relative to the layer).

    prev: the operation whose output is exactly the linears' input, up to
        elementwise products ("norm": a RMSNorm/LayerNorm; "linear": e.g. v_proj
        before o_proj, up_proj before down_proj).
    linears: every linear reading that output (they share one scale vector).
    kind: "norm" or "linear".
    norm_offset: the norm multiplies by (norm_offset + weight): 1.0 for Gemma.
    no_clip: linears of the group whose ranges are not clip-searched (q and k,
        whose errors pass through softmax, as in the AWQ reference).
    """

    prev: str
    linears: tuple[str, ...]
    kind: str = "norm"
    norm_offset: float = 0.0
    no_clip: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in ("norm", "linear"):
            raise ValueError(f"ScaleGroup kind must be 'norm' or 'linear', not {self.kind!r}")


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # dotted path from the top-level model to the ModuleList of decoder layers
    # Linear names relative to a decoder layer; each inner tuple shares one input.
    sequential: tuple[tuple[str, ...], ...] | None = None
    # AWQ scale groups in execution order; None: AWQ is not available for this architecture.
    awq: tuple[ScaleGroup, ...] | None = None
    # What a decoder layer returns after its hidden states, in order (empty: the hidden states
    # alone): for each further output, the keyword argument of the next layer that takes it
    # (GLM-5's top-k token selection, reused by the next layer), or None where none does.
    passes: tuple[str | None, ...] = ()


_LLAMA_SEQUENTIAL = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_QK = ("self_attn.q_proj", "self_attn.k_proj")


def _llama_awq(mlp_norm: str, norm_offset: float = 0.0, mlp: str = "mlp") -> tuple[ScaleGroup, ...]:
    # v -> o is dropped at run time when grouped-query attention makes the shapes differ.
    return (
        ScaleGroup("input_layernorm", _QKV, norm_offset=norm_offset, no_clip=_QK),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), kind="linear"),
        ScaleGroup(mlp_norm, (f"{mlp}.gate_proj", f"{mlp}.up_proj"), norm_offset=norm_offset),
        ScaleGroup(f"{mlp}.up_proj", (f"{mlp}.down_proj",), kind="linear"),
    )


_LLAMA_AWQ = _llama_awq("post_attention_layernorm")
# Gemma's RMSNorm multiplies by (1 + weight); Gemma 2 and 3 have a separate pre-MLP norm.
_GEMMA_AWQ = _llama_awq("post_attention_layernorm", norm_offset=1.0)
_GEMMA2_AWQ = _llama_awq("pre_feedforward_layernorm", norm_offset=1.0)
_LLAMA = ArchSpec(layers="model.layers", sequential=_LLAMA_SEQUENTIAL, awq=_LLAMA_AWQ)

# Mixture-of-experts blocks. "*" in a name stands for each expert of the QuantExperts
# before it (llmq.moe): a group whose prev holds "*" is one group per expert (each
# expert's up projection feeds its own down projection, on the tokens routed to it);
# "*" only in the linears puts every expert into one group. The post-attention norm
# feeds the router and every expert, so they share one scale vector, searched on
# the statistics of all tokens (the router's input, listed first so that its
# forward pre-hook sees the whole batch); the router stays in full precision and
# its input columns are multiplied by the scales (compensated), so routing does
# not change.


def _moe_awq(router: tuple[str, ...], up: tuple[str, ...], down: str | None,
             shared: tuple[tuple[str, ...], str] | None = None, attention=None, dense: bool = False,
             block: str = "mlp", norm_offset: float = 0.0, norm: str = "post_attention_layernorm"):
    llama = _llama_awq(norm, norm_offset, mlp=block)
    groups = list(attention if attention is not None else llama[:2])
    shared_up = shared[0] if shared else ()
    experts = tuple(f"{block}.experts.*.{n}" for n in up)
    groups.append(ScaleGroup(norm, router + experts + shared_up, norm_offset=norm_offset))
    if down is not None:  # the up projection (of a gated pair, the second) feeds down through a product
        groups.append(ScaleGroup(f"{block}.experts.*.{up[-1]}", (f"{block}.experts.*.{down}",), kind="linear"))
    if shared:
        groups.append(ScaleGroup(shared_up[-1], (shared[1],), kind="linear"))
    if dense:  # dense layers between MoE layers (DeepSeek's and GLM-4.5's first layers, Llama 4's every other)
        groups += list(llama[2:])
    return tuple(groups)


_QWEN_EXPERTS = ("gate_proj", "up_proj")
# The attention of the MoE architectures with Llama's projections; their experts'
# gate and up projections are joined per expert where the groups are used.
_MOE_SEQUENTIAL = (_QKV, ("self_attn.o_proj",))
_MLA = (  # DeepSeek's multi-head latent attention: the low-rank projections and their norms
    ScaleGroup("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.q_proj")),
    ScaleGroup("self_attn.q_a_layernorm", ("self_attn.q_b_proj",)),
    ScaleGroup("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",)),
)
# With DeepSeek's sparse attention (GLM-5): the indexer reads the input norm's output and the
# query's low-rank state too; its weights_proj stays in full precision (the indexer reads its weight's
# dtype: llmq.weight_reads), compensated like a router.
_DSA_INDEXER = "self_attn.indexer"
_MLA_DSA = (
    ScaleGroup("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa", f"{_DSA_INDEXER}.wk",
                                   f"{_DSA_INDEXER}.weights_proj")),
    ScaleGroup("self_attn.q_a_layernorm", ("self_attn.q_b_proj", f"{_DSA_INDEXER}.wq_b")),
    _MLA[2],
)

# Parallel blocks (Cohere, Phi-2): one input norm feeds the attention and the MLP, so
# every linear reading it shares one scale vector.
_PARALLEL_SEQUENTIAL = (_QKV + ("mlp.gate_proj", "mlp.up_proj"), ("self_attn.o_proj",), ("mlp.down_proj",))
_ZAYA_CCA = tuple(f"self_attn.qkv_proj.{n}" for n in ("q_proj", "k_proj", "v_proj_current", "v_proj_delayed"))
_SHARED_EXPERTS = (("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"), "mlp.shared_experts.down_proj")
# Llama 4: the MLP (dense, or routed experts beside a shared expert) is `feed_forward`; its experts are
# fed their tokens already multiplied by the routing score (llmq.experts.UNDECORATED), which commutes
# with the scales folded into their input columns.
_LLAMA4_FF = (("feed_forward.shared_expert.gate_proj", "feed_forward.shared_expert.up_proj"),
              "feed_forward.shared_expert.down_proj")
_LLAMA4 = ArchSpec(
    layers="model.layers",
    sequential=_MOE_SEQUENTIAL + (("feed_forward.gate_proj", "feed_forward.up_proj"), ("feed_forward.down_proj",),
                                  _LLAMA4_FF[0], (_LLAMA4_FF[1],)),
    awq=_moe_awq(("feed_forward.router",), _QWEN_EXPERTS, "down_proj", shared=_LLAMA4_FF, dense=True,
                 block="feed_forward"))

def _mamba_hybrid_awq(mlp_norm: str, mlp_in: tuple[str, ...], down: str | None = None,
                      parallel: bool = False, mixer_norm: str | None = "mamba.norm") -> tuple[ScaleGroup, ...]:
    # The input norm feeds q/k/v in attention layers and the Mamba mixer's in_proj in the others
    # (parallel: both in every layer, one group); the mixer's gated RMSNorm feeds its out_proj (Jamba's
    # mixer has none: its out_proj reads the gated scan output directly).
    mixers = ((ScaleGroup("input_layernorm", _QKV + ("mamba.in_proj",), no_clip=_QK),) if parallel else
              (ScaleGroup("input_layernorm", _QKV, no_clip=_QK), ScaleGroup("input_layernorm", ("mamba.in_proj",))))
    out = (ScaleGroup(mixer_norm, ("mamba.out_proj",)),) if mixer_norm else ()
    groups = [*mixers, _LLAMA_AWQ[1], *out, ScaleGroup(mlp_norm, mlp_in)]
    if down is not None:  # the up projection (the last of mlp_in) feeds down through a product
        groups.append(ScaleGroup(mlp_in[-1], (down,), kind="linear"))
    return tuple(groups)


# DeepSeek-V3.2's layers: latent attention with sparse attention, a dense first layer, shared experts.
_DSA = ArchSpec(layers="model.layers",
                awq=_moe_awq(("mlp.gate",), _QWEN_EXPERTS, "down_proj", attention=_MLA_DSA, dense=True,
                             shared=_SHARED_EXPERTS))

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "granite": _LLAMA,  # its multipliers scale the residual stream and attention scores, not a linear's input
    "smollm3": _LLAMA,
    # OLMo 2 normalises after attention and MLP: nothing is folded into q/k/v or gate/up.
    "olmo2": ArchSpec(layers="model.layers", sequential=_LLAMA_SEQUENTIAL, awq=_LLAMA_AWQ[1::2]),
    "glm4": ArchSpec(  # fused gate_up_proj: up -> down would need a slice of it
        layers="model.layers",
        sequential=(_QKV, ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        awq=_LLAMA_AWQ[:2] + (ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",)),),
    ),
    "cohere": ArchSpec(
        layers="model.layers", sequential=_PARALLEL_SEQUENTIAL,
        awq=(ScaleGroup("input_layernorm", _PARALLEL_SEQUENTIAL[0], no_clip=_QK),) + _LLAMA_AWQ[1::2],
    ),
    "phi": ArchSpec(  # fc1 -> fc2 passes through GELU: not scaled
        layers="model.layers",
        sequential=(_QKV + ("mlp.fc1",), ("self_attn.dense",), ("mlp.fc2",)),
        awq=(ScaleGroup("input_layernorm", _QKV + ("mlp.fc1",), no_clip=_QK),
             ScaleGroup("self_attn.v_proj", ("self_attn.dense",), kind="linear")),
    ),
    "starcoder2": ArchSpec(  # c_fc -> c_proj passes through GELU: not scaled
        layers="model.layers",
        sequential=(_QKV, ("self_attn.o_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        awq=_LLAMA_AWQ[:2] + (ScaleGroup("post_attention_layernorm", ("mlp.c_fc",)),),
    ),
    "gpt_neox": ArchSpec(  # the MLP reads its own norm of the layer input, parallel residual or not
        layers="gpt_neox.layers",
        sequential=(("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",),
                    ("mlp.dense_4h_to_h",)),
        awq=(ScaleGroup("input_layernorm", ("attention.query_key_value",), no_clip=("attention.query_key_value",)),
             ScaleGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
    ),
    "gemma": ArchSpec(layers="model.layers", sequential=_LLAMA_SEQUENTIAL, awq=_GEMMA_AWQ),
    "gemma2": ArchSpec(layers="model.layers", sequential=_LLAMA_SEQUENTIAL, awq=_GEMMA2_AWQ),
    "gemma3_text": ArchSpec(layers="model.layers", sequential=_LLAMA_SEQUENTIAL, awq=_GEMMA2_AWQ),
    "gemma3": ArchSpec(layers="model.language_model.layers", sequential=_LLAMA_SEQUENTIAL, awq=_GEMMA2_AWQ),
    "phi3": ArchSpec(
        layers="model.layers",
        sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        # v -> o and up -> down would need slices of the fused projections: not scaled.
        awq=(
            ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), no_clip=("self_attn.qkv_proj",)),
            ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",)),
        ),
    ),
    "mixtral": ArchSpec(layers="model.layers", sequential=_MOE_SEQUENTIAL,
                       awq=_moe_awq(("mlp.gate",), ("w1", "w3"), "w2")),
    "qwen2_moe": ArchSpec(
        layers="model.layers",
        sequential=_MOE_SEQUENTIAL + (("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
                                      ("mlp.shared_expert.down_proj",)),
        awq=_moe_awq(("mlp.gate", "mlp.shared_expert_gate"), _QWEN_EXPERTS, "down_proj",
                     shared=(("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
                             "mlp.shared_expert.down_proj"))),
    "qwen3_moe": ArchSpec(layers="model.layers", sequential=_MOE_SEQUENTIAL,
                         awq=_moe_awq(("mlp.gate",), _QWEN_EXPERTS, "down_proj")),
    "olmoe": ArchSpec(layers="model.layers", sequential=_MOE_SEQUENTIAL,
                      awq=_moe_awq(("mlp.gate",), _QWEN_EXPERTS, "down_proj")),
    "deepseek_v3": ArchSpec(layers="model.layers", awq=_moe_awq(
        ("mlp.gate",), _QWEN_EXPERTS, "down_proj", attention=_MLA, dense=True,
        shared=_SHARED_EXPERTS)),
    # gpt-oss: (up + 1) * clamped GLU between the projections: no up -> down group.
    "gpt_oss": ArchSpec(layers="model.layers", awq=_moe_awq(("mlp.router",), ("gate_up_proj",), None)),
    "deepseek_v32": _DSA,
    # GLM-5: a layer's top-k token selection goes to the next, which reuses it on "shared" indexer layers.
    "glm_moe_dsa": replace(_DSA, passes=("prev_topk_indices",)),
    # Mamba-attention hybrids: each layer mixes by attention or by Mamba (Falcon-H1: both, side by
    # side). Bamba returns its attention weights after the hidden states; no layer reads them.
    "bamba": ArchSpec(layers="model.layers", passes=(None,), awq=_mamba_hybrid_awq(
        "pre_ff_layernorm", ("feed_forward.gate_proj", "feed_forward.up_proj"), "feed_forward.down_proj")),
    # Jamba: Mamba layers and attention layers, dense MLPs and MoE blocks alternating (the Mamba
    # mixer reads dt_proj's weight directly on its fast path: llmq.weight_reads keeps it).
    "jamba": ArchSpec(layers="model.layers", awq=_mamba_hybrid_awq(
        "pre_ff_layernorm", ("feed_forward.gate_proj", "feed_forward.up_proj"), "feed_forward.down_proj",
        mixer_norm=None) + _moe_awq(("feed_forward.router",), _QWEN_EXPERTS, "down_proj", attention=(),
                                    block="feed_forward", norm="pre_ff_layernorm")),
    # Kimi Linear: delta-rule linear-attention layers (the input norm feeds q/k/v and the forget, beta
    # and output gates; each gate's low-rank pair is a linear pair) and latent-attention layers;
    # a dense first MLP, then MoE blocks (Mixtral's expert names) with a shared expert. Its per-head
    # gated output norm cannot take a scale per channel.
    "kimi_linear": ArchSpec(layers="model.layers", awq=_moe_awq(
        ("mlp.gate",), ("w1", "w3"), "w2", shared=_SHARED_EXPERTS, dense=True, attention=(
            ScaleGroup("input_layernorm", _QKV + ("self_attn.forget_gate.f_a_proj", "self_attn.b_proj",
                                                  "self_attn.g_a_proj", "self_attn.kv_a_proj_with_mqa"), no_clip=_QK),
            _MLA[2],
            ScaleGroup("self_attn.forget_gate.f_a_proj", ("self_attn.forget_gate.f_b_proj",), kind="linear"),
            ScaleGroup("self_attn.g_a_proj", ("self_attn.g_b_proj",), kind="linear")))),
    "granitemoehybrid": ArchSpec(layers="model.layers", awq=_mamba_hybrid_awq(  # fused gate/up: no up -> down
        "post_attention_layernorm",
        ("block_sparse_moe.router", "block_sparse_moe.experts.*.gate_up_proj", "shared_mlp.input_linear"))),
    "falcon_h1": ArchSpec(layers="model.layers", awq=_mamba_hybrid_awq(
        "pre_ff_layernorm", ("feed_forward.gate_proj", "feed_forward.up_proj"), "feed_forward.down_proj",
        parallel=True)),
    "llama4_text": _LLAMA4,
    "olmo_hybrid": ArchSpec(layers="model.layers"),
    "inkling2_text": ArchSpec(layers="model.layers"),
    # Hunyuan V4: as GLM-5, a layer's top-k token selection goes to the next, which reuses it on "shared"
    # indexer layers (its hyper-connection streams: no scale groups).
    "hy_v4": ArchSpec(layers="model.layers", passes=("prev_topk_indices",)),
    # ZAYA1: each layer's router hands its projected hidden states on to the next layer's router
    # (llmq.experts.ROUTER_NETWORKS keeps the routers). Its convolutional attention reads the input
    # norm through four projections; q and k are mixed by convolutions before the attention, and
    # each value head joins halves of two projections, one of them a token late (no v -> o group).
    "zaya": ArchSpec(layers="model.layers", passes=("prev_router_hidden_states",), awq=_moe_awq(
        ("mlp.gate.down_proj",), ("gate_up_proj",), None,
        attention=(ScaleGroup("input_layernorm", _ZAYA_CCA, no_clip=_ZAYA_CCA[:2]),))),
    # DBRX: fused q/k/v (no v -> o); its norm_2 feeds the router's linear and every expert.
    "dbrx": ArchSpec(layers="transformer.blocks", awq=(
        ScaleGroup("norm_attn_norm.norm_1", ("norm_attn_norm.attn.Wqkv",), no_clip=("norm_attn_norm.attn.Wqkv",)),
        ScaleGroup("norm_attn_norm.norm_2", ("ffn.router.layer", "ffn.experts.*.w1", "ffn.experts.*.v1")),
        ScaleGroup("ffn.experts.*.v1", ("ffn.experts.*.w2",), kind="linear"))),
    "glm4_moe": ArchSpec(layers="model.layers", awq=_moe_awq(("mlp.gate",), _QWEN_EXPERTS, "down_proj",
                                                             shared=_SHARED_EXPERTS, dense=True)),
    "ernie4_5_moe": ArchSpec(layers="model.layers", awq=_moe_awq(("mlp.gate",), _QWEN_EXPERTS, "down_proj",
                                                                 shared=_SHARED_EXPERTS, dense=True)),
    "phimoe": ArchSpec(layers="model.layers", sequential=_MOE_SEQUENTIAL,
                       awq=_moe_awq(("mlp.router",), ("w1", "w3"), "w2")),
    # Granite MoE keeps its experts' gate and up fused on disk: no up -> down group.
    "granitemoe": ArchSpec(layers="model.layers", sequential=_MOE_SEQUENTIAL,
                           awq=_moe_awq(("block_sparse_moe.router",), ("gate_up_proj",), None,
                                        block="block_sparse_moe")),
    # Qwen3-Next: RMSNorms multiply by (1 + weight); its linear-attention layers read the input
    # norm through in_proj_qkvz and in_proj_ba instead of q/k/v.
    "qwen3_next": ArchSpec(layers="model.layers", sequential=_MOE_SEQUENTIAL, awq=_moe_awq(
        ("mlp.gate", "mlp.shared_expert_gate"), _QWEN_EXPERTS, "down_proj", norm_offset=1.0,
        shared=(("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), "mlp.shared_expert.down_proj"),
        attention=_llama_awq("post_attention_layernorm", norm_offset=1.0)[:2] + (
            ScaleGroup("input_layernorm", ("linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba"), norm_offset=1.0,
                       no_clip=("linear_attn.in_proj_qkvz",)),))),
    "opt": ArchSpec(
        layers="model.decoder.layers",
        sequential=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        # fc1 -> fc2 passes through the activation: not scaled. The norms feed the
        # linears only with do_layer_norm_before (checked where the groups are used).
        awq=(
            ScaleGroup("self_attn_layer_norm", _QKV, no_clip=_QK),
            ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), kind="linear"),
            ScaleGroup("final_layer_norm", ("fc1",)),
        ),
    ),
}


def _unsupported_layer_types(model: nn.Module) -> set[str]:
    # GPT-2 style Conv1D stores its weight transposed ([in, out]); quantizing it as a
    # Linear would silently transpose the layer, so such models are refused.
    return {type(m).__name__ for m in model.modules() if type(m).__name__ == "Conv1D"}


# Architectures llmq refuses, and why: facts of their modelling code that no entry can describe.
REFUSED = {
    "rwkv": "its blocks hand a recurrent state to each other, and its model rescales its output linears' "
            "weights in place, which quantized linears do not hold",
    **dict.fromkeys(("zamba", "zamba2"), "its hybrid layers run one attention block whose weights they share "
                                         "(tied), which quantizing layer by layer would untie"),
}


def arch_spec(model: nn.Module) -> ArchSpec:
    """The spec for this model: its entry, or one discovered from the module tree."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in REFUSED:
        raise LlmqError(f"architecture {model_type!r} is not supported: {REFUSED[model_type]}; use a transformer "
                        "model built from nn.Linear layers (Llama, Mistral, Qwen, Gemma, Phi-3, OPT ...)")
    unsupported = _unsupported_layer_types(model)
    if unsupported:
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        raise LlmqError(f"architecture {model_type!r} uses {', '.join(sorted(unsupported))} layers (GPT-2 style "
                        "transposed linears), which llmq does not quantize; use a model built from nn.Linear "
                        "layers (Llama, Mistral, Qwen, Gemma, Phi-3, OPT ...)")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is not None and _get(model, spec.layers) is not None:
        return spec
    return ArchSpec(layers=_discover_layers(model), sequential=None)


def check_discovered_layers(model: nn.Module, spec: ArchSpec) -> None:
    """Refuse layers found by discovery that leave most of the model's linear weights outside them
    (Zamba2's mixed layer classes, XLM's separate attention and MLP lists, HRM's two stacks): the run
    would quantize a fraction of the model. Other modalities' encoders and the output head do not count."""
    if getattr(getattr(model, "config", None), "model_type", None) in ARCHITECTURES:
        return
    prefix = spec.layers + "."
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside, outside = 0, {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or m is head or _other_modality(name):
            continue
        if name.startswith(prefix):
            inside += m.weight.numel()
        else:
            outside[name] = m.weight.numel()
    if inside < 2 * sum(outside.values()):
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        share = inside / max(inside + sum(outside.values()), 1)
        raise LlmqError(f"the decoder layers llmq found in architecture {model_type!r} ({spec.layers}) hold "
                        f"{share:.0%} of its linear weights, and {len(outside)} linears are outside them (e.g. "
                        f"{max(outside, key=outside.get)}), so much of the model would stay unquantized: add an "
                        "entry to llmq.arch.ARCHITECTURES naming the ModuleList of its decoder layers")


def decoder_layers(model: nn.Module, spec: ArchSpec | None = None) -> tuple[str, nn.ModuleList]:
    """(dotted path, ModuleList) of the decoder layers; spec: the model's, if already resolved."""
    spec = spec or arch_spec(model)
    return spec.layers, _get(model, spec.layers)


# nn.Linear subclasses whose own forward computes x W^T + b all the same (Falcon's writes it out).
PLAIN_LINEAR_SUBCLASSES = ("FalconLinear",)


def is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear computing x W^T + b and nothing else: a quantized linear can take its place. (Llama
    4's router is an nn.Linear subclass whose forward also picks the top-k experts.)"""
    return isinstance(module, nn.Linear) and (type(module).forward is nn.Linear.forward
                                              or type(module).__name__ in PLAIN_LINEAR_SUBCLASSES)


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """All nn.Linear modules inside one decoder layer, by name relative to the layer."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def sequential_groups(spec: ArchSpec, layer: nn.Module, names: list[str]) -> list[list[str]]:
    """The quantization order inside a layer, restricted to the linears being quantized.

    Linears the spec does not name (an architecture variant with extra
    projections) get a group each, so nothing is skipped.
    """
    if spec.sequential is None:
        return _join_expert_inputs(layer, [[n] for n in names])
    wanted = set(names)
    groups = [[n for n in group if n in wanted] for group in spec.sequential]
    groups = [g for g in groups if g]
    listed = {n for g in groups for n in g}
    return _join_expert_inputs(layer, groups + [[n] for n in names if n not in listed])


def _join_expert_inputs(layer: nn.Module, groups: list[list[str]]) -> list[list[str]]:
    """Put each expert's gate and up projections (one input) into one group, where the first stands."""
    from .modules.qexperts import QuantExperts

    join: dict[str, list[str]] = {}
    for qname, q in layer.named_modules():
        if isinstance(q, QuantExperts) and len(q.up_names) > 1:
            for e in range(q.num_experts):
                members = [f"{qname}.{e}.{n}" for n in q.up_names]
                join.update({m: members for m in members})
    if not join:
        return groups
    out, placed = [], set()
    for g in groups:
        if len(g) == 1 and g[0] in join:
            members = [m for m in join[g[0]] if any(m in h for h in groups)]
            if g[0] not in placed:
                out.append(members)
                placed.update(members)
            continue
        out.append(g)
    return out


def _get(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.ModuleList) else None


# Modules of other modalities (a multimodal causal LM's encoders): their layer lists are not the
# decoder's, however long (Phi-4-multimodal's audio encoder, GIT's image encoder).
_OTHER_MODALITIES = ("vision", "visual", "image", "audio", "speech", "embed")


def _other_modality(name: str) -> bool:
    return any(word in part for part in name.lower().split(".") for word in _OTHER_MODALITIES)


def _discover_layers(model: nn.Module) -> str:
    """The longest ModuleList of one layer class holding linears, outside other modalities' encoders
    where there is one."""
    found = []
    for name, m in model.named_modules():
        kinds = {type(child) for child in m} if isinstance(m, nn.ModuleList) else set()
        if len(kinds) == 1 and any(isinstance(x, nn.Linear) for x in m[0].modules()):
            found.append((name, len(m)))
    textual = [(name, n) for name, n in found if not _other_modality(name)]
    best = max(textual or found, key=lambda item: item[1], default=(None, 0))[0]
    if best is None:
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        raise LlmqError(f"could not find the decoder layers of architecture {model_type!r}: add an entry "
                        "to llmq.arch.ARCHITECTURES naming the ModuleList that holds them")
    return best
