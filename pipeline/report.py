"""The labeling job's morning report: did last night look normal, and which rows should a person check.

Each labeling job (a Slurm array job, by its id; elsewhere ``--job ID`` or a generated id) writes
its own folder ``OUT_DIR/_report/<job>/``:

- ``summary.json``: rows, rows labeled when their file was labeled (the others kept an earlier
  label, with ``--only-missing``), rows per ``label_status``, files failed with their reasons,
  throughput, the label distribution of the labeled catalog, a 20-bin histogram of the
  confidences this job gave, the share below ``label.review_below``, label changes
  (``--only-missing`` and ``--in-place`` over labeled rows), the adapter, and **drift**: the
  Jensen-Shannon divergence (base 2) of the label shares against the training split's and
  against the previous complete job's, the labels that moved most, and ``flagged`` above
  ``label.drift_threshold``;
- ``review_queue.parquet``: the rows to check first (every truncated name, then the lowest
  calibrated confidences below ``label.review_below``), at most ``label.review_max``, with id,
  name, the top three labels and their probabilities (kept from the labeling pass: no row is
  scored twice), and the source file and row;
- ``report.html``: the same, self-contained, with the trend of the last nights and a link to the
  previous job's report.

Beside the job folders: ``history.jsonl``, one line of key figures per merge, append-only and
never pruned (a rebuilt job appends a new line; readers take each job's last), and ``latest``, a
link switched atomically to the newest complete job. Only the last ``label.report_keep`` job
folders are kept.

Each task of a job writes its partial (``<job>/partial/shard-<i>-of-<N>.json``: its figures and
everything the merge needs, so that ``catalog-tuner report`` rebuilds a job without the model).
Whichever task completes the set merges it, under a lock on ``_report/``: exactly one merge per
complete set, and a rerun task (requeue, manual rerun) merges its job again. Merged figures
equal one process's: counts add up, and each task keeps its own ``review_max`` lowest rows,
among which the global lowest are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.spatial.distance import jensenshannon

from pipeline import tracking
from pipeline.atomic import file_lock, point_link, write_atomic, write_json_atomic
from pipeline.config import LabelConfig, TrackingConfig
from pipeline.errors import ReportError
from pipeline.report_page import render_html

log = logging.getLogger(__name__)

REPORT_DIR = "_report"
HISTORY_FILE = "history.jsonl"
LATEST = "latest"
HISTOGRAM_BINS = 20
TOP_MOVES = 10
RUNNERS_UP = ("_top_labels", "_top_probabilities")
"""Columns of the committed parts only (never of an output file): each scored row's ``TOP_K`` most
probable labels, kept from the labeling pass so that the review queue needs no second scoring of
up to ``label.review_max`` rows a job (minutes with the trie scorer; results/README.md)."""
TOP_K = 3


@dataclass
class LabelStats:
    """What one file (or a whole job, once merged) contributed to the report."""

    rows: int = 0
    """Rows in the outputs."""
    labeled: int = 0
    """Rows scored when their file was labeled (the others kept an earlier label, with
    ``--only-missing``); a file skipped as already done brings its counts from its manifest."""
    by_status: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    """Label counts over every output row: the catalog as it now stands."""
    confidence_histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)
    """Confidences this job gave, in 20 equal bins over [0, 1]."""
    low_confidence: int = 0
    """Rows this job scored with a confidence below ``label.review_below``: the trend's
    low-confidence share."""
    changed: int = 0
    """Rows this job scored that had another label before."""
    moves: dict[str, int] = field(default_factory=dict)
    """``"old -> new"``: how often."""
    review: list[dict[str, Any]] = field(default_factory=list)
    """Candidates for the review queue, already ordered and bounded."""

    def add(self, table: pa.Table, *, level: str, labeled_by: str, labeled_at: datetime,
            previous: list[Any] | None, source: Path, first_row: int, id_column: str, text_column: str,
            settings: LabelConfig) -> None:
        """Count one committed batch (``table``: its output rows; ``previous``: the input's labels)."""
        labels = table.column(level).to_pylist()
        confidences = table.column(f"{level}_confidence").to_pylist()
        statuses = table.column("label_status").to_pylist()
        scored = [by == labeled_by and at == labeled_at for by, at in
                  zip(table.column("labeled_by").to_pylist(), table.column("labeled_at").to_pylist())]
        ids = table.column(id_column).to_pylist() if id_column in table.column_names else [None] * len(labels)
        names = table.column(text_column).to_pylist()
        # The labeling pass's runners-up (a part committed by an older version has none).
        top_labels, top_probabilities = (table.column(c).to_pylist() if c in table.column_names
                                         else [None] * len(labels) for c in RUNNERS_UP)
        self.rows += len(labels)
        _add(self.labels, Counter(label for label in labels if label is not None))
        candidates = []
        for i, label in enumerate(labels):
            if not scored[i]:
                continue
            self.labeled += 1
            self.by_status[statuses[i]] = self.by_status.get(statuses[i], 0) + 1
            if confidences[i] is not None:
                self.confidence_histogram[min(int(confidences[i] * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
                self.low_confidence += confidences[i] < settings.review_below
            before = previous[i] if previous is not None else None
            if before is not None and before != label:
                self.changed += 1
                move = f"{before} -> {label}"
                self.moves[move] = self.moves.get(move, 0) + 1
            if statuses[i] == "truncated" or (confidences[i] is not None and confidences[i] < settings.review_below):
                candidates.append({"source": str(source), "row": first_row + i, "id": ids[i], "name": names[i],
                                   "label": label, "confidence": confidences[i], "label_status": statuses[i],
                                   "top": list(zip(top_labels[i] or [], top_probabilities[i] or []))})
        self.review = review_order(self.review + candidates)[: settings.review_max]

    def merge(self, other: LabelStats, review_max: int) -> None:
        self.rows += other.rows
        self.labeled += other.labeled
        self.changed += other.changed
        self.low_confidence += other.low_confidence
        for mine, theirs in ((self.by_status, other.by_status), (self.labels, other.labels),
                             (self.moves, other.moves)):
            _add(mine, theirs)
        self.confidence_histogram = [a + b for a, b in zip(self.confidence_histogram, other.confidence_histogram)]
        self.review = review_order(self.review + other.review)[:review_max]

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> LabelStats:
        """From a manifest or partial; fields an older version did not write keep their defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


def _add(total: dict[str, int], counts: dict[str, int]) -> None:
    for key, count in counts.items():
        total[key] = total.get(key, 0) + count


def review_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Truncated names first (the model did not see all of them), then the lowest confidence;
    ties by file and row, so that shards and one process agree."""
    return sorted(rows, key=lambda r: (r["label_status"] != "truncated", r["confidence"] if r["confidence"]
                                       is not None else 0.0, r["source"], r["row"]))


# --- drift -----------------------------------------------------------------------------------


def shares(counts: dict[str, int], labels: list[str]) -> np.ndarray:
    values = np.array([counts.get(label, 0) for label in labels], dtype=float)
    return values / values.sum() if values.sum() else values


def drift(counts: dict[str, int], reference: dict[str, int], labels: list[str], threshold: float) -> dict[str, Any]:
    """Jensen-Shannon divergence (base 2, in [0, 1]) of two label distributions and the labels whose
    share moved most."""
    p, q = shares(counts, labels), shares(reference, labels)
    divergence = float(jensenshannon(p, q, base=2) ** 2) if p.sum() and q.sum() else 0.0
    moved = sorted(range(len(labels)), key=lambda i: -abs(p[i] - q[i]))[:5]
    return {"jensen_shannon": round(divergence, 5), "threshold": threshold, "flagged": divergence > threshold,
            "moved_most": [{"label": labels[i], "share": round(float(p[i]), 4),
                            "reference_share": round(float(q[i]), 4)} for i in moved]}


# --- one job's report --------------------------------------------------------------------------


def job_id(given: str | None = None) -> str | None:
    """The labeling job's id: ``--job``, else the Slurm array job (or plain job) id; None elsewhere."""
    return given or os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")


def new_job_id() -> str:
    """A job id for a one-process job outside Slurm: sortable, and unique per process."""
    return f"local-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{os.getpid()}"


@dataclass
class JobContext:
    """What a merge needs besides the tasks' figures; each partial carries it, so that a report is
    rebuilt (``catalog-tuner report``) without the run directory or the model."""

    labels: list[str]
    provenance: dict[str, Any]
    settings: LabelConfig
    tracking: TrackingConfig
    training: dict[str, Any] | None
    """The training split's label distribution (``RUN_DIR/label_distribution.json``)."""

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> JobContext:
        def known(kind: type, values: dict[str, Any]) -> Any:
            return kind(**{k: v for k, v in values.items() if k in {f.name for f in fields(kind)}})

        return cls(saved["labels"], saved["provenance"], known(LabelConfig, saved["settings"]),
                   known(TrackingConfig, saved["tracking"]), saved.get("training"))


def job_folder(out_dir: Path, job: str) -> Path:
    return out_dir / REPORT_DIR / job


def partial_name(shard: tuple[int, int]) -> str:
    return f"shard-{shard[0]}-of-{shard[1]}.json"


def write_partial(out_dir: Path, job: str, shard: tuple[int, int], stats: LabelStats, files: dict[str, Any],
                  seconds: float, context: JobContext) -> Path:
    """This task's share of its job's report, where the merging task finds it."""
    path = job_folder(out_dir, job) / "partial" / partial_name(shard)
    write_json_atomic(path, {"shard": f"{shard[0]}/{shard[1]}", "job": job,
                             "finished_at": datetime.now(UTC).isoformat(timespec="seconds"), "seconds": seconds,
                             "files": files,
                             "stats": asdict(stats), "context": asdict(context)})
    return path


def read_partials(folder: Path, count: int | None = None) -> tuple[list[dict[str, Any]] | None, str]:
    """A job's partials in shard order, or None and why not (shards missing, a partial damaged).
    ``count``: the job's number of tasks; by default the one its partials' names agree on."""
    found, damaged = {}, []
    for path in sorted((folder / "partial").glob("shard-*-of-*.json")):
        try:
            partial = json.loads(path.read_text())
            found[path.name] = partial, LabelStats.from_dict(partial["stats"]), JobContext.from_dict(partial["context"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            damaged.append(f"{path} is damaged ({type(exc).__name__}: {exc})")
    counts = {int(name.removesuffix(".json").rsplit("-", 1)[1]) for name in found}
    if count is None:
        if len(counts) != 1:
            return None, "; ".join(damaged) or (f"{folder}: partials of {sorted(counts)} tasks" if counts
                                                 else f"{folder}: no partial")
        count = counts.pop()
    missing = [i for i in range(count) if partial_name((i, count)) not in found]
    if missing or damaged:
        return None, "; ".join(damaged + ([f"{folder}: no partial yet from shard(s) "
                                           f"{', '.join(f'{i}/{count}' for i in missing)}"] if missing else []))
    return [found[partial_name((i, count))][0] for i in range(count)], ""


def report_lock(out_dir: Path):
    """Held while a job's report, the history and ``latest`` are written: two tasks (of one job or
    two) finishing together merge one after the other, and the second sees the first's work."""
    return file_lock(out_dir / REPORT_DIR / ".lock")


def read_history(out_dir: Path) -> list[dict[str, Any]]:
    """Each job's last history line, in the order the jobs first completed; damaged lines (a write cut
    by a full disk) are logged by line number and skipped."""
    path = out_dir / REPORT_DIR / HISTORY_FILE
    entries: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                entry = json.loads(line)
                entries[str(entry["job"])] = entry  # a job merged again keeps its first place
            except (ValueError, KeyError, TypeError):
                if line.strip():
                    log.warning("%s, line %d: damaged, skipped", path, number)
    return list(entries.values())


def append_history(out_dir: Path, entry: dict[str, Any]) -> None:
    path = out_dir / REPORT_DIR / HISTORY_FILE
    with open(path, "a+b") as f:
        if f.seek(0, os.SEEK_END) and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
            f.write(b"\n")  # a line cut short before (a full disk): end it; readers skip it
        f.write(json.dumps(entry, sort_keys=True).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


STALE_AFTER_S = 24 * 3600
"""A job folder without a report, untouched for this long, is a job that never completed."""


def prune(out_dir: Path, history: list[dict[str, Any]], keep: int) -> None:
    """Remove the folders of complete jobs older than the last ``keep``, and of jobs that never
    completed: older than all of those and untouched for a day (a job still running keeps its
    partials whatever ``keep`` is); the history stays whole."""
    root = out_dir / REPORT_DIR
    complete = [e["job"] for e in history if (root / e["job"]).is_dir()]
    kept = complete[-keep:] if keep > 0 else complete
    for job in complete[:len(complete) - len(kept)]:
        shutil.rmtree(root / job, ignore_errors=True)
    oldest = min(((root / job).stat().st_mtime for job in kept), default=None)
    stale = time.time() - STALE_AFTER_S
    for folder in root.iterdir():
        if (folder.is_dir() and not folder.is_symlink() and not folder.name.startswith((".", "_"))
                and folder.name not in complete and oldest is not None
                and folder.stat().st_mtime < min(oldest, stale)):
            shutil.rmtree(folder, ignore_errors=True)


def fingerprint(partials: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(partials, sort_keys=True).encode()).hexdigest()


def merge_job(out_dir: Path, job: str, count: int | None = None, rebuild: bool = False) -> Path | None:
    """Merge a job's partials into its report, once per complete set: returns the job's folder, or
    None while tasks are missing (``rebuild``: raise :class:`ReportError` naming them). A set already
    merged is left alone unless ``rebuild``."""
    folder = job_folder(out_dir, job)
    with report_lock(out_dir):
        partials, why = read_partials(folder, count)
        if partials is None:
            if rebuild:
                raise ReportError(why)
            if "damaged" in why:
                log.warning("report of job %s not merged: %s", job, why)
            return None
        digest = fingerprint(partials)
        summary_path = folder / "summary.json"
        if not rebuild and summary_path.is_file():
            try:
                if json.loads(summary_path.read_text()).get("partials_sha256") == digest:
                    return folder  # another task of this job merged this very set
            except ValueError:
                log.warning("%s is damaged: merging again", summary_path)
        context = JobContext.from_dict(partials[-1]["context"])
        stats, files = LabelStats(), {}
        for partial in partials:
            stats.merge(LabelStats.from_dict(partial["stats"]), context.settings.review_max)
            for key, value in partial["files"].items():  # counts add up, lists of failed files join
                files[key] = files.get(key, type(value)()) + value
        history = read_history(out_dir)
        order = [e["job"] for e in history]
        before = order[:order.index(job)] if job in order else order
        previous = history[len(before) - 1] if before else None
        summary = build_summary(job, stats, files, partials, context, previous, digest)
        review = review_table(stats.review)
        entry = history_entry(summary)
        trend = [*history[:len(before)], entry][-TREND_JOBS:]
        write_atomic(folder / "review_queue.parquet", lambda tmp: pq.write_table(review, tmp))
        page = render_html(summary, review, context.labels, trend, has_previous=previous is not None and
                           (out_dir / REPORT_DIR / previous["job"] / "report.html").is_file())
        write_atomic(folder / "report.html", lambda tmp: tmp.write_text(page))
        write_json_atomic(summary_path, summary)  # last of the three: its presence says the report is whole
        append_history(out_dir, entry)
        if job not in order or order[-1] == job:  # a rebuilt older job does not move latest back
            point_link(out_dir / REPORT_DIR / LATEST, job)
        prune(out_dir, read_history(out_dir), context.settings.report_keep)
    tracking.log_label_report(folder, summary, review, context.tracking)
    return folder


TREND_JOBS = 14
"""Jobs shown in the report's trend: two weeks of nights."""


def history_entry(summary: dict[str, Any]) -> dict[str, Any]:
    """The key figures of a job, one line of ``history.jsonl``."""
    drift = summary["drift"]
    return {"job": summary["job"], "written_at": summary["written_at"], "rows": summary["rows"],
            "labeled": summary["labeled"], "by_label_status": summary["by_label_status"],
            "failed_files": [f["file"] for f in summary["files"]["failed"]],
            "rows_per_task_second": summary["rows_per_task_second"],
            "low_confidence_share": summary["low_confidence"]["share"], "changed": summary["changes"]["rows"],
            "drift_against_training": (drift["against_training"] or {}).get("jensen_shannon"),
            "drift_against_previous": (drift["against_previous_job"] or {}).get("jensen_shannon"),
            "drift_flagged": drift["flagged"], "previous_job": summary["previous_job"],
            "labeled_by": summary["adapter"].get("labeled_by"), "partials_sha256": summary["partials_sha256"],
            "label_counts": {k: v["count"] for k, v in summary["label_distribution"].items() if v["count"]}}


def build_summary(job: str, stats: LabelStats, files: dict[str, Any], partials: list[dict[str, Any]],
                  context: JobContext, previous: dict[str, Any] | None, digest: str) -> dict[str, Any]:
    settings, labels, training = context.settings, context.labels, context.training
    task_seconds = sum(p["seconds"] for p in partials)
    summary = {
        "job": job, "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": stats.rows, "labeled": stats.labeled, "kept_earlier_label": stats.rows - stats.labeled,
        "by_label_status": stats.by_status, "files": files,
        "tasks": [{k: p[k] for k in ("shard", "job", "finished_at", "seconds")} for p in partials],
        "task_seconds": round(task_seconds, 1),
        "rows_per_task_second": round(stats.labeled / task_seconds, 1) if task_seconds else None,
        "label_distribution": {label: {"count": stats.labels.get(label, 0), "share": round(float(s), 4),
                                       **({"training_share": round(float(t), 4)} if training else {})}
                               for label, s, t in zip(labels, shares(stats.labels, labels),
                                                      shares(training["counts"] if training else {}, labels))},
        "confidence_histogram": {"bins": HISTOGRAM_BINS, "counts": stats.confidence_histogram},
        "low_confidence": {"rows": stats.low_confidence, "below": settings.review_below,
                           "share": round(stats.low_confidence / stats.labeled, 4) if stats.labeled else None},
        "changes": {"rows": stats.changed, "top_moves": dict(Counter(stats.moves).most_common(TOP_MOVES))},
        "review_queue": {"rows": len(stats.review), "max": settings.review_max, "below": settings.review_below},
        "adapter": context.provenance,
        "training_label_distribution": training,
        "previous_job": previous["job"] if previous else None,
        "drift": {
            "against_training": drift(stats.labels, training["counts"], labels, settings.drift_threshold)
            if training else None,
            "against_previous_job": drift(stats.labels, previous["label_counts"], labels, settings.drift_threshold)
            if previous else None,
        },
        "partials_sha256": digest,
    }
    summary["drift"]["flagged"] = any(d and d["flagged"] for d in summary["drift"].values() if isinstance(d, dict))
    return summary


def review_table(review: list[dict[str, Any]]) -> pa.Table:
    """The review queue with each row's three most probable labels, as the labeling pass scored them."""
    top = [r.get("top") or [] for r in review]
    columns: dict[str, list[Any]] = {k: [r[k] for r in review] for k in
                                     ("id", "name", "label", "confidence", "label_status", "source", "row")}
    for k in range(TOP_K):
        columns[f"top{k + 1}_label"] = [t[k][0] if len(t) > k else None for t in top]
        columns[f"top{k + 1}_probability"] = [t[k][1] if len(t) > k else None for t in top]
    columns["id"] = [None if v is None else str(v) for v in columns["id"]]  # ids of any type, one column
    return pa.table(columns)


def finish_job(out_dir: Path, job: str, shard: tuple[int, int], file_stats: list[LabelStats],
               files: dict[str, Any], seconds: float, context: JobContext) -> Path | None:
    """Write this task's partial (``files``: files labeled, skipped and failed, rows resumed and
    failed); if it completes its job's set, merge the report. Returns the job's report folder, or
    None while other tasks of the job are still running."""
    stats = LabelStats()
    for one in file_stats:
        stats.merge(one, context.settings.review_max)
    write_partial(out_dir, job, shard, stats, files, seconds, context)
    return merge_job(out_dir, job, count=shard[1])


def rebuild_report(out_dir: Path, job: str | None = None) -> Path:
    """``catalog-tuner report``: merge a job's partials again (by default the job whose report folder
    changed last), without relabeling: after a failed merge, a rerun shard, or to redraw the HTML."""
    root = out_dir / REPORT_DIR
    if job is None:
        folders = [f for f in root.glob("*/partial") if not f.parent.is_symlink()] if root.is_dir() else []
        if not folders:
            raise ReportError(f"{root}: no labeling job's partials here")
        job = max(folders, key=lambda f: max(p.stat().st_mtime for p in [f, *f.iterdir()])).parent.name
    if not (root / job).is_dir():
        raise ReportError(f"{root / job}: no such job")
    folder = merge_job(out_dir, job, rebuild=True)
    assert folder is not None  # rebuild raises instead
    return folder
