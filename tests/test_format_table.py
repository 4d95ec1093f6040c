"""The format table: every list of checkpoint formats, and every read and write, comes from it."""

import pytest

from llmq.errors import LlmqError
from llmq.formats import awq, convert, gptq


def test_lists_of_formats_come_from_the_table():
    assert convert.READ_FORMATS == tuple(convert.FORMATS) == ("llmq", "gptq", "awq", "compressed-tensors")
    assert convert.WRITE_FORMATS == ("llmq", "gptq", "compressed-tensors")  # awq is read only
    assert convert.FORMATS["gptq"].read is gptq.import_checkpoint
    assert convert.FORMATS["awq"].read is awq.import_checkpoint and convert.FORMATS["awq"].encode is None
    assert callable(convert.FORMATS["compressed-tensors"].read)  # dispatches weight-only and W8A8 folders
    assert convert.FORMATS["gptq"].extra_json == "quantize_config.json"


def test_unknown_or_read_only_formats_are_refused():
    with pytest.raises(LlmqError, match="cannot write format 'awq': choose one of llmq, gptq, compressed-tensors"):
        convert.encode(None, "awq")
    with pytest.raises(LlmqError, match="not readable by llmq: it reads llmq, gptq, awq, compressed-tensors"):
        convert.detect_format({"quantization_config": {"quant_method": "bitsandbytes"}})
