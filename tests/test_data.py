"""Text sources and calibration windows (llmq/data.py), all offline."""

import json
import random
import sys
import time

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llmq import data
from llmq.data import calibration_windows, load_text, sample_tokens, tokenize, wants_bos
from llmq.errors import LlmqError

WORDS = [f"w{i}" for i in range(60)]


def make_tokenizer(adds_bos: bool) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over WORDS; with adds_bos its post-processor adds <s>."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def random_text(nwords: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(nwords))


def assert_slices(windows: torch.Tensor, stream: torch.Tensor, bos: int | None) -> None:
    """Each window (after its BOS, if any) is a contiguous slice of stream."""
    for row in windows:
        if bos is not None:
            assert row[0].item() == bos
            row = row[1:]
        n = row.numel()
        hits = [s for s in range(stream.numel() - n + 1) if torch.equal(stream[s : s + n], row)]
        assert hits, "window is not a slice of the token stream"


@pytest.fixture
def tok():
    return make_tokenizer(adds_bos=False)


# ---------------------------------------------------------------- local specs


def test_builtin_text_ships_with_the_package(tmp_path, monkeypatch):
    from pathlib import Path

    import llmq

    shipped = Path(llmq.__file__).parent / "texts" / "emma-volume-1.txt"
    text = load_text("builtin")
    assert text == shipped.read_text(encoding="utf-8")
    assert text.startswith("EMMA\n\nBy Jane Austen") and "CHAPTER XVIII" in text and "VOLUME II" not in text
    assert 200_000 < len(text.encode()) < 300_000
    assert load_text("builtin", max_chars=1000) == text[:1000]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "builtin").write_text("a local file of that name is not read")
    assert load_text("builtin") == text


def test_txt_file(tmp_path):
    text = random_text(50, seed=1) + "\nsecond line"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    assert load_text(str(tmp_path / "a.txt")) == text


