"""Resuming a streamed quantization after a crash or `kill -9`.

While a streamed run goes, its partial folder (`.OUT.partial-<pid>-*`, see
llmq.outdir) holds, next to the output shard parts of the finished layers:

- resume.json: the run's fingerprint, the number of finished layers and the
  shard writer's state (which bytes of which part belong to which tensor),
  replaced atomically after each layer;
- resume-hidden-<layers done>-rank<r>.safetensors: the hidden states
  entering the first unfinished layer (the finished layers' outputs), one
  file per process (each holds its share of the calibration windows under
  torchrun), written before resume.json names the layer as finished; the
  state names the files it goes with, so a kill between the two writes
  leaves the previous state and its own files, never a state with the next
  layer's inputs.

The fingerprint is everything the result depends on: llmq's version, the
quantization options, the source folder and the size and modification time
of each of its files, the device type, and a hash of the calibration token
windows (so a changed dataset file is noticed, whatever its name). A resumed
run continues only a folder whose fingerprint equals its own; it recaptures
the layers' keyword arguments (a forward through the embeddings only) and
starts at the first unfinished layer, so the checkpoint equals an
uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import distributed
from ._version import __version__
from .config import QuantConfig
from .errors import InterruptedWork, LlmqError
from .outdir import resolve, stale_partials

STATE_FILE = "resume.json"
HIDDEN_GLOB = "resume-hidden-*.safetensors"
PASSES = "passes."  # the prefix of a passed keyword argument's tensor in a hidden-states file


def hidden_file(folder: Path, layers_done: int, rank: int = 0) -> Path:
    return folder / f"resume-hidden-{layers_done:05d}-rank{rank}.safetensors"


def fingerprint(source: str, config: QuantConfig, device: torch.device, dtype, windows: torch.Tensor | None,
                dataset=None, hub=None) -> dict:
    """What a resumed run must share with the interrupted one.

    hub: for a model on the hub (llmq.hub.HubModel), the repository's commit and
    its shards' headers stand for the folder's files (which arrive during the run).
    """
    if hub is not None:
        folder = f"{hub.repo_id}@{hub.revision}"
        files = {name: hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()
                 for name, header in sorted(hub.headers.items())}
    else:
        folder = resolve(source)
        files = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.iterdir())
                 if f.is_file() and (f.suffix in (".safetensors", ".json"))}
    digest = None
    if windows is not None:
        digest = hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
        digest += f":{list(windows.shape)}"
    return {"llmq": __version__, "config": config.to_dict(), "source": str(folder), "files": files,
            "device": device.type, "dtype": str(dtype), "dataset": _dataset_key(dataset),
            "windows": digest, "processes": distributed.world()}


# What each part of a fingerprint is, to the user.
_PARTS = {"llmq": "llmq version", "source": "model", "files": "model files (changed since)", "device": "device",
          "dtype": "dtype", "dataset": "--dataset", "processes": "number of processes",
          "windows": "calibration windows (--nsamples, --seqlen, --seed or the text itself)"}


def _differences(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints, in the user's words: a setting by name, with both values."""
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key == "config":
            was, now = old.get(key) or {}, new.get(key) or {}
            out += [f"{name} (was {was.get(name)!r}, now {now.get(name)!r})"
                    for name in sorted(set(was) | set(now)) if was.get(name) != now.get(name)]
        elif key in ("files", "windows"):
            out.append(_PARTS[key])
        else:
            out.append(f"{_PARTS.get(key, key)} (was {old.get(key)!r}, now {new.get(key)!r})")
    return out


def _dataset_key(dataset) -> str | None:
    """The dataset spec as the fingerprint holds it: a local file or folder by its absolute path, so
    that `words.txt` and `./words.txt` are one dataset."""
    if not isinstance(dataset, str):
        return None
    path, column = dataset, None
    if not Path(path).exists() and ":" in dataset:
        path, column = dataset.rsplit(":", 1)
    if not Path(path).exists():
        return dataset
    return str(Path(path).resolve()) + ("" if column is None else f":{column}")


