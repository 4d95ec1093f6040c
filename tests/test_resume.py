"""Resuming a streamed run killed with SIGKILL: the checkpoint equals an uninterrupted run's."""

import json
import os
import subprocess
import sys

import pytest
import torch

import llmq
from llmq.cli import main
from llmq.outdir import stale_partials
from conftest import checkpoint_tensors, model_folder_with_text, random_ids



def _run_killed(argv, layer):
    """Run `llmq quantize` in a process that SIGKILLs itself once layer `layer` is finished."""
    env = dict(os.environ, LLMQ_TEST_SIGNAL_AT=f"layer-{layer}:SIGKILL", PYTHONPATH=os.getcwd())
    r = subprocess.run([sys.executable, "-m", "llmq", "quantize", *argv], env=env, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    return r


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _args(src, out, text, *extra):
    return [str(src), str(out), "--method", "gptq", "--bits", "4", "--group-size", "32", "--dataset", str(text),
            "--nsamples", "6", "--seqlen", "24", "--seed", "1", "--stream", "--quiet", *extra]


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, capsys):
    src = tmp_path / "m"
    text = model_folder_with_text(src, "qwen3")
    assert main(["quantize", *_args(src, tmp_path / "ref", text)]) == 0
    out = tmp_path / "q"
    _run_killed(_args(src, out, text), layer=0)
    assert not out.exists()
    [partial] = stale_partials(out)
    state = json.loads((partial / "resume.json").read_text())
    assert state["layers_done"] == 1 and [p.name for p in partial.glob("resume-hidden-*")] == [
        "resume-hidden-00001-rank0.safetensors"]
    before = _snapshot(partial)

    # Different options, or a different dataset: refused with exit 2, nothing touched.
    capsys.readouterr()
    assert main(["quantize", *_args(src, out, text, "--resume", "--damp", "0.05")]) == 2
    assert "differs from this one in: damp (was 0.01, now 0.05);" in capsys.readouterr().err
    original = text.read_text()
    text.write_text(" ".join(reversed(original.split())))  # same file name, other text
    assert main(["quantize", *_args(src, out, text, "--resume")]) == 2
    err = capsys.readouterr().err
    assert "differs from this one in: calibration windows" in err and "--resume" in err

    text.write_text(original)
    assert stale_partials(out) == [partial] and _snapshot(partial) == before and not out.exists()

    assert main(["quantize", *_args(src, out, text, "--resume")]) == 0
    assert stale_partials(out) == [] and not (out / "resume.json").exists()
    ref, got = checkpoint_tensors(tmp_path / "ref"), checkpoint_tensors(out)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert json.loads((out / "config.json").read_text()) == json.loads((tmp_path / "ref" / "config.json").read_text())
    ids = random_ids(seed=4)
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(out)(ids).logits, llmq.from_pretrained(tmp_path / "ref")(ids).logits)


def test_without_resume_a_stale_folder_is_reported_and_left_alone(tmp_path, capsys):
    src = tmp_path / "m"
    text = model_folder_with_text(src)
    out = tmp_path / "q"
    _run_killed(_args(src, out, text), layer=0)
    [partial] = stale_partials(out)
    before = _snapshot(partial)
    capsys.readouterr()
    assert main(["quantize", *_args(src, out, text)[:-1]]) == 0  # without --quiet or --resume
    err = capsys.readouterr().err
    assert "left by an interrupted run" in err and partial.name in err
    assert stale_partials(out) == [partial] and _snapshot(partial) == before
    assert (out / "config.json").is_file()


def test_resume_with_nothing_to_resume_runs_from_the_start(tmp_path, capsys):
    src = tmp_path / "m"
    text = model_folder_with_text(src)
    capsys.readouterr()
    assert main(["quantize", *_args(src, tmp_path / "a", text)[:-1], "--resume"]) == 0  # without --quiet
    assert "note: --resume found no interrupted run" in capsys.readouterr().err
    assert main(["quantize", *_args(src, tmp_path / "b", text)]) == 0
    a, b = checkpoint_tensors(tmp_path / "a"), checkpoint_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["quantize", *_args(src, tmp_path / "c", text, "--resume", "--no-stream")]) == 2


