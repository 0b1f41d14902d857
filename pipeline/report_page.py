"""``report.html`` of a labeling job: the summary's figures, charts, the trend of the last jobs, the
review queue; one self-contained file (inline PNG charts) to open from a shared folder."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.page import STYLE, png, pyplot, table


def charts(summary: dict[str, Any], labels: list[str], trend: list[dict[str, Any]]) -> dict[str, str]:
    """Label shares against the training split's, the confidence histogram, and (from two jobs on)
    the trend of drift and low-confidence share."""
    plt = pyplot()
    result = {}
    by_count = sorted(labels, key=lambda label: -summary["label_distribution"][label]["count"])
    shown = labels if len(labels) <= 40 else by_count[:40]
    fig, ax = plt.subplots(figsize=(8, 0.22 * len(shown) + 1.2))
    y = np.arange(len(shown))
    ax.barh(y - 0.2, [summary["label_distribution"][l]["share"] for l in shown], height=0.4, label="this catalog")
    if summary.get("training_label_distribution"):
        ax.barh(y + 0.2, [summary["label_distribution"][l]["training_share"] for l in shown], height=0.4,
                label="training split")
    ax.set_yticks(y, shown, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("share of rows")
    ax.legend(loc="upper right")
    fig.tight_layout()
    result["labels"] = png(fig)

    fig, ax = plt.subplots(figsize=(8, 2.6))
    counts = summary["confidence_histogram"]["counts"]
    ax.bar(np.arange(len(counts)) / len(counts), counts, width=1 / len(counts), align="edge", edgecolor="white")
    ax.set_xlabel("confidence")
    ax.set_ylabel("rows")
    ax.set_xlim(0, 1)
    fig.tight_layout()
    result["confidence"] = png(fig)

    if len(trend) >= 2:
        fig, ax = plt.subplots(figsize=(8, 2.6))
        x = np.arange(len(trend))
        for key, name in (("drift_against_training", "drift vs training"),
                          ("drift_against_previous", "drift vs previous job"),
                          ("low_confidence_share", "low-confidence share")):
            ax.plot(x, [np.nan if e.get(key) is None else e[key] for e in trend], marker="o", label=name)
        ax.set_xticks(x, [e["job"] for e in trend], fontsize=7, rotation=20)
        ax.legend(fontsize=7)
        fig.tight_layout()
        result["trend"] = png(fig)
    return result


def render_html(summary: dict[str, Any], review: pa.Table, labels: list[str], trend: list[dict[str, Any]],
                has_previous: bool, review_rows: int = 50) -> str:
    """The page; ``trend`` is the history's last jobs up to this one, ``has_previous`` whether the
    previous job's report is still there to link to."""
    images = charts(summary, labels, trend)
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
    previous = summary["previous_job"]
    link = (f'Previous job: <a href="../{html.escape(previous)}/report.html">{html.escape(previous)}</a>.'
            if previous and has_previous else f"Previous job: {html.escape(previous or 'none')}.")
    low = summary["low_confidence"]
    trend_rows = [[e["job"], e["written_at"], e["rows"], e["labeled"], e.get("drift_against_training"),
                   e.get("drift_against_previous"), e.get("low_confidence_share"), len(e.get("failed_files", []))]
                  for e in reversed(trend)]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>catalog-tuner labeling report</title>
<style>{STYLE}</style></head><body>
<h1>Labeling report: job {html.escape(summary['job'])}, {html.escape(summary['written_at'])}</h1>
<p>{summary['rows']:,} rows; {summary['labeled']:,} labeled, {summary['kept_earlier_label']:,} kept an
earlier label. Files: {summary['files']['labeled']} labeled, {summary['files']['skipped']} already done,
{len(failed)} failed. Labeled by <code>{html.escape(str(summary['adapter'].get('labeled_by')))}</code>. {flag}.
{link}</p>
{table(["label status", "rows"], [[k, v] for k, v in summary["by_label_status"].items()])}
<p>{low['rows']:,} labels given with a confidence below {low['below']}.</p>
<h2>Drift</h2>
{table(["against", "Jensen-Shannon", "threshold", "verdict", "moved most"], drift_rows) if drift_rows
 else "<p>No reference distribution.</p>"}
<h2>Trend of the last {len(trend)} job(s)</h2>
{f'<img alt="trend" src="{images["trend"]}">' if "trend" in images else ""}
{table(["job", "written", "rows", "labeled", "drift vs training", "drift vs previous", "low-confidence share",
        "failed files"], trend_rows)}
<h2>Label distribution</h2><img alt="label shares" src="{images['labels']}">
<h2>Confidence of the labels given by this job</h2><img alt="confidence histogram" src="{images['confidence']}">
<h2>Changes</h2><p>{summary['changes']['rows']:,} rows changed label.</p>
{table(["move", "rows"], [[k, v] for k, v in summary["changes"]["top_moves"].items()])}
<h2>Review queue (first {min(review_rows, review.num_rows)} of {review.num_rows})</h2>
{table(["id", "name", "label", "confidence", "status", "2nd label", "2nd prob.", "source", "row"],
       [[r["id"], r["name"], r["label"], r["confidence"], r["label_status"], r["top2_label"],
         r["top2_probability"], Path(r["source"]).name, r["row"]] for r in queue], name_column=1)}
<h2>Failed files</h2>
{table(["file", "reason", "rows committed (kept for the rerun)"],
       [[f["file"], f["reason"], f.get("committed_rows")] for f in failed]) if failed else "<p>None.</p>"}
<p>{summary['files'].get('resumed_rows', 0):,} rows resumed from an interrupted run;
{summary['files'].get('failed_rows', 0):,} rows of failed files still to label.</p>
<h2>Tasks</h2>
{table(["shard", "job", "finished", "seconds"], [[t["shard"], t["job"], t["finished_at"], t["seconds"]]
                                                 for t in summary["tasks"]])}
</body></html>
"""
