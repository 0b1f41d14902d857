"""The labeling job's morning report: did last night look normal, and which rows should a person check.

Every ``catalog-tuner label`` job writes, after its last file, ``OUT_DIR/_report/``:

- ``summary.json``: rows, rows labeled when their file was labeled (the others kept an earlier
  label, with ``--only-missing``), rows per ``label_status``, files failed
  with their reasons, throughput, the label distribution of the labeled catalog, a 20-bin
  histogram of the confidences this job gave, label changes (``--only-missing`` and
  ``--in-place`` over labeled rows), the adapter, and **drift**: the Jensen-Shannon divergence
  (base 2) of the label shares against the training split's (``RUN_DIR/label_distribution.json``)
  and against the previous report in this OUT_DIR, the labels that moved most, and
  ``flagged`` above ``label.drift_threshold``;
- ``review_queue.parquet``: the rows to check first (every truncated name, then the lowest
  calibrated confidences below ``label.review_below``), at most ``label.review_max``, with id,
  name, the top three labels and their probabilities (kept from the labeling pass: no row is
  scored twice), and the source file and row;
- ``report.html``: the same, self-contained (inline PNG charts), to open from a shared folder.

The figures come from what was written: each file's statistics are gathered as its batches are
committed (resumed batches are read back) and kept in its manifest, so a file skipped as already
labeled still counts. A Slurm array writes one partial per task (``_report/partial/``); whichever
task completes the set merges them, and a rerun of a failed task merges again. Merged figures
equal one process's: counts add up, and each task keeps its own ``review_max`` lowest rows, among
which the global lowest are.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.spatial.distance import jensenshannon

from pipeline import tracking
from pipeline.atomic import write_atomic, write_json_atomic
from pipeline.config import LabelConfig, Recipe

REPORT_DIR = "_report"
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
        for mine, theirs in ((self.by_status, other.by_status), (self.labels, other.labels),
                             (self.moves, other.moves)):
            _add(mine, theirs)
        self.confidence_histogram = [a + b for a, b in zip(self.confidence_histogram, other.confidence_histogram)]
        self.review = review_order(self.review + other.review)[:review_max]

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> LabelStats:
        return cls(**saved)


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


# --- the job's report ------------------------------------------------------------------------


def write_partial(out_dir: Path, shard: tuple[int, int], stats: LabelStats, failed: list[dict[str, str]],
                  seconds: float, skipped_files: int, labeled_files: int) -> Path:
    """This task's share of the report, where the merging task finds it."""
    index, count = shard
    path = out_dir / REPORT_DIR / "partial" / f"shard-{index}-of-{count}.json"
    write_json_atomic(path, {"shard": f"{index}/{count}", "job": os.environ.get("SLURM_ARRAY_JOB_ID",
                                                                                  os.environ.get("SLURM_JOB_ID")),
                             "finished_at": datetime.now(UTC).isoformat(timespec="seconds"), "seconds": seconds,
                             "files": {"labeled": labeled_files, "skipped": skipped_files, "failed": failed},
                             "stats": asdict(stats)})
    return path


def complete_partials(out_dir: Path, count: int) -> list[dict[str, Any]] | None:
    """Every task's partial for an N-task job, or None while some task has not finished."""
    partials = [out_dir / REPORT_DIR / "partial" / f"shard-{i}-of-{count}.json" for i in range(count)]
    if not all(p.is_file() for p in partials):
        return None
    return [json.loads(p.read_text()) for p in partials]


def merge_partials(partials: list[dict[str, Any]], review_max: int) -> tuple[LabelStats, dict[str, Any]]:
    stats = LabelStats()
    files = {"labeled": 0, "skipped": 0, "failed": []}
    for partial in partials:
        stats.merge(LabelStats.from_dict(partial["stats"]), review_max)
        files["labeled"] += partial["files"]["labeled"]
        files["skipped"] += partial["files"]["skipped"]
        files["failed"] += partial["files"]["failed"]
    return stats, files


