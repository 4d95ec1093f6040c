"""The method table: one list of methods, each looked up by quantize, and a new one plugs in."""

import re
import sys
import types

import pytest
import torch

import llmq
from llmq import LlmqError, QuantConfig, arch, cli, config as config_module
from llmq.formats import compressed_tensors, gptq as gptq_format
from llmq.methods import registry
from llmq.methods.base import Method
from llmq.methods.rtn import RTNLayerStep
from conftest import random_ids, tiny_model


def test_every_list_of_methods_is_the_table():
    names = registry.names()
    assert names == ("rtn", "gptq", "awq", "awq+gptq")
    assert config_module.METHODS == names
    choices = next(a.choices for a in cli.build_parser()._subparsers._group_actions[0].choices["quantize"]._actions
                   if a.dest == "method")
    assert tuple(choices) == names
    for name in names:
        method = registry.get(name)
        assert isinstance(method, Method) and method.name == name
        assert method.needs_calibration == (name != "rtn")
    assert "registry" in vars(gptq_format) and "registry" in vars(compressed_tensors)


@pytest.mark.parametrize("method", ["gptq", "awq", "awq+gptq"])
def test_architecture_resolved_once_and_caller_config_untouched(monkeypatch, method):
    calls = []
    real = arch.arch_spec
    monkeypatch.setattr(arch, "arch_spec", lambda model: calls.append(1) or real(model))
    config = QuantConfig(method=method, bits=4, group_size=32)
    before = config.to_dict()
    windows = random_ids(n=4, length=16, seed=3)
    model = llmq.quantize(tiny_model("llama"), config, windows, device="cpu", progress=False)
    assert len(calls) == 1
    assert config.to_dict() == before  # nothing written into the caller's config
    recorded = model.config.quantization_config["calibration"]
    assert recorded == {"dataset": "token windows", "nsamples": 4, "seqlen": 16}


@pytest.mark.parametrize("bad", [torch.zeros(4, 8), torch.zeros(8, dtype=torch.long),
                                 torch.zeros(0, 8, dtype=torch.long), torch.zeros(4, 8, dtype=torch.bool)])
def test_bad_calibration_windows_are_refused(bad):
    """Each malformed window tensor is refused by name (see below for other kinds of dataset)."""
    with pytest.raises(LlmqError, match="calibration windows must be a non-empty integer tensor"):
        llmq.quantize(tiny_model("llama"), QuantConfig(method="gptq", group_size=32), bad, device="cpu",
                      progress=False)


@pytest.mark.parametrize("low, high", [(-1, 5), (0, 10_000)])
def test_calibration_token_ids_outside_the_vocabulary_are_refused(low, high):
    model = tiny_model("llama")
    windows = torch.randint(0, 5, (2, 8))
    windows[0, 0], windows[1, 3] = low, high
    with pytest.raises(LlmqError, match=f"token ids from {low} to {high}, outside this model's vocabulary"):
        llmq.quantize(model, QuantConfig(method="gptq", group_size=32), windows, device="cpu", progress=False)


