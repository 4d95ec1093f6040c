"""Host memory: the process's peak so far, and what the machine has available.

Read from the kernel (getrusage, /proc/meminfo) so that no extra package is
needed; where /proc is absent (macOS), available memory is unknown (None).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

GIB = 1024**3


def peak_host_memory() -> int:
    """Peak resident set size of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak if sys.platform == "darwin" else peak * 1024


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_FROM_BYTES = 64 * 1024


def return_freed_memory_promptly() -> bool:
    """Make glibc give large freed blocks back to the system at once; True where it applied.

    By default glibc raises its mmap threshold each time a large mmapped block is
    freed (up to 32 MiB), so a layer-by-layer run's many temporaries of a few to
    tens of MiB end up in the heap, where freed space is kept and fragments: the
    resident size of a streamed GPTQ of a 12-layer checkpoint crept from 1,029 to
    1,300 MiB this way, and stayed flat near 800 MiB with a fixed 64 KiB threshold
    and no trim threshold (BENCHMARKS.md). A fixed threshold also turns the raising off.
    Process-wide, so it is called where a bounded-memory run starts, never on import.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, 0))


def available_host_memory() -> int | None:
    """Memory the kernel says new allocations can use without swapping (MemAvailable), in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
