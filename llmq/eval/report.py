"""Presenting an `evaluate` result: terminal table, JSON file, PNG chart."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import LlmqError
from ..units import MIB, human_bytes


def protocol_line(protocol: dict) -> str:
    """One line naming everything a perplexity number depends on."""
    split = f" ({protocol['split']})" if protocol.get("split") else ""
    windows = f"{protocol['windows']} of {protocol['windows_available']} windows"
    return (f"protocol: {protocol['dataset']}{split}, seqlen {protocol['seqlen']}, {windows} "
            f"(non-overlapping, tail dropped), {protocol['tokens_scored']} tokens scored, "
            f"{protocol['bos_rule']}; ppl = exp(total NLL / tokens scored)")



def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_table(result: dict) -> str:
    """The protocol line, then one row per model (reference first)."""
    rows = result["models"]
    ref_ppl = rows[0]["perplexity"] if rows else None
    header = ["model", "quantization", "size", "ppl", "d ppl", "KL mean", "KL p99", "top-1"]
    body = []
    for r in rows:
        delta = "ref" if r["reference"] else f"{r['perplexity'] - ref_ppl:+.3f}"
        top1 = None if r["top1_agreement"] is None else 100 * r["top1_agreement"]
        body.append([r["model"], r["label"], human_bytes(r["size_bytes"]), f"{r['perplexity']:.3f}", delta,
                     _num(r["kl_mean"], ".5f"), _num(r["kl_p99"], ".4f"),
                     "-" if top1 is None else f"{top1:.2f}%"])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    left = {0, 1}

    def fmt(cells):
        return "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [protocol_line(result["protocol"]), fmt(header), fmt(["-" * w for w in widths])]
    lines += [fmt(cells) for cells in body]
    return "\n".join(lines)


def write_json(result: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def plot(result: dict, path: str | os.PathLike) -> Path:
    """Bar charts of perplexity and size on disk per model, written as PNG."""
    try:
        # A bare Figure renders with Agg and touches no pyplot or backend state.
        from matplotlib.figure import Figure
    except ImportError as e:
        raise LlmqError("--plot needs matplotlib: pip install matplotlib") from e
    rows = result["models"]
    labels = [f"{Path(r['model']).name or r['model']}\n{r['label']}" for r in rows]
    sizes = [r["size_bytes"] if r["size_bytes"] is not None else r["memory_bytes"] for r in rows]
    size_kind = "size on disk" if all(r["size_bytes"] is not None for r in rows) else "size (disk, else memory)"
    height = 1.2 + 0.55 * len(rows)
    fig = Figure(figsize=(11, height))
    ax_ppl, ax_size = fig.subplots(1, 2, sharey=True)
    ypos = list(range(len(rows)))[::-1]
    colors = ["#4c72b0" if r["reference"] else "#dd8452" for r in rows]
    ax_ppl.barh(ypos, [r["perplexity"] for r in rows], color=colors)
    ax_ppl.axvline(rows[0]["perplexity"], color="black", linestyle="--", linewidth=0.8)
    for y, r in zip(ypos, rows):
        note = f" {r['perplexity']:.2f}"
        if not r["reference"] and r["kl_mean"] is not None:
            note += f"  (KL {r['kl_mean']:.3f})"
        ax_ppl.text(r["perplexity"], y, note, va="center", fontsize=8)
    ax_ppl.set_yticks(ypos, labels, fontsize=8)
    ax_ppl.set_xlabel("perplexity (lower is better)")
    ax_ppl.set_xlim(0, max(r["perplexity"] for r in rows) * 1.35)
    mib = [s / MIB for s in sizes]
    ax_size.barh(ypos, mib, color=colors)
    for y, v in zip(ypos, mib):
        ax_size.text(v, y, f" {v:.1f} MiB", va="center", fontsize=8)
    ax_size.set_xlabel(f"{size_kind}, MiB")
    ax_size.set_xlim(0, max(mib) * 1.3)
    p = result["protocol"]
    fig.suptitle(f"{p['dataset']}, seqlen {p['seqlen']}, {p['windows']} windows, {p['tokens_scored']} tokens, "
                 f"{'BOS' if p['bos'] else 'no BOS'}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
