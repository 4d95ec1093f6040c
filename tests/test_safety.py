"""Nothing lost, nothing silent: every way a user's files could be lost or a broken result hidden.

Each case runs the real command (in process, or as a subprocess where a signal,
another user's permissions or another working folder is needed) on tiny models
in temporary folders, and asserts the exit status, the message and what is left
on disk. Cases that would delete real files if the guard regressed (OUT = `/`,
`~`, `.`, `..`) run inside a temporary HOME and working folder, or test the
path rule itself; no command here can reach a file outside the test's folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmq
from llmq import outdir
from llmq.cli import main
from llmq.errors import LlmqError
from conftest import checkpoint_tensors, tiny_model

ROOT = Path(__file__).resolve().parents[1]
QUANT = ["--group-size", "32", "--quiet"]


# ---- helpers ------------------------------------------------------------------------------------------------

def _run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _cli(*argv, cwd=None, env=None, prefix=(), timeout=300):
    """The command line in a fresh process (signals, permissions, another working folder)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    # A shell that starts the test runner as a background job leaves SIGINT ignored, and the child
    # would inherit that; give it the default disposition, as a terminal user's process has.
    r = subprocess.run([*prefix, sys.executable, "-m", "llmq.cli", *map(str, argv)], cwd=cwd, env=full_env,
                       capture_output=True, text=True, timeout=timeout,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return r.returncode, r.stdout, r.stderr


def _one_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("llmq: error:")]
    assert len(lines) == 1, err
    assert err.strip().splitlines()[-1] == lines[0], err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _tree(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under folder: what is on disk, to compare before and after."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _bits(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["quantization_config"]["bits"]


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "m"
    tiny_model("llama").save_pretrained(path)
    return path


def _checkpoint(model_dir, out, bits=8):
    assert main(["quantize", str(model_dir), str(out), "--bits", str(bits), *QUANT]) == 0
    return _tree(out)


# ---- 1. OUT equal to, holding or inside the source ---------------------------------------------------------

def test_out_is_the_source_with_overwrite(model_dir, capsys):
    (model_dir / "README.md").write_text("notes")
    before = _tree(model_dir)
    code, _, err = _run(capsys, "quantize", model_dir, model_dir, "--overwrite", *QUANT)
    _one_error(code, err, "is the source")
    assert _tree(model_dir) == before


def test_out_holds_the_source_with_overwrite(tmp_path, capsys):
    proj = tmp_path / "proj"
    tiny_model("llama").save_pretrained(proj / "m")
    (proj / "data.csv").write_text("1,2")
    before = _tree(proj)
    code, _, err = _run(capsys, "quantize", proj / "m", proj, "--overwrite", *QUANT)
    _one_error(code, err, "holds the source")
    assert _tree(proj) == before


def test_out_inside_the_source(model_dir, capsys):
    before = _tree(model_dir)
    code, _, err = _run(capsys, "quantize", model_dir, model_dir / "q", *QUANT)
    _one_error(code, err, "inside the source")
    assert _tree(model_dir) == before and not (model_dir / "q").exists()


def test_convert_into_a_folder_holding_its_source(tmp_path, model_dir, capsys):
    _checkpoint(model_dir, tmp_path / "x" / "q4", bits=4)
    before = _tree(tmp_path / "x")
    code, _, err = _run(capsys, "convert", tmp_path / "x" / "q4", tmp_path / "x", "--overwrite")
    _one_error(code, err, "holds the source")
    assert _tree(tmp_path / "x") == before


def test_convert_onto_itself_and_into_itself(tmp_path, model_dir, capsys):
    before = _checkpoint(model_dir, tmp_path / "q")
    for dst in (tmp_path / "q", tmp_path / "q" / "sub"):
        code, _, err = _run(capsys, "convert", tmp_path / "q", dst, "--overwrite")
        _one_error(code, err, "source")
    assert _tree(tmp_path / "q") == before


def test_save_api_refuses_the_source_folder(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "m")
    model = llmq.quantize(str(tmp_path / "m"), llmq.QuantConfig(group_size=32))
    before = _tree(tmp_path / "m")
    with pytest.raises(LlmqError, match="is the source"):
        llmq.save(model, tmp_path / "m", overwrite=True)
    assert _tree(tmp_path / "m") == before


# ---- 2. OUT ".", "..", "~", "/": run inside a temporary HOME and working folder -----------------------------

@pytest.fixture
def sandbox(tmp_path):
    """A temporary HOME holding the working folder w (with a file) and the model; nothing real is reachable."""
    home = tmp_path / "home"
    work = home / "w"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    (home / "diary.txt").write_text("also mine")
    tiny_model("llama").save_pretrained(home / "tiny")
    return home, work


@pytest.mark.parametrize("out, why", [(".", "is the current folder"), ("..", "is the home folder"),
                                      ("~", "is the home folder")])
def test_out_dot_dotdot_home(sandbox, out, why):
    home, work = sandbox
    before = _tree(home)
    target = str(home) if out == "~" else out  # the shell expands ~ before llmq sees it
    code, _, err = _cli("quantize", "../tiny", target, "--overwrite", *QUANT, cwd=work, env={"HOME": str(home)})
    _one_error(code, err, why)
    assert _tree(home) == before


def test_unsafe_paths_rule_itself(tmp_path):
    """The path rule for OUT = / and for folders holding HOME or the working folder; no command runs."""
    home, cwd = tmp_path / "h", tmp_path / "h" / "w" / "x"
    cwd.mkdir(parents=True)
    reason = lambda p, src=(): outdir.unsafe_reason(outdir.resolve(p), src, cwd=cwd, home=home)  # noqa: E731
    assert "root folder" in reason("/")
    assert "holds the home folder" in reason(tmp_path)
    assert "is the home folder" in reason(home)
    assert "holds the current folder" in reason(home / "w")
    assert "is the current folder" in reason(cwd)
    assert "is the current folder" in reason(cwd / "sub" / "..")
    assert reason(cwd / "out") is None and reason(tmp_path / "elsewhere") is None
    (tmp_path / "src").mkdir()
    assert "is the source" in reason(tmp_path / "src", [tmp_path / "src"])
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "src")
    assert "is the source" in reason(link, [tmp_path / "src"])  # symlinks resolved first


