"""Evaluation of a run on a labelled split: accuracy, macro-F1, per-label report, confusion matrix.

Each split gets its own block in RUN_DIR/metrics.json, named after the split's file
(``validation``, ``test``): runs are compared and chosen on ``validation``; ``test`` is for
reporting the chosen one.

Every figure comes with the majority-class line (always predict the most frequent training
department) and the classical baseline (``pipeline.baseline``: TF-IDF + linear SVM fitted on the
same training split), so a reader sees at once what the adapter adds over guessing and whether it
earns its cost over a cheap text classifier. Where the run ships a calibration
(``pipeline.calibrate``), the block's figures are the shipped predictor's (the blend when kept,
with calibrated confidences), ``adapter`` holds the adapter alone, ``calibration`` the expected
calibration error before and after the temperature, and ``versus_baseline`` the paired bootstrap
interval of each one's difference from the baseline.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import confusion_matrix

from pipeline import baseline
from pipeline.atomic import write_json_atomic
from pipeline.config import Recipe
from pipeline.data import read_labels, read_split
from pipeline.metrics import (
    CONFIDENT,
    ECE_BINS,
    classification_metrics,
    confidence_report,
    expected_calibration_error,
    paired_bootstrap,
)
from pipeline.predict import Predictor, run_recipe
from pipeline.shipped import load_calibration

log = logging.getLogger(__name__)


def majority_baseline(train_departments: pd.Series, truth: list[str], labels: list[str]) -> dict[str, Any]:
    majority = str(train_departments.value_counts().idxmax())
    metrics = classification_metrics(truth, [majority] * len(truth), labels)
    return {"label": majority, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


def baseline_metrics(train_path: Path, train: pd.DataFrame, test: pd.DataFrame, labels: list[str],
                     level: str = "department") -> tuple[dict[str, Any], list[str]]:
    """The classical baseline, fitted on the training split (``train``, read from ``train_path``)
    at the run's label level, scored on the same test rows: its metrics and its predictions."""
    fitted = baseline.fitted(train_path, train, level)
    predicted = [str(p) for p in fitted["model"].predict(test["product_name"].tolist())]
    return {"name": fitted["name"], "c": fitted["c"], "fit_seconds": fitted["fit_seconds"],
            "n_train": fitted["n_train"], **short_metrics(test[level].tolist(), predicted, labels)}, predicted


