"""A regular (non-editable) install works: build the wheel, install it into a fresh
virtual environment, and run the command line from there, away from the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _packages_in_source() -> set[str]:
    """Every package under llmq/ in the checkout (kernels/ installs as llmq.kernels)."""
    found = {"llmq.kernels"}
    for init in (ROOT / "llmq").rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if "kernels" not in rel.parts:
            found.add(".".join(rel.parts))
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (path,) = out.glob("llmq-*.whl")
    return path


def test_wheel_holds_every_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {os.path.dirname(n).replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert _packages_in_source() <= in_wheel, sorted(_packages_in_source() - in_wheel)
    assert "llmq/kernels/triton_qmm.py" in names
    assert "llmq/texts/emma-volume-1.txt" in names  # the text behind --dataset builtin
    assert not any(n.startswith(("kernels/", "tests/", "scripts/")) for n in names)
    # The version is read from llmq/_version.py, its one owner.
    from llmq._version import __version__

    assert wheel.name.startswith(f"llmq-{__version__}-")


def test_installed_wheel_runs(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    # The dependencies come from the test environment's site-packages, added as a plain path:
    # its .pth files are not run, so an editable install of the checkout there cannot leak in.
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "test-deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    run_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q",
                        str(wheel)], capture_output=True, text=True, env=run_env)
    assert r.returncode == 0, r.stderr
    work = tmp_path / "work"  # away from the checkout, so nothing is imported from its folders
    work.mkdir()
    tiny_model("llama").save_pretrained(work / "tiny")

    def run(*args):
        r = subprocess.run(list(args), capture_output=True, text=True, cwd=work, env=run_env)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    where = run(str(py), "-c", "import llmq, llmq.kernels, llmq.eval, llmq.methods\n"
                "for m in (llmq, llmq.kernels, llmq.eval, llmq.methods): print(m.__file__)")
    assert all(line.startswith(str(env_dir)) for line in where.split()), where
    llmq_exe = str(env_dir / "bin" / "llmq")
    assert "quantize" in run(llmq_exe, "--help")
    run(llmq_exe, "quantize", "tiny", "q", "--method", "rtn", "--bits", "4", "--group-size", "32", "--quiet")
    # The shipped calibration text is read from the installed package.
    run(str(py), "-c", "from llmq.data import load_text; assert load_text('builtin').startswith('EMMA')")
    info = run(llmq_exe, "info", "q")
    assert "4" in info and "32" in info
