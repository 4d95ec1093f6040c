"""Freed memory goes back to the system at once during bounded-memory runs (glibc's mallopt)."""

import os
import subprocess
import sys

import pytest

# A 16 MiB block freed below a live small one: where glibc keeps it in its heap the
# resident size does not drop; where it was mmapped, freeing it unmaps it.
PROBE = r"""
import ctypes, ctypes.util, sys
from llmq.memory import return_freed_memory_promptly
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
if sys.argv[1] == "on":
    assert return_freed_memory_promptly()
MiB = 1 << 20
first = libc.malloc(24 * MiB); ctypes.memset(first, 1, 24 * MiB); libc.free(first)  # glibc raises its threshold
block = libc.malloc(16 * MiB); ctypes.memset(block, 1, 16 * MiB)
pin = libc.malloc(1024); ctypes.memset(pin, 1, 1024)  # keeps the heap's top above the block
before = rss(); libc.free(block)
print(before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_freed_block_leaves_the_process_only_when_set():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    released = {mode: int(subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True,
                                         text=True, check=True).stdout)
                for mode in ("off", "on")}
    assert released["off"] < 1 << 20  # glibc's default keeps it
    assert released["on"] >= 15 << 20
