"""Where a checkpoint may be written, and writing it there without losing anything.

The rules (one owner for all of them, used by `llmq quantize`, `llmq convert`
and `llmq.save`):

- OUT is resolved (symlinks, `..`) before anything else is decided.
- OUT may never be, contain or sit inside a source model or checkpoint, and it
  may never be or contain the current folder or the home folder (`/`, `~`, `.`,
  `..` are refused whatever the flags).
- An existing non-empty OUT is replaced only with overwrite, and only when it
  is itself a quantized checkpoint's folder; anything else (other files, a
  full-precision model) is refused with a note of what it holds.
- The new checkpoint is written into a hidden sibling `.OUT.partial-<pid>-*`
  and published by one rename. With overwrite, the old folder is swapped out
  atomically (renameat2 RENAME_EXCHANGE where the kernel has it) and removed
  only once the new one is in place. Without overwrite, an OUT that appeared
  during the run is never touched: the finished work is left beside it and
  the error says where.
- OUT's parent must be writable before any work starts.

Partial folders carry the writer's pid, so a later run can tell those of a
dead (killed) run from those of a run still going: `stale_partials(out)`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

from .errors import LlmqError
from .folder_io import read_folder_config

PARTIAL_TAG = "partial"  # .OUT.partial-<pid>-<random>: a checkpoint being written
ASIDE_TAG = "old"  # .OUT.old-<pid>-<random>: the replaced checkpoint, until the new one is in place
_TAGS = (PARTIAL_TAG, ASIDE_TAG)
PUBLISHED: list[Path] = []  # output folders put in place whole (publish): an interruption after that lost nothing
KEPT: list[Path] = []  # partial folders kept on an error because they hold resumable work (atomic_folder keep_if)

# What a model or checkpoint folder holds (Hugging Face, llmq, gptq, awq,
# compressed-tensors, hub downloads): an OUT made only of these may be replaced.
MODEL_FOLDER_FILES = (
    "*.json", "*.safetensors", "*.model", "*.tiktoken", "*.jinja", "merges.txt", "vocab.txt", "*.md",
    "LICENSE*", "NOTICE*", "USE_POLICY*", ".gitattributes", "*.py", "recipe.yaml", "pytorch_model*.bin",
    "training_args.bin",
)
MODEL_FOLDER_DIRS = (".cache",)  # `hf download --local-dir` metadata


def resolve(path: str | os.PathLike) -> Path:
    """Absolute path with symlinks and `..` resolved (the target need not exist)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def unsafe_reason(out: Path, sources=(), *, cwd: Path | None = None, home: Path | None = None) -> str | None:
    """Why the resolved path `out` may not be written (replaced) as a checkpoint folder, or None.

    sources: folders the run reads (model, checkpoint); out may not be, hold or
    sit inside any of them. cwd and home (default: the process's) may not be
    out or inside it.
    """
    cwd = resolve(cwd if cwd is not None else os.getcwd())
    home = resolve(home if home is not None else Path.home())
    if out == out.parent:
        return f"{out} is the root folder"
    if _is_within(home, out):
        return f"{out} is the home folder" if out == home else f"{out} holds the home folder {home}"
    if _is_within(cwd, out):
        return f"{out} is the current folder" if out == cwd else f"{out} holds the current folder {cwd}"
    for src in sources:
        if src is None or not Path(src).exists():
            continue
        src = resolve(src)
        if out == src:
            return f"{out} is the source {src}"
        if _is_within(src, out):
            return f"{out} holds the source {src}"
        if _is_within(out, src):
            return f"{out} is inside the source {src}"
    return None


def foreign_entries(folder: Path) -> list[str]:
    """Entries of `folder` that a model or checkpoint folder does not hold (empty: safe to replace)."""
    names = sorted(os.listdir(folder))
    if names and "config.json" not in names:
        return ["no config.json"] + names
    foreign = []
    for name in names:
        if (folder / name).is_dir() and not (folder / name).is_symlink():
            if name not in MODEL_FOLDER_DIRS:
                foreign.append(name + "/")
        elif not any(fnmatch.fnmatchcase(name, p) for p in MODEL_FOLDER_FILES):
            foreign.append(name)
    return foreign


