"""Host memory: the process's peak so far, and what the machine has available.

Read from the kernel (getrusage, /proc/meminfo) so that no extra package is
needed; where /proc is absent (macOS), available memory is unknown (None).
"""

from __future__ import annotations

import resource
import sys

GIB = 1024**3


def peak_host_memory() -> int:
    """Peak resident set size of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak if sys.platform == "darwin" else peak * 1024


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