def test_a_dtype_for_a_model_already_loaded_is_refused():
    model = tiny_model("llama")
    with pytest.raises(LlmqError, match="dtype='bfloat16' sets the dtype a model path is loaded in"):
        llmq.quantize(model, QuantConfig(group_size=32), dtype="bfloat16", progress=False)
    assert llmq.quantize(model, QuantConfig(group_size=32), dtype=torch.float32, progress=False) is model


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_calibration_windows_of_any_integer_type_calibrate_as_int64_ones(dtype):
    windows = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(7))
    config = QuantConfig(method="gptq", group_size=32)
    expected = llmq.quantize(tiny_model("llama"), config, windows, device="cpu", progress=False).state_dict()
    got = llmq.quantize(tiny_model("llama"), config, windows.to(dtype), device="cpu", progress=False).state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_a_registered_method_is_used_by_quantize(monkeypatch):
    # A new method is one module with METHOD and one table entry; here a calibrated
    # round-to-nearest that records which layers it saw and the shape of their inputs.
    seen = []

    class Seen(RTNLayerStep):
        def __call__(self, index, layer, hidden, args, kwargs):
            seen.append((index, tuple(hidden.shape)))
            out = layer(hidden, *args, **kwargs)
            super().__call__(index, layer, hidden, args, kwargs)
            return out[0] if isinstance(out, tuple) else out, ""

    class Toy(Method):
        name = "toy"

        def layer_step(self, job, plans):
            assert set(plans) == set(job.targets) == {0, 1}
            return Seen(job.config, plans, job.scale_dtype)

    module = types.ModuleType("llmq_toy_method")
    module.METHOD = Toy()
    monkeypatch.setitem(sys.modules, "llmq_toy_method", module)
    monkeypatch.setitem(registry._TABLE, "toy", registry.MethodEntry("toy", "llmq_toy_method", "a test method"))
    with pytest.raises(LlmqError, match="unknown method"):
        QuantConfig(method="toy2")
    model = llmq.quantize(tiny_model("llama"), QuantConfig(method="toy", group_size=32),
                          random_ids(n=2, length=8), device="cpu", progress=False)
    assert [i for i, _ in seen] == [0, 1] and all(s == (2, 8, 64) for _, s in seen)
    assert sum(isinstance(m, llmq.QuantLinear) for m in model.modules()) == 14
    assert model.config.quantization_config["method"] == "toy"


def test_short_config_spec_of_the_scripts():
    from llmq.config import parse_config_spec

    c = parse_config_spec("gptq:4:64:asym:act:static")
    assert (c.method, c.bits, c.group_size, c.sym, c.desc_act, c.static_groups) == ("gptq", 4, 64, False, True, True)
    c = parse_config_spec("awq+gptq:8:-1:sym")
    assert (c.method, c.bits, c.group_size, c.sym) == ("awq+gptq", 8, -1, True)
    for bad in ("gptq:4:64", "nope:4:64:sym", "rtn:4:64:sym:fast", "rtn:four:64:sym"):
        with pytest.raises(LlmqError, match="bad config spec"):
            parse_config_spec(bad)


@pytest.mark.parametrize("field, value", [
    ("sym", "false"), ("sym", None), ("desc_act", "yes"), ("clip_search", "no"), ("keep_routers", 0),
    ("static_groups", 1), ("bits", 4.0), ("bits", True), ("damp", "0.01"), ("damp", None),
    ("modules_to_not_convert", "lm_head"), ("modules_to_not_convert", [1, 2]), ("moe_min_tokens", True),
    ("calibration", "x"), ("smooth", False), ("smooth", True), ("group_size", True),
])
def test_config_values_of_the_wrong_kind_are_refused(field, value):
    """A value of another kind would be read as something else: the string "false" as a true sym."""
    with pytest.raises(LlmqError, match=re.escape(f"QuantConfig {field}={value!r} is invalid")):
        QuantConfig(**{field: value})


@pytest.mark.parametrize("dataset", [[[1, 2, 3], [4, 5, 6]], {"text": "x"}, 3])
def test_a_dataset_of_another_kind_is_refused(dataset):
    with pytest.raises(LlmqError, match=f"dataset must be a dataset spec .* not {type(dataset).__name__}"):
        llmq.quantize(tiny_model("llama"), QuantConfig(method="gptq", group_size=32), dataset, device="cpu",
                      progress=False)


def test_a_dataset_a_run_does_not_read_is_said(recwarn):
    llmq.quantize(tiny_model("llama"), QuantConfig(group_size=32), "builtin", progress=False)
    assert any("dataset is not read" in str(w.message) for w in recwarn.list)


def test_calibration_with_fewer_tokens_than_a_linear_has_inputs_is_said():
    with pytest.warns(UserWarning, match="calibration holds 6 tokens, fewer than the 128 inputs"):
        llmq.quantize(tiny_model(), QuantConfig(method="gptq", group_size=32), dataset=random_ids(n=2, length=3),
                      progress=False)
