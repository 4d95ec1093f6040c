"""Calibration and evaluation text: dataset spec -> raw text -> token windows.

A *spec* names where the text comes from:

=================================  ===========================================================
``wikitext2``                      hub ``wikitext`` / ``wikitext-2-raw-v1``; rows joined with
                                   "\\n\\n" (GPTQ protocol); split train (calibration) by
                                   default, ``split="test"`` for evaluation
``c4``                             hub ``allenai/c4``, English validation shard
                                   ``en/c4-validation.00000-of-00008.json.gz`` (``split="train"``
                                   reads ``en/c4-train.00000-of-01024.json.gz``)
``pileval``                        hub ``mit-han-lab/pile-val-backup``, validation
``hf:owner/name[:config][:split][:column]``
                                   any hub dataset; empty fields take the defaults
                                   (no config, split "train", column "text")
``file.txt``                       a UTF-8 text file
``file.jsonl`` / ``file.json``     JSON lines, or a JSON list of objects; column "text",
                                   ``file.jsonl:column`` picks another
``file.parquet[:column]``          a Parquet table, same columns rule
``folder/``                        every ``*.txt`` in the folder, sorted by name, joined
                                   with "\\n\\n"
``builtin``                        Volume I of Jane Austen's *Emma* (public domain, 269 KB,
                                   about 60k tokens), shipped inside llmq: real text that
                                   needs no network and no files (a local file of that
                                   name is not looked up)
``self`` (or ``model``)            text sampled from the model being quantized: needs no
                                   network and no files, but is weaker calibration than
                                   real text (see `sample_tokens`)
=================================  ===========================================================

Hub sources go through the ``datasets`` library (never with remote code).
Before a hub load, one short request checks that the hub answers, so an
offline machine gets an error at once instead of after a minute of retries.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Iterable

import torch

from .errors import LlmqError

# Named hub datasets: (path, config, default split, {split: data_files}, column).
_HUB = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", None, "text"),
    "c4": (
        "allenai/c4",
        None,
        "validation",
        {
            "validation": "en/c4-validation.00000-of-00008.json.gz",
            "train": "en/c4-train.00000-of-01024.json.gz",
        },
        "text",
    ),
    "pileval": ("mit-han-lab/pile-val-backup", None, "validation", None, "text"),
}
_SELF = ("self", "model")
DEFAULT_CALIBRATION = "wikitext2"  # the calibration text of a run that names none

# Texts shipped with llmq (package data in llmq/texts/): spec -> file name.
_BUILTIN = {"builtin": "emma-volume-1.txt"}
_TABLE_SUFFIXES = (".jsonl", ".json", ".parquet")
_TEXTS = ("builtin, wikitext2, c4, pileval, hf:owner/name[:config][:split][:column], a .txt/.jsonl/.json/.parquet "
          "file or a folder of .txt files")
_LOCAL_FILE = "a local text file instead (a .txt, .jsonl, .json or .parquet file, or a folder of .txt files)"
_KNOWN = f"{_TEXTS}, or self"
_LOCAL_HINT = f"pass {_LOCAL_FILE}, or use `self` to calibrate on text sampled from the model"
# Evaluation scores a model on real text: its messages never offer `self` (see load_text).
_EVAL_HINT = f"pass {_LOCAL_FILE}, or use `builtin` (text shipped with llmq)"

# Openings for `self`: each row starts from the first token of one of these
# words, so that rows differ from the first token on and a batch needs no padding
# (left-padded batches take a slower masked attention path on CPU).
_OPENINGS = (
    "The", "Once", "In", "Chapter", "She", "He", "When", "According", "def", "Q", "Ingredients", "It",
    "After", "This", "We", "Although", "During", "Many", "Our", "If", "A", "There", "Research", "Dear",
)


# --------------------------------------------------------------------------- text


def load_text(spec: str, *, split: str | None = None, max_chars: int | None = None,
              evaluation: bool = False) -> str:
    """The raw text a spec names (see the module docstring for the specs).

    Args:
        spec: dataset spec; ``self`` is not text and is handled by
            `calibration_windows`.
        split: split of a hub dataset (default: the calibration split, i.e.
            train for wikitext2, validation for c4 and pileval, train for
            ``hf:`` specs). A split written in an ``hf:`` spec wins, since
            the user chose it. Ignored for local files.
        max_chars: stop joining rows once this many characters are collected
            (the rows kept are the first ones, in order); None keeps all.
        evaluation: the text is to score a model on: ``self`` is refused as
            such, and no message offers it.

    Raises:
        LlmqError: unreachable hub, unknown dataset, missing file, unknown
            column (the message lists the columns), or no text.
    """
    if spec in _SELF:
        if evaluation:
            raise LlmqError(f"`{spec}` is text sampled from the model itself, and a model scored on its own samples "
                            "gives no meaningful perplexity: evaluate on real text, `builtin` (shipped with llmq, "
                            "works offline) or a local text file (.txt, .jsonl, .json, .parquet, or a folder of .txt "
                            "files)")
        raise LlmqError(f"`{spec}` samples text from the model; use calibration_windows(..., model=model)")
    hint = _EVAL_HINT if evaluation else _LOCAL_HINT
    if spec in _BUILTIN:
        text = resources.files("llmq").joinpath("texts", _BUILTIN[spec]).read_text(encoding="utf-8")
        text = text if max_chars is None else text[:max_chars]
    elif spec in _HUB:
        name, config, default_split, files, column = _HUB[spec]
        split = split or default_split
        data_files = None
        if files is not None:
            if split not in files:
                raise LlmqError(f"{spec} has splits {', '.join(files)}, not {split!r}")
            data_files = {split: files[split]}
        rows = _hub_column(name, config, split, column, data_files, hint)
        text = _join(rows, max_chars)
    elif spec.startswith("hf:"):
        name, config, hub_split, column = _parse_hf(spec)
        rows = _hub_column(name, config, hub_split or split or "train", column, None, hint)
        text = _join(rows, max_chars)
    else:
        text = _load_local(spec, max_chars, _TEXTS if evaluation else _KNOWN)
    if not text.strip():
        raise LlmqError(f"{spec} contains no text; pass a dataset or file with text in it")
    return text


def _join(rows: Iterable, max_chars: int | None) -> str:
    """Rows joined with "\\n\\n", stopping once max_chars characters are in."""
    parts, total = [], 0
    for row in rows:
        if row is None:
            continue
        if not isinstance(row, str):
            raise LlmqError(f"the text column holds {type(row).__name__} values, not strings; choose a text column")
        parts.append(row)
        total += len(row) + 2
        if max_chars is not None and total >= max_chars:
            break
    return "\n\n".join(parts)


def _parse_hf(spec: str) -> tuple[str, str | None, str | None, str]:
    """``hf:owner/name[:config][:split][:column]`` -> (name, config, split, column)."""
    fields = spec[3:].split(":")
    if not fields[0] or len(fields) > 4:
        raise LlmqError(f"bad hub spec {spec!r}; write hf:owner/name[:config][:split][:column]")
    fields += [""] * (4 - len(fields))
    name, config, split, column = fields
    return name, config or None, split or None, column or "text"


def _hub_column(name: str, config: str | None, split: str, column: str, data_files, hint: str) -> list:
    """One column of one split of a hub dataset, as a list of rows; `hint` says what to use instead when
    the hub or the dataset cannot be had."""
    where = f"{name}" + (f" ({config})" if config else "")
    if not _hub_answers():
        raise LlmqError(
            f"could not reach the Hugging Face hub to load {where}; {hint} "
            "(a dataset already in the local cache loads with HF_HUB_OFFLINE=1)"
        )
    try:
        import datasets
    except ImportError as err:
        raise LlmqError(f"loading {where} from the hub needs the `datasets` package (pip install datasets); "
                        f"{hint}") from err
    try:
        dataset = datasets.load_dataset(name, config, split=split, data_files=data_files)
    except datasets.exceptions.DatasetNotFoundError as err:
        raise LlmqError(f"no dataset {where} on the Hugging Face hub ({err}); check the name or {hint}") from err
    except (ConnectionError, OSError, TimeoutError) as err:
        raise LlmqError(f"could not reach the Hugging Face hub to load {where} ({err}); {hint}") from err
    except ValueError as err:  # unknown split or config
        raise LlmqError(f"could not load {where} split {split!r}: {err}") from err
    _check_column(column, dataset.column_names, where)
    return dataset[column]


def _hub_answers(timeout: float = 5.0) -> bool:
    """Whether the hub endpoint answers one HEAD request within `timeout` s.

    Offline mode set by the user (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) skips
    the check so that `datasets` serves its cache. The request goes through
    huggingface_hub's own HTTP session, so proxy settings apply.
    """
    if any(os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE")
           for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # any transport failure means "not reachable"; the caller explains
        return False
    return True


def _check_column(column: str, columns: list[str], where: str) -> None:
    if column not in columns:
        raise LlmqError(f"{where} has no column {column!r}; columns: {', '.join(columns)}")


def _split_column(spec: str) -> tuple[Path, str | None]:
    """``path`` or ``path.jsonl:column`` -> (path, column or None)."""
    path = Path(spec).expanduser()
    if path.exists() or ":" not in spec:
        return path, None
    head, column = spec.rsplit(":", 1)
    if Path(head).suffix.lower() in _TABLE_SUFFIXES and column:
        return Path(head).expanduser(), column
    return path, None


def _load_local(spec: str, max_chars: int | None, known: str) -> str:
    path, column = _split_column(spec)
    if not path.exists():
        raise LlmqError(f"no file or folder {str(path)!r}, and {spec!r} is not a known dataset; use one of: {known}")
    if path.is_dir():
        try:
            files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".txt" and p.is_file())
        except OSError as err:
            raise LlmqError(f"cannot list folder {str(path)!r} ({err.strerror or err}); check its permissions") from err
        if not files:
            raise LlmqError(f"folder {str(path)!r} holds no .txt files; put the text in .txt files or pass one file")
        return _join((_read_utf8(p) for p in files), max_chars)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _join(_json_column(path, column or "text"), max_chars)
    if suffix == ".parquet":
        return _join(_parquet_column(path, column or "text"), max_chars)
    if column is not None:
        raise LlmqError(f"a column can only be chosen for .jsonl, .json and .parquet files, not {str(path)!r}")
    text = _read_utf8(path)
    return text[:max_chars] if max_chars is not None else text


_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip", ".7z", ".lz4")


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        if path.suffix.lower() in _COMPRESSED:
            raise LlmqError(f"{str(path)!r} is compressed ({path.suffix}): decompress it first") from err
        raise LlmqError(f"{str(path)!r} is not UTF-8 text ({err}); convert it to UTF-8") from err
    except OSError as err:  # unreadable: permissions, a folder named like a file, I/O error
        raise LlmqError(f"cannot read {str(path)!r} ({err.strerror or err}); check its permissions") from err


def _json_column(path: Path, column: str) -> list:
    """Rows of `column` from JSON lines, or from a JSON list of objects."""
    raw = _read_utf8(path)
    try:
        if path.suffix.lower() == ".json" and raw.lstrip().startswith("["):
            records = json.loads(raw)
        else:
            records = [json.loads(line) for line in raw.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise LlmqError(f"{str(path)!r} is not valid JSON lines or a JSON list of objects ({err})") from err
    if not all(isinstance(r, dict) for r in records):
        raise LlmqError(f"{str(path)!r} must hold one JSON object per line (or a list of objects)")
    columns = list(dict.fromkeys(key for record in records for key in record))
    _check_column(column, columns, repr(str(path)))
    return [record.get(column) for record in records]


def _parquet_column(path: Path, column: str) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:  # it comes with `datasets`; an install without it lacks both
        raise LlmqError(f"reading {str(path)!r} needs the `pyarrow` package (pip install pyarrow); or pass the "
                        "text as a .txt, .jsonl or .json file") from err
    try:
        columns = pq.read_schema(path).names
    except Exception as err:  # pyarrow raises its own error types for bad files
        raise LlmqError(f"{str(path)!r} is not a readable Parquet file ({err})") from err
    _check_column(column, columns, repr(str(path)))
    return pq.read_table(path, columns=[column]).column(column).to_pylist()


# --------------------------------------------------------------------------- tokens


def wants_bos(tokenizer) -> bool:
    """Whether sequences fed to the model should start with the BOS token.

    True when the tokenizer has a BOS token and adds it itself (so the model
    was trained with it: Gemma-family models collapse without it); False for
    tokenizers such as SmolLM2's that define a BOS token but never add it.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos


def window_bos(tokenizer) -> int | None:
    """The token every window starts with: the BOS id when `wants_bos`, else None."""
    return tokenizer.bos_token_id if wants_bos(tokenizer) else None


def text_span(seqlen: int, bos: int | None) -> int:
    """Text tokens in a window of seqlen tokens: one fewer when it starts with BOS."""
    return seqlen - 1 if bos is not None else seqlen


def start_with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """Windows [n, span] of text -> [n, span + 1] with BOS first; unchanged when bos is None."""
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=torch.long), windows], dim=1)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one token stream, without special tokens.

    Returns a LongTensor [T]. A fast tokenizer encodes it in one call to its
    Rust backend (about a second per 500k tokens on one core), which also
    avoids the "sequence longer than the model maximum" warning.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        ids = backend.encode(text, add_special_tokens=False).ids
    else:
        ids = tokenizer(text, add_special_tokens=False).input_ids
    return torch.tensor(ids, dtype=torch.long)


def check_positions(config, seqlen: int) -> None:
    """Refuse windows longer than the model's positions (config: a transformers config or config.json's
    dict): learned position embeddings have no row past them, and rotary ones compute positions
    the model never saw, so the activations calibrated or scored would not be the model's."""
    if not isinstance(config, dict):
        config = config.to_dict()
    for c in (config, config.get("text_config") or {}):
        limit = c.get("max_position_embeddings")
        if isinstance(limit, int) and not isinstance(limit, bool):
            if seqlen > limit:
                raise LlmqError(f"--seqlen {seqlen} is longer than this model's {limit} positions "
                                "(max_position_embeddings): lower --seqlen")
            return


