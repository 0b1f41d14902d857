"""Streaming bulk labeler: Parquet catalogs in, the same rows plus predictions out.

Safety rules, in the order a nightly job needs them:

- an input file is never modified, except by the ``--in-place`` commit (write beside it, check
  row count and id column, atomic rename; the original is kept as a backup until then);
- before any model loads, every folder the job writes to is tried for writing and for room for
  one record batch: a read-only mount or a full disk is a one-line error (exit 2);
- each output is labeled by the protocol of ``pipeline.parts``: locked against a second process,
  each record batch committed as a verified part under ``OUT/_partial/`` (a rerun redoes only the
  batches not committed, or whose part is damaged), the parts joined into a file that appears
  under its final name only when complete; SIGTERM (preemption, ``scancel``) commits the batch in
  hand and exits with code 75 for requeue;
- every finished input gets a manifest entry (``OUT/_manifest/<name>.json``: rows, checksums,
  adapter; with ``--in-place`` OUT holds only the manifest), so a rerun skips finished work;
- one bad file, or one that cannot be written (a full disk, a quota, an I/O error), fails alone
  with its name and the reason, its committed batches kept; the others are still labeled.

Which rows each task labels is planned in :mod:`pipeline.shards`. A piece of a split file has
its own output name; once it is published, the outputs an earlier job wrote for the same rows
under another layout are removed (:func:`remove_other_layouts`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline.atomic import publish, sha256_file, temporary_path, write_json_atomic
from pipeline.config import DataConfig, LabelConfig
from pipeline.errors import FileFailed, LabelError, LabelingInterrupted
from pipeline.parts import PARTIAL_DIR, Parts, os_reason, output_lock, writing
from pipeline.predict import Predictor, Prepared, run_recipe
from pipeline.progress import progress_bar
from pipeline.report import RUNNERS_UP, TOP_K, JobContext, LabelStats, finish_job, job_id, new_job_id
from pipeline.scoring import Prediction
from pipeline.shards import Unit, find_inputs, parse_shard, plan
from pipeline.signals import StopOnSignal

log = logging.getLogger(__name__)
T, U = TypeVar("T"), TypeVar("U")

OUTPUT_COLUMNS = ["department", "department_confidence", "label_status", "labeled_by", "labeled_at"]
"""What a department-level run adds to every row; an aisle-level run adds ``aisle`` and
``aisle_confidence`` first (:meth:`Labeler.output_columns`)."""
PROVENANCE_COLUMNS = ["label_status", "labeled_by", "labeled_at"]
MANIFEST_DIR = "_manifest"


# --- provenance and atomic files ------------------------------------------------------------------


def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        described = version("catalog-tuner")
    except PackageNotFoundError:  # a checkout on PYTHONPATH (a container, a GPU node), not installed
        described = "source"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return described
    return f"{described}+g{commit.stdout.strip()}" if commit.returncode == 0 else described


def remove_stale_temporaries(final: Path) -> None:
    """Leftovers of a killed run: partial outputs, and an --in-place backup whose commit either
    never happened or already did (the file in place is valid in both cases)."""
    for stale in [*final.parent.glob(f".{final.name}.tmp-*"), final.with_name(f".{final.name}.orig")]:
        stale.unlink(missing_ok=True)


# --- labeling --------------------------------------------------------------------------------


@dataclass
class Labeler:
    """A run's predictor plus the provenance every labeled row and manifest carries."""

    run_dir: Path
    batch_size: int = 64
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides of the run's recipe for this job, e.g. ``eval.batch_size=32``."""
    labeled_by: str = field(init=False)
    predictor: Predictor = field(init=False)

    def __post_init__(self) -> None:
        self.predictor = Predictor.from_run(self.run_dir, recipe=run_recipe(self.run_dir, self.overrides),
                                            batch_size=self.batch_size)
        self.labeled_by = str(self.predictor.identity["labeled_by"])

    def provenance(self) -> dict[str, Any]:
        return {"adapter": str(self.run_dir.resolve()), "labels": self.predictor.labels,
                **self.predictor.describe(), "code_version": code_version()}

    def predict(self, names: list[str | None]) -> Prediction:
        return self.predictor.predict(names)

    @property
    def output_columns(self) -> list[str]:
        """The prediction columns, named after the run's label levels, then the provenance."""
        level = self.predictor.level
        hierarchy = [level, f"{level}_confidence"] + (
            ["department", "department_confidence"] if self.predictor.parent is not None else [])
        return hierarchy + PROVENANCE_COLUMNS

    def lexical_seconds(self) -> float:
        """Time spent so far in the blend's lexical model (0 without a blend)."""
        calibration = self.predictor.calibration
        return calibration.lexical_seconds if calibration else 0.0


