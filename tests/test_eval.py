"""llmq.eval: perplexity, KL / top-1 against a reference, windows, CLI, JSON, plot."""

from __future__ import annotations

import copy
import json
import math
import random
import re

import numpy as np
import pytest
import torch

import llmq
from llmq.cli import main
from llmq.errors import LlmqError
from llmq.eval import RefStore, cut_windows, eval_windows, evaluate, perplexity
from conftest import tiny_model

WORDS = ("the a of and to in is was that it he she for on with as his her at by had not but be from this "
         "letter house sister ball walk morning evening mother father").split()


def _text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _tokenizer(bos: bool):
    """A tiny BPE tokenizer trained offline; ids 0..3 are <pad> <s> </s> <unk>
    (the tiny models' pad/bos/eos ids). With bos=True it prepends <s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([_text(3000, 0)], trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _direct_logprobs(model, windows):
    """float64 log-softmax of the model's logits [n, seqlen - 1, vocab] (positions predicting tokens 1..)."""
    with torch.no_grad():
        logits = model(input_ids=windows).logits.double()
    return torch.log_softmax(logits[:, :-1], dim=-1)


def _perturbed(model, scale=0.02, seed=5):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


@pytest.fixture
def windows():
    g = torch.Generator().manual_seed(3)
    return torch.randint(3, 256, (5, 24), generator=g)


# --------------------------------------------------------------------------- perplexity and KL


def test_perplexity_matches_direct_computation(windows):
    model = tiny_model("llama")
    stats = perplexity(model, windows, batch_size=2)  # batches of 2, 2, 1
    logp = _direct_logprobs(model, windows)
    nll = -logp.gather(-1, windows[:, 1:, None]).sum().item()
    assert stats.tokens == 5 * 23 and stats.windows == 5
    assert stats.nll == pytest.approx(nll, rel=1e-6)
    assert stats.perplexity == pytest.approx(math.exp(nll / (5 * 23)), rel=1e-6)
    assert stats.kl is None and stats.top1_agreement is None


def test_kl_self_is_zero_and_perturbed_matches_float64(windows, tmp_path):
    model = tiny_model("llama")
    other = _perturbed(model)
    n, seqlen = windows.shape
    with RefStore(n, seqlen - 1, 256, dtype="float32", dir=tmp_path) as store:
        perplexity(model, windows, batch_size=3, record=store)
        same = perplexity(model, windows, batch_size=2, reference=store)
        diff = perplexity(other, windows, batch_size=2, reference=store)
    assert same.kl.abs().max() < 1e-6
    assert same.top1_agreement == 1.0

    p, q = _direct_logprobs(model, windows), _direct_logprobs(other, windows)
    kl = (p.exp() * (p - q)).sum(-1).flatten()  # [tokens], float64
    agree = (p.argmax(-1) == q.argmax(-1)).double().mean().item()
    assert kl.mean() > 1e-3
    assert diff.kl_mean == pytest.approx(kl.mean().item(), rel=1e-4)
    torch.testing.assert_close(diff.kl, kl, rtol=1e-3, atol=1e-6)
    assert diff.kl_quantile(0.99) == pytest.approx(np.quantile(kl.numpy(), 0.99), rel=1e-3)
    assert diff.top1_agreement == pytest.approx(agree)
    assert diff.top1_agreement < 1.0


def test_float16_store_is_close_to_exact(windows, tmp_path):
    model = tiny_model("llama")
    other = _perturbed(model)
    n, seqlen = windows.shape
    with RefStore(n, seqlen - 1, 256, dtype="float16", dir=tmp_path) as store:
        perplexity(model, windows, record=store)
        assert (store.folder / "logprobs.bin").stat().st_size == n * (seqlen - 1) * 256 * 2
        same = perplexity(model, windows, reference=store)
        diff = perplexity(other, windows, reference=store)
    p, q = _direct_logprobs(model, windows), _direct_logprobs(other, windows)
    exact = (p.exp() * (p - q)).sum(-1).mean().item()
    assert same.kl_mean < 1e-5  # renormalised fp16: second-order error only
    assert diff.kl_mean == pytest.approx(exact, rel=1e-2)


