"""The sweep's own report, ``SWEEP_DIR/sweep_report.html``: the leaderboard, the swept parameters
against the validation metric, and every run's loss curve. Written by the driver after ranking
(``pipeline.sweep``); W&B holds the same when a site syncs it."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from pipeline.atomic import write_atomic
from pipeline.page import STYLE, png, pyplot, table


def sweep_charts(sweep_dir: Path, ranked: list[dict[str, Any]], parameters: list[str], metric: str) -> dict[str, str]:
    """A parallel-coordinates chart (each swept parameter, then the validation metric; one line per
    finished run, coloured by the metric) and every run's training-loss curve."""
    plt = pyplot()
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
        result["parallel"] = png(fig)
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
        result["loss"] = png(fig)
    else:
        plt.close(fig)
    return result


def write_sweep_report(sweep_dir: Path, ranked: list[dict[str, Any]], parameters: list[str], metric: str,
                       promoted: dict[str, Any] | None) -> Path:
    """SWEEP_DIR/sweep_report.html: the leaderboard, parameters against the metric, loss curves."""
    images = sweep_charts(sweep_dir, ranked, parameters, metric)
    columns = ["rank", "run", "status", "ships", f"validation_{metric}", f"baseline_validation_{metric}",
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
{table(columns, [[r.get(c) for c in columns] for r in ranked])}
{parallel}
<h2>Training loss</h2>{f'<img alt="loss curves" src="{images["loss"]}">' if "loss" in images else
                        "<p>No run logged a loss (runs shorter than train.logging_steps).</p>"}
</body></html>
"""
    path = sweep_dir / "sweep_report.html"
    write_atomic(path, lambda tmp: tmp.write_text(page))
    return path