# ---- 3. OUT spelled through itself, or a symlink -------------------------------------------------------------

def test_out_spelled_through_itself_is_resolved(tmp_path, model_dir, capsys):
    _checkpoint(model_dir, tmp_path / "out", bits=8)
    code, _, err = _run(capsys, "quantize", model_dir, f"{tmp_path}/out/../out", "--bits", "4", "--overwrite", *QUANT)
    assert code == 0, err
    assert _bits(tmp_path / "out") == 4
    assert _hidden(tmp_path) == []
    llmq.from_pretrained(tmp_path / "out")


def test_out_symlink_with_overwrite_replaces_its_target(tmp_path, model_dir, capsys):
    _checkpoint(model_dir, tmp_path / "real", bits=8)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    code, _, err = _run(capsys, "quantize", model_dir, tmp_path / "link", "--bits", "4", "--overwrite", *QUANT)
    assert code == 0, err
    assert (tmp_path / "link").is_symlink() and _bits(tmp_path / "real") == 4
    assert _hidden(tmp_path) == []


# ---- --overwrite replaces only checkpoint folders ----------------------------------------------------------

def test_overwrite_refuses_a_folder_of_other_files(tmp_path, model_dir, capsys):
    out = tmp_path / "out"
    (out / "photos").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "thesis.docx").write_text("years of work")
    before = _tree(out)
    code, _, err = _run(capsys, "quantize", model_dir, out, "--overwrite", *QUANT)
    _one_error(code, err, "not a model or checkpoint folder", "photos/", "thesis.docx")
    assert _tree(out) == before


