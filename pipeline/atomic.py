"""Files: atomic writes, so that a reader (a labeling job, a sweep task, a person) sees the old file
or the whole new one, never a half-written one; and the project's one content hash. Light on
imports: the sweep driver uses it too."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temporary_path(final: Path) -> Path:
    """Where ``final`` is written before its rename: beside it (same filesystem), one per process."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shared_mode(path: Path) -> None:
    """Give ``path`` the mode a plain ``open`` would (0666 less the umask): safetensors writes its
    files 0600, and run folders are read by other accounts (a nightly job's service user)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def publish(tmp: Path, final: Path) -> None:
    """fsync a finished temporary file and rename it into place (atomic on one filesystem), with
    the umask's permissions whatever library wrote it."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    shared_mode(tmp)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def write_atomic(final: Path, write: Callable[[Path], None]) -> None:
    """``write`` the temporary file, then publish it; nothing is left behind if ``write`` fails."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(final)
    try:
        write(tmp)
        publish(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def point_link(link: Path, target: str | Path) -> None:
    """Make ``link`` a symlink to ``target`` (relative to the link's folder) with one rename: a
    reader sees the old target or the new one, never no link (``promoted``, ``_report/latest``)."""
    tmp = temporary_path(link)
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


@contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (created if missing, never removed: removing a
    lock file lets a third process lock a new file while a second waits on the old one). Without
    ``wait``, a lock another process holds raises :class:`BlockingIOError` at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1) + "\n"))


def sha256_file(*paths: Path) -> str:
    """The sha256 of the files' bytes, in order: what manifests, ``labeled_by`` and resume checks
    compare (adapters, inputs, outputs, committed parts, the lexical model's two files)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
