import os
import subprocess
import sys


def test_import_without_triton_touches_no_global_state():
    code = r"""
import os, sys
sys.modules["triton"] = None  # importing triton now fails, as on a machine without it
before_env = dict(os.environ)
import torch
flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.get_default_dtype(), torch.get_num_threads())
import llmq, llmq.kernels, llmq.cli
assert dict(os.environ) == before_env, "import changed the environment"
assert flags == (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                 torch.get_default_dtype(), torch.get_num_threads()), "import changed torch flags"
assert not torch.cuda.is_initialized()
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
assert "llmq" in AUTO_QUANTIZER_MAPPING
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