def test_store_is_removed(tmp_path):
    store = RefStore(2, 3, 8, dir=tmp_path)
    assert store.folder.is_dir() and store.folder.parent == tmp_path
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_store_refuses_more_than_the_disk_holds(tmp_path):
    with pytest.raises(LlmqError, match="--no-kl"):
        RefStore(10**6, 10**4, 10**5, dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize("bos", [False, True])
def test_windows_bos_rule_and_tail(bos):
    tok = _tokenizer(bos)
    text = _text(403, 1)
    stream = tok(text, add_special_tokens=False).input_ids
    seqlen = 16
    span = seqlen - 1 if bos else seqlen
    assert len(stream) % span != 0  # there is a tail to drop
    win = eval_windows(tok, text, seqlen)
    assert win.shape == (len(stream) // span, seqlen)
    if bos:
        assert (win[:, 0] == tok.bos_token_id).all()
        text_part = win[:, 1:]
    else:
        assert (win[:, 0] != tok.bos_token_id).all()
        text_part = win
    assert text_part.flatten().tolist() == stream[: win.shape[0] * span]
    assert torch.equal(eval_windows(tok, text, seqlen, max_windows=3), win[:3])


def test_too_little_text_is_an_error():
    with pytest.raises(LlmqError, match="fewer than one window"):
        cut_windows(torch.arange(10), 16, None)


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def folders(tmp_path):
    """A tiny fp model with a tokenizer, its RTN int4 llmq checkpoint, and a text file."""
    tok = _tokenizer(bos=False)
    model = tiny_model("llama")
    fp = tmp_path / "fp"
    model.save_pretrained(fp)
    tok.save_pretrained(fp)
    config = llmq.QuantConfig(method="rtn", bits=4, group_size=32, sym=False)
    quantized = llmq.quantize(copy.deepcopy(model), config, device="cpu", progress=False)
    q = llmq.save(quantized, tmp_path / "rtn4", tok)
    text = tmp_path / "text.txt"
    text.write_text(_text(600, 2))
    return fp, q, text, tok


def test_cli_end_to_end_json_and_plot(folders, tmp_path, capsys):
    fp, q, text, tok = folders
    out, png, spill = tmp_path / "eval.json", tmp_path / "eval.png", tmp_path / "spill"
    spill.mkdir()
    args = ["eval", str(fp), str(q), "--dataset", str(text), "--seqlen", "32", "--max-windows", "4",
            "--batch-size", "3", "--json", str(out), "--tmp-dir", str(spill), "--quiet"]
    if _has_matplotlib():
        args += ["--plot", str(png)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())

    protocol = result["protocol"]
    assert protocol["dataset"] == str(text) and protocol["seqlen"] == 32 and protocol["windows"] == 4
    assert protocol["tokens_scored"] == 4 * 31 and protocol["bos"] is False
    assert {"torch", "transformers", "llmq"} <= set(result["versions"])
    ref, quant = result["models"]
    assert [ref["model"], quant["model"]] == [str(fp), str(q)]

    # Same numbers as the Python API on the same windows.
    windows = eval_windows(tok, text.read_text(), 32, max_windows=4)
    fp_model = tiny_model("llama")
    assert ref["perplexity"] == pytest.approx(perplexity(fp_model, windows).perplexity, rel=1e-6)
    q_model = llmq.from_pretrained(q)
    assert quant["perplexity"] == pytest.approx(perplexity(q_model, windows).perplexity, rel=1e-6)
    assert quant["perplexity"] != pytest.approx(ref["perplexity"], rel=1e-6)
    assert ref["kl_mean"] == 0.0 and ref["top1_agreement"] == 1.0
    assert quant["kl_mean"] > 0 and quant["kl_p99"] >= quant["kl_mean"] and 0 < quant["top1_agreement"] <= 1
    assert quant["tokens_scored"] == 4 * 31 and quant["label"] == "rtn w4 g32 asym"
    assert 0 < quant["size_bytes"] < ref["size_bytes"]

    assert printed.startswith("protocol: ") and "124 tokens scored" in printed and "3 windows per forward" in printed
    assert f"{quant['perplexity']:.3f}" in printed
    assert list(spill.iterdir()) == []  # the reference log-probs are gone
    if _has_matplotlib():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_store_cleaned_up_when_a_model_fails(folders, tmp_path):
    fp, _, text, _ = folders
    spill = tmp_path / "spill"
    spill.mkdir()

    def broken():
        raise LlmqError("cannot build")

    with pytest.raises(LlmqError, match="cannot build"):
        evaluate([str(fp), broken], dataset=str(text), seqlen=32, max_windows=2, tmp_dir=spill, progress=False)
    assert list(spill.iterdir()) == []


def test_vocab_mismatch_and_missing_tokenizer(folders, tmp_path, capsys):
    fp, _, text, _ = folders
    import transformers as T

    small = T.AutoModelForCausalLM.from_config(T.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2))
    with pytest.raises(LlmqError, match="vocabulary"):
        evaluate([str(fp), small], dataset=str(text), seqlen=32, max_windows=1, progress=False)
    bare = tmp_path / "bare"
    tiny_model("llama").save_pretrained(bare)
    assert main(["eval", str(bare), "--dataset", str(text), "--quiet"]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    # The fix the message names works.
    assert main(["eval", str(bare), "--dataset", str(text), "--seqlen", "32", "--tokenizer", str(fp),
                 "--quiet"]) == 0


def test_in_memory_models_and_factories(folders):
    fp, _, text, tok = folders
    model = tiny_model("llama")
    result = evaluate([model, lambda: _perturbed(tiny_model("llama"))], tokenizer=tok, dataset=str(text),
                      seqlen=32, max_windows=2, progress=False, names=["fp", "noisy"])
    assert [r["model"] for r in result["models"]] == ["fp", "noisy"]
    assert result["models"][1]["kl_mean"] > 0 and result["models"][0]["size_bytes"] is None


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


# --------------------------------------------------------------------------- lm-evaluation-harness


def test_lm_eval_runs_on_an_llmq_checkpoint(folders, tmp_path):
    """lm-eval's HF backend loads an llmq checkpoint once llmq is imported (offline, local task)."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    _, q, _, _ = folders
    lm = HFLM(pretrained=str(q), dtype="float32", device="cpu", batch_size=2)
    assert sum(isinstance(m, llmq.QuantLinear) for m in lm.model.modules()) == 2 * 7  # real int4 layers
    task_dir = _write_local_task(tmp_path)
    results = evaluator.simple_evaluate(model=lm, tasks=["llmq_tiny_choice"],
                                        task_manager=TaskManager(include_path=str(task_dir)))
    acc = results["results"]["llmq_tiny_choice"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert results["n-samples"]["llmq_tiny_choice"]["effective"] == 6


def _write_local_task(tmp_path):
    """A multiple-choice task over a local jsonl file (no hub access)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    rows = [{"question": _text(5, i), "choices": [_text(2, 10 + i), _text(2, 20 + i)], "label": i % 2}
            for i in range(6)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "llmq_tiny_choice.yaml").write_text(
        "task: llmq_tiny_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'data.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    return folder


def test_perplexity_script_quantizes_in_memory(folders, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "perplexity.py"
    spec = importlib.util.spec_from_file_location("perplexity_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    fp, q, text, _ = folders
    out = tmp_path / "script.json"
    assert script.main([str(fp), str(q), "--dataset", str(text), "--seqlen", "32", "--max-windows", "3",
                        "--quantize", "rtn:4:32:asym", "--json", str(out), "--quiet"]) == 0
    ref, saved, in_memory = json.loads(out.read_text())["models"]
    # RTN is deterministic: quantizing in memory gives the saved checkpoint's numbers.
    assert in_memory["perplexity"] == pytest.approx(saved["perplexity"], rel=1e-6)
    assert in_memory["kl_mean"] == pytest.approx(saved["kl_mean"], rel=1e-5)
    assert in_memory["model"].endswith("[rtn:4:32:asym, in memory]")
    assert script.main([str(fp), "--quantize", "rtn:4"]) == 2


def test_e2e_benchmark_times_random_weights_of_a_config(tmp_path):
    """scripts/bench_e2e.py --random-config (the GPU run's end-to-end step) builds both models from
    one seed and times the fp model against its W8A8 or int4 copy."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_e2e.py"
    spec = importlib.util.spec_from_file_location("bench_e2e_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(model_type="llama", hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=256)))
    a, b = script.random_model(str(config), torch.float32), script.random_model(str(config), torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    w8a8 = script.quant_config("w8a8")
    assert (w8a8.scheme, w8a8.act, w8a8.smooth) == ("w8a8", "dynamic", "off")
    for i, quantize in enumerate(("w8a8", "rtn:4:32:sym")):
        out = tmp_path / f"{i}.json"
        assert script.main(["--random-config", str(config), "--quantize", quantize, "--new-tokens", "4",
                            "--prompt-tokens", "6", "--repeats", "1", "--json", str(out)]) == 0
        summary = json.loads(out.read_text())
        assert summary["model"] == f"random weights, {config}" and summary["quantized"] == quantize
        assert summary["quantized_weights_mib"] < summary["fp_weights_mib"]
        assert summary["fp_tokens_per_s"] > 0 and summary["quantized_tokens_per_s"] > 0


def test_eval_compares_a_w8a8_checkpoint(folders, tmp_path, capsys):
    fp, _, text, tok = folders
    calib = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    q = llmq.quantize(tiny_model("llama"), llmq.QuantConfig(scheme="w8a8", act="static", smooth=0.5),
                      dataset=calib, progress=False)
    path = llmq.save(q, tmp_path / "w8a8", tok)
    out = tmp_path / "eval.json"
    assert main(["eval", str(fp), str(path), "--dataset", str(text), "--seqlen", "32", "--max-windows", "3",
                 "--json", str(out), "--quiet"]) == 0
    ref, quant = json.loads(out.read_text())["models"]
    windows = eval_windows(tok, text.read_text(), 32, max_windows=3)
    assert quant["perplexity"] == pytest.approx(perplexity(llmq.from_pretrained(path), windows).perplexity, rel=1e-6)
    assert quant["label"] == "rtn w8 per-row sym a8 static smooth 0.5"
    assert quant["kl_mean"] > 0 and 0 < quant["top1_agreement"] <= 1


def test_eval_reads_every_format_llmq_reads_with_llmq(folders, tmp_path):
    """An asymmetric compressed-tensors export (stock transformers stops on its zero points) and a gptq
    folder (transformers wants optimum for it) are scored on llmq's layers, exactly like their native twin."""
    from llmq.formats.convert import convert

    fp, q, text, _ = folders
    convert(q, tmp_path / "ct", "compressed-tensors")
    convert(q, tmp_path / "gptq", "gptq")
    out = tmp_path / "eval.json"
    assert main(["eval", str(fp), str(q), str(tmp_path / "ct"), str(tmp_path / "gptq"), "--dataset", str(text),
                 "--seqlen", "32", "--max-windows", "3", "--json", str(out), "--quiet"]) == 0
    _, native, *foreign = json.loads(out.read_text())["models"]
    for row in foreign:
        assert row["label"] == native["label"] == "rtn w4 g32 asym"
        for key in ("perplexity", "kl_mean", "top1_agreement"):
            assert row[key] == native[key], (row["model"], key)


def test_eval_turns_a_foreign_loader_failure_into_one_line(folders, tmp_path, capsys, monkeypatch):
    """A format llmq does not read goes to transformers, whose loader fails with RuntimeError among others."""
    import shutil

    import transformers

    fp, _, text, _ = folders
    other = tmp_path / "other"
    shutil.copytree(fp, other)
    config = json.loads((other / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (other / "config.json").write_text(json.dumps(config))

    def fails(*args, **kwargs):
        raise RuntimeError("You set `ignore_mismatched_sizes` to `False`, thus raising an error.\nreport follows")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fails)
    assert main(["eval", str(other), "--dataset", str(text), "--seqlen", "32", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llmq: error: transformers could not load the 'bitsandbytes'")
    assert "RuntimeError: You set `ignore_mismatched_sizes`" in err and "llmq itself reads llmq, gptq" in err


# --------------------------------------------------------------------------- bad input, refused up front


def _no_model_loads(monkeypatch):
    import importlib

    evaluate_module = importlib.import_module("llmq.eval.evaluate")  # llmq.eval.evaluate is also the function

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(evaluate_module, "_materialise", fail)


@pytest.mark.parametrize("option,target,message", [
    ("--json", "missing/eval.json", r"--json .*missing/eval\.json: the folder .*missing does not exist"),
    ("--json", ".", r"--json .* is a folder: give a file name"),
    ("--plot", "missing/eval.png", r"--plot .*missing/eval\.png: the folder .*missing does not exist"),
    ("--plot", ".", r"--plot .* is a folder: give a file name"),
    ("--plot", "eval.gif", r"the extension \.gif names no format llmq draws in; end it with one of \.png, \.pdf"),
    ("--plot", "eval.pgf", r"the extension \.pgf names no format"),
    ("--plot", "eval", r"the name has no extension"),
])
def test_output_paths_are_checked_before_any_model_loads(folders, tmp_path, capsys, monkeypatch, option, target,
                                                          message):
    if option == "--plot" and not _has_matplotlib():
        pytest.skip("matplotlib is not installed")
    fp, _, text, _ = folders
    _no_model_loads(monkeypatch)
    assert main(["eval", str(fp), "--dataset", str(text), "--seqlen", "32", option, str(tmp_path / target),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llmq: error: ") and re.search(message, err), err
    assert not (tmp_path / "missing").exists()  # no folder is created on the way


def test_a_missing_model_is_named_before_any_model_loads(folders, tmp_path, capsys, monkeypatch):
    fp, q, text, _ = folders
    _no_model_loads(monkeypatch)
    assert main(["eval", str(fp), str(q), str(tmp_path / "typo"), "--dataset", str(text), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "typo' not found" in err, err


@pytest.mark.parametrize("spec", ["self", "model"])
def test_eval_refuses_text_sampled_from_the_model(folders, capsys, monkeypatch, spec):
    fp, _, _, _ = folders
    _no_model_loads(monkeypatch)
    assert main(["eval", str(fp), "--dataset", spec, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"`{spec}` is text sampled from the model itself" in err
    assert "no meaningful perplexity" in err and "`builtin`" in err and "local text file" in err
    assert "calibration_windows" not in err


def test_eval_offers_real_text_when_the_hub_is_unreachable(folders, tmp_path, capsys, monkeypatch):
    from llmq import data

    fp, _, _, _ = folders
    _no_model_loads(monkeypatch)
    monkeypatch.setattr(data, "_hub_answers", lambda timeout=5.0: False)
    assert main(["eval", str(fp), "--quiet"]) == 2  # wikitext2 by default
    err = capsys.readouterr().err
    assert "could not reach the Hugging Face hub" in err and "`builtin`" in err and "self" not in err
    assert main(["eval", str(fp), "--dataset", str(tmp_path / "absent.txt"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not a known dataset; use one of: builtin" in err and "self" not in err
    # Calibration still offers text sampled from the model, which is what it is for.
    with pytest.raises(LlmqError, match="use `self` to calibrate"):
        data.load_text("wikitext2")


def test_eval_help_names_builtin_and_local_files(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "builtin (text shipped with llmq, works offline)" in out and "a local .txt/.jsonl/.json/.parquet file" in out


def test_a_write_that_fails_after_the_run_is_one_line(tmp_path):
    from llmq.eval import write_json

    # The folder was checked up front but went away while the models ran.
    with pytest.raises(LlmqError, match=r"could not write --json .*gone/eval\.json \(No such file or directory\)"):
        write_json({"models": []}, tmp_path / "gone" / "eval.json")
    assert not (tmp_path / "gone").exists()
