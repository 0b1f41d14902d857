"""Which rows each task of a labeling array labels: the shard plan.

Work is split into units of consecutive row groups. ``--shard I/N`` (or the Slurm array
position) takes the I-th of N contiguous, row-balanced slices of all units in path order, so N
array tasks cover the catalog exactly once, whatever its files' sizes. A file that a shard covers
whole keeps its name; a piece of a split file gets its own output name
(:attr:`Unit.output_name`). Only Parquet metadata is read here: planning a million-row catalog
costs no row.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.errors import LabelError


@dataclass
class Unit:
    """Consecutive row groups of one input file that one shard labels into one output."""

    source: Path
    relative: Path
    row_groups: list[int]
    rows: int
    whole_file: bool = True

    @property
    def output_name(self) -> Path:
        if self.whole_file:
            return self.relative
        return self.relative.with_name(f"{self.relative.stem}.part-{self.row_groups[0]:05d}{self.relative.suffix}")


def find_inputs(paths: list[str]) -> list[tuple[Path, Path]]:
    """(file, name relative to its root) for every Parquet file under the given paths or globs."""
    found: dict[Path, Path] = {}
    for raw in paths:
        matches = [Path(m) for m in sorted(glob.glob(raw, recursive=True))] if glob.has_magic(raw) else [Path(raw)]
        if not matches:
            raise LabelError(f"{raw}: no file matches")
        for path in matches:
            if path.is_dir():
                for file in sorted(path.rglob("*.parquet")):
                    # like pyarrow.dataset: "_" and "." names are bookkeeping (manifests, reports,
                    # committed batches, temporaries), never catalog files
                    if not any(part.startswith(("_", ".")) for part in file.relative_to(path).parts):
                        found.setdefault(file.resolve(), file.relative_to(path))
            elif path.exists():
                found.setdefault(path.resolve(), Path(path.name))
            else:
                raise LabelError(f"{path}: not found")
    return list(found.items())


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"I/N"``, else the Slurm array position, else ``0/1``."""
    if shard is None:
        if "SLURM_ARRAY_TASK_ID" in os.environ and "SLURM_ARRAY_TASK_COUNT" in os.environ:
            index = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
            return index, int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        return 0, 1
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise LabelError(f"--shard {shard!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise LabelError(f"--shard {shard!r}: need 0 <= I < N")
    return index, count


def plan(inputs: list[tuple[Path, Path]], shard: tuple[int, int]) -> tuple[list[Unit], list[tuple[Path, str]]]:
    """This shard's units, plus the files that could not even be opened as Parquet."""
    groups: list[tuple[Path, Path, int, int]] = []  # (file, relative, row group, rows)
    unreadable: list[tuple[Path, str]] = []
    for path, relative in inputs:
        try:
            metadata = pq.ParquetFile(path).metadata
        except Exception as exc:  # pyarrow raises several types for a non-Parquet file
            unreadable.append((path, f"{path}: cannot be read as Parquet: {exc}"))
            continue
        if metadata.num_row_groups == 0:
            groups.append((path, relative, -1, 0))
        groups += [(path, relative, g, metadata.row_group(g).num_rows) for g in range(metadata.num_row_groups)]
    index, count = shard
    total = sum(g[3] for g in groups)
    # Contiguous row-balanced slices: a row group belongs to the shard its middle row falls in,
    # so each shard is within one row group of total/count rows.
    mine, seen = [], 0
    for group in groups:
        middle = seen + group[3] / 2
        if min(count - 1, int(middle * count // max(total, 1))) == index:
            mine.append(group)
        seen += group[3]
    if unreadable and index != 0:
        unreadable = []  # report each broken file once, from shard 0
    units: list[Unit] = []
    for path, relative, group, rows in mine:
        if units and units[-1].source == path:
            units[-1].row_groups.append(group)
            units[-1].rows += rows
        else:
            units.append(Unit(path, relative, [group] if group >= 0 else [], rows))
    file_groups: dict[Path, int] = {}
    for path, _, group, _ in groups:
        file_groups[path] = file_groups.get(path, 0) + (group >= 0)
    for unit in units:
        unit.whole_file = len(unit.row_groups) == file_groups[unit.source]
    return units, unreadable
