"""The Triton kernels compile for a real GPU (sm_90) ahead of time, without one.

The interpreter tests check the kernels' arithmetic, but the interpreter runs
plain Python: code that does not lower to GPU instructions (an early return
inside a constexpr branch, a reshape the compiler rejects) passes there and
fails on the first CUDA call. scripts/compile_kernels.py compiles every
autotune config and every specialization with triton's compiler and the
ptxas shipped in its wheel; it runs in its own process without
TRITON_INTERPRET, since under the interpreter nothing is compiled.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "compile_kernels.py"


def _has_nvidia_backend() -> bool:
    try:
        from triton import knobs

        return Path(knobs.nvidia.ptxas.path).exists() and Path(knobs.nvidia.cuobjdump.path).exists()
    except Exception:  # triton missing, or built without its NVIDIA backend
        return False


@pytest.mark.skipif(not _has_nvidia_backend(), reason="needs triton with its NVIDIA backend (ptxas)")
def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--arch", "90"], env=env,
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "all kernels compiled" in run.stdout
    assert "FAILED" not in run.stdout
    # Every specialization reports registers and, for fp16/bf16 dots, tensor-core instructions.
    rows = [line for line in run.stdout.splitlines() if line.startswith("  splitk") or line.startswith("  gemm")]
    assert rows and all("mma" in line for line in rows if "fp16" in line or "bf16" in line)
    # The W8A8 kernels' int8 dots run on tensor cores (int8 mma) for every activation dtype.
    int8_rows = [line for line in run.stdout.splitlines() if line.startswith(("  int8-gemm", "  int8-splitk"))]
    assert int8_rows and all("mma" in line for line in int8_rows)