@pytest.mark.parametrize("quiet", [True, False])
def test_sigterm_keeps_the_finished_layers_and_says_so_once(tmp_path, quiet):
    src = tmp_path / "m"
    text = model_folder_with_text(src)
    out = tmp_path / "q"
    env = dict(os.environ, LLMQ_TEST_SIGNAL_AT="layer-0:SIGTERM", PYTHONPATH=os.getcwd())
    args = [a for a in _args(src, out, text) if quiet or a != "--quiet"]
    r = subprocess.run([sys.executable, "-m", "llmq", "quantize", *args], env=env, capture_output=True, text=True)
    assert r.returncode == 143, r.stderr
    [partial] = stale_partials(out)
    assert r.stderr.count(f"finished layers are kept in {partial}" if not quiet
                          else f"finished layers kept in {partial}") == 1
    assert r.stderr.count("--resume") == 1 and "llmq: terminated" in r.stderr
    assert json.loads((partial / "resume.json").read_text())["layers_done"] == 1
    assert main(["quantize", *_args(src, out, text, "--resume")]) == 0 and (out / "config.json").is_file()


@pytest.mark.parametrize("arch,settings,marker", [
    ("llama", ["--scheme", "w8a8", "--act", "static", "--smooth", "auto"], ".input_scale"),
    # Layer 1's experts are loaded fused and unrolled again in the resumed process.
    ("mixtral", ["--method", "gptq", "--bits", "4", "--group-size", "16", "--moe-min-tokens", "80"],
     ".block_sparse_moe.experts.1.w3.qweight"),
    # GLM-5's layer 1 reuses layer 0's top-k token selection, kept beside the hidden states.
    ("glm_moe_dsa", ["--method", "gptq", "--bits", "4", "--group-size", "16"], ".mlp.experts.1.up_proj.qweight"),
])
def test_w8a8_and_moe_resume_after_sigkill_equals_uninterrupted_run(tmp_path, capsys, arch, settings, marker):
    src = tmp_path / "m"
    text = model_folder_with_text(src, arch)

    def args(out, *extra):
        return [str(src), str(out), *settings, "--dataset", str(text), "--nsamples", "6", "--seqlen", "24", "--seed",
                "1", "--stream", "--quiet", *extra]

    def report():  # the experts' lines: tokens per expert, and the fallbacks of every layer
        return [line for line in capsys.readouterr().out.splitlines() if "experts" in line or "layer " in line]

    capsys.readouterr()
    assert main(["quantize", *[a for a in args(tmp_path / "ref") if a != "--quiet"]]) == 0
    expected = report()
    out = tmp_path / "q"
    _run_killed(args(out), layer=0)
    assert not out.exists() and len(stale_partials(out)) == 1
    assert main(["quantize", *[a for a in args(out, "--resume") if a != "--quiet"]]) == 0
    # Layer 0 was finished by the killed run: its lines come from the resume state.
    assert report() == expected and (arch != "mixtral" or any(line.startswith("layer 0") for line in expected))
    ref, got = checkpoint_tensors(tmp_path / "ref"), checkpoint_tensors(out)
    assert ref.keys() == got.keys() and any(k.endswith(marker) for k in got)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_a_dataset_file_named_another_way_is_the_same_dataset(tmp_path, monkeypatch):
    from llmq.resume import _dataset_key

    text = tmp_path / "words.jsonl"
    text.write_text('{"text": "a b c"}\n')
    monkeypatch.chdir(tmp_path)
    same = {_dataset_key(spec) for spec in ("words.jsonl", "./words.jsonl", str(text), f"{tmp_path}/./words.jsonl")}
    assert same == {str(text)}
    assert _dataset_key("words.jsonl:text") == f"{text}:text" == _dataset_key("./words.jsonl:text")
    assert _dataset_key("builtin") == "builtin" and _dataset_key(None) is None


def test_resume_reports_the_folders_it_does_not_continue(tmp_path):
    """A run killed after its checkpoint was complete (no resume state left, not yet renamed): --resume
    starts again and names the folder left behind, as a run without --resume does."""
    src = tmp_path / "m"
    text = model_folder_with_text(src)
    out = tmp_path / "q"
    env = dict(os.environ, LLMQ_TEST_SIGNAL_AT="written:SIGKILL", PYTHONPATH=os.getcwd())
    r = subprocess.run([sys.executable, "-m", "llmq", "quantize", *_args(src, out, text)], env=env,
                       capture_output=True, text=True)
    assert r.returncode == -9
    [left] = stale_partials(out)
    args = [a for a in _args(src, out, text, "--resume") if a != "--quiet"]
    r = subprocess.run([sys.executable, "-m", "llmq", "quantize", *args], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert r.returncode == 0, r.stderr
    assert "found no interrupted run" in r.stderr and f"left by an interrupted run of {out}" in r.stderr
    assert left.name in r.stderr and stale_partials(out) == [left]  # reported, not removed without --overwrite