def test_jsonl_default_and_chosen_column(tmp_path):
    rows = [{"text": random_text(5, seed=i), "body": random_text(7, seed=100 + i)} for i in range(4)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert load_text(str(path)) == "\n\n".join(r["text"] for r in rows)
    assert load_text(f"{path}:body") == "\n\n".join(r["body"] for r in rows)


def test_json_list_of_objects(tmp_path):
    rows = [{"content": random_text(6, seed=i)} for i in range(3)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    assert load_text(f"{path}:content") == "\n\n".join(r["content"] for r in rows)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [random_text(8, seed=i) for i in range(5)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": texts, "n": list(range(5))}), path)
    assert load_text(str(path)) == "\n\n".join(texts)


def test_folder_sorted_txt_only(tmp_path):
    (tmp_path / "b.txt").write_text("second file", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not text input", encoding="utf-8")
    assert load_text(str(tmp_path)) == "first file\n\nsecond file"


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(LlmqError, match="no file or folder"):
        load_text(str(tmp_path / "absent.txt"))


def test_unknown_column_lists_columns(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "x", "title": "y"}) + "\n", encoding="utf-8")
    with pytest.raises(LlmqError, match="no column 'text'; columns: body, title"):
        load_text(str(path))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(LlmqError, match="columns: body"):
        load_text(f"{tmp_path / 'd.parquet'}:content")


def test_empty_text(tmp_path):
    (tmp_path / "e.txt").write_text(" \n\n \n", encoding="utf-8")
    with pytest.raises(LlmqError, match="no text"):
        load_text(str(tmp_path / "e.txt"))


def test_too_little_text(tmp_path, tok):
    (tmp_path / "s.txt").write_text(random_text(100, seed=2), encoding="utf-8")
    with pytest.raises(LlmqError, match="has 100 tokens, but 4 windows of 98 tokens need at least 101"):
        calibration_windows(tok, str(tmp_path / "s.txt"), nsamples=4, seqlen=98, seed=0)
    # One token fewer per window fits: four distinct starts, every window a slice.
    windows = calibration_windows(tok, str(tmp_path / "s.txt"), nsamples=4, seqlen=97, seed=0)
    assert windows.shape == (4, 97)


def test_hub_unreachable_is_quick(monkeypatch):
    # A closed local port stands in for an unreachable hub on any machine.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    for spec in ("wikitext2", "hf:someone/corpus:cfg:test:body"):
        with pytest.raises(LlmqError, match="could not reach the Hugging Face hub.*local text file"):
            load_text(spec)
    assert time.monotonic() - start < 10


def test_hub_unreachable_here():
    if data._hub_answers(timeout=2.0):
        pytest.skip("the Hugging Face hub is reachable from this machine")
    start = time.monotonic()
    with pytest.raises(LlmqError, match="local text file"):
        load_text("wikitext2", split="test")
    assert time.monotonic() - start < 10


def test_load_dataset_connection_failure_is_wrapped(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def refuse(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'x' on the Hub")

    monkeypatch.setattr(data, "_hub_answers", lambda timeout=5.0: True)
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(LlmqError, match="could not reach the Hugging Face hub.*local text file"):
        load_text("c4")


def test_hub_dataset_without_the_datasets_package_is_one_line(monkeypatch):
    monkeypatch.setattr(data, "_hub_answers", lambda timeout=5.0: True)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(LlmqError, match="needs the `datasets` package.*local text file"):
        load_text("c4")


def test_parquet_without_pyarrow_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(LlmqError, match="needs the `pyarrow` package"):
        load_text(str(path))


def test_hub_spec_fields_and_column_check(monkeypatch):
    datasets = pytest.importorskip("datasets")

    seen = {}

    def fake_load(name, config, split, data_files):
        seen.update(name=name, config=config, split=split)
        return datasets.Dataset.from_dict({"body": ["one", "two"], "id": [1, 2]})

    monkeypatch.setattr(data, "_hub_answers", lambda timeout=5.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_text("hf:owner/name:cfg:dev:body", split="test") == "one\n\ntwo"
    assert seen == {"name": "owner/name", "config": "cfg", "split": "dev"}  # the spec's split wins
    assert load_text("hf:owner/name:::body") == "one\n\ntwo"
    assert seen == {"name": "owner/name", "config": None, "split": "train"}  # empty fields: defaults
    with pytest.raises(LlmqError, match="no column 'text'; columns: body, id"):
        load_text("hf:owner/name", split="validation")
    assert seen == {"name": "owner/name", "config": None, "split": "validation"}


# ---------------------------------------------------------------- windows


def test_windows_shape_slices_and_seed(tmp_path, tok):
    text = random_text(3000, seed=3)
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    stream = tokenize(tok, text)
    assert stream.tolist() == tok(text, add_special_tokens=False).input_ids
    w0 = calibration_windows(tok, str(path), nsamples=6, seqlen=40, seed=0)
    assert w0.shape == (6, 40) and w0.dtype == torch.long
    assert_slices(w0, stream, bos=None)
    assert torch.equal(w0, calibration_windows(tok, str(path), nsamples=6, seqlen=40, seed=0))
    assert not torch.equal(w0, calibration_windows(tok, str(path), nsamples=6, seqlen=40, seed=1))


def test_bos_rule_both_ways(tmp_path):
    adds, plain = make_tokenizer(adds_bos=True), make_tokenizer(adds_bos=False)
    assert wants_bos(adds) and not wants_bos(plain)
    text = random_text(2000, seed=4)
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    with_bos = calibration_windows(adds, str(path), nsamples=5, seqlen=30, seed=7)
    assert with_bos.shape == (5, 30)
    assert_slices(with_bos, tokenize(adds, text), bos=adds.bos_token_id)
    without = calibration_windows(plain, str(path), nsamples=5, seqlen=30, seed=7)
    assert (without != plain.bos_token_id).all()
    assert_slices(without, tokenize(plain, text), bos=None)


def test_real_tokenizer_bos_rule():
    from llmq.realmodel import smollm2_path

    try:
        folder = smollm2_path()
    except LlmqError as err:
        pytest.skip(str(err))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.bos_token_id is not None and not wants_bos(tokenizer)


# ---------------------------------------------------------------- self


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("adds_bos", [False, True])
def test_self_windows(adds_bos):
    tokenizer = make_tokenizer(adds_bos)
    model = tiny_llama(len(tokenizer))
    rng_before = torch.random.get_rng_state()
    kwargs = dict(nsamples=4, seqlen=24, model=model)
    w0 = calibration_windows(tokenizer, "self", seed=0, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched
    assert w0.shape == (4, 24)
    assert torch.equal(w0, calibration_windows(tokenizer, "model", seed=0, **kwargs))
    assert not torch.equal(w0, calibration_windows(tokenizer, "self", seed=1, **kwargs))
    if adds_bos:
        assert (w0[:, 0] == 1).all()
    else:
        assert (w0 != tokenizer.bos_token_id).all()
    span = 23 if adds_bos else 24
    stream = sample_tokens(model, tokenizer, 4 * span, seed=0)  # what calibration_windows drew from
    assert stream.numel() >= 4 * span
    assert_slices(w0, stream, bos=1 if adds_bos else None)
    # A random model samples EOS and BOS often; rows stop there, so the
    # stream never holds them.
    assert not ({1, 2} & set(stream.tolist()))


def test_self_needs_model(tok):
    with pytest.raises(LlmqError, match="needs the model"):
        calibration_windows(tok, "self", nsamples=2, seqlen=8, seed=0)


def test_named_hub_specs(monkeypatch):
    datasets = pytest.importorskip("datasets")

    calls = []

    def fake_load(name, config, split, data_files):
        calls.append((name, config, split, data_files))
        return datasets.Dataset.from_dict({"text": ["= Title =", "", "body"]})

    monkeypatch.setattr(data, "_hub_answers", lambda timeout=5.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_text("wikitext2", split="test") == "= Title =\n\n\n\nbody"  # rows joined as in GPTQ
    load_text("wikitext2")
    load_text("c4")
    load_text("pileval")
    assert calls == [
        ("wikitext", "wikitext-2-raw-v1", "test", None),
        ("wikitext", "wikitext-2-raw-v1", "train", None),
        ("allenai/c4", None, "validation", {"validation": "en/c4-validation.00000-of-00008.json.gz"}),
        ("mit-han-lab/pile-val-backup", None, "validation", None),
    ]
    with pytest.raises(LlmqError, match="c4 has splits validation, train"):
        load_text("c4", split="test")


def test_compressed_and_non_utf8_files_are_named(tmp_path):
    import gzip

    packed = tmp_path / "emma.txt.gz"
    packed.write_bytes(gzip.compress("Emma Woodhouse, handsome, clever, and rich ".encode() * 50))
    with pytest.raises(data.LlmqError, match=r"is compressed \(\.gz\): decompress it first"):
        load_text(str(packed))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café ".encode("latin-1") * 50)
    with pytest.raises(data.LlmqError, match="is not UTF-8 text .* convert it to UTF-8"):
        load_text(str(latin))