def build_summary(stats: LabelStats, files: dict[str, Any], partials: list[dict[str, Any]], labels: list[str],
                  provenance: dict[str, Any], training: dict[str, Any] | None, previous: dict[str, Any] | None,
                  settings: LabelConfig) -> dict[str, Any]:
    task_seconds = sum(p["seconds"] for p in partials)
    summary = {
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": stats.rows, "labeled": stats.labeled, "kept_earlier_label": stats.rows - stats.labeled,
        "by_label_status": stats.by_status, "files": files,
        "tasks": [{k: p[k] for k in ("shard", "job", "finished_at", "seconds")} for p in partials],
        "task_seconds": round(task_seconds, 1),
        "rows_per_task_second": round(stats.labeled / task_seconds, 1) if task_seconds else None,
        "label_distribution": {label: {"count": stats.labels.get(label, 0),
                                       "share": round(float(s), 4)} for label, s in
                               zip(labels, shares(stats.labels, labels))},
        "confidence_histogram": {"bins": HISTOGRAM_BINS, "counts": stats.confidence_histogram},
        "changes": {"rows": stats.changed, "top_moves": dict(Counter(stats.moves).most_common(TOP_MOVES))},
        "review_queue": {"rows": len(stats.review), "max": settings.review_max, "below": settings.review_below},
        "adapter": provenance,
        "training_label_distribution": training,
        "drift": {
            "against_training": drift(stats.labels, training["counts"], labels, settings.drift_threshold)
            if training else None,
            "against_previous_report": drift(stats.labels, {k: v["count"] for k, v in
                                                            previous["label_distribution"].items()},
                                             labels, settings.drift_threshold) if previous else None,
        },
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


def write_report(out_dir: Path, summary: dict[str, Any], review: pa.Table, labels: list[str]) -> Path:
    """``summary.json``, ``review_queue.parquet`` and ``report.html``, each atomically."""
    folder = out_dir / REPORT_DIR
    write_atomic(folder / "review_queue.parquet", lambda tmp: pq.write_table(review, tmp))
    write_atomic(folder / "report.html", lambda tmp: tmp.write_text(render_html(summary, review, labels)))
    write_json_atomic(folder / "summary.json", summary)  # last: its presence says the report is whole
    return folder


def finish_job(out_dir: Path, shard: tuple[int, int], file_stats: list[LabelStats], failed: list[dict[str, str]],
               labeled_files: int, skipped_files: int, seconds: float, labels: list[str], provenance: dict[str, Any],
               run_dir: Path, settings: LabelConfig, recipe: Recipe) -> Path | None:
    """Write this task's partial; if it completes the set, the report. Returns the report folder,
    or None while other tasks of the array are still running."""
    stats = LabelStats()
    for one in file_stats:
        stats.merge(one, settings.review_max)
    write_partial(out_dir, shard, stats, failed, seconds, skipped_files, labeled_files)
    partials = complete_partials(out_dir, shard[1])
    if partials is None:
        return None
    merged, files = merge_partials(partials, settings.review_max)
    training_path, previous_path = run_dir / "label_distribution.json", out_dir / REPORT_DIR / "summary.json"
    training = json.loads(training_path.read_text()) if training_path.is_file() else None
    previous = json.loads(previous_path.read_text()) if previous_path.is_file() else None
    summary = build_summary(merged, files, partials, labels, provenance, training, previous, settings)
    review = review_table(merged.review)
    folder = write_report(out_dir, summary, review, labels)
    tracking.log_label_report(folder, summary, review, recipe)
    return folder


# --- report.html -----------------------------------------------------------------------------


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def charts(summary: dict[str, Any], labels: list[str]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = {}
    by_count = sorted(labels, key=lambda label: -summary["label_distribution"][label]["count"])
    shown = labels if len(labels) <= 40 else by_count[:40]
    fig, ax = plt.subplots(figsize=(8, 0.22 * len(shown) + 1.2))
    y = np.arange(len(shown))
    ax.barh(y - 0.2, [summary["label_distribution"][l]["share"] for l in shown], height=0.4, label="this catalog")
    training = summary.get("training_label_distribution")
    if training:
        reference = shares(training["counts"], labels)
        ax.barh(y + 0.2, [reference[labels.index(l)] for l in shown], height=0.4, label="training split")
    ax.set_yticks(y, shown, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("share of rows")
    ax.legend(loc="upper right")
    fig.tight_layout()
    result["labels"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 2.6))
    counts = summary["confidence_histogram"]["counts"]
    ax.bar(np.arange(len(counts)) / len(counts), counts, width=1 / len(counts), align="edge", edgecolor="white")
    ax.set_xlabel("confidence")
    ax.set_ylabel("rows")
    ax.set_xlim(0, 1)
    fig.tight_layout()
    result["confidence"] = _png(fig)
    plt.close(fig)
    return result


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1100px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
.scroll{max-width:100%;overflow-x:auto}.flag{color:#b00020;font-weight:bold}.ok{color:#1b7f3b}
img{max-width:100%;height:auto}td.name{max-width:420px;overflow-wrap:anywhere}
"""


def _table(header: list[str], rows: list[list[Any]], name_column: int | None = None) -> str:
    def cell(i: int, value: Any) -> str:
        text = html.escape("" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value))
        return f'<td class="name">{text}</td>' if i == name_column else f"<td>{text}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def render_html(summary: dict[str, Any], review: pa.Table, labels: list[str], review_rows: int = 50) -> str:
    images = charts(summary, labels)
    drift_rows = []
    for name, d in summary["drift"].items():
        if isinstance(d, dict):
            moved = ", ".join(f"{m['label']} {m['reference_share']:.1%} -> {m['share']:.1%}"
                              for m in d["moved_most"][:3])
            drift_rows.append([name.replace("_", " "), d["jensen_shannon"], d["threshold"],
                               "FLAGGED" if d["flagged"] else "normal", moved])
    flag = ('<span class="flag">drift flagged</span>' if summary["drift"]["flagged"]
            else '<span class="ok">no drift flagged</span>')
    failed = summary["files"]["failed"]
    queue = review.slice(0, review_rows).to_pylist()
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>catalog-tuner labeling report</title>
<style>{STYLE}</style></head><body>
<h1>Labeling report: {html.escape(summary['written_at'])}</h1>
<p>{summary['rows']:,} rows; {summary['labeled']:,} labeled, {summary['kept_earlier_label']:,} kept an
earlier label. Files: {summary['files']['labeled']} labeled, {summary['files']['skipped']} already done,
{len(failed)} failed. Adapter <code>{html.escape(str(summary['adapter'].get('labeled_by')))}</code>. {flag}.</p>
{_table(["label status", "rows"], [[k, v] for k, v in summary["by_label_status"].items()])}
<h2>Drift</h2>
{_table(["against", "Jensen-Shannon", "threshold", "verdict", "moved most"], drift_rows) if drift_rows
 else "<p>No reference distribution.</p>"}
<h2>Label distribution</h2><img alt="label shares" src="{images['labels']}">
<h2>Confidence of the labels given tonight</h2><img alt="confidence histogram" src="{images['confidence']}">
<h2>Changes</h2><p>{summary['changes']['rows']:,} rows changed label.</p>
{_table(["move", "rows"], [[k, v] for k, v in summary["changes"]["top_moves"].items()])}
<h2>Review queue (first {min(review_rows, review.num_rows)} of {review.num_rows})</h2>
{_table(["id", "name", "label", "confidence", "status", "2nd label", "2nd prob.", "source", "row"],
        [[r["id"], r["name"], r["label"], r["confidence"], r["label_status"], r["top2_label"],
          r["top2_probability"], Path(r["source"]).name, r["row"]] for r in queue], name_column=1)}
<h2>Failed files</h2>
{_table(["file", "reason"], [[f["file"], f["reason"]] for f in failed]) if failed else "<p>None.</p>"}
<h2>Tasks</h2>
{_table(["shard", "job", "finished", "seconds"], [[t["shard"], t["job"], t["finished_at"], t["seconds"]]
                                                  for t in summary["tasks"]])}
</body></html>
"""


# --- the sweep's report ----------------------------------------------------------------------


def sweep_charts(sweep_dir: Path, ranked: list[dict[str, Any]], parameters: list[str], metric: str) -> dict[str, str]:
    """A parallel-coordinates chart (each swept parameter, then the validation metric; one line per
    finished run, coloured by the metric) and every run's training-loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [r for r in ranked if r["status"] == "ok"]
    axes = [*parameters, f"validation_{metric}"]
    result = {}
    if finished and axes:
        fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(axes)), 3.6))
        positions = {}
        for name in axes:  # each axis scaled to [0, 1]; categories spread evenly in sorted order
            values = [r.get(name) for r in finished]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                low, high = min(values), max(values)
                positions[name] = [(v - low) / (high - low) if high > low else 0.5 for v in values]
                labels = [f"{low:.3g}", f"{high:.3g}"]
            else:
                kinds = sorted({str(v) for v in values})
                positions[name] = [kinds.index(str(v)) / max(1, len(kinds) - 1) for v in values]
                labels = [kinds[0], kinds[-1]]
            ax.text(axes.index(name), -0.12, labels[0], ha="center", fontsize=7)
            ax.text(axes.index(name), 1.06, labels[-1], ha="center", fontsize=7)
        scores = positions[axes[-1]]
        colours = plt.cm.viridis(scores)
        for i, run in enumerate(finished):
            ax.plot(range(len(axes)), [positions[a][i] for a in axes], color=colours[i], marker="o", label=run["run"])
        ax.set_xticks(range(len(axes)), axes, fontsize=8, rotation=15)
        ax.set_yticks([])
        ax.set_ylim(-0.2, 1.15)
        for x in range(len(axes)):
            ax.axvline(x, color="grey", linewidth=0.6)
        if len(finished) <= 12:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        result["parallel"] = _png(fig)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for run in ranked:
        log_path = sweep_dir / "runs" / run["run"] / "train_log.json"
        if log_path.is_file():
            points = [(h["step"], h["loss"]) for h in json.loads(log_path.read_text()) if "loss" in h]
            if points:
                ax.plot(*zip(*points), label=run["run"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if ax.lines and len(ax.lines) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    if ax.lines:  # runs shorter than train.logging_steps log no loss
        result["loss"] = _png(fig)
    plt.close(fig)
    return result


def write_sweep_report(sweep_dir: Path, ranked: list[dict[str, Any]], parameters: list[str], metric: str,
                       promoted: dict[str, Any] | None) -> Path:
    """SWEEP_DIR/sweep_report.html: the leaderboard, parameters against the metric, loss curves."""
    images = sweep_charts(sweep_dir, ranked, parameters, metric)
    columns = ["rank", "run", "status", f"validation_{metric}", f"baseline_validation_{metric}",
               f"test_{metric}", "train_runtime_s", *parameters]
    verdict = (f"Promoted <b>{html.escape(promoted['run'])}</b> on validation_{metric} = {promoted['value']:.4f}"
               + (f"; its test {metric}: {promoted['test'][metric]:.4f}" if promoted.get("test") else "")
               if promoted else "No run finished: nothing promoted.")
    parallel = (f'<h2>Parameters against validation {metric}</h2><img alt="parallel coordinates" '
                f'src="{images["parallel"]}">' if "parallel" in images else "")
    title = html.escape(sweep_dir.name)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}: sweep report</title>
<style>{STYLE}</style></head><body>
<h1>Sweep {title}</h1><p>{verdict}. Runs are ranked on validation; test is scored once,
for the promoted run.</p>
<h2>Leaderboard</h2>
{_table(columns, [[r.get(c) for c in columns] for r in ranked])}
{parallel}
<h2>Training loss</h2>{f'<img alt="loss curves" src="{images["loss"]}">' if "loss" in images else
                        "<p>No run logged a loss (runs shorter than train.logging_steps).</p>"}
</body></html>
"""
    path = sweep_dir / "sweep_report.html"
    write_atomic(path, lambda tmp: tmp.write_text(page))
    return path