def catalog_columns(data: DataConfig, text_column: str | None = None,
                    id_column: str | None = None) -> tuple[str, str]:
    """(name column, id column) of the catalogs to label: as given, else the ones the run was trained
    with (its recipe's ``data.text_column`` / ``data.id_column``, which ``train`` takes from the
    DATA_DIR it prepared), else Instacart's: a shop's next export, shaped like its training data,
    needs no flag."""
    return text_column or data.text_column or "product_name", id_column or data.id_column or "product_id"


def _check_text_column(source: Path, schema: pa.Schema, column: str) -> None:
    if column not in schema.names:
        raise FileFailed(f"{source}: no column {column!r} (has: {', '.join(schema.names)})")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise FileFailed(f"{source}: column {column!r} is {kind}, not a string column")


def _needs_label(batch: pa.RecordBatch, labeled_by: str, level: str) -> list[bool]:
    """--only-missing: rows with no label at the run's level, or labeled by another adapter."""
    if level not in batch.schema.names:
        return [True] * batch.num_rows
    missing = pc.is_null(batch.column(level))
    if "labeled_by" in batch.schema.names:
        other = pc.fill_null(pc.not_equal(batch.column("labeled_by"), labeled_by), True)
        missing = pc.or_(missing, other)
    return missing.to_pylist()


def prepare_batch(labeler: Labeler, batch: pa.RecordBatch, text_column: str,
                  only_missing: bool) -> tuple[list[int], Prepared]:
    """What a record batch needs before the model: the rows to label and their prepared names
    (prompts; the blend's lexical scores)."""
    names = batch.column(text_column).to_pylist()
    todo = _needs_label(batch, labeler.labeled_by, labeler.predictor.level) if only_missing else [True] * batch.num_rows
    rows = [i for i, t in enumerate(todo) if t]
    return rows, labeler.predictor.prepare([names[i] for i in rows])


def label_batch(labeler: Labeler, batch: pa.RecordBatch, text_column: str, only_missing: bool,
                labeled_at: datetime) -> pa.RecordBatch:
    """A record batch labeled: :func:`prepare_batch`, the model, :func:`output_batch`."""
    rows, prepared = prepare_batch(labeler, batch, text_column, only_missing)
    return output_batch(labeler, batch, rows, labeler.predictor.predict(prepared), labeled_at)


