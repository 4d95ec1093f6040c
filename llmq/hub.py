"""A model on the Hugging Face hub, fetched file by file as llmq needs it.

`open_hub_model(repo_id)` asks huggingface_hub for the repository's file list,
downloads its small files (config, generation config, the weights index,
tokenizer files) with `hf_hub_download`, and reads the safetensors header of
every weight shard with `get_safetensors_metadata` (range requests of a few
kilobytes per shard, no weights). A weight shard is downloaded, with
`hf_hub_download` again, the first time `HubModel.path` is asked for it: the
streaming engine (llmq.stream) and the shard-by-shard RTN (llmq.shard_rtn) ask
when they first read a tensor from that shard, so a streamed run downloads
shard k when it reaches the layers stored in it, never all shards up front.

Everything lands in the hub cache as huggingface_hub puts it there (a second
run finds the shards already downloaded). The files come from one revision,
the commit the first download resolved, so that a push to the repository
during a long run cannot mix two versions of the model.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InterruptedWork, LlmqError

# The non-weight files a model folder needs: configs, the weights index,
# tokenizer files, chat templates (transformers reads a model's further named
# templates from additional_chat_templates/). Weights come one shard at a time (path()).
SMALL_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja")
SMALL_FILES_IN_FOLDERS = ("additional_chat_templates/*.jinja",)


def _small(name: str) -> bool:
    patterns = SMALL_FILES_IN_FOLDERS if "/" in name else SMALL_FILES
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def _why(e: Exception) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _hub_error(repo_id: str, what: str, e: Exception) -> LlmqError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(e, GatedRepoError):
        return LlmqError(f"{repo_id} is a gated model on the Hugging Face hub ({_why(e)}): accept its license "
                         "on the hub and log in (`hf auth login`), or download it and pass its folder")
    if isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError)):
        return LlmqError(f"no model {repo_id!r} on the Hugging Face hub ({_why(e)}): check the id (a private "
                         "model needs a token: `hf auth login` or HF_TOKEN), or pass the folder of a downloaded model")
    if getattr(getattr(e, "response", None), "status_code", None) in (401, 403):
        return LlmqError(f"the Hugging Face hub refused access to {repo_id} ({_why(e)}): check your token "
                         "(`hf auth login` or HF_TOKEN), or pass the folder of a downloaded model")
    return InterruptedWork(f"could not {what} of {repo_id} from the Hugging Face hub ({_why(e)}): check your "
                           "network and rerun (a streamed run keeps its finished layers: add --resume), or "
                           "download the model and pass its folder")


@dataclass
class HubModel:
    """A hub repository's model files: the small ones local, the weight shards on demand."""

    repo_id: str
    revision: str | None  # the commit every file is taken from
    folder: Path  # the local snapshot folder: configs and tokenizer now, shards as they are downloaded
    weight_map: dict[str, str]  # tensor name -> shard file name
    headers: dict[str, dict[str, tuple[list[int], str]]]  # shard -> tensor -> (shape, safetensors dtype)
    metadata: dict | None  # the index's "metadata" (None for a single-file model)
    fetched: list[str] = field(default_factory=list)  # shards downloaded by this process, in order

    def path(self, filename: str) -> str:
        """The local path of a weight shard, downloaded now if it is not in the cache yet."""
        from huggingface_hub import hf_hub_download

        local = self.folder / filename
        if filename not in self.fetched:
            try:  # the hub client shows its own progress bar (off under --quiet)
                local = Path(hf_hub_download(self.repo_id, filename, revision=self.revision))
            except Exception as e:  # the hub client's HTTP, OS and cache errors alike
                raise _hub_error(self.repo_id, f"download {filename}", e) from e
            self.fetched.append(filename)
        return str(local)


# The arguments of from_pretrained that say where and how a hub model is fetched: the functions below
# take them (as **where) so that llmq's own reads of a hub model fetch what transformers then loads.
WHERE = ("revision", "token", "cache_dir")


