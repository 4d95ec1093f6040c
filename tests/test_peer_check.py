"""GPTQModel (and llm-compressor, when installed) as judges of llmq's checkpoints: scripts/peer_check.py.

Skipped unless gptqmodel is importable (it is not a dependency of llmq; README
says how it was installed). Slow: GPTQModel and llm-compressor quantize the
tiny model on the CPU.
"""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("gptqmodel", reason="GPTQModel is not installed (see README: checked by peer clients)")

spec = importlib.util.spec_from_file_location("peer_check", Path(__file__).resolve().parents[1] / "scripts" /
                                              "peer_check.py")
peer_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peer_check)


def test_peers_and_llmq_read_each_others_checkpoints(tmp_path):
    result = peer_check.run(tmp_path, quick=True)
    names = [r["check"] for r in result["checks"]]
    assert any("-> GPTQModel" in n for n in names) and any("GPTQModel gptq" in n for n in names)
    assert any(n.startswith("control") for n in names)  # a decoding mistake is caught by the same comparison
    failed = [r for r in result["checks"] if not r["ok"]]
    assert not failed, failed