def calibration_windows(
    tokenizer, spec: str, *, nsamples: int, seqlen: int, seed: int, model=None
) -> torch.Tensor:
    """Random windows of calibration tokens.

    The text is tokenised once into one stream; `nsamples` window starts are
    drawn uniformly with a `torch.Generator` seeded by `seed` (the same seed
    gives the same windows; the global RNG is untouched). When
    `wants_bos(tokenizer)`, each window is BOS followed by seqlen - 1 text
    tokens; otherwise seqlen text tokens.

    Args:
        tokenizer: the model's tokenizer.
        spec: dataset spec (module docstring); ``self`` needs `model`.
        nsamples, seqlen: window count and length in tokens.
        seed: seeds the window starts (and the sampling for ``self``).
        model: the causal LM, only used by ``self``.

    Returns:
        LongTensor [nsamples, seqlen] on the CPU.

    Raises:
        LlmqError: bad sizes, any error of `load_text`, or too little text:
            fewer than span + nsamples - 1 tokens (span = text tokens per
            window), i.e. no window fits or fewer than nsamples places to
            start one. Windows drawn from a short text overlap; give at least
            nsamples * seqlen tokens for distinct data.
    """
    if nsamples < 1 or seqlen < 2:
        raise LlmqError(f"need nsamples >= 1 and seqlen >= 2, got nsamples={nsamples}, seqlen={seqlen}")
    if not -(2**63) <= seed < 2**64:  # what torch's generators take
        raise LlmqError(f"--seed {seed} is out of range: use a number below 2^64, such as 0")
    bos = window_bos(tokenizer)
    span = text_span(seqlen, bos)
    if spec in _SELF:
        if model is None:
            raise LlmqError(f"calibration spec `{spec}` samples text from the model, so it needs the model")
        # Enough sampled text for disjoint windows: sampling is the cost, so no more.
        stream = sample_tokens(model, tokenizer, nsamples * span, seed=seed)
    else:
        # Large corpora (c4, pileval) only need a prefix; 16M characters keeps
        # all of WikiText-2 train (11M), 64 per window token keeps room to
        # sample for large settings.
        stream = tokenize(tokenizer, load_text(spec, max_chars=max(64 * nsamples * span, 1 << 24)))
    # Windows may overlap (as in the GPTQ protocol), but every one must fit
    # and there must be nsamples different places to start.
    needed = span + nsamples - 1
    if stream.numel() < needed:
        raise LlmqError(
            f"{spec} has {stream.numel()} tokens, but {nsamples} windows of {seqlen} tokens need at least {needed}; "
            "give more text or lower --nsamples / --seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - span + 1, (nsamples,), generator=generator)
    return start_with_bos(torch.stack([stream[s : s + span] for s in starts.tolist()]), bos)


def sample_tokens(model, tokenizer, ntokens: int, *, seed: int, batch_size: int = 32,
                  max_new_tokens: int = 128) -> torch.Tensor:
    """At least `ntokens` tokens of text sampled from the model itself.

    Each row starts (after BOS when `wants_bos`) from the first token of a
    varied opening word and is sampled in batches (top-k 50, top-p 0.95,
    temperature 1). Rows keep the tokens before the first special token
    (EOS, a stray BOS or chat marker) and are joined with the
    tokens of "\n\n" into one stream, a LongTensor [T >= ntokens] on the CPU.
    Deterministic for a seed; the global RNG state is restored afterwards.

    Sampled text needs no data, but it only reflects what the model already
    does well: real text (wikitext2, c4, a local file) calibrates better.
    Cost grows with ntokens: rounds of batch_size rows of at most
    max_new_tokens tokens (shorter when fewer tokens are still needed).
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    bos = [] if window_bos(tokenizer) is None else [tokenizer.bos_token_id]
    # A row ends at the first special token it samples (EOS, or BOS, chat
    # markers and document ends, which plain text does not contain).
    stops = set(tokenizer.all_special_ids)
    starts = sorted({ids[0] for ids in (tokenize(tokenizer, word).tolist() for word in _OPENINGS) if ids})
    if not starts:
        raise LlmqError("the tokenizer encodes none of the opening words, so `self` cannot sample; pass a text file")
    separator = tokenize(tokenizer, "\n\n").tolist()  # between rows, as between documents
    pieces, total, round_ = [], 0, 0
    devices = [device] if device.type == "cuda" else []
    # fork_rng: seed the sampling without changing the caller's RNG state.
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(seed)
        was_training = model.training
        model.eval()
        try:
            while total < ntokens:
                first = [starts[(round_ * batch_size + i) % len(starts)] for i in range(batch_size)]
                round_ += 1
                # Small requests need short rows only; a quarter more than an
                # even share allows for rows that end early.
                steps = min(max_new_tokens, max(16, -(-5 * (ntokens - total) // (4 * batch_size))))
                ids = torch.tensor([bos + [t] for t in first], device=device)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    top_k=50,
                    top_p=0.95,
                    temperature=1.0,
                    max_new_tokens=steps,
                    pad_token_id=eos if eos is not None else 0,
                    eos_token_id=eos,
                )
                for row in out[:, len(bos) :].tolist():  # BOS is not text
                    # Keep the opening token, then stop at the first special one
                    # (after EOS comes padding).
                    end = next((i for i, t in enumerate(row[1:], 1) if t in stops), len(row))
                    row = row[:end]
                    pieces.append(torch.tensor(row + separator, dtype=torch.long))
                    total += len(row) + len(separator)
        finally:
            model.train(was_training)
    return torch.cat(pieces)
