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


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(TINY_CONFIGS[arch](), dtype=dtype)
    # Random init gives tiny weights in some architectures; spread them so that
    # quantization error is visible and outputs depend on every layer.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
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
