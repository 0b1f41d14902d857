"""How the labeler commits one output file, so that no fault loses work or shows a half-written file.

Read top to bottom, for one output (an input file, or a shard's piece of one):

1. :func:`output_lock`: one process at a time labels an output; a second one skips it (or waits,
   ``--wait-for-lock``). The lock is ``OUT/_partial/<output>.lock``, held with ``fcntl`` for the
   whole of steps 2-4, so it holds across nodes on a shared file system with POSIX locks.
2. :class:`Parts`: each record batch, once labeled, is written to
   ``OUT/_partial/<output>/part-NNNNNN.parquet`` (atomically) and recorded in ``progress.json``
   with its row count and sha256. A rerun of the same work (same input, adapter and options)
   takes each recorded part that still verifies and relabels the rest: a part that is missing,
   unreadable or altered (a crashed client, a full quota) is logged with its reason and redone,
   never joined and never fatal.
3. :meth:`Parts.join`: the parts, in order, into a temporary file beside the output, whose row
   count is checked against the parts' before it is published by rename.
4. The caller writes the manifest, then removes the parts.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import file_lock, sha256_file, write_atomic, write_json_atomic
from pipeline.errors import FileFailed

log = logging.getLogger(__name__)

PARTIAL_DIR = "_partial"


def os_reason(exc: BaseException) -> str:
    """An I/O failure in words: the OS reason with its symbol (``No space left on device (ENOSPC)``),
    else the library's message."""
    if isinstance(exc, OSError) and exc.errno in errno.errorcode and exc.strerror:
        return f"{exc.strerror} ({errno.errorcode[exc.errno]})"
    return str(exc)


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Name the file whose write failed (a full disk, a quota, an I/O error) in a :class:`FileFailed`."""
    try:
        yield
    except (OSError, pa.ArrowException) as exc:
        raise FileFailed(f"cannot write {path}: {os_reason(exc)}") from exc


@contextmanager
def output_lock(path: Path, final: Path, wait: bool) -> Iterator[None]:
    """Hold the lock file ``path`` while ``final`` is labeled; raise :class:`FileFailed` when another
    process holds it, unless ``wait``."""
    with ExitStack() as held:
        try:
            held.enter_context(file_lock(path, wait=False))
        except BlockingIOError:
            if not wait:
                raise FileFailed(f"{final} is being labeled by another process (it holds {path}); skipped: run "
                                 "again when it is done, or pass --wait-for-lock") from None
            log.info("%s is being labeled by another process: waiting for it (%s)", final, path)
            held.enter_context(file_lock(path))
        yield


class Parts:
    """The committed parts of one output, verified against ``progress.json`` when opened."""

    def __init__(self, folder: Path, key: dict[str, Any]) -> None:
        """Resume the parts of an interrupted run made with the same ``key``, else start afresh."""
        self.folder = folder
        self.progress_path = folder / "progress.json"
        progress = None
        if self.progress_path.is_file():
            try:
                progress = json.loads(self.progress_path.read_text())
            except (OSError, ValueError) as exc:
                log.warning("%s is damaged (%s): labeling %s from the start", self.progress_path, exc, folder.name)
        if progress is not None and progress.get("key") == key:
            for stale in folder.glob(".*.tmp-*"):  # a part being written when the job was killed
                stale.unlink()
        else:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            progress = {"key": key, "labeled_at": datetime.now(UTC).isoformat(), "parts": {}}
            write_json_atomic(self.progress_path, progress)
        self.progress = progress
        self.labeled_at = datetime.fromisoformat(progress["labeled_at"])
        recorded = progress.get("parts", {})
        self.verified = {name: record for name, record in recorded.items() if self._verifies(name, record)}
        self.progress["parts"] = dict(self.verified)

    def _verifies(self, name: str, record: dict[str, Any]) -> bool:
        path = self.folder / name
        try:
            if not path.is_file():
                reason = "it is missing"
            elif sha256_file(path) != record["sha256"]:
                reason = "its bytes differ from those committed"
            elif pq.ParquetFile(path).metadata.num_rows != record["rows"]:
                reason = f"it holds another row count than the {record['rows']} committed"
            else:
                return True
        except (OSError, pa.ArrowException, KeyError, TypeError) as exc:
            reason = f"it cannot be read ({exc})"
        log.warning("%s: committed part %s is not resumed, %s: relabeling its batch", self.folder, name, reason)
        return False

    @staticmethod
    def name(k: int) -> str:
        return f"part-{k:06d}.parquet"

    def committed(self, k: int) -> bool:
        """Whether batch ``k`` was committed by an earlier run and still verifies."""
        return self.name(k) in self.verified

    def read(self, k: int) -> pa.Table:
        return pq.read_table(self.folder / self.name(k))

    def commit(self, k: int, table: pa.Table) -> None:
        """Write batch ``k``'s part, then record it: a part is resumed only once recorded."""
        path = self.folder / self.name(k)
        with writing(path):
            write_atomic(path, lambda tmp: pq.write_table(table, tmp))
        self.progress["parts"][path.name] = {"rows": table.num_rows, "sha256": sha256_file(path)}
        with writing(self.progress_path):
            write_json_atomic(self.progress_path, self.progress)

    def join(self, batches: int, tmp: Path, drop: tuple[str, ...]) -> int:
        """Parts ``0..batches-1`` into ``tmp`` without the ``drop`` columns; the rows written, checked
        against those the parts recorded."""
        names = [self.name(k) for k in range(batches)]
        schema = pq.read_schema(self.folder / names[0])
        output = [name for name in schema.names if name not in drop]
        with writing(tmp), pq.ParquetWriter(tmp, pa.schema([schema.field(name) for name in output])) as writer:
            for name in names:
                writer.write_table(pq.read_table(self.folder / name, schema=schema, columns=output))
        written = pq.ParquetFile(tmp).metadata.num_rows
        recorded = sum(self.progress["parts"][name]["rows"] for name in names)
        if written != recorded:
            raise FileFailed(f"{tmp}: joined {written} rows, the parts recorded {recorded}")
        return written

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