def model_files(repo_id: str, revision: str | None = None, token=None, **_) -> list[str]:
    """The files of a hub model, refused in one line where it is none that llmq reads: no config.json,
    or pickled weights only (transformers would then quietly take the safetensors of an open
    conversion pull request, another revision, or run the hub's conversion service)."""
    from huggingface_hub import list_repo_files

    try:
        names = list_repo_files(repo_id, revision=revision, token=token)
    except Exception as e:
        raise _hub_error(repo_id, "list the files", e) from e
    if "config.json" not in names:
        raise LlmqError(f"{repo_id} on the Hugging Face hub has no config.json: it is not a transformers model")
    if not any(n.endswith(".safetensors") for n in names):
        from .loading import BIN_FIX

        raise LlmqError(f"{repo_id} on the Hugging Face hub has no safetensors weights, and llmq never loads "
                        f"pickled ones: {BIN_FIX}")
    return names


def hub_config(repo_id: str, **where) -> dict:
    """config.json of a hub model, downloaded into the hub cache (after model_files' checks), with the
    quantization settings of an older GPTQ or AWQ repository's side file folded in, as for a folder."""
    from huggingface_hub import hf_hub_download

    from .formats.table import FORMATS, read_folder_quant_config

    names = model_files(repo_id, **where)
    fetch = {k: v for k, v in where.items() if k in WHERE}
    wanted = ["config.json"] + [f.extra_json for f in FORMATS.values() if f.extra_json in names]
    for name in wanted:
        try:
            path = Path(hf_hub_download(repo_id, name, **fetch))
        except Exception as e:
            raise _hub_error(repo_id, f"download {name}", e) from e
        fetch["revision"] = fetch.get("revision") or _commit(path)  # the side file from the same commit
    return read_folder_quant_config(path.parent)


def _commit(path: Path) -> str | None:
    """The commit of a file in the hub cache (snapshots/<commit>/<file>), or None."""
    return path.parent.name if path.parent.parent.name == "snapshots" else None


def hub_checkpoint(repo_id: str, **where) -> str:
    """A local snapshot folder holding a hub checkpoint's files: configs, tokenizer and safetensors
    weights (what a conversion as the weights are read needs, which reads the folder's files)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, **{k: v for k, v in where.items() if k in WHERE},
                                 allow_patterns=[*SMALL_FILES, *SMALL_FILES_IN_FOLDERS, "*.safetensors"])
    except Exception as e:
        raise _hub_error(repo_id, "download the checkpoint", e) from e


def cached_model(repo_id: str, revision: str | None = None, cache_dir=None, **_) -> str | None:
    """The hub cache's copy of a model at a revision (None: the one last downloaded of main), or None."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except Exception:  # not in the cache: the hub client's own error types
        return None
    return folder if (Path(folder) / "config.json").is_file() else None


def open_hub_model(repo_id: str, revision: str | None = None) -> HubModel:
    """The model at repo_id with its small files downloaded and its shards' headers read (no weights).

    Raises LlmqError, in one line, when the hub does not answer, the model does
    not exist or is gated, or the repository holds no safetensors weights.
    """
    from huggingface_hub import get_safetensors_metadata, hf_hub_download
    from huggingface_hub.errors import NotASafetensorsRepoError

    names = model_files(repo_id, revision)
    try:
        config = Path(hf_hub_download(repo_id, "config.json", revision=revision))
    except Exception as e:
        raise _hub_error(repo_id, "download config.json", e) from e
    revision = _commit(config)  # later files come from the same commit
    small = [n for n in names if n != "config.json" and _small(n)]
    for name in small:
        try:
            hf_hub_download(repo_id, name, revision=revision)
        except Exception as e:
            raise _hub_error(repo_id, f"download {name}", e) from e
    try:
        meta = get_safetensors_metadata(repo_id, revision=revision)
    except NotASafetensorsRepoError as e:
        from .loading import BIN_FIX

        raise LlmqError(f"{repo_id} on the Hugging Face hub has no safetensors weights, and llmq never loads "
                        f"pickled ones: {BIN_FIX}") from e
    except Exception as e:
        raise _hub_error(repo_id, "read the safetensors headers", e) from e
    headers = {name: {key: (list(info.shape), info.dtype) for key, info in fm.tensors.items()}
               for name, fm in meta.files_metadata.items()}
    return HubModel(repo_id, revision, config.parent, dict(meta.weight_map), headers,
                    meta.metadata if meta.sharded else None)
