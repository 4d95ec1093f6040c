"""Shared fixtures: tiny random models of every supported architecture, built from configs."""

from __future__ import annotations

import os

# Triton kernels run on CPU tensors under the interpreter, which must be chosen
# before triton defines any kernel; set it for the whole session so the order
# in which test modules import triton does not matter.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as T  # noqa: E402

_COMMON = dict(vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_ATTN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)

TINY_CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_ATTN, **_COMMON),
    "mistral": lambda: T.MistralConfig(**_ATTN, **_COMMON),
    "qwen2": lambda: T.Qwen2Config(**_ATTN, **_COMMON),
    "qwen3": lambda: T.Qwen3Config(**_ATTN, head_dim=16, **_COMMON),
    "gemma3": lambda: T.Gemma3TextConfig(**_ATTN, head_dim=16, sliding_window=4,
                                         layer_types=["sliding_attention", "full_attention"], **_COMMON),
    "phi3": lambda: T.Phi3Config(**_ATTN, **_COMMON),
    "opt": lambda: T.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                               word_embed_proj_dim=64, **_COMMON),
}

# Mixture-of-experts models (4 experts, top-2): their experts are 3D parameters of one module.
_MOE = dict(num_experts_per_tok=2, **_ATTN, **_COMMON)
TINY_MOE_CONFIGS = {
    "mixtral": lambda: T.MixtralConfig(num_local_experts=4, **_MOE),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(num_experts=4, moe_intermediate_size=32,  # with a gated shared expert
                                          shared_expert_intermediate_size=64, **_MOE),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=32, head_dim=16, **_MOE),
    "deepseek_v3": lambda: T.DeepseekV3Config(  # MLA attention, a dense first layer, shared experts
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, **_COMMON),
    "gpt_oss": lambda: T.GptOssConfig(  # transposed, interleaved gate/up, expert biases
        num_local_experts=4, head_dim=16, layer_types=["sliding_attention", "full_attention"], sliding_window=4,
        **_MOE),
    "olmoe": lambda: T.OlmoeConfig(num_experts=4, **_MOE),
}

_HYBRID = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=16,
               **_ATTN, **_COMMON)
