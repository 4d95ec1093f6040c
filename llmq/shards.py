"""Safetensors shards read one tensor at a time and written as tensors arrive.

SourceShards reads the weights of a local model folder lazily: it knows every
tensor's shape and dtype from the headers, and reads a tensor's bytes only
when asked (with positioned reads where safetensors offers them, so that a
file's pages do not stay mapped and counted in the process's memory).

ShardWriter writes output shards without holding them in memory: each tensor's
bytes are appended to a part file as soon as it is added; when a part reaches
the shard size, a new one starts. `finish` turns each part into a safetensors
file (header, then the part's bytes) named as transformers names shards, with
an index when there is more than one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import LlmqError
from .folder_io import SAFETENSORS_DTYPES

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _open(path: str):
    try:
        return safe_open(path, framework="pt", backend="pread")
    except TypeError:  # safetensors without positioned reads: memory-mapped
        return safe_open(path, framework="pt")


class SourceShards:
    """The safetensors weights of a model, read lazily by tensor name.

    SourceShards(folder) reads a local model folder; SourceShards.from_hub(hub)
    a hub model (llmq.hub.HubModel), whose shards are downloaded when a tensor
    of theirs is first read (path()).
    """

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        index = folder / INDEX_FILE
        if index.is_file():
            index_data = json.loads(index.read_text())
            files = sorted(set(index_data["weight_map"].values()))
            self.metadata = index_data.get("metadata") or {}
        elif (folder / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
            self.metadata = None
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")
        self.folder = folder
        self.files = [str(folder / f) for f in files]
        self.file_of: dict[str, str] = {}
        self.header: dict[str, tuple[list[int], torch.dtype]] = {}
        for path in self.files:
            with _open(path) as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    self.file_of[key] = path
                    self.header[key] = (list(sl.get_shape()), SAFETENSORS_DTYPES.get(sl.get_dtype()))
        self._handle = None
        self._handle_path = None
        self.hub = None

    @classmethod
    def from_hub(cls, hub) -> "SourceShards":
        """The shards of a hub model, known from their headers; each downloaded when first read."""
        self = cls.__new__(cls)
        self.folder = hub.folder
        self.metadata = hub.metadata
        self.files = sorted(hub.headers)  # shard file names, made local by path()
        self.file_of, self.header = {}, {}
        for name in self.files:
            for key, (shape, dtype) in sorted(hub.headers[name].items()):
                self.file_of[key] = name
                self.header[key] = (shape, SAFETENSORS_DTYPES.get(dtype))
        self._handle = None
        self._handle_path = None
        self.hub = hub
        return self

    def path(self, key: str) -> str:
        """The local file holding tensor key (a hub shard is downloaded the first time)."""
        where = self.file_of[key]
        return self.hub.path(where) if self.hub is not None else where

    def keys(self) -> list[str]:
        return list(self.header)

    def nbytes(self) -> int:
        """Size of all tensors on disk."""
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.header.values())

    def read(self, key: str) -> torch.Tensor:
        """The tensor named key, as stored (a fresh CPU tensor)."""
        path = self.path(key)
        if self._handle_path != path:
            self.close()
            self._handle = _open(path).__enter__()
            self._handle_path = path
        return self._handle.get_tensor(key)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle = None
        self._handle_path = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _shard_names(n: int) -> list[str]:
    """The safetensors files of n parts, as transformers names them."""
    return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _holds_whole(path: Path, data_size: int) -> bool:
    """Whether the safetensors file at path was written to its end: its header, then data_size bytes."""
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
        return path.stat().st_size == 8 + header_size + data_size
    except OSError:
        return False


class ShardWriter:
    """Write tensors into safetensors shards of at most max_shard_size bytes, as they arrive."""

    def __init__(self, folder: str | os.PathLike, max_shard_size: int = 4 * 10**9):
        self.folder = Path(folder)
        self.max_shard_size = max_shard_size
        self.parts: list[dict] = []  # {"data": path, "entries": {name: (dtype, shape, start, end)}, "size": n}
        self._file = None
        self._names: set[str] = set()

    def _new_part(self) -> None:
        if self._file is not None:
            self._file.close()
        path = self.folder / f".part-{len(self.parts) + 1:05d}.data"
        self.parts.append({"data": path, "entries": {}, "size": 0, "done": False})
        self._file = open(path, "wb")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        data = tensor.detach().to("cpu").contiguous()
        nbytes = data.numel() * data.element_size()
        if not self.parts or (self.parts[-1]["size"] and self.parts[-1]["size"] + nbytes > self.max_shard_size):
            self._new_part()
        part = self.parts[-1]
        if nbytes:
            self._file.write(data.reshape(-1).view(torch.uint8).numpy().data)
        part["entries"][name] = (_DTYPE_NAMES[data.dtype], list(data.shape), part["size"], part["size"] + nbytes)
        part["size"] += nbytes
        self._names.add(name)

    def state(self) -> dict:
        """What resume() needs to continue: the parts so far, their bytes flushed to disk."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        return {"max_shard_size": self.max_shard_size,
                "parts": [{"data": p["data"].name, "size": p["size"],
                           "entries": {k: list(v) for k, v in p["entries"].items()}} for p in self.parts]}

    @classmethod
    def resume(cls, folder: str | os.PathLike, state: dict) -> "ShardWriter":
        """A writer that continues from state(): bytes written after it (an unfinished layer) are cut off.

        A run interrupted inside finish() has turned some parts into their safetensors files already
        (each part's data is removed once its file is whole): those parts are done, and finish() writes
        the others."""
        writer = cls(folder, state["max_shard_size"])
        names = _shard_names(len(state["parts"]))  # only finish() removes data, after every part was added
        for part, name in zip(state["parts"], names):
            path = writer.folder / part["data"]
            entries = {k: (v[0], v[1], v[2], v[3]) for k, v in part["entries"].items()}
            done = not path.exists() and _holds_whole(writer.folder / name, part["size"])
            if not done and (not path.is_file() or path.stat().st_size < part["size"]):
                raise LlmqError(f"{path} is shorter than the interrupted run recorded: the folder is damaged; run "
                                "without --resume (add --overwrite to remove it)")
            writer.parts.append({"data": path, "entries": entries, "size": part["size"], "done": done})
            writer._names.update(entries)
        for part in writer.parts:
            if not part["done"]:
                os.truncate(part["data"], part["size"])
        if writer.parts and not writer.parts[-1]["done"]:
            writer._file = open(writer.parts[-1]["data"], "ab")
        return writer

    def finish(self, metadata: dict[str, str] | None = None) -> list[Path]:
        """Write the safetensors files (and the index when there are several); return their paths."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self.parts:
            self._new_part()
            self._file.close()
            self._file = None
        n = len(self.parts)
        names = _shard_names(n)
        weight_map = {}
        for part, name in zip(self.parts, names):
            header = {"__metadata__": {"format": "pt", **(metadata or {})}}
            for key, (dtype, shape, start, end) in sorted(part["entries"].items()):
                header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}
                weight_map[key] = name
            if part.get("done"):  # written whole before an interruption (resume)
                continue
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
            with open(self.folder / name, "wb") as out, open(part["data"], "rb") as src:
                out.write(len(raw).to_bytes(8, "little"))
                out.write(raw)
                shutil.copyfileobj(src, out, 16 * 2**20)
            os.remove(part["data"])
        if n > 1:
            total = sum(p["size"] for p in self.parts)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return [self.folder / name for name in names]
