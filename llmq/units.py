"""Byte counts for people: one formatter, binary units (KiB = 1024 B), used by `llmq info` and the eval report."""

from __future__ import annotations

MIB = 1 << 20


def human_bytes(n: int | float | None) -> str:
    """'512 B', '1.5 KiB', '3.2 GiB' ...; '-' for None (unknown)."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