# Further architectures llmq knows the scale groups of (tests/test_more_architectures.py):
# parallel blocks, post-norms, fused projections, other expert layouts, norms of (1 + weight).
MORE_CONFIGS = {
    "granite": lambda: T.GraniteConfig(**_ATTN, **_COMMON),
    "smollm3": lambda: T.SmolLM3Config(**_ATTN, **_COMMON),
    "olmo2": lambda: T.Olmo2Config(**_ATTN, **_COMMON),
    "glm4": lambda: T.Glm4Config(**_ATTN, head_dim=16, **_COMMON),
    "cohere": lambda: T.CohereConfig(**_ATTN, **_COMMON),
    "phi": lambda: T.PhiConfig(**_ATTN, **_COMMON),
    "starcoder2": lambda: T.Starcoder2Config(**_ATTN, **_COMMON),
    "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, **_COMMON),
    "granitemoe": lambda: T.GraniteMoeConfig(num_local_experts=4, **_MOE),
    "phimoe": lambda: T.PhimoeConfig(num_local_experts=4, **_MOE),
    "glm4_moe": lambda: T.Glm4MoeConfig(n_routed_experts=4, moe_intermediate_size=32, first_k_dense_replace=1,
                                        n_group=1, topk_group=1, head_dim=16, **_MOE),
    "ernie4_5_moe": lambda: T.Ernie4_5_MoeConfig(moe_num_experts=4, moe_k=2, moe_intermediate_size=32,
                                                 moe_layer_start_index=1, **_ATTN, **_COMMON),
    "qwen3_next": lambda: T.Qwen3NextConfig(  # a linear-attention layer, then a full-attention one
        num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64, head_dim=16,
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
        layer_types=["linear_attention", "full_attention"], **_MOE),
    # GLM-5: latent attention with sparse attention; its second layer reuses the first's top-k tokens.
    "glm_moe_dsa": lambda: T.GlmMoeDsaConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1, kv_lora_rank=32, q_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, index_topk=4, index_n_heads=8, index_head_dim=16,
        indexer_types=["full", "shared"], **_COMMON),
    "deepseek_v32": lambda: T.DeepseekV32Config(  # DeepSeek-V3.2: every layer selects its own top-k tokens
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1, kv_lora_rank=32, q_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, index_topk=4, index_n_heads=8, index_head_dim=16,
        **_COMMON),
    # Llama 4: a dense layer, then an MoE one (top-1 experts fed scored copies, a shared expert); the
    # first layer's attention is chunked (chunks of 4 tokens), the second's full and without RoPE.
    "llama4_text": lambda: T.Llama4TextConfig(
        intermediate_size=32, intermediate_size_mlp=128, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=2, no_rope_layers=[1, 0], attention_chunk_size=4,
        **{k: v for k, v in _ATTN.items() if k != "intermediate_size"}, **_COMMON),
    # DBRX: its experts' weights stacked in 2D parameters of a submodule, its router's linear inside a module.
    "dbrx": lambda: T.DbrxConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=64,
                                 attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
                                 ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2), **_COMMON),
    # Mamba-attention hybrids: a Mamba layer, then an attention one (Falcon-H1: both in each layer).
    "bamba": lambda: T.BambaConfig(attn_layer_indices=[1], **_HYBRID),
    "granitemoehybrid": lambda: T.GraniteMoeHybridConfig(num_local_experts=4, num_experts_per_tok=2,
                                                         shared_intermediate_size=64,
                                                         layer_types=["mamba", "attention"], **_HYBRID),
    "falcon_h1": lambda: T.FalconH1Config(mamba_d_ssm=128, **_HYBRID),
    # Kimi Linear: a linear-attention layer with a dense MLP, then a latent-attention one with an MoE block.
    "kimi_linear": lambda: T.KimiLinearConfig(
        moe_intermediate_size=32, num_experts=4, num_experts_per_token=2, num_shared_experts=1, kv_lora_rank=32,
        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=16, linear_head_dim=32,
        linear_num_heads=8, mlp_layer_types=["dense", "sparse"], layer_types=["linear_attention", "full_attention"],
        **_ATTN, **_COMMON),
    # Jamba: a Mamba layer with a dense MLP, then an attention layer with an MoE block.
    "jamba": lambda: T.JambaConfig(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                   expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=16,
                                   mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8,
                                   **_ATTN, **_COMMON),
}

if hasattr(T, "ZayaConfig"):  # transformers 5.24 and later
    # ZAYA1: convolutional attention, top-1 experts, a router network whose state passes from layer to layer.
    MORE_CONFIGS["zaya"] = lambda: T.ZayaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        moe_intermediate_size=32, num_experts=4, num_experts_per_tok=1, router_hidden_size=32,
        layer_types=["hybrid", "hybrid"], **_COMMON)