def find(out: str | os.PathLike, fp: dict) -> tuple[Path, dict] | None:
    """The stale partial folder of OUT to continue, with its state; None when there is none.

    Raises LlmqError, touching nothing, when interrupted runs of OUT exist but
    none was made with the same model, data and options.
    """
    candidates = []
    for folder in stale_partials(out):
        state_file = folder / STATE_FILE
        if not state_file.is_file():
            continue
        try:
            state = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        candidates.append((folder, state))
    if not candidates:
        return None
    matching = [(f, s) for f, s in candidates if s.get("fingerprint") == fp]
    if not matching:
        folder, state = candidates[-1]
        diff = "; ".join(_differences(state.get("fingerprint", {}), fp))
        raise LlmqError(f"the interrupted run in {folder} differs from this one in: {diff}; resume with the same "
                        "model, data and options, or run without --resume (add --overwrite to remove it)")
    return max(matching, key=lambda fs: fs[1]["layers_done"])


def save(folder: Path, fp: dict, layers_done: int, writer_state: dict | None, hidden: torch.Tensor | None,
         report: dict | None = None, passes: dict | None = None) -> None:
    """Record that layers_done layers are finished (their tensors in writer_state; report: what the run
    reports of them, as JSON, which a resumed run takes up; passes: the tensors the last of them hands
    the next layer as keyword arguments, llmq.arch's ArchSpec.passes, kept beside the hidden states).

    Every process calls it: each writes its share of the hidden states, then
    rank 0 (which holds the writer) replaces the state, then the older hidden
    files go; the processes wait for one another between the steps, so that
    the state never names files that are not all written.
    """
    rank = distributed.rank()
    if hidden is not None:
        path = hidden_file(folder, layers_done, rank)
        tmp = path.with_name(path.name + ".tmp")
        passed = {f"{PASSES}{name}": t.detach().to("cpu").contiguous() for name, t in (passes or {}).items()
                  if isinstance(t, torch.Tensor)}
        save_file({"hidden": hidden.detach().to("cpu").contiguous(), **passed}, str(tmp))
        os.replace(tmp, path)
    distributed.barrier("recording a finished layer")
    if rank == 0:
        tmp = folder / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": fp, "layers_done": layers_done, "writer": writer_state,
                                   "hidden": layers_done if hidden is not None else None, "report": report}))
        with open(tmp) as f:
            os.fsync(f.fileno())
        os.replace(tmp, folder / STATE_FILE)
        current = {hidden_file(folder, layers_done, r).name for r in range(distributed.world())}
        for old in folder.glob(HIDDEN_GLOB):
            if old.name not in current:
                old.unlink(missing_ok=True)
    distributed.barrier("recording a finished layer")


def load_hidden(folder: Path, state: dict) -> tuple[torch.Tensor | None, dict]:
    """This process's hidden states entering the first unfinished layer, as the state names them, and
    the tensors the last finished layer hands it as keyword arguments ({} where none)."""
    if state.get("hidden") is None:
        return None, {}
    path = hidden_file(folder, state["hidden"], distributed.rank())
    if not path.is_file():
        raise LlmqError(f"{path} is missing from the interrupted run's folder: run without --resume "
                        "(add --overwrite to remove the folder)")
    tensors = load_file(str(path))
    return tensors.pop("hidden"), {name[len(PASSES):]: t for name, t in tensors.items() if name.startswith(PASSES)}


def clear(folder: Path) -> None:
    """Remove the resume files from a finished checkpoint."""
    (folder / STATE_FILE).unlink(missing_ok=True)
    for path in folder.glob(HIDDEN_GLOB):
        path.unlink()


def resumable(folder: Path, exc: BaseException) -> bool:
    """Whether to keep a partial folder after exc: it records finished layers and exc is not a refusal."""
    refusal = isinstance(exc, LlmqError) and not isinstance(exc, InterruptedWork)
    return not refusal and (folder / STATE_FILE).is_file()