def output_batch(labeler: Labeler, batch: pa.RecordBatch, rows: list[int], prediction: Prediction,
                 labeled_at: datetime) -> pa.RecordBatch:
    """Input columns in order (old prediction columns replaced), plus the contract's columns, plus
    the runners-up (:data:`RUNNERS_UP`, for the committed part; the output drops them);
    ``prediction`` is of the batch's ``rows``."""
    level, columns = labeler.predictor.level, labeler.output_columns
    predicted = {level: prediction.labels, f"{level}_confidence": prediction.confidences}
    if labeler.predictor.parent is not None:
        predicted["department"], predicted["department_confidence"] = labeler.predictor.parent_prediction(prediction)

    def previous(column: str) -> list[Any]:
        return batch.column(column).to_pylist() if column in batch.schema.names else [None] * batch.num_rows

    new = {c: previous(c) for c in columns}
    for k, i in enumerate(rows):
        for column, values in predicted.items():
            new[column][i] = values[k]
        new["label_status"][i], new["labeled_by"][i], new["labeled_at"][i] = (
            prediction.statuses[k], labeler.labeled_by, labeled_at)
    top_labels: list[list[str] | None] = [None] * batch.num_rows
    top_probabilities: list[list[float] | None] = [None] * batch.num_rows
    probs = prediction.log_probs.exp()
    best = probs.topk(min(TOP_K, probs.shape[1]), dim=-1) if len(rows) else None
    for k, i in enumerate(rows):
        if prediction.labels[k] is not None:  # labels the trie search left unscored (probability 0) are no runners-up
            scored = [(j, p) for j, p in zip(best.indices[k].tolist(), best.values[k].tolist()) if p > 0]
            top_labels[i] = [labeler.predictor.labels[j] for j, _ in scored]
            top_probabilities[i] = [round(p, 4) for _, p in scored]
    types = {"label_status": pa.string(), "labeled_by": pa.string(), "labeled_at": pa.timestamp("us", tz="UTC")}
    keep = [c for c in batch.schema.names if c not in columns]
    arrays = [batch.column(c) for c in keep] + [
        pa.array(new[c], types.get(c, pa.float32() if c.endswith("_confidence") else pa.string())) for c in columns]
    arrays += [pa.array(top_labels, pa.list_(pa.string())), pa.array(top_probabilities, pa.list_(pa.float64()))]
    return pa.RecordBatch.from_arrays(arrays, names=keep + columns + list(RUNNERS_UP))


def ahead(items: Iterable[T], work: Callable[[T], U], overlap: bool = True) -> Iterator[U]:
    """``work(item)`` for each item in order; with ``overlap``, the next item is fetched and
    worked on in a thread while the caller uses this one (one item ahead at most)."""
    if not overlap:
        yield from map(work, items)
        return
    iterator, end = iter(items), object()

    def next_done() -> Any:
        item = next(iterator, end)
        return end if item is end else work(item)

    with ThreadPoolExecutor(1, thread_name_prefix="prepare") as pool:
        pending = pool.submit(next_done)
        while (done := pending.result()) is not end:
            pending = pool.submit(next_done)
            yield done


def iter_batches(unit: Unit, rows_per_batch: int) -> Iterator[pa.RecordBatch]:
    if not unit.row_groups:
        return
    yield from pq.ParquetFile(unit.source).iter_batches(batch_size=rows_per_batch, row_groups=unit.row_groups)


@dataclass
class Outcome:
    unit: Unit
    status: str  # labeled | skipped | failed
    rows: int = 0
    """Rows written (labeled, skipped); for a failed file, the rows committed before it failed."""
    resumed_rows: int = 0
    """Rows whose batch an interrupted run had committed: read back, not labeled again."""
    duplicate_ids: int = 0
    message: str = ""
    stats: LabelStats = field(default_factory=LabelStats)


def label_unit(labeler: Labeler, unit: Unit, out_dir: Path, *, text_column: str, id_column: str,
               only_missing: bool, in_place: bool, rows_per_batch: int, bar: tqdm,
               stop: StopOnSignal | None = None, settings: LabelConfig | None = None,
               wait_for_lock: bool = False) -> Outcome:
    """Label one unit into its output (or into the input itself with ``in_place``), by the protocol
    of ``pipeline.parts``: locked, each record batch committed as a verified part, the parts joined
    into a file that appears under its final name only when complete, then the manifest.

    A failure to write (a full disk, a quota, an I/O error) fails this file by name with the OS
    reason; the batches committed so far are kept for the rerun."""
    final = unit.source if in_place else out_dir / unit.output_name
    committed = [0]  # rows committed so far, in this run or an earlier one

    try:
        with output_lock(out_dir / PARTIAL_DIR / f"{unit.output_name}.lock", final, wait_for_lock):
            return _label_locked(labeler, unit, out_dir, final, committed, text_column=text_column,
                                 id_column=id_column, only_missing=only_missing, in_place=in_place,
                                 rows_per_batch=rows_per_batch, bar=bar, stop=stop, settings=settings or LabelConfig())
    except (FileFailed, OSError, pa.ArrowException) as exc:
        reason = str(exc) if isinstance(exc, FileFailed) else os_reason(exc)
        reason = reason if reason.startswith(str(unit.source)) else f"{unit.source}: {reason}"
        kept = f"; {committed[0]} of {unit.rows} rows committed, kept for the rerun" if committed[0] else ""
        raise FileFailed(f"{reason}{kept}", committed[0]) from exc


