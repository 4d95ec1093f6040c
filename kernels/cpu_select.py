"""Which CPU kernel runs a quantized linear: measured once per process, on this processor.

The fastest way to multiply by quantized weights on a CPU depends on the
instructions the processor has and how its library kernels use them (bf16
matmuls are 2x faster than fp32 on some processors with avx512_bf16 and 2x
slower on others; int8 GEMMs need VNNI to pay), and on the number of rows M:
decode (a few rows) is bound by reading the weights, prefill (many rows) by
arithmetic. So the kernels are not chosen by assumption: the first call of a
kind of layer times its candidates on a representative shape, in this process,
with its thread count, and every later call of that kind takes the winner for
its regime. Nothing is measured at import. The measurement (a fraction of a
second per kind; a candidate whose first run takes HOPELESS times the fastest
one's is not run again) runs with the thread count of that moment; after
changing torch's threads, `reset()` makes the next calls measure again.

Kinds and candidates (each computes the same product; see the modules that
run them for their numerics):

    w8a8   int8 activations x int8 weights (kernels/int8.py): "intmm", "dequant", "int8pack"
    int4   4-bit grouped weight-only (kernels/cpu.py): "int4pack", "dequant", "dequant_bf16"
    int8   8-bit per-row weight-only (kernels/cpu.py): "int8pack", "dequant", "dequant_bf16"

Regimes: "decode" for M <= DECODE_MAX_ROWS rows, "prefill" above.

Override (tests, or to pin a choice): the environment variable
LLMQ_CPU_KERNELS, a comma-separated list of `kind=name` (both regimes) or
`kind.regime=name`, e.g. `LLMQ_CPU_KERNELS=int4.prefill=dequant,w8a8=intmm`;
or `force(kind, name, regime=None)` in code. A name that is not a candidate
of its kind raises ValueError when the kind is first used.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

DECODE_MAX_ROWS = 16
REGIMES = ("decode", "prefill")
CANDIDATES = {
    "w8a8": ("intmm", "dequant", "int8pack"),
    "int4": ("int4pack", "dequant", "dequant_bf16"),
    "int8": ("int8pack", "dequant", "dequant_bf16"),
}
ENV = "LLMQ_CPU_KERNELS"

_lock = threading.Lock()
_chosen: dict[tuple[str, str], str] = {}
_timings: dict[tuple[str, str], dict[str, float]] = {}
_forced: dict[tuple[str, str], str] = {}


def regime(m: int) -> str:
    return "decode" if m <= DECODE_MAX_ROWS else "prefill"


def _check(kind: str, name: str, where: str) -> None:
    if kind not in CANDIDATES:
        raise ValueError(f"{where}: unknown kernel kind {kind!r}; kinds: {', '.join(CANDIDATES)}")
    if name not in CANDIDATES[kind]:
        raise ValueError(f"{where}: {name!r} is not a {kind} CPU kernel; candidates: {', '.join(CANDIDATES[kind])}")


def _env_choices() -> dict[tuple[str, str], str]:
    out = {}
    for item in filter(None, (s.strip() for s in os.environ.get(ENV, "").split(","))):
        key, sep, name = item.partition("=")
        kind, _, reg = key.strip().partition(".")
        if not sep or (reg and reg not in REGIMES):
            raise ValueError(f"{ENV}: cannot read {item!r}; write kind=name or kind.regime=name "
                             f"(regimes: {', '.join(REGIMES)})")
        _check(kind, name.strip(), ENV)
        for r in ([reg] if reg else REGIMES):
            out[(kind, r)] = name.strip()
    return out


def force(kind: str, name: str | None, regime: str | None = None) -> None:
    """Pin `kind` (in one regime, or both) to the candidate `name`; None lifts the pin."""
    for r in ([regime] if regime else REGIMES):
        if name is None:
            _forced.pop((kind, r), None)
        else:
            _check(kind, name, "force")
            _forced[(kind, r)] = name


def reset() -> None:
    """Forget every measured choice (the next call of each kind measures again)."""
    with _lock:
        _chosen.clear()
        _timings.clear()


# A candidate whose warm-up takes this many times the fastest warm-up is not run again: it
# cannot win, and on some processors one run of it takes seconds (an int8 GEMM or a bf16 matmul
# without the instructions for them, BENCHMARKS.md), which every round would pay again.
HOPELESS = 10.0


def _time(candidates: dict[str, Callable[[], object]], rounds: int = 5) -> dict[str, float]:
    """Best-of-`rounds` seconds of each candidate, the candidates interleaved (fair under load);
    a HOPELESS candidate keeps the seconds of its one warm-up run."""
    warm = {}
    for name, run in candidates.items():
        t0 = time.perf_counter()
        run()  # warm-up: first-call allocations and library initialisation
        warm[name] = time.perf_counter() - t0
    fastest = min(warm.values())
    best = {name: (float("inf") if warm[name] <= HOPELESS * fastest else warm[name]) for name in candidates}
    timed = [name for name, seconds in best.items() if seconds == float("inf")]
    for _ in range(rounds):
        for name in timed:
            t0 = time.perf_counter()
            candidates[name]()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def choice(kind: str, m: int, benchmarks: Callable[[str], dict[str, Callable[[], object]]]) -> str:
    """The candidate of `kind` that runs M = m rows.

    `benchmarks(regime)` gives, for each candidate, a function running it once on a
    representative shape of that regime; it is called only on the first use of
    (kind, regime) that no override decides.
    """
    key = (kind, regime(m))
    name = _forced.get(key) or _chosen.get(key)
    if name is not None:
        return name
    with _lock:
        if key not in _chosen:
            pinned = _env_choices().get(key)
            if pinned is not None:
                _chosen[key] = pinned
            else:
                timings = _time(benchmarks(key[1]))
                _timings[key] = timings
                _chosen[key] = min(timings, key=timings.get)
        return _chosen[key]


def report() -> dict[str, dict]:
    """What this process chose so far: {"kind.regime": {"kernel": name, "seconds": {candidate: best}}}."""
    out = {}
    for (kind, reg), name in sorted(_chosen.items()):
        out[f"{kind}.{reg}"] = dict(kernel=_forced.get((kind, reg), name), seconds=_timings.get((kind, reg), {}))
    return out
