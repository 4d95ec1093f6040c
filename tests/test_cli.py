import json
import os
import subprocess
import sys

import pytest
import torch

from llmq.cli import main
from conftest import model_folder_with_text, tiny_model


def _run(capsys, *argv):
    capsys.readouterr()  # drop what the test's own set-up printed
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_and_info_end_to_end(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "q"
    code, _, _ = _run(capsys, "quantize", str(tiny_llama_dir), str(out), "--bits", "4", "--group-size", "64",
                      "--asym", "--quiet")
    assert code == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "llmq" and cfg["group_size"] == 64 and cfg["sym"] is False
    code, text, _ = _run(capsys, "info", str(out))
    assert code == 0
    assert "int4" in text and "group size 64" in text and "asymmetric" in text and "14 linears" in text
    assert "x larger" in text


def test_a_reader_that_left_stops_the_output_quietly(tmp_path, tiny_llama_dir, capsys):
    """`llmq info X | head -1`: stdout's reader is gone, so the first write fails (a closed pipe here)."""
    assert main(["quantize", str(tiny_llama_dir), str(tmp_path / "q"), "--bits", "8", "--group-size", "-1",
                 "--quiet"]) == 0
    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run([sys.executable, "-m", "llmq", "info", str(tmp_path / "q")], stdout=write,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    finally:
        os.close(write)
    assert r.returncode == 141 and r.stderr == ""


def test_console_script_runs(tmp_path, tiny_llama_dir):
    exe = os.path.join(os.path.dirname(sys.executable), "llmq")
    r = subprocess.run([exe, "quantize", str(tiny_llama_dir), str(tmp_path / "q"), "--bits", "8",
                        "--group-size", "-1", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([exe, "quantize", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--group-size" in r.stdout and "--asym" in r.stdout


def _assert_clean_failure(code, err, tmp_path, match):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("llmq:")]
    assert len(lines) == 1 and lines[0].startswith("llmq: error:"), err
    assert err.strip().splitlines()[-1] == lines[0]
    assert match in lines[0]
    assert "Traceback" not in err


def test_unknown_model_path(tmp_path, capsys):
    code, _, err = _run(capsys, "quantize", str(tmp_path / "nope"), str(tmp_path / "q"))
    _assert_clean_failure(code, err, tmp_path, "not found")
    assert not (tmp_path / "q").exists()


def test_unsupported_bits(tmp_path, tiny_llama_dir, capsys):
    code, _, err = _run(capsys, "quantize", str(tiny_llama_dir), str(tmp_path / "q"), "--bits", "3")
    _assert_clean_failure(code, err, tmp_path, "3 bits are not supported")
    assert not (tmp_path / "q").exists()


def test_group_size_not_dividing_names_layer_and_options(tmp_path, capsys):
    path = tmp_path / "m"
    tiny_model("llama").save_pretrained(path)
    code, _, err = _run(capsys, "quantize", str(path), str(tmp_path / "q"), "--group-size", "48")
    _assert_clean_failure(code, err, tmp_path, "model.layers.0.")
    assert "16, 32, 64" in err and "-1" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_nan_weights(tmp_path, capsys):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "m")
    code, _, err = _run(capsys, "quantize", str(tmp_path / "m"), str(tmp_path / "q"), "--group-size", "32")
    _assert_clean_failure(code, err, tmp_path, "model.layers.1.mlp.up_proj.weight")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("route", [["--no-stream"], ["--stream"], []])  # in memory, streamed, shard by shard
def test_weights_past_the_scales_range_are_refused_by_name(tmp_path, capsys, route):
    # An fp32 model's scales are fp16: a weight of 1e6 needs a 4-bit scale past fp16's 65504. The
    # checkpoint would hold an infinite scale, which loading refuses.
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = 1e6
    model.save_pretrained(tmp_path / "m")
    code, _, err = _run(capsys, "quantize", str(tmp_path / "m"), str(tmp_path / "q"), "--group-size", "32",
                        "--method", "rtn", *route)
    _assert_clean_failure(code, err, tmp_path, "mlp.up_proj.scales")
    assert "--dtype bfloat16" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert main(["quantize", str(tmp_path / "m"), str(tmp_path / "q"), "--group-size", "32", "--method", "rtn",
                 "--dtype", "bfloat16", *route, "--quiet"]) == 0  # bf16 scales hold it


def test_non_empty_output(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = _run(capsys, "quantize", str(tiny_llama_dir), str(out), "--group-size", "32")
    _assert_clean_failure(code, err, tmp_path, "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"


def test_already_quantized_input(tmp_path, tiny_llama_dir, capsys):
    assert main(["quantize", str(tiny_llama_dir), str(tmp_path / "q"), "--group-size", "32", "--quiet"]) == 0
    code, _, err = _run(capsys, "quantize", str(tmp_path / "q"), str(tmp_path / "q2"))
    _assert_clean_failure(code, err, tmp_path, "already quantized")


def test_info_on_non_checkpoint(tmp_path, tiny_llama_dir, capsys):
    code, _, err = _run(capsys, "info", str(tiny_llama_dir))
    _assert_clean_failure(code, err, tmp_path, "not quantized")


def test_argparse_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize"])
    assert e.value.code == 2


@pytest.mark.parametrize("command", ["quantize", "eval", "convert"])
def test_help_shows_the_defaults_that_say_something(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    # None means "see the help text", and a switch's True/False reads as if the switch were on or off.
    for meaningless in ("(default: None)", "(default: True)", "(default: False)"):
        assert meaningless not in text.replace("\n", " ").replace("  ", " "), meaningless
    if command == "quantize":
        assert "(default: 128)" in " ".join(text.split())  # --nsamples


@pytest.mark.parametrize("argv, hint", [
    (["--group-size", "32"], "--method gptq or awq"),
    (["--scheme", "w8a8"], "--smooth auto or --method gptq"),
])
def test_a_dataset_the_run_does_not_read_is_reported(tmp_path, tiny_llama_dir, capsys, argv, hint):
    text = tmp_path / "text.txt"
    text.write_text("calibration text that a data-free run never reads. " * 20)
    code, _, err = _run(capsys, "quantize", str(tiny_llama_dir), str(tmp_path / "q"), "--dataset", str(text), *argv)
    assert code == 0
    assert "note: --dataset is not read" in err and hint in err, err


@pytest.mark.parametrize("argv, match", [
    (["--method", "rtn", "--act-order"], "--method rtn does not run GPTQ"),
    (["--method", "awq", "--act-order"], "--method awq does not run GPTQ"),
    (["--scheme", "w8a8", "--act-order"], "--method rtn does not run GPTQ"),
    (["--method", "gptq", "--no-act-order", "--static-groups"], "add --act-order"),
    (["--static-groups"], "add --act-order"),
])
def test_gptq_settings_for_a_run_without_them_are_refused(tmp_path, tiny_llama_dir, capsys, argv, match):
    """A setting nothing would run is refused: an rtn run with act-order once wrote a checkpoint that
    promised g_idx tensors it did not hold."""
    code, _, err = _run(capsys, "quantize", str(tiny_llama_dir), str(tmp_path / "q"), *argv)
    _assert_clean_failure(code, err, tmp_path, match)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("arch, pattern", [("llama", "nonexistent"), ("llama", "proj"), ("llama", "model"),
                                           ("mixtral", "block_sparse_moe.experts")])
def test_a_skip_that_names_no_layer_is_refused(tmp_path, capsys, arch, pattern):
    path = tmp_path / "m"
    tiny_model(arch).save_pretrained(path)
    code, _, err = _run(capsys, "quantize", str(path), str(tmp_path / "q"), "--group-size", "32",
                        "--skip", "q_proj", "--skip", pattern)
    _assert_clean_failure(code, err, tmp_path, f"--skip {pattern!r} names no linear layer")
    assert "self_attn.q_proj" in err and ("mlp.experts" in err) == (arch == "mixtral")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("argv, noted", [
    (["--damp", "0.05"], "--damp set"),
    (["--damp", "0.05", "--no-clip-search"], "--damp and --no-clip-search set"),
    (["--scheme", "w8a8", "--no-clip-search"], "--no-clip-search set"),
    (["--method", "gptq", "--nsamples", "2", "--seqlen", "16", "--damp", "0.05"], None),
])
def test_gptq_settings_a_run_does_not_read_are_reported(tmp_path, capsys, argv, noted):
    text = model_folder_with_text(tmp_path / "m")
    group = [] if "w8a8" in argv else ["--group-size", "32"]
    code, _, err = _run(capsys, "quantize", str(tmp_path / "m"), str(tmp_path / "q"), "--dataset", str(text),
                        *group, *argv)
    assert code == 0, err
    if noted:
        assert f"note: {noted} GPTQ's solve, which --method rtn does not run: not read" in err, err
    else:
        assert "GPTQ's solve" not in err, err
    damp = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["damp"]
    assert damp == (0.05 if "0.05" in argv else 0.01)


def test_skip_adds_to_the_kept_head(tmp_path, tiny_llama_dir, capsys):
    code, _, err = _run(capsys, "quantize", str(tiny_llama_dir), str(tmp_path / "q"), "--group-size", "32",
                        "--skip", "down_proj", "--skip", "lm_head", "--quiet")
    assert code == 0, err
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == ["lm_head", "down_proj"]


@pytest.mark.parametrize("arch", ["llama", "opt"])  # rotary positions, and OPT's learned position table
def test_windows_longer_than_the_models_positions_are_refused_before_any_work(tmp_path, capsys, monkeypatch,
                                                                              arch):
    import conftest

    full = conftest.TINY_CONFIGS[arch]
    monkeypatch.setitem(conftest.TINY_CONFIGS, arch, lambda: full().__class__(**{
        **full().to_diff_dict(), "max_position_embeddings": 32}))
    src = tmp_path / "m"
    text = model_folder_with_text(src, arch)
    capsys.readouterr()
    message = "--seqlen 40 is longer than this model's 32 positions"
    for argv in (["quantize", str(src), str(tmp_path / "q"), "--method", "gptq", "--group-size", "32",
                  "--dataset", str(text), "--nsamples", "2", "--seqlen", "40", "--quiet"],
                 ["eval", str(src), "--dataset", str(text), "--seqlen", "40", "--quiet"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "q").exists()
    assert main(["eval", str(src), "--dataset", str(text), "--seqlen", "32", "--quiet"]) == 0


def test_token_windows_longer_than_the_models_positions_are_refused():
    import llmq

    model = tiny_model("llama")
    model.config.max_position_embeddings = 16
    with pytest.raises(llmq.LlmqError, match="--seqlen 20 is longer than this model's 16 positions"):
        llmq.quantize(model, llmq.QuantConfig(method="gptq", group_size=32), torch.randint(0, 200, (2, 20)),
                      progress=False)


@pytest.mark.parametrize("error", [
    lambda: OSError(28, "No space left on device"),
    lambda: __import__("safetensors").SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"),
])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, tiny_llama_dir, capsys, monkeypatch, error):
    from llmq.formats import convert

    assert main(["quantize", str(tiny_llama_dir), str(tmp_path / "q"), "--bits", "8", "--group-size", "-1",
                 "--quiet"]) == 0

    def full(*args, **kwargs):
        raise error()

    monkeypatch.setattr(convert, "save_file", full)
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "q"), str(tmp_path / "g"), "--format", "gptq", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmq: error: no space left on the device") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["q", tiny_llama_dir.name])


@pytest.mark.parametrize("edit,message", [
    ({"model_type": "foobar"}, "has model type 'foobar', which transformers"),
    ({"model_type": "mycustom", "auto_map": {"AutoModelForCausalLM": "modeling_mycustom.MyModel"}},
     "needs its own modeling code (auto_map"),
])
def test_an_architecture_transformers_does_not_ship_is_refused(tmp_path, tiny_llama_dir, capsys, edit, message):
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    (tiny_llama_dir / "config.json").write_text(json.dumps({**config, **edit}))
    assert main(["quantize", str(tiny_llama_dir), str(tmp_path / "q"), "--bits", "8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_an_empty_model_name_and_a_seed_out_of_range_are_refused(tmp_path, capsys):
    src = tmp_path / "m"
    text = model_folder_with_text(src)
    capsys.readouterr()
    assert main(["quantize", "", str(tmp_path / "q")]) == 2
    assert "the model is an empty name" in capsys.readouterr().err
    assert main(["quantize", str(src), str(tmp_path / "q"), "--method", "gptq", "--group-size", "32", "--dataset",
                 str(text), "--seed", str(2**64), "--quiet"]) == 2
    assert f"--seed {2**64} is out of range" in capsys.readouterr().err and not (tmp_path / "q").exists()