def _label_locked(labeler: Labeler, unit: Unit, out_dir: Path, final: Path, committed: list[int], *,
                  text_column: str, id_column: str, only_missing: bool, in_place: bool, rows_per_batch: int,
                  bar: tqdm, stop: StopOnSignal | None, settings: LabelConfig) -> Outcome:
    manifest = out_dir / MANIFEST_DIR / f"{unit.output_name}.json"
    source_sha = sha256_file(unit.source)
    if manifest.is_file():
        entry = json.loads(manifest.read_text())
        done_sha = entry["output_sha256"] if in_place else entry["input_sha256"]
        # A rewritten (in-place) file has new row groups: only a part must match its groups.
        same_part = unit.whole_file or entry.get("row_groups") == unit.row_groups
        finished = entry.get("labeled_by") == labeler.labeled_by and done_sha == source_sha
        if finished and same_part and final.is_file():
            bar.update(unit.rows)
            return Outcome(unit, "skipped", entry["rows"], stats=LabelStats.from_dict(entry.get("stats") or {}))

    parquet = pq.ParquetFile(unit.source)
    _check_text_column(unit.source, parquet.schema_arrow, text_column)
    parts = Parts(out_dir / PARTIAL_DIR / unit.output_name, {
        "input_sha256": source_sha, "labeled_by": labeler.labeled_by, "row_groups": unit.row_groups,
        "rows_per_batch": rows_per_batch, "only_missing": only_missing, "text_column": text_column})
    labeled_at = parts.labeled_at
    start, lexical_start = time.perf_counter(), labeler.lexical_seconds()
    batches, rows, resumed_rows = 0, 0, 0
    stats, level = LabelStats(), labeler.predictor.level
    first_row = sum(parquet.metadata.row_group(g).num_rows for g in range(unit.row_groups[0])) if unit.row_groups else 0

    def prepare(numbered: tuple[int, pa.RecordBatch]) -> tuple[pa.RecordBatch, int, Any]:
        k, batch = numbered  # a batch an interrupted run committed needs no work
        return batch, k, None if parts.committed(k) else prepare_batch(labeler, batch, text_column, only_missing)

    def commit(batch: pa.RecordBatch, k: int, at_row: int, scored: tuple[list[int], Prediction] | None) -> None:
        if scored is None:  # committed by an interrupted run
            labeled = parts.read(k)
        else:
            labeled = pa.Table.from_batches([output_batch(labeler, batch, *scored, labeled_at)])
            parts.commit(k, labeled)
        committed[0] += batch.num_rows
        stats.add(labeled, level=level, labeled_by=labeler.labeled_by, labeled_at=labeled_at,
                  previous=batch.column(level).to_pylist() if level in batch.schema.names else None,
                  source=unit.source, first_row=at_row, id_column=id_column, text_column=text_column,
                  settings=settings)
        bar.update(batch.num_rows)

    # Reading and preparing the next batch, and writing the last one, overlap the model's scoring
    # of this one (label.overlap): on a GPU they were most of the time (results/README.md).
    overlap = settings.overlap
    if overlap is None:
        overlap = labeler.predictor.device != "cpu"
    with ThreadPoolExecutor(1, thread_name_prefix="commit") as committer:
        committing: Future | None = None
        for batch, k, work in ahead(enumerate(iter_batches(unit, rows_per_batch)), prepare, overlap):
            if work is None:
                resumed_rows += batch.num_rows
                scored = None
            else:
                todo, prepared = work
                scored = todo, labeler.predictor.predict(prepared)
            if committing is not None:
                committing.result()
            committing = committer.submit(commit, batch, k, first_row + rows, scored)
            if not overlap:
                committing.result()
            batches += 1
            rows += batch.num_rows
            if stop is not None and stop.requested:
                committing.result()
                raise LabelingInterrupted(f"{unit.source}: stopped on {stop.requested} with {rows} of {unit.rows} "
                                          f"rows committed; rerun the same command to resume")
        if committing is not None:
            committing.result()  # the last batch's
    if resumed_rows:
        log.info("%s: resumed, %d of %d rows were already committed", unit.source, resumed_rows, rows)

    remove_stale_temporaries(final)
    tmp = temporary_path(final)
    try:
        if batches:
            written = parts.join(batches, tmp, RUNNERS_UP)
        else:  # no rows: still write a valid file with the output schema
            empty = pa.RecordBatch.from_pylist([], schema=parquet.schema_arrow)
            with writing(tmp):
                pq.write_table(pa.Table.from_batches([label_batch(labeler, empty, text_column, only_missing,
                                                                  labeled_at)]).drop_columns(list(RUNNERS_UP)), tmp)
            written = 0
        if written != unit.rows:
            raise FileFailed(f"{unit.source}: wrote {written} rows, expected {unit.rows}")
        with writing(final):
            if in_place:
                _verify_ids(unit.source, tmp, id_column)
                backup = unit.source.with_name(f".{unit.source.name}.orig")
                shutil.copy2(unit.source, backup)  # kept until the commit below succeeds
                publish(tmp, final)
                backup.unlink()
            else:
                publish(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    duplicates = count_duplicate_ids(parquet, unit.row_groups, id_column)
    with writing(manifest):
        write_json_atomic(manifest, {
            "input": str(unit.source), "output": str(final), "row_groups": unit.row_groups, "rows": rows,
            "resumed_rows": resumed_rows,
            "input_sha256": source_sha, "output_sha256": sha256_file(final), "duplicate_ids": duplicates,
            "finished_at": datetime.now(UTC).isoformat(), "seconds": round(time.perf_counter() - start, 3),
            "lexical_seconds": round(labeler.lexical_seconds() - lexical_start, 3), **labeler.provenance(),
            "stats": asdict(stats),
        })
    parts.remove()
    if not in_place:
        remove_other_layouts(out_dir, unit, source_sha)
    return Outcome(unit, "labeled", rows, resumed_rows, duplicates, stats=stats)


def remove_other_layouts(out_dir: Path, unit: Unit, source_sha: str) -> None:
    """Remove the outputs (and manifests) an earlier job wrote for the same input under another
    layout, once this unit's output is published: the whole file where it is now split between
    shards, pieces where it is now whole or cut elsewhere, and any piece of older content. Left
    there, a reader of OUT_DIR would see those rows twice.

    Only outputs whose rows overlap this unit's (or that came from other bytes) go: the other
    pieces of tonight's layout, which other shards write at the same time, stay."""
    stem, suffix = unit.relative.stem, unit.relative.suffix
    folder = out_dir / MANIFEST_DIR / unit.relative.parent
    mine = set(unit.row_groups)
    for manifest in [folder / f"{unit.relative.name}.json", *folder.glob(f"{glob.escape(stem)}.part-*{suffix}.json")]:
        if manifest.name == f"{unit.output_name.name}.json" or not manifest.is_file():
            continue
        try:
            entry = json.loads(manifest.read_text())
            if Path(entry["input"]).resolve() != unit.source.resolve():
                continue
            stale = entry.get("input_sha256") != source_sha or bool(mine & set(entry.get("row_groups") or []))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a manifest this job can read: left as it is
        if stale:
            log.info("%s: removing %s, labeled in another layout (row groups %s)", unit.source,
                     entry["output"], entry.get("row_groups"))
            Path(entry["output"]).unlink(missing_ok=True)  # the data first, then the entry that names it
            manifest.unlink(missing_ok=True)


def count_duplicate_ids(parquet: pq.ParquetFile, row_groups: list[int], id_column: str) -> int:
    """Rows whose id repeats an earlier one; reads the id column alone (8 bytes a row)."""
    if id_column not in parquet.schema_arrow.names or not row_groups:
        return 0
    ids = parquet.read_row_groups(row_groups, columns=[id_column]).column(0)
    return len(ids) - pc.count_distinct(ids, mode="all").as_py()


def _verify_ids(original: Path, rewritten: Path, id_column: str) -> None:
    if id_column not in pq.ParquetFile(original).schema_arrow.names:
        return
    before = pq.read_table(original, columns=[id_column]).column(0)
    if not before.equals(pq.read_table(rewritten, columns=[id_column]).column(0)):
        raise FileFailed(f"{original}: the rewritten file's {id_column} column differs from the original's")


def check_output_folders(units: list[Unit], out_dir: Path, in_place: bool, rows_per_batch: int) -> None:
    """Before any model loads: each folder the job writes to can be written (permissions, a
    read-only mount: tried, since root passes every permission check) and has room for one record
    batch of its largest-rowed input (estimated from the input's bytes per row, twice over for the
    predictions and the temporary copy)."""
    folders: dict[Path, int] = {out_dir: 0}
    for unit in units:
        folder = unit.source.parent if in_place else (out_dir / unit.output_name).parent
        rows = max(1, pq.ParquetFile(unit.source).metadata.num_rows)
        need = 2 * unit.source.stat().st_size * min(rows_per_batch, rows) // rows + 4096
        folders[folder] = max(folders.get(folder, 0), need)
    for folder, need in folders.items():
        probe = folder / f".write-check-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"0")
                os.fsync(f.fileno())
            probe.unlink()
        except OSError as exc:
            with contextlib.suppress(OSError):  # created but not written (a full disk)
                probe.unlink(missing_ok=True)
            raise LabelError(f"{folder}: cannot be written: {os_reason(exc)}") from None
        free = shutil.disk_usage(folder).free
        if free < need:
            raise LabelError(f"{folder}: {free:,} bytes free, a record batch needs about {need:,}: free space, "
                             "or lower --rows-per-batch")


def label_catalogs(adapter: str | Path, catalogs: list[str], out_dir: str | Path, *, shard: str | None = None,
                   job: str | None = None, in_place: bool = False, only_missing: bool = False,
                   fail_fast: bool = False, wait_for_lock: bool = False, text_column: str | None = None,
                   id_column: str | None = None, rows_per_batch: int = 4096, batch_size: int = 64,
                   progress: bool = True, review_max: int | None = None,
                   overrides: list[str] | None = None) -> list[Outcome]:
    """Label every input row of this shard, then write this task's share of the job's report
    (``pipeline.report``; ``job``: the labeling job the shard belongs to, by default Slurm's);
    ``text_column`` / ``id_column`` default to the run's (:func:`catalog_columns`)."""
    inputs = find_inputs(catalogs)
    position = parse_shard(shard)
    job = job_id(job)
    if job is None:
        if position[1] > 1:
            raise LabelError(f"--shard {position[0]}/{position[1]} outside Slurm: name the job with --job ID, "
                             "the same for its tasks, so that their reports merge")
        job = new_job_id()
    units, unreadable = plan(inputs, position)
    outcomes = [Outcome(Unit(p, Path(p.name), [], 0), "failed", message=m) for p, m in unreadable]
    if fail_fast and outcomes:
        return outcomes
    if in_place and any(not u.whole_file for u in units):
        raise LabelError("--in-place cannot split a file between shards; use as many shards as files or fewer")
    out = Path(out_dir)
    check_output_folders(units, out, in_place, rows_per_batch)
    labeler = Labeler(Path(adapter), batch_size=batch_size, overrides=overrides or [])
    text_column, id_column = catalog_columns(labeler.predictor.recipe.data, text_column, id_column)
    settings = labeler.predictor.recipe.label
    if review_max is not None:
        settings = dataclasses.replace(settings, review_max=review_max)
    start = time.perf_counter()
    with progress_bar(sum(u.rows for u in units), "labeling", "row", disable=not progress) as bar, \
            StopOnSignal("committing the batch in hand") as stop:
        for unit in units:
            try:
                outcomes.append(label_unit(labeler, unit, out, text_column=text_column, id_column=id_column,
                                           only_missing=only_missing, in_place=in_place,
                                           rows_per_batch=rows_per_batch, bar=bar, stop=stop, settings=settings,
                                           wait_for_lock=wait_for_lock))
            except FileFailed as exc:
                log.error("%s", exc)
                outcomes.append(Outcome(unit, "failed", exc.committed_rows, message=str(exc)))
                if fail_fast:
                    break
    seconds = time.perf_counter() - start
    counts = {s: sum(o.status == s for o in outcomes) for s in ("labeled", "skipped", "failed")}
    log.info("%d rows labeled in %d file(s), %d file(s) already done, %d failed, in %.1f s",
             sum(o.rows for o in outcomes if o.status == "labeled"), counts["labeled"], counts["skipped"],
             counts["failed"], seconds)
    training = labeler.run_dir / "label_distribution.json"
    context = JobContext(labeler.predictor.labels, labeler.provenance(), settings, labeler.predictor.recipe.tracking,
                         json.loads(training.read_text()) if training.is_file() else None)
    failed = [o for o in outcomes if o.status == "failed"]
    files = {"labeled": counts["labeled"], "skipped": counts["skipped"],
             "failed": [{"file": str(o.unit.source), "reason": o.message, "committed_rows": o.rows} for o in failed],
             "resumed_rows": sum(o.resumed_rows for o in outcomes),
             "failed_rows": sum(o.unit.rows - o.rows for o in failed)}
    try:
        report = finish_job(out, job, position, [o.stats for o in outcomes], files, round(seconds, 2), context)
    except OSError as exc:  # the report is a view of the outputs: it never changes the labeling's outcome
        log.error("the report of job %s was not written (%s%s); the labeled outputs stand. Once fixed, rebuild "
                  "it with: catalog-tuner report %s --job %s", job, os_reason(exc),
                  f": {exc.filename}" if exc.filename else "", out, job)
        return outcomes
    log.info("report of job %s: %s", job, report if report else f"waiting for the other tasks ({position[1]} in all)")
    return outcomes


def summarize(outcomes: list[Outcome]) -> str:
    """One line per file (a failed one with its reason), then the counts: what a person reads first."""
    lines = []
    for o in outcomes:
        if o.status == "failed":
            lines.append(f"FAILED {o.message}")
        else:
            extra = f", {o.duplicate_ids} duplicate ids" if o.duplicate_ids else ""
            resumed = f", {o.resumed_rows} resumed" if o.resumed_rows else ""
            lines.append(f"{o.status} {o.unit.source}: {o.rows} rows{resumed}{extra}")
    counts = {s: sum(o.status == s for o in outcomes) for s in ("labeled", "skipped", "failed")}
    done = [o for o in outcomes if o.status != "failed"]
    lines.append(f"{counts['labeled']} labeled, {counts['skipped']} skipped (already done), {counts['failed']} failed; "
                 f"{sum(o.rows for o in done)} rows, {sum(o.duplicate_ids for o in outcomes)} duplicate ids")
    failed = [o for o in outcomes if o.status == "failed" and o.unit.rows]
    if failed:
        lines.append(f"failed files: {sum(o.rows for o in failed)} rows committed and kept for the rerun, "
                     f"{sum(o.unit.rows - o.rows for o in failed)} still to label")
    return "\n".join(lines)