def replace_refusal(folder: Path) -> str | None:
    """Why --overwrite may not replace `folder`, or None: only a quantized checkpoint's folder may be
    replaced, never other files nor a full-precision model (a typo in OUT must not cost a download)."""
    foreign = foreign_entries(folder)
    if foreign:
        return f"is not a model or checkpoint folder (it holds {_summary(foreign)})"
    try:
        config = read_folder_config(folder)
    except LlmqError:  # damaged: not a checkpoint llmq would replace
        config = {}
    if not config.get("quantization_config"):
        return "holds a full-precision model (its config.json has no quantization_config)"
    return None


def _summary(entries: list[str], limit: int = 5) -> str:
    shown = ", ".join(entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def check_output_dir(out: str | os.PathLike, overwrite: bool, sources=(), *, contents: bool = True) -> Path:
    """Check every rule about OUT before any work; return OUT resolved.

    Raises LlmqError when OUT is unsafe (see the module docstring), a file, a
    non-empty folder without overwrite, a folder that is not a checkpoint with
    overwrite, or not writable. contents=False skips the two rules about what
    OUT holds (the final rename checks them again anyway).
    """
    given = os.fspath(out)
    out = resolve(given)
    reason = unsafe_reason(out, sources)
    if reason:
        raise LlmqError(f"refusing to write to {given}: {reason}; choose a new folder for the output")
    if out.exists() and not out.is_dir():
        raise LlmqError(f"output {given} exists and is not a folder: choose another path")
    if contents and out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise LlmqError(f"output folder {given} is not empty: choose another path or pass --overwrite "
                            "(overwrite=True from Python)")
        refusal = replace_refusal(out)
        if refusal:
            raise LlmqError(f"output folder {given} {refusal}: --overwrite only replaces a quantized checkpoint; "
                            "choose another path")
    check_writable(out, replacing=out.is_dir())
    return out


def check_writable(out: Path, replacing: bool) -> None:
    """Fail now, not after the work, when OUT's parent (or OUT itself, to replace it) is not writable."""
    parent = out.parent
    while not parent.exists():  # the save creates missing parents
        parent = parent.parent
    if not parent.is_dir():
        raise LlmqError(f"cannot create {out}: {parent} is not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".llmq-write-probe-", dir=parent)
        os.rmdir(probe)
    except OSError as e:
        raise LlmqError(f"cannot write to {parent} ({e.strerror}): choose an OUT in a folder you can write to") from e
    if replacing and not os.access(out, os.W_OK | os.X_OK):
        raise LlmqError(f"cannot replace {out}: it is not writable by this user")


# ---- stale folders of interrupted runs ------------------------------------------------------------------

_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<tag>partial|old)-(?P<pid>\d+)-[^/]*$")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def stale_partials(out: str | os.PathLike) -> list[Path]:
    """Hidden siblings of OUT left by runs that died (SIGKILL, power loss): `.OUT.partial-*` (unfinished,
    or finished but never renamed into place) and `.OUT.old-*` (a replaced checkpoint not yet removed).

    Folders of runs still alive are not stale and are never listed.
    """
    out = resolve(out)
    if not out.parent.is_dir():
        return []
    stale = []
    for entry in sorted(out.parent.iterdir()):
        m = _SIBLING.match(entry.name)
        if m and m["name"] == out.name and entry.is_dir() and not pid_alive(int(m["pid"])):
            stale.append(entry)
    return stale


def handle_stale_partials(out: str | os.PathLike, overwrite: bool, report=None, keep: Path | None = None) -> list[Path]:
    """Report the stale siblings of OUT but `keep` (the one a resumed run continues in); with overwrite,
    remove them. Returns those found."""
    stale = [d for d in stale_partials(out) if keep is None or d != keep]
    if not stale:
        return stale
    report = report or _stderr
    size = sum(f.stat().st_size for d in stale for f in d.rglob("*") if f.is_file())
    names = ", ".join(d.name for d in stale)
    if overwrite:
        for d in stale:
            shutil.rmtree(d, ignore_errors=True)
        report(f"removed {len(stale)} folder(s) left by an interrupted run of {out} "
               f"({size / 2**20:.1f} MiB): {names}")
    else:
        report(f"{len(stale)} folder(s) left by an interrupted run of {out} ({size / 2**20:.1f} MiB) in "
               f"{resolve(out).parent}: {names}; pass --overwrite to remove them")
    return stale


def _stderr(message: str) -> None:
    import sys

    print(f"llmq: note: {message}", file=sys.stderr)


# ---- writing ----------------------------------------------------------------------------------------------

def test_point(name: str) -> None:
    """Deliver a signal at a named point of a save, when LLMQ_TEST_SIGNAL_AT="point:SIGNAL" asks for it.

    Lets the tests kill a run (SIGKILL, SIGTERM, SIGINT) at fixed points of
    the save; a no-op otherwise. Points: "written" (the new checkpoint is
    complete in its partial folder), "aside" (the old OUT was renamed aside,
    two-rename fallback only), "swapped" (the new OUT is in place, the old one
    not yet removed).
    """
    spec = os.environ.get("LLMQ_TEST_SIGNAL_AT")
    if not spec:
        return
    point, _, sig = spec.partition(":")
    if point == name:
        os.kill(os.getpid(), getattr(signal, sig or "SIGKILL"))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _sibling(out: Path, tag: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-{os.getpid()}-", dir=out.parent))


def _keep_finished(tmp: Path, out: Path) -> Path:
    """Give a finished checkpoint that could not be put at OUT a visible name beside it."""
    for i in range(1, 1000):
        dest = out.with_name(f"{out.name}.new" if i == 1 else f"{out.name}.new{i}")
        if not dest.exists():
            try:
                os.rename(tmp, dest)
                return dest
            except OSError:
                break
    return tmp


def publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Put the finished folder tmp at out; the old out (overwrite) is removed only after."""
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            kept = _keep_finished(tmp, out)
            raise LlmqError(f"{out} appeared while llmq was running and was left as it is; the finished "
                            f"checkpoint is in {kept}: move it into place yourself")
        refusal = replace_refusal(out)
        if refusal:
            kept = _keep_finished(tmp, out)
            raise LlmqError(f"{out} was replaced during the run by a folder that {refusal} and was left as it "
                            f"is; the finished checkpoint is in {kept}")
        if _exchange(tmp, out):
            aside = tmp  # tmp now names the old checkpoint
        else:
            aside = _sibling(out, ASIDE_TAG)
            os.replace(out, aside)  # onto an empty folder: atomic
            try:
                test_point("aside")
                os.rename(tmp, out)
            except BaseException:
                os.replace(aside, out)  # the old checkpoint goes back; tmp is removed by the caller
                raise
        PUBLISHED.append(out)
        test_point("swapped")
        shutil.rmtree(aside, ignore_errors=True)
        return
    try:
        os.rename(tmp, out)  # onto nothing or an empty folder; a non-empty one makes it fail
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        kept = _keep_finished(tmp, out)
        raise LlmqError(f"{out} appeared while llmq was running and was left as it is; the finished "
                        f"checkpoint is in {kept}: move it into place yourself") from e
    PUBLISHED.append(out)
    test_point("swapped")


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, overwrite: bool, sources=(), *, adopt: Path | None = None,
                  keep_if=None):
    """Yield a hidden partial sibling folder of OUT; on success it becomes OUT.

    OUT is checked first (`check_output_dir`; what OUT holds is judged at the
    final rename, so work done meanwhile is never thrown away); on any error or
    interruption (SIGINT, SIGTERM once `cleanup_on_signals` is active) the
    partial folder is removed and OUT is left as it was.

    adopt: a stale partial folder of OUT to continue in (a resumed run); it is
    renamed to carry this process's pid. keep_if(folder, exc): True keeps the
    partial folder on that error (resumable work; the caller says so).
    """
    out = check_output_dir(out, overwrite, sources, contents=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, PARTIAL_TAG)
    if adopt is not None:
        os.rmdir(tmp)
        os.rename(adopt, tmp)
    try:
        yield tmp
        _apply_umask(tmp)
        test_point("written")
    except BaseException as exc:
        if keep_if is None or not keep_if(tmp, exc):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            KEPT.append(tmp)
        raise
    try:
        publish(tmp, out, overwrite)
    except LlmqError:
        raise  # the finished work was kept; the message says where
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _apply_umask(folder: Path) -> None:
    # mkdtemp (and some writers) create private files; a checkpoint gets the
    # permissions any other new file of this user would get.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)


# ---- signals ----------------------------------------------------------------------------------------------

class Terminated(BaseException):
    """SIGTERM turned into an exception, so that `finally` blocks clean up as for Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


def cleanup_on_signals():
    """Make SIGTERM unwind the stack like Ctrl-C (SIGINT already does): partial folders and temporary
    stores are then removed by their own cleanup code. Called by the command line only; returns the
    previous handler for `restore_signals`."""
    try:
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: signals stay as they are
        return None


def restore_signals(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