# Architectures llmq knows no scale groups of (planned by discovery, or by an llmq.arch entry naming
# their layers alone) whose own code meets a quantized model head on
# (tests/test_discovered_architectures.py); each is left out where the installed transformers does not
# have it.
_DISCOVERED = {
    # Their weight initializers reach into a child linear's `.weight` after loading.
    "gpt_bigcode": ("GPTBigCodeConfig", dict(n_embd=64, n_layer=2, n_head=4)),
    "nanochat": ("NanoChatConfig", dict(**_ATTN)),
    "modernbert-decoder": ("ModernBertDecoderConfig", dict(
        **{k: v for k, v in _ATTN.items() if k != "num_key_value_heads"},
        layer_types=["full_attention", "sliding_attention"], cls_token_id=1, sep_token_id=2)),
    # Mamba's mixer holds tensors of its own, and reads dt_proj's weight on its CUDA path.
    "mamba": ("MambaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, time_step_rank=8)),
    # Its sparse-attention indexer casts to weights_proj's weight dtype.
    "hy_v4": ("HYV4Config", dict(
        **_ATTN, moe_intermediate_size=32, head_dim=16, n_routed_experts=4, num_experts_per_tok=2, q_lora_rank=32,
        kv_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, mlp_layer_types=["dense", "sparse"],
        layer_types=["indexed_attention", "indexed_attention"], indexer_types=["full", "shared"])),
    # LongCat-Flash: two MLA attentions and two dense MLPs per layer beside an MoE block whose router also
    # picks among identity ("zero") experts; top-2 of 4 experts and 4 identities (tests/test_longcat.py).
    "longcat_flash": ("LongcatFlashConfig", dict(
        hidden_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=4, ffn_hidden_size=128,
        expert_ffn_hidden_size=32, n_routed_experts=4, zero_expert_num=4, moe_topk=2, q_lora_rank=32,
        kv_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=8, head_dim=8, v_head_dim=16)),
    # Gemma 3n: AltUp's mixing coefficients and modality router are linears too small to pack in 4 bits.
    # Four layers: more than its three AltUp projections, which also sit in a list.
    "gemma3n_text": ("Gemma3nTextConfig", dict(
        **{**_ATTN, "num_hidden_layers": 4}, head_dim=16, vocab_size_per_layer_input=256,
        hidden_size_per_layer_input=16, num_kv_shared_layers=0, laurel_rank=16, activation_sparsity_pattern=[0.0] * 4,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2)),
    # OLMo hybrid: linear-attention and attention layers of two classes in one list; per-head gates.
    "olmo_hybrid": ("OlmoHybridConfig", dict(
        **{**_ATTN, "num_key_value_heads": 4}, layer_types=["linear_attention", "full_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)),
    # Inkling 2: a renaming for its short convolutions' weight_proj, stored as `sconv.weight_proj`, would
    # also rename the packed tensors below it. Its vocabulary: the size its checkpoints unpad from.
    "inkling2_text": ("Inkling2TextConfig", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        layer_types=["hybrid_sliding", "hybrid"], moe_intermediate_size=32, n_routed_experts=4,
        num_experts_per_tok=2, vocab_size=201024)),
    # MoE architectures planned by discovery: Hunyuan-A13B's, dots.llm1's (a dense first layer, a shared
    # expert) and LFM2-MoE's (convolution and attention layers, a dense first layer).
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", dict(
        **_ATTN, head_dim=16, num_experts=4, moe_topk=2, rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
    "dots1": ("Dots1Config", dict(**_ATTN, moe_intermediate_size=32, n_shared_experts=1, n_routed_experts=4,
                                  num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1)),
    "lfm2_moe": ("Lfm2MoeConfig", dict(**_ATTN, moe_intermediate_size=32, num_dense_layers=1, num_experts_per_tok=2,
                                       num_experts=4, layer_types=["conv", "full_attention"])),
    # Stored with q/k/v fused in one `query_key_value`, split on loading.
    "sarvam_moe": ("SarvamMoEConfig", dict(**_ATTN, moe_intermediate_size=32, num_experts_per_tok=2,
                                           n_routed_experts=4, head_dim=16)),
}


def _config_builds(name: str, kw: dict) -> bool:
    """Whether the installed transformers has config class `name` and takes these settings (transformers
    5.17's Hunyuan V4 knows other layer types)."""
    try:
        getattr(T, name)(**{**_COMMON, **kw})
    except Exception:  # a missing class, or its validators (huggingface_hub's own error class)
        return False
    return True


DISCOVERED_CONFIGS = {arch: (lambda name=name, kw=kw: getattr(T, name)(**{**_COMMON, **kw}))
                      for arch, (name, kw) in _DISCOVERED.items() if _config_builds(name, kw)}


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = {**TINY_CONFIGS, **TINY_MOE_CONFIGS, **MORE_CONFIGS, **DISCOVERED_CONFIGS}[arch]()
    model = T.AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init gives tiny weights in some architectures; spread them so that
    # quantization error is visible and outputs depend on every layer.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() in (2, 3):  # 3D: the experts of MoE models
                p.normal_(0, 0.05)
    return model.eval()


@pytest.fixture
def tiny_llama_dir(tmp_path):
    path = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    return path


def random_ids(n: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n, length), generator=g)


WORDS = [f"w{i}" for i in range(200)]


def model_folder_with_text(path, arch: str = "llama", seed: int = 2, dtype=torch.float32):
    """A tiny model saved in several shards with a word-level tokenizer, and a text file to calibrate on
    (returned), for command-line runs of the calibrated methods."""
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers

    tiny_model(arch, seed=seed, dtype=dtype).save_pretrained(path, max_shard_size="60KB")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    T.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                              unk_token="<unk>").save_pretrained(path)
    rng = random.Random(5)
    text = path.parent / f"{path.name}-calib.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(40)))
    return text


def checkpoint_tensors(folder) -> dict:
    """Every tensor of a safetensors folder by name (a name in two shards is an error)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                assert k not in out, f"{k} in two shards"
                out[k] = h.get_tensor(k)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Codes packed LSB first along dim (0: rows of qweight, 1: columns of qzeros), with plain shifts."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        codes = (words.unsqueeze(1) >> shifts.view(1, per, 1)) & (2**bits - 1)
        return codes.reshape(-1, words.shape[1])
    codes = (words.unsqueeze(2) >> shifts.view(1, 1, per)) & (2**bits - 1)
    return codes.reshape(words.shape[0], -1)


def stored_weight64(t: dict, name: str, bits: int, group_size: int) -> torch.Tensor:
    """[N, K] float64 weight of the quantized module `name` in tensors t: its stored codes, dequantized."""
    q = unpack_codes(t[f"{name}.qweight"], bits, 0).double()  # [K, N]
    z = unpack_codes(t[f"{name}.qzeros"], bits, 1).double()  # [G, N]
    s = t[f"{name}.scales"].double()
    g = t[f"{name}.g_idx"].long() if f"{name}.g_idx" in t else torch.arange(q.shape[0]) // group_size
    return ((q - z[g]) * s[g]).t()


def float64_with_stored_linears(fp_model, folder, bits: int, group_size: int):
    """(a float64 copy of fp_model whose linears outside the experts hold the weights stored in `folder`,
    the folder's tensors): the start of a reference built independently of llmq's modules."""
    import copy

    from safetensors.torch import load_file

    ref = copy.deepcopy(fp_model).double()
    t = load_file(str(folder / "model.safetensors"))
    for name in sorted({k[: -len(".qweight")] for k in t if k.endswith(".qweight")}):
        if ".experts." not in name:
            ref.get_submodule(name).weight.data = stored_weight64(t, name, bits, group_size)
    return ref, t


def quantize_and_save(fp_model, config, folder, ids):
    """(the model llmq.quantize makes of fp_model with config, its logits on ids, the names of the
    tensors llmq.save writes to folder)."""
    import llmq
    from safetensors.torch import load_file

    model = llmq.quantize(fp_model, config, progress=False)
    with torch.no_grad():
        logits = model(ids).logits
    llmq.save(model, folder)
    return model, logits, set(load_file(str(folder / "model.safetensors")))



@pytest.fixture
def exact_w8a8_kernel(monkeypatch):
    """W8A8Linears on CPU pinned to the exact int8 sums ("intmm"), whatever this processor measures
    fastest ("int8pack" rounds them to bf16): for tests that compare them with exact references."""
    from llmq.kernels import cpu_select

    monkeypatch.setattr(cpu_select, "_forced", {("w8a8", regime): "intmm" for regime in cpu_select.REGIMES})