def short_metrics(truth: list[str], predicted: list[str], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-label F1: how a competitor is summarised beside the main figures."""
    metrics = classification_metrics(truth, predicted, labels)
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            "per_label_f1": {label: m["f1-score"] for label, m in metrics["per_label"].items()}}


def plot_confusion(truth: list[str], predicted: list[str], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = confusion_matrix(truth, predicted, labels=labels, normalize="true")
    fig, ax = plt.subplots(figsize=(0.45 * len(labels) + 3, 0.45 * len(labels) + 2.5))
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (row-normalised)")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(metrics: dict[str, Any], split: str) -> str:
    """The console summary of one split: what the run ships (the lexical model, the adapter or the
    blend, and its ``labeled_by``), the adapter alone, the majority class and the baseline; then
    calibration and the bootstrap intervals."""
    block = metrics[split]
    base = block["majority_class"]
    runtime = metrics.get("train_runtime_s")
    n = str(block["n_eval"])
    rows = [
        (f"{split} split", "accuracy", "macro-F1", "n", "train time"),
        (f"shipped: {block.get('predictor', 'adapter')}", f"{block['accuracy']:.4f}", f"{block['macro_f1']:.4f}",
         n, f"{runtime / 60:.1f} min" if runtime is not None else "-"),
    ]
    if block.get("predictor", "adapter") != "adapter":
        rows.append(("adapter alone", f"{block['adapter']['accuracy']:.4f}", f"{block['adapter']['macro_f1']:.4f}",
                     n, "-"))
    rows.append((f"majority ({base['label']})", f"{base['accuracy']:.4f}", f"{base['macro_f1']:.4f}", n, "-"))
    if "baseline" in block:
        b = block["baseline"]
        rows.append((f"baseline ({b['name']})", f"{b['accuracy']:.4f}", f"{b['macro_f1']:.4f}", n,
                     f"{b['fit_seconds'] / 60:.1f} min"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    if block.get("labeled_by"):
        lines.append(f"labels are written as labeled_by={block['labeled_by']}")
    calibration = block.get("calibration", {})
    if calibration.get("before"):
        before, after = calibration["before"], calibration["after"]
        lines.append(f"calibration: T={calibration['temperature']:.3f}, ECE {before['ece']:.4f} -> {after['ece']:.4f}; "
                     f"confidence >= {CONFIDENT}: {after['confident_share']:.1%} of rows, "
                     f"accuracy {after['confident_accuracy'] or 0:.4f}")
    for name, difference in block.get("versus_baseline", {}).items():
        lines.append(f"{name} - baseline (95% paired bootstrap): " + ", ".join(
            f"{measure} {d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
            for measure, d in difference.items()))
    if "department" in block:
        implied, base_department = block["department"], block.get("baseline", {}).get("department")
        lines.append(f"department implied by the {block['label_level']}: accuracy {implied['accuracy']:.4f}, "
                     f"macro-F1 {implied['macro_f1']:.4f}" + (
                         f" (baseline's {block['label_level']} mapped the same way: "
                         f"{base_department['accuracy']:.4f} / {base_department['macro_f1']:.4f})"
                         if base_department else ""))
    if block.get("behind_baseline") is not None:
        lines.append(f"departments where the baseline's F1 is higher: {', '.join(block['behind_baseline']) or 'none'}")
    return "\n".join(lines)


def format_per_label(block: dict[str, Any]) -> str:
    """Per-department precision / recall / F1 of one split's block, worst F1 first."""
    rows = sorted(block["per_label"].items(), key=lambda item: item[1]["f1-score"])
    width = max(len(label) for label, _ in rows)
    base = block.get("baseline", {}).get("per_label_f1", {})
    lines = [f"{'department'.ljust(width)}  precision  recall  f1      support" + ("  baseline f1" if base else "")]
    lines += [f"{label.ljust(width)}  {m['precision']:<9.3f}  {m['recall']:<6.3f}  {m['f1-score']:<6.3f}  "
              f"{int(m['support']):<7}" + (f"  {base.get(label, 0.0):.3f}" if base else "") for label, m in rows]
    return "\n".join(lines)


def plot_reliability(before: torch.Tensor, after: torch.Tensor, truth: torch.Tensor, path: Path,
                     title: str) -> None:
    """Reliability diagram: accuracy against confidence per bin, before and after calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(0, 1, ECE_BINS + 1)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    for log_probs, name in ((before, "before"), (after, "after")):
        confidence, predicted = log_probs.exp().max(-1)
        correct = (predicted == truth).numpy()
        which = np.clip(np.digitize(confidence.numpy(), edges[1:-1], right=True), 0, ECE_BINS - 1)
        used = [b for b in range(ECE_BINS) if (which == b).any()]
        ece = expected_calibration_error(confidence.numpy(), correct)
        ax.plot([confidence.numpy()[which == b].mean() for b in used], [correct[which == b].mean() for b in used],
                marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(run_dir: str | Path, data_path: str | Path | None = None, recipe: Recipe | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Score a labelled split with the run's adapter; record it as the block of RUN_DIR/metrics.json
    named after the split file (``test`` by default), with the split's predictions and confusion matrix."""
    run = Path(run_dir)
    recipe = recipe or run_recipe(run)
    labels = read_labels(run / "labels.json")
    level = recipe.data.label_level
    data_path = Path(data_path) if data_path else Path(recipe.data.dir) / "test.parquet"
    split = data_path.stem
    rows = read_split(data_path, labels, level)
    if recipe.eval.max_samples:
        rows = rows.head(recipe.eval.max_samples)
    train_path = data_path.with_name("train.parquet")
    train = read_split(train_path, level=level) if train_path.is_file() else None
    train_targets = train[level] if train is not None else rows[level]

    # The adapter is scored whatever ships, so that the table shows what it adds; the shipped
    # scores are the calibration's candidate over the same rows.
    predictor = Predictor.from_run(run, recipe, calibrated=False)
    calibration = load_calibration(run, labels)
    names = rows["product_name"].tolist()
    adapter = predictor.predict(names, progress, calibrated=False,  # calibration's, when it scored these rows
                                hidden=bool(calibration and calibration.needs_hidden))
    start = time.perf_counter()
    offsets = calibration.offsets(names) if calibration else None
    shipped = calibration.apply(adapter, offsets) if calibration else adapter
    seconds = (adapter.seconds if not calibration or calibration.needs_adapter else 0.0) + (
        time.perf_counter() - start)

    truth = rows[level].tolist()
    block = classification_metrics(truth, shipped.labels, labels)
    block.update(
        eval_data=str(data_path),
        label_level=level,
        predictor=calibration.shipped if calibration else "adapter",
        labeled_by=predictor.identity["labeled_by"],
        scorer=predictor.scorer,
        eval_runtime_s=round(seconds, 2),
        eval_products_per_s=round(len(truth) / seconds, 1),
        majority_class=majority_baseline(train_targets, truth, labels),
    )
    truth_index = torch.tensor([labels.index(d) for d in truth])
    if calibration:
        block["adapter"] = short_metrics(truth, adapter.labels, labels)
        uncalibrated = calibration.blended(adapter.log_probs, offsets, adapter.hidden).log_softmax(-1)
        block["calibration"] = {"temperature": calibration.temperature,
                                "before": confidence_report(uncalibrated, truth_index),
                                "after": confidence_report(shipped.log_probs, truth_index)}
        plot_reliability(uncalibrated, shipped.log_probs, truth_index, run / f"calibration_{split}.png",
                                   f"{run.name}: {split} ({len(truth)} rows)")
    else:
        block["calibration"] = {"temperature": None,
                                "after": confidence_report(adapter.log_probs, truth_index)}
    if recipe.eval.baseline and train is not None:
        block["baseline"], baseline_predicted = baseline_metrics(train_path, train, rows, labels, level)
        block["versus_baseline"] = {"shipped": paired_bootstrap(truth, shipped.labels, baseline_predicted, labels)}
        if calibration:
            block["versus_baseline"]["adapter"] = paired_bootstrap(truth, adapter.labels, baseline_predicted, labels)
        block["behind_baseline"] = sorted(
            label for label, m in block["per_label"].items()
            if m["f1-score"] < block["baseline"]["per_label_f1"].get(label, 0.0))
    columns = {"predicted": shipped.labels, "confidence": shipped.confidences,
               "adapter_predicted": adapter.labels, "adapter_confidence": adapter.confidences}
    if predictor.parent is not None:  # an aisle-level run: the department its aisle implies
        implied, columns["predicted_department_confidence"] = predictor.parent_prediction(shipped)
        columns["predicted_department"] = implied
        departments = sorted(set(predictor.parent.values()))
        block["department"] = {"implied_by": level, **short_metrics(rows["department"].tolist(), implied, departments)}
        if "baseline" in block:
            block["baseline"]["department"] = short_metrics(
                rows["department"].tolist(), [predictor.parent[p] for p in baseline_predicted], departments)
    plot_confusion(truth, shipped.labels, labels, run / f"confusion_matrix_{split}.png")
    rows.assign(**columns).to_parquet(run / f"predictions_{split}.parquet", index=False)

    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics[split] = block
    write_json_atomic(metrics_path, metrics)
    return metrics