def test_overwrite_refuses_a_folder_without_config(tmp_path, model_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("x")
    code, _, err = _run(capsys, "convert", model_dir, out, "--overwrite")
    _one_error(code, err, "no config.json")
    assert (out / "model.safetensors").read_text() == "x"


def test_overwrite_refuses_a_full_precision_model(tmp_path, model_dir, capsys):
    """A typo in OUT must not delete a downloaded model: --overwrite replaces only a quantized checkpoint."""
    other = tmp_path / "other"
    tiny_model("llama", seed=1).save_pretrained(other)
    before = _tree(other)
    code, _, err = _run(capsys, "quantize", model_dir, other, "--overwrite", *QUANT)
    _one_error(code, err, "full-precision model", "quantization_config")
    _checkpoint(model_dir, tmp_path / "q4", bits=4)
    code, _, err = _run(capsys, "convert", tmp_path / "q4", other, "--format", "gptq", "--overwrite")
    _one_error(code, err, "full-precision model")
    assert _tree(other) == before and _hidden(tmp_path) == []


def test_overwrite_replaces_a_checkpoint(tmp_path, model_dir, capsys):
    _checkpoint(model_dir, tmp_path / "q", bits=8)
    code, _, err = _run(capsys, "quantize", model_dir, tmp_path / "q", "--bits", "4", "--overwrite", *QUANT)
    assert code == 0, err
    assert _bits(tmp_path / "q") == 4 and _hidden(tmp_path) == []


# ---- 4. an OUT that appears during the run -----------------------------------------------------------------

def _appear_during_quantize(monkeypatch, make):
    """Run make() once the new checkpoint is written, just before it is renamed into place."""
    real = outdir.publish
    pending = [make]

    def appear_then_publish(*a, **k):
        if pending:
            pending.pop()()
        return real(*a, **k)

    monkeypatch.setattr(outdir, "publish", appear_then_publish)


def test_out_appearing_during_the_run_is_kept(tmp_path, model_dir, capsys, monkeypatch):
    out = tmp_path / "q"

    def other_run():
        out.mkdir()
        (out / "other.txt").write_text("another run's work")

    _appear_during_quantize(monkeypatch, other_run)
    code, _, err = _run(capsys, "quantize", model_dir, out, *QUANT)
    _one_error(code, err, "appeared while llmq was running", f"{out}.new")
    assert (out / "other.txt").read_text() == "another run's work"
    assert _hidden(tmp_path) == []
    llmq.from_pretrained(f"{out}.new")  # the finished work, where the message says


def test_checkpoint_appearing_during_two_runs_is_kept(tmp_path, model_dir, capsys, monkeypatch):
    """Two runs writing the same OUT without --overwrite: the second never replaces the first."""
    out = tmp_path / "q"
    _appear_during_quantize(monkeypatch, lambda: llmq.save(llmq.quantize(str(model_dir),
                                                                         llmq.QuantConfig(bits=8, group_size=32)), out))
    first = None
    code, _, err = _run(capsys, "quantize", model_dir, out, *QUANT)
    _one_error(code, err, "appeared while llmq was running")
    first = _bits(out)
    assert first == 8 and _bits(Path(f"{out}.new")) == 4


def test_overwrite_refuses_other_files_that_appeared(tmp_path, model_dir, capsys, monkeypatch):
    out = tmp_path / "q"
    _checkpoint(model_dir, out)

    def replaced_by_user():
        for f in out.iterdir():
            f.unlink()
        (out / "mine.txt").write_text("keep")

    _appear_during_quantize(monkeypatch, replaced_by_user)
    code, _, err = _run(capsys, "quantize", model_dir, out, "--overwrite", *QUANT)
    _one_error(code, err, "not a model or checkpoint folder", "mine.txt", f"{out}.new")
    assert (out / "mine.txt").read_text() == "keep"


# ---- 5 and 12: kills and signals at fixed points of the save -----------------------------------------------

def _killed_at(point, model_dir, out, *extra, sig="SIGKILL", env=None):
    return _cli("quantize", model_dir, out, *extra, *QUANT,
                env={"LLMQ_TEST_SIGNAL_AT": f"{point}:{sig}", **(env or {})})


def test_sigkill_before_rename_keeps_old_out_and_next_run_reports_it(tmp_path, model_dir):
    out = tmp_path / "q"
    old = _checkpoint(model_dir, out, bits=8)
    code, _, _ = _killed_at("written", model_dir, out, "--bits", "4", "--overwrite")
    assert code == -9
    assert _tree(out) == old  # the old checkpoint is untouched
    stale = _hidden(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(".q.partial-")
    assert [p.name for p in outdir.stale_partials(out)] == stale
    assert outdir.stale_partials(tmp_path / "q2") == []  # another OUT's folders are not its business
    # the next run reports it (and leaves it) without --overwrite, and removes it with --overwrite
    (tmp_path / "q").rename(tmp_path / "q-kept")
    code, _, err = _cli("quantize", model_dir, out, *QUANT)
    assert code == 0 and "left by an interrupted run" in err and "--overwrite to remove" in err
    assert _hidden(tmp_path) == stale
    code, _, err = _cli("quantize", model_dir, out, "--overwrite", *QUANT)
    assert code == 0 and "removed 1 folder(s) left by an interrupted run" in err
    assert _hidden(tmp_path) == []


def test_sigkill_after_swap_leaves_new_out(tmp_path, model_dir):
    out = tmp_path / "q"
    _checkpoint(model_dir, out, bits=8)
    code, _, _ = _killed_at("swapped", model_dir, out, "--bits", "4", "--overwrite")
    assert code == -9
    assert _bits(out) == 4  # the new checkpoint is in place
    llmq.from_pretrained(out)
    stale = outdir.stale_partials(out)
    assert len(stale) == 1 and _bits(stale[0]) == 8  # the old one, not yet removed, found as stale


def test_sigkill_between_two_renames_fallback(tmp_path, model_dir):
    """Where the kernel cannot swap two folders atomically: the old OUT is renamed aside first."""
    out = tmp_path / "q"
    _checkpoint(model_dir, out, bits=8)
    code = subprocess.run(
        [sys.executable, "-c", "import sys, llmq.outdir as o, llmq.cli as c; o._exchange = lambda a, b: False; "
                               "sys.exit(c.main(sys.argv[1:]))",
         "quantize", str(model_dir), str(out), "--bits", "4", "--overwrite", *QUANT],
        env={**os.environ, "PYTHONPATH": str(ROOT), "LLMQ_TEST_SIGNAL_AT": "aside:SIGTERM"},
        capture_output=True, text=True).returncode
    assert code == 143
    assert _bits(out) == 8 and _hidden(tmp_path) == []  # SIGTERM there puts the old one back


@pytest.mark.parametrize("sig, code, word", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_sigterm_and_sigint_remove_the_partial_folder(tmp_path, model_dir, sig, code, word):
    out = tmp_path / "q"
    old = _checkpoint(model_dir, out, bits=8)
    rc, _, err = _killed_at("written", model_dir, out, "--bits", "4", "--overwrite", sig=sig)
    assert rc == code and word in err and "Traceback" not in err
    assert _tree(out) == old and _hidden(tmp_path) == []


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_after_the_output_is_in_place_says_it_is_whole(tmp_path, model_dir, sig, code):
    out = tmp_path / "q"
    _checkpoint(model_dir, out, bits=8)
    rc, _, err = _killed_at("swapped", model_dir, out, "--bits", "4", "--overwrite", sig=sig)
    assert rc == code and f"{out} was written whole before" in err and "removed" not in err, err
    assert _bits(out) == 4 and _hidden(tmp_path) == []


def test_sigterm_during_gptq_export_leaves_nothing(tmp_path, model_dir):
    rc, _, err = _killed_at("written", model_dir, tmp_path / "g", "--format", "gptq", sig="SIGTERM")
    assert rc == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# ---- writability, checked before any work -------------------------------------------------------------------

# Root ignores permission bits; without CAP_DAC_OVERRIDE it obeys them as any user does.
NO_DAC = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--")


def _have_setpriv() -> bool:
    try:
        return subprocess.run([*NO_DAC, "true"], capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.mark.skipif(not _have_setpriv() and os.geteuid() == 0, reason="needs setpriv to drop root's override")
def test_read_only_parent_fails_before_any_work(tmp_path, model_dir):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    prefix = NO_DAC if os.geteuid() == 0 else ()
    code, _, err = _cli("quantize", model_dir, ro / "q", "--method", "gptq", "--dataset", "self", *QUANT,
                        prefix=prefix, env={"LLMQ_TEST_SIGNAL_AT": ""})
    _one_error(code, err, "cannot write to", str(ro))
    assert list(ro.iterdir()) == []
    ro.chmod(0o755)


@pytest.mark.skipif(not _have_setpriv() and os.geteuid() == 0, reason="needs setpriv to drop root's override")
def test_an_unreadable_weight_file_is_named_as_such(tmp_path, model_dir):
    [shard] = model_dir.glob("*.safetensors")
    shard.chmod(0o000)
    prefix = NO_DAC if os.geteuid() == 0 else ()
    code, _, err = _cli("quantize", model_dir, tmp_path / "q", *QUANT, prefix=prefix)
    shard.chmod(0o644)
    _one_error(code, err, f"cannot read {shard} (permission denied)")


# ---- 6. missing or unexpected weights; folders that hold a quantized checkpoint ----------------------------

def _edit_weights(folder: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit, needles", [
    (lambda t: t.pop(f"{Q_PROJ}.weight"), ["1 tensor(s) missing", f"{Q_PROJ}.weight", "randomly initialised"]),
    (lambda t: t.__setitem__("model.layers.0.extra.weight", t[f"{Q_PROJ}.weight"].clone()),
     ["not used by the model", "model.layers.0.extra.weight"]),
    (lambda t: t.__setitem__(f"{Q_PROJ}.weight", t[f"{Q_PROJ}.weight"][:, :32].clone()),
     ["wrong shape", f"{Q_PROJ}.weight: [64, 32] in the file, [64, 64] in the model"]),
], ids=["missing", "unexpected", "wrong-shape"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_weights_not_matching_the_config_are_refused(tmp_path, model_dir, capsys, edit, needles, method):
    _edit_weights(model_dir, edit)
    extra = ["--dataset", "self", "--nsamples", "2", "--seqlen", "8"] if method == "gptq" else []
    code, _, err = _run(capsys, "quantize", model_dir, tmp_path / "q", "--method", method, *extra, *QUANT)
    _one_error(code, err, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_autogptq_folder_is_refused(tmp_path, model_dir, capsys):
    """An old AutoGPTQ folder: quantize_config.json, no quantization_config in config.json."""
    _checkpoint(model_dir, tmp_path / "g", bits=4)
    assert main(["convert", str(tmp_path / "g"), str(tmp_path / "old"), "--format", "gptq", "--quiet"]) == 0
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    code, _, err = _run(capsys, "quantize", tmp_path / "old", tmp_path / "q", *QUANT)
    _one_error(code, err, "already quantized (gptq)")
    (tmp_path / "old" / "quantize_config.json").unlink()  # and without it: the packed tensors give it away
    code, _, err = _run(capsys, "quantize", tmp_path / "old", tmp_path / "q", *QUANT)
    _one_error(code, err, "already quantized", ".qweight")
    assert not (tmp_path / "q").exists()


# ---- 7. tokenizers ------------------------------------------------------------------------------------------

def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *[f"w{i}" for i in range(100)]])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_broken_tokenizer_is_an_error_with_its_cause(tmp_path, model_dir, capsys):
    _word_tokenizer().save_pretrained(model_dir)
    (model_dir / "tokenizer.json").write_text('{"version": "1.0", "model": ')  # cut short
    for argv in (["quantize", model_dir, tmp_path / "q", *QUANT],
                 ["eval", model_dir, "--dataset", tmp_path / "t.txt", "--seqlen", "8", "--quiet"]):
        (tmp_path / "t.txt").write_text(" ".join(f"w{i % 100}" for i in range(200)))
        code, _, err = _run(capsys, *argv)
        _one_error(code, err, f"the tokenizer of {model_dir} does not load", "Error")
    assert not (tmp_path / "q").exists()


def test_tokenizer_shipped_and_no_tokenizer_is_quiet(tmp_path, model_dir, capsys):
    code, _, err = _run(capsys, "quantize", model_dir, tmp_path / "bare", *QUANT)
    assert code == 0 and err == ""  # no tokenizer files: quiet, none shipped
    assert not (tmp_path / "bare" / "tokenizer.json").exists()
    _word_tokenizer().save_pretrained(model_dir)
    for method in ("rtn", "gptq"):
        extra = ["--dataset", "self", "--nsamples", "2", "--seqlen", "8"] if method == "gptq" else []
        assert main(["quantize", str(model_dir), str(tmp_path / method), "--method", method, *extra, *QUANT]) == 0
        assert (tmp_path / method / "tokenizer.json").is_file()


# ---- 8. damaged quantized checkpoints: info, convert and loading name the damage ---------------------------

def _nan_scale(t):
    t[f"{Q_PROJ}.scales"][0, 0] = float("nan")


def _inf_scale(t):
    t[f"{Q_PROJ}.scales"][-1, -1] = float("inf")


DAMAGE = {
    "nan-scale": (_nan_scale, f"{Q_PROJ}.scales holds 1 NaN"),
    "inf-scale": (_inf_scale, f"{Q_PROJ}.scales holds 1 NaN or infinite"),
    "float-qweight": (lambda t: t.__setitem__(f"{Q_PROJ}.qweight", t[f"{Q_PROJ}.qweight"].float()),
                      f"{Q_PROJ}.qweight is float32, not int32"),
    "missing-qzeros": (lambda t: t.pop(f"{Q_PROJ}.qzeros"), f"{Q_PROJ}.qzeros"),
    "extra-qweight": (lambda t: t.__setitem__("model.layers.0.extra.qweight", t[f"{Q_PROJ}.qweight"].clone()),
                      "model.layers.0.extra"),
    "scales-shape": (lambda t: t.__setitem__(f"{Q_PROJ}.scales", t[f"{Q_PROJ}.scales"][:1].clone()),
                     f"{Q_PROJ}.scales has shape"),
}


def _truncate(folder):
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _hostile_header(folder):
    (folder / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")


FILE_DAMAGE = {"truncated": (_truncate, "is damaged"), "hostile-header": (_hostile_header, "header too large")}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    tiny_model("llama").save_pretrained(root / "m")
    assert main(["quantize", str(root / "m"), str(root / "llmq"), "--bits", "4", *QUANT]) == 0
    assert main(["convert", str(root / "llmq"), str(root / "gptq"), "--format", "gptq", "--quiet"]) == 0
    return root


@pytest.mark.parametrize("damage", [*DAMAGE, *FILE_DAMAGE])
@pytest.mark.parametrize("fmt", ["llmq", "gptq"])
def test_damaged_checkpoint_is_named_by_info_convert_and_load(checkpoints, tmp_path, capsys, damage, fmt):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(checkpoints / fmt, src)
    if damage in DAMAGE:
        edit, needle = DAMAGE[damage]
        _edit_weights(src, edit)
    else:
        make, needle = FILE_DAMAGE[damage]
        make(src)
    code, _, err = _run(capsys, "info", src)
    _one_error(code, err, needle)
    code, _, err = _run(capsys, "convert", src, tmp_path / "dst", "--quiet")
    _one_error(code, err, needle)
    assert not (tmp_path / "dst").exists() and _hidden(tmp_path) == []
    with pytest.raises(LlmqError, match=needle.replace("[", r"\[")):
        llmq.from_pretrained(src)


def test_convert_never_copies_stray_weights(checkpoints, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(checkpoints / "gptq", src)
    for stray in ("pytorch_model.bin", "optimizer.pt", "model.gguf", "old.safetensors.bak"):
        (src / stray).write_bytes(b"not for copying")
    (src / "tokenizer_config.json").write_text("{}")
    assert main(["convert", str(src), str(tmp_path / "dst"), "--quiet"]) == 0
    names = sorted(p.name for p in (tmp_path / "dst").iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"]


# ---- 9. pickle: never loaded --------------------------------------------------------------------------------

def test_bin_only_model_is_refused_without_unpickling(tmp_path, capsys, monkeypatch):
    import torch

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m", safe_serialization=False) if _saves_bin() else _fake_bin(tmp_path / "m")

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    (tmp_path / "t.txt").write_text("text " * 100)
    for argv in (["quantize", tmp_path / "m", tmp_path / "q", *QUANT],
                 ["eval", tmp_path / "m", "--dataset", tmp_path / "t.txt", "--seqlen", "8", "--quiet"]):
        code, _, err = _run(capsys, *argv)
        _one_error(code, err, "pickled weights", "pytorch_model.bin", "save_pretrained(DST)")
    assert not (tmp_path / "q").exists()


def _saves_bin() -> bool:
    import inspect

    from transformers import PreTrainedModel

    return "safe_serialization" in inspect.signature(PreTrainedModel.save_pretrained).parameters


def _fake_bin(folder: Path) -> None:
    """A model folder with config.json and a pytorch_model.bin (transformers 5 writes safetensors only)."""
    tiny_model("llama").config.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 pickled bytes that must never be loaded")


# ---- 10. damaged full-precision inputs: one line, exit 2, nothing left --------------------------------------

def _truncated_fp(folder):
    _truncate(folder)


def _empty_fp(folder):
    (folder / "model.safetensors").write_bytes(b"")


def _bad_index(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ')


def _config_not_object(folder):
    (folder / "config.json").write_text("[1, 2, 3]")


FP_DAMAGE = {"truncated": (_truncated_fp, "is damaged"), "empty": (_empty_fp, "header too small"),
             "bad-index": (_bad_index, "model.safetensors.index.json is damaged"),
             "config-list": (_config_not_object, "holds a JSON list, not an object")}


@pytest.mark.parametrize("damage", FP_DAMAGE)
def test_damaged_fp_model_quantize_and_eval(tmp_path, model_dir, capsys, damage):
    make, needle = FP_DAMAGE[damage]
    make(model_dir)
    (tmp_path / "t.txt").write_text("text " * 100)
    for argv in (["quantize", model_dir, tmp_path / "q", *QUANT],
                 ["quantize", model_dir, tmp_path / "q", "--method", "gptq", "--dataset", "self", *QUANT],
                 ["eval", model_dir, "--dataset", tmp_path / "t.txt", "--quiet"]):
        code, _, err = _run(capsys, *argv)
        _one_error(code, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "t.txt"]


@pytest.mark.skipif(not _have_setpriv() and os.geteuid() == 0, reason="needs setpriv to drop root's override")
def test_unreadable_calibration_file(tmp_path, model_dir):
    _word_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 100}" for i in range(500)))
    text.chmod(0o000)
    prefix = NO_DAC if os.geteuid() == 0 else ()
    code, _, err = _cli("quantize", model_dir, tmp_path / "q", "--method", "gptq", "--dataset", text,
                        "--nsamples", "2", "--seqlen", "8", *QUANT, prefix=prefix)
    _one_error(code, err, f"cannot read '{text}'", "Permission denied")
    assert not (tmp_path / "q").exists() and _hidden(tmp_path) == []


def test_eval_tmp_dir_missing(tmp_path, model_dir, capsys):
    _word_tokenizer().save_pretrained(model_dir)
    (tmp_path / "t.txt").write_text("text " * 100)
    code, _, err = _run(capsys, "eval", model_dir, model_dir, "--dataset", tmp_path / "t.txt", "--tmp-dir",
                        tmp_path / "nope")
    _one_error(code, err, f"--tmp-dir {tmp_path / 'nope'} is not an existing folder")


# ---- 11. hub ids when the hub cannot be reached ------------------------------------------------------------

@pytest.fixture
def fresh_hub_state(monkeypatch):
    import llmq.loading

    monkeypatch.setattr(llmq.loading, "_hub_state", {})
    monkeypatch.setattr(llmq.loading, "_read_from_cache", set())


@pytest.mark.parametrize("how", ["offline-env", "refused"])
def test_hub_id_fails_fast_when_unreachable(tmp_path, capsys, monkeypatch, fresh_hub_state, how):
    import time

    import huggingface_hub.constants

    if how == "offline-env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # a port nothing listens on: the first connection fails at once
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    start = time.monotonic()
    code, _, err = _run(capsys, "quantize", "someone/model", tmp_path / "q", *QUANT)
    _one_error(code, err, "'someone/model' is not a local folder nor in the hub cache; hub unreachable")
    (tmp_path / "t.txt").write_text("text " * 100)
    code, _, err = _run(capsys, "eval", "models/tiny", "--dataset", "t.txt", "--quiet")  # a mistyped path
    _one_error(code, err, "hub unreachable", "there is a local folder models")
    assert time.monotonic() - start < 10
    assert not (tmp_path / "q").exists()


def test_a_cached_hub_model_is_read_from_the_cache_when_the_hub_is_unreachable(tmp_path, capsys, monkeypatch,
                                                                              fresh_hub_state, model_dir):
    """As transformers reads it offline: the hub cache's snapshot of the model's last downloaded revision."""
    import shutil

    import huggingface_hub.constants

    cache = tmp_path / "hub-cache"
    snapshot = cache / "models--someone--model" / "snapshots" / "0123abcd"
    shutil.copytree(model_dir, snapshot)
    (cache / "models--someone--model" / "refs").mkdir()
    (cache / "models--someone--model" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["quantize", str(model_dir), str(tmp_path / "local"), *QUANT]) == 0
    with pytest.warns(UserWarning, match="read from its copy in the hub cache"):
        assert main(["quantize", "someone/model", str(tmp_path / "cached"), *QUANT]) == 0
    a, b = checkpoint_tensors(tmp_path / "local"), checkpoint_tensors(tmp_path / "cached")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A revision asked for is read at that revision: a quantized model's two commits, main the older.
    llmq.save(llmq.quantize(tiny_model("llama", seed=3), llmq.QuantConfig(group_size=32), progress=False),
              tmp_path / "newer")
    repo = cache / "models--someone--quantized"
    shutil.copytree(tmp_path / "cached", repo / "snapshots" / ("a" * 40))
    shutil.copytree(tmp_path / "newer", repo / "snapshots" / ("b" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for revision, folder in ((None, "cached"), ("b" * 40, "newer")):
            with pytest.warns(UserWarning, match="hub cache"):
                got = llmq.from_pretrained("someone/quantized", revision=revision)(ids).logits
            assert torch.equal(got, llmq.from_pretrained(tmp_path / folder)(ids).logits), revision


def test_a_damaged_side_file_is_one_line(tmp_path, capsys, model_dir):
    (model_dir / "quantize_config.json").write_text("")
    code, _, err = _run(capsys, "quantize", model_dir, tmp_path / "q", *QUANT)
    _one_error(code, err, "quantize_config.json does not read as JSON", "damaged")


# ---- 12. eval's reference store: removed on SIGTERM, and after a kill by the next run ------------------------

def test_eval_reference_store_cleaned_on_sigterm_and_after_sigkill(tmp_path, model_dir):
    _word_tokenizer().save_pretrained(model_dir)
    (tmp_path / "t.txt").write_text(" ".join(f"w{i % 100}" for i in range(400)))
    store = tmp_path / "store"
    store.mkdir()
    argv = ["eval", model_dir, model_dir, "--dataset", tmp_path / "t.txt", "--seqlen", "16", "--tmp-dir", store,
            "--quiet"]
    code, _, err = _cli(*argv, env={"LLMQ_TEST_SIGNAL_AT": "reference-scored:SIGTERM"})
    assert code == 143 and "terminated" in err
    assert list(store.iterdir()) == []
    code, _, err = _cli(*argv, env={"LLMQ_TEST_SIGNAL_AT": "reference-scored:SIGKILL"})
    assert code == -9
    left = list(store.iterdir())
    assert len(left) == 1 and left[0].name.startswith("llmq-eval-ref-")
    code, out, err = _cli(*argv)
    assert code == 0, err
    assert f"removed {left[0]}" in err and "interrupted eval" in err
    assert list(store.iterdir()) == []


# ---- 13. --quiet is quiet ------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [[], ["--no-stream"], ["--format", "gptq"]])
def test_quiet_prints_nothing(tmp_path, model_dir, extra):
    code, out, err = _cli("quantize", model_dir, tmp_path / "q", *extra, *QUANT)
    assert code == 0 and out == "" and err == ""
    code, out, err = _cli("convert", tmp_path / "q", tmp_path / "c", "--format", "compressed-tensors", "--quiet")
    assert code == 0 and out == "" and err == ""
