"""Experiment tracking: W&B when installed and enabled, offline unless the user says otherwise.

Compute nodes rarely reach the internet, so runs are written offline under the run directory
and synced later from a login node (``wandb sync RUN_DIR/wandb/offline-run-*``).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pipeline.config import Recipe, TrackingConfig

log = logging.getLogger(__name__)

Logged = TypeVar("Logged")


def best_effort(log_to_wandb: Callable[..., Logged]) -> Callable[..., Logged | None]:
    """W&B is a copy of what the job already wrote to disk (leaderboard, reports): a failing W&B
    call logs a warning and returns None, and never fails the sweep or the labeling."""
    @functools.wraps(log_to_wandb)
    def guarded(*args: Any, **kwargs: Any) -> Logged | None:
        try:
            return log_to_wandb(*args, **kwargs)
        except Exception as exc:
            log.warning("W&B %s failed (%s); the files on disk are complete", log_to_wandb.__name__, exc)
            return None
    return guarded


def report_to(recipe: Recipe, run_dir: Path) -> list[str]:
    """Configure W&B through its environment variables and return the Trainer's ``report_to``."""
    if not recipe.tracking.wandb:
        return []
    if importlib.util.find_spec("wandb") is None:
        log.warning("tracking.wandb is on but wandb is not installed (pip install 'catalog-tuner[wandb]'); not logging")
        return []
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_PROJECT", recipe.tracking.project)
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    if recipe.tracking.group:
        os.environ.setdefault("WANDB_RUN_GROUP", recipe.tracking.group)
    os.environ.setdefault("WANDB_JOB_TYPE", "train")
    return ["wandb"]


def log_final_metrics(metrics: dict[str, Any], recipe: Recipe) -> None:
    """Add the resolved recipe and the evaluation's figures to the W&B run, then close it.

    The Trainer logs training only; the sweep dashboard ranks on validation accuracy.
    """
    if "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is None:
        return
    wandb.run.config.update({"recipe": recipe.to_dict()}, allow_val_change=True)
    summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    for split, block in metrics.items():  # "validation/accuracy", "test/baseline_macro_f1", ...
        if isinstance(block, dict) and "accuracy" in block:
            summary.update({f"{split}/{k}": block[k] for k in ("accuracy", "macro_f1", "n_eval")})
            if "baseline" in block:
                summary.update({f"{split}/baseline_{k}": block["baseline"][k] for k in ("accuracy", "macro_f1")})
    wandb.run.summary.update(summary)
    wandb.finish()


@best_effort
def log_sweep_summary(sweep_dir: Path, group: str, project: str, ranked: list[dict[str, Any]],
                      parameters: list[str], metric: str) -> Path | None:
    """One W&B run of ``job_type=sweep-summary`` in the sweep's group: a table of every configuration
    with its figures, beside the group's training runs (whose configs and summaries feed W&B's
    parallel-coordinates and parameter-importance panels once synced). Offline unless WANDB_MODE
    says otherwise; returns the run's folder, or None without wandb."""
    if importlib.util.find_spec("wandb") is None:
        return None
    import wandb

    columns = ["rank", "run", "status", f"validation_{metric}", f"baseline_validation_{metric}", f"test_{metric}",
               "train_runtime_s", *parameters]
    run = wandb.init(project=project, group=group, job_type="sweep-summary", name=f"{group}-summary",
                     dir=str(sweep_dir), mode=os.environ.get("WANDB_MODE", "offline"),
                     config={"parameters": parameters, "metric": f"validation_{metric}"})
    run.log({"leaderboard": wandb.Table(columns=columns, data=[[str(r.get(c)) if c in parameters else r.get(c)
                                                                 for c in columns] for r in ranked])})
    best = next((r for r in ranked if r["status"] == "ok"), None)
    if best:
        run.summary.update({"promoted": best["run"], f"validation_{metric}": best[f"validation_{metric}"]})
    folder = Path(run.dir).parent if run.dir else None
    run.finish()
    return folder


@best_effort
def log_label_report(report_dir: Path, summary: dict[str, Any], review: Any,
                     settings: TrackingConfig) -> Path | None:
    """The labeling report as one W&B run (``job_type=label``) when the adapter's recipe tracks to
    W&B (``settings``: its ``tracking`` section) and wandb is installed: the summary's figures, the
    confidence histogram, the label distribution and the review queue as tables.
    Offline unless WANDB_MODE says otherwise."""
    if not settings.wandb or importlib.util.find_spec("wandb") is None:
        return None
    import numpy as np
    import wandb

    run = wandb.init(project=settings.project, group=settings.group, job_type="label",
                     dir=str(report_dir), mode=os.environ.get("WANDB_MODE", "offline"),
                     config={"adapter": summary["adapter"].get("labeled_by")})
    counts = summary["confidence_histogram"]["counts"]
    run.log({
        "confidence": wandb.Histogram(np_histogram=(np.array(counts), np.linspace(0, 1, len(counts) + 1))),
        "label_distribution": wandb.Table(columns=["label", "count", "share"], data=[
            [label, v["count"], v["share"]] for label, v in summary["label_distribution"].items()]),
        "review_queue": wandb.Table(dataframe=review.to_pandas()),
    })
    drift = summary["drift"]
    run.summary.update({"rows": summary["rows"], "labeled": summary["labeled"], "drift_flagged": drift["flagged"],
                        **{f"{k}/{s}": v for s, d in drift.items() if isinstance(d, dict)
                           for k, v in (("jensen_shannon", d["jensen_shannon"]),)}})
    folder = Path(run.dir).parent if run.dir else None
    run.finish()
    return folder
