"""The format table: every list of checkpoint formats, and every read and write, comes from it."""

import re

import pytest
import torch

from llmq.errors import LlmqError
from llmq.formats import awq, convert, gptq, table


def test_lists_of_formats_come_from_the_table():
    assert convert.READ_FORMATS == tuple(convert.FORMATS) == ("llmq", "gptq", "awq", "compressed-tensors")
    assert convert.WRITE_FORMATS == ("llmq", "gptq", "compressed-tensors")  # awq is read only
    assert convert.FORMATS["gptq"].read is gptq.import_checkpoint
    assert convert.FORMATS["awq"].read is awq.import_checkpoint and convert.FORMATS["awq"].encode is None
    assert callable(convert.FORMATS["compressed-tensors"].read)  # dispatches weight-only and W8A8 folders
    assert convert.FORMATS["gptq"].extra_json == "quantize_config.json"
    assert convert.FORMATS["awq"].extra_json == "quant_config.json"  # AutoAWQ's first releases


def test_unknown_or_read_only_formats_are_refused():
    with pytest.raises(LlmqError, match="cannot write format 'awq': choose one of llmq, gptq, compressed-tensors"):
        convert.encode(None, "awq")
    with pytest.raises(LlmqError, match="not readable by llmq: it reads llmq, gptq, awq, compressed-tensors"):
        convert.detect_format({"quantization_config": {"quant_method": "bitsandbytes"}})


def _native_checkpoint(tmp_path, **config):
    import llmq
    from llmq import QuantConfig
    from conftest import tiny_model

    llmq.save(llmq.quantize(tiny_model(), QuantConfig(**config), progress=False), tmp_path / "native")
    return convert.read_checkpoint(tmp_path / "native")


@pytest.mark.parametrize("fmt,config", [("gptq", dict(sym=True, group_size=32)),
                                        ("gptq", dict(sym=False, group_size=32)),
                                        ("compressed-tensors", dict(sym=False, group_size=32)),
                                        ("compressed-tensors", dict(scheme="w8a8"))])
def test_every_entry_reads_what_it_writes_and_loads_it_in_flight_alike(tmp_path, fmt, config):
    """Through the table alone: the quantization_config an entry writes is detected as that entry,
    its reader gives back the native tensors bit for bit, and its in-flight re-layouts (applied
    to each stored tensor alone, as the loader does) give the same tensors as its reader."""
    ckpt = _native_checkpoint(tmp_path, **config)
    entry = convert.FORMATS[fmt]
    qcfg, stored = entry.config(ckpt), entry.encode(ckpt)
    assert convert.stored_format(qcfg) is entry
    back, qc = entry.read(stored, qcfg)
    assert set(back) == set(ckpt.tensors)
    for key, tensor in ckpt.tensors.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    relayouts, unexpected = entry.in_flight(qcfg, qc)
    in_flight = {}
    for key, tensor in stored.items():
        module, _, last = key.rpartition(".")
        match = [r for r in relayouts if r.source == last]
        if match:
            in_flight.update({f"{module}.{k}": v for k, v in match[0].native(tensor).items()})
        elif not any(re.search(pattern, key) for pattern in unexpected):
            in_flight[key] = tensor
    assert set(in_flight) == set(back)
    for key, tensor in back.items():
        assert torch.equal(in_flight[key], tensor), key


def test_a_folder_with_only_the_side_file_is_read_as_its_format(tmp_path):
    """Older AutoGPTQ folders keep their settings in quantize_config.json (the gptq entry's side file)
    and none in config.json: the table names the format, the codes come back bit for bit, and the
    folder loads and evaluates as its twin with the settings in config.json."""
    import json

    import llmq
    from llmq.eval.models import quant_method
    from conftest import random_ids

    ckpt = _native_checkpoint(tmp_path, sym=False, group_size=32)
    convert.convert(tmp_path / "native", tmp_path / "old", "gptq")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    assert table.side_config(tmp_path / "old")[0] is convert.FORMATS["gptq"]
    assert table.side_config(tmp_path / "native") is None
    back = convert.read_checkpoint(tmp_path / "old")
    assert back.source_format == "gptq"
    for key, tensor in ckpt.tensors.items():
        assert torch.equal(back.tensors[key], tensor), key
    assert quant_method(str(tmp_path / "old")) == "gptq"  # llmq eval loads it as gptq, not as a model to refuse
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(llmq.from_pretrained(tmp_path / "old")(ids).logits,
                           llmq.from_pretrained(tmp_path / "native")(ids).logits)
