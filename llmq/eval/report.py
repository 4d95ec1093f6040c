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
            f"{protocol['bos_rule']}; ppl = exp(total NLL / tokens scored)"
            + (f"; {protocol['batch_size']} windows per forward" if protocol.get("batch_size") else ""))



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


# --plot formats: what matplotlib writes with its own backends, and through Pillow (one of its
# dependencies). Not pgf (needs a LaTeX installation) nor avif (needs a Pillow built with it), which
# would fail only once every model has been scored.
PLOT_FORMATS = ("png", "pdf", "svg", "svgz", "eps", "ps", "jpg", "jpeg", "tif", "tiff", "webp")


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """Refuse a --json / --plot path that could not be written, before any model is loaded: the
    path must not be a folder, and its folder must exist (none is created) and be writable."""
    path = Path(path)
    if path.is_dir():
        raise LlmqError(f"{option} {path} is a folder: give a file name inside it")
    folder = path.parent
    if not folder.is_dir():
        raise LlmqError(f"{option} {path}: the folder {folder} does not exist; create it first or write elsewhere")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LlmqError(f"{option} {path}: the folder {folder} is not writable; write elsewhere")
    return path


def check_plot_file(path: str | os.PathLike) -> Path:
    """check_output_file, and an extension that names a format PLOT_FORMATS holds and matplotlib writes."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase  # imported only when a plot is asked for
    except ImportError as e:
        raise LlmqError("--plot needs matplotlib: pip install matplotlib") from e
    path = check_output_file(path, "--plot")
    ext = path.suffix.lower().removeprefix(".")
    if ext not in PLOT_FORMATS or ext not in FigureCanvasBase.get_supported_filetypes():
        what = f"the extension .{ext} names no format" if ext else "the name has no extension to name a format"
        raise LlmqError(f"--plot {path}: {what} llmq draws in; end it with one of "
                        f"{', '.join('.' + f for f in PLOT_FORMATS)}")
    return path


def _written(path: Path, option: str, write) -> Path:
    try:
        write(path)
    except OSError as e:  # checked up front; the folder can still change while the models run
        raise LlmqError(f"could not write {option} {path} ({e.strerror or e}): check that folder and the free "
                        "disk space, or write elsewhere") from e
    return path


def write_json(result: dict, path: str | os.PathLike) -> Path:
    """Write `result` as JSON to path (its folder must exist)."""
    return _written(Path(path), "--json", lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))


def plot(result: dict, path: str | os.PathLike) -> Path:
    """Bar charts of perplexity and size on disk per model, written in the format path's extension
    names (PNG, PDF, SVG ...: check_plot_file); its folder must exist."""
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
    return _written(Path(path), "--plot", lambda p: fig.savefig(p, dpi=120))
