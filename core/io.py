"""File helpers: atomic writes (nothing half-written on failure) and checksums."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give them the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path, what: str) -> Any:
    """Read a JSON file of ours, failing with one line that names the file and the fix."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found; run the stage that writes it first")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt {what} ({e}); delete it and rerun with --force") from e


class RunLocked(RuntimeError):
    """Another live process holds the run folder."""


@contextlib.contextmanager
def file_lock(path: Path, on_busy: Callable[[str], None]) -> Iterator[None]:
    """Hold an OS file lock on ``path`` (a dead holder, even one killed by SIGKILL, never blocks anyone); the
    file names the holder's PID. If another process holds it, ``on_busy(its PID)`` runs first: it raises to
    give up, or returns to wait for the lock."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            busy = False
        except BlockingIOError:
            busy = True
        if busy:
            f.seek(0)
            on_busy(f.read().strip() or "unknown")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def run_lock(run_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Hold ``<run_dir>/.lock`` while a command runs; a second command on the folder fails at once."""
    def busy(holder: str) -> None:
        raise RunLocked(f"{run_dir} is in use by another nonn process (PID {holder}); wait for it to finish "
                        "or use another --run-dir")
    return file_lock(run_dir / ".lock", busy)


def swap_in(new: Path, target: Path) -> None:
    """Make folder ``new`` become ``target``; an existing ``target`` is moved aside first and deleted only
    once ``new`` is in place (:func:`restore_interrupted_swap` undoes a swap killed halfway)."""
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rename(target, old / "previous")
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old / "previous", target)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def restore_interrupted_swap(target: Path) -> None:
    """Put back a folder that a killed :func:`swap_in` moved aside, and delete what is left of swaps that finished."""
    for old in sorted(target.parent.glob(f".{target.name}.*.old")):
        if not target.exists() and (old / "previous").is_dir():
            os.rename(old / "previous", target)
        shutil.rmtree(old, ignore_errors=True)
