"""Evaluation of a run on a labelled split: accuracy, macro-F1, per-label report, confusion matrix.

Each split gets its own block in RUN_DIR/metrics.json, named after the split's file
(``validation``, ``test``): runs are compared and chosen on ``validation``; ``test`` is for
reporting the chosen one.

Every figure comes with the majority-class line (always predict the most frequent training
department) and the classical baseline (``pipeline.baseline``: TF-IDF + linear SVM fitted on the
same training split), so a reader sees at once what the adapter adds over guessing and whether it
earns its cost over a cheap text classifier.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

from pipeline import baseline
from pipeline.config import Recipe
from pipeline.data import read_labels, read_split
from pipeline.predict import Predictor, run_recipe

log = logging.getLogger(__name__)


def classification_metrics(truth: list[str], predicted: list[str], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 over the labels present in truth or predictions, and per-label P/R/F1."""
    present = [l for l in labels if l in set(truth) | set(predicted)]
    report = classification_report(truth, predicted, labels=present, output_dict=True, zero_division=0)
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, labels=present, average="macro", zero_division=0)),
        "n_eval": len(truth),
        "per_label": {
            l: {k: round(float(report[l][k]), 4) for k in ("precision", "recall", "f1-score", "support")}
            for l in present
        },
    }


def majority_baseline(train_departments: pd.Series, truth: list[str], labels: list[str]) -> dict[str, Any]:
    majority = str(train_departments.value_counts().idxmax())
    metrics = classification_metrics(truth, [majority] * len(truth), labels)
    return {"label": majority, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


def baseline_metrics(train_path: Path, train: pd.DataFrame, test: pd.DataFrame, labels: list[str]) -> dict[str, Any]:
    """The classical baseline, fitted on the training split (``train``, read from ``train_path``),
    scored on the same test rows."""
    fitted = baseline.fitted(train_path, train)
    predicted = [str(p) for p in fitted["model"].predict(test["product_name"].tolist())]
    metrics = classification_metrics(test["department"].tolist(), predicted, labels)
    return {"name": fitted["name"], "c": fitted["c"], "fit_seconds": fitted["fit_seconds"],
            "n_train": fitted["n_train"], "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
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
    """The console summary of one split: the adapter against the majority class and the baseline."""
    block = metrics[split]
    base = block["majority_class"]
    runtime = metrics.get("train_runtime_s")
    n = str(block["n_eval"])
    rows = [
        (f"{split} split", "accuracy", "macro-F1", "n", "train time"),
        ("adapter", f"{block['accuracy']:.4f}", f"{block['macro_f1']:.4f}", n,
         f"{runtime / 60:.1f} min" if runtime is not None else "-"),
        (f"majority ({base['label']})", f"{base['accuracy']:.4f}", f"{base['macro_f1']:.4f}", n, "-"),
    ]
    if "baseline" in block:
        b = block["baseline"]
        rows.append((f"baseline ({b['name']})", f"{b['accuracy']:.4f}", f"{b['macro_f1']:.4f}", n,
                     f"{b['fit_seconds'] / 60:.1f} min"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def format_per_label(block: dict[str, Any]) -> str:
    """Per-department precision / recall / F1 of one split's block, worst F1 first."""
    rows = sorted(block["per_label"].items(), key=lambda item: item[1]["f1-score"])
    width = max(len(label) for label, _ in rows)
    base = block.get("baseline", {}).get("per_label_f1", {})
    lines = [f"{'department'.ljust(width)}  precision  recall  f1      support" + ("  baseline f1" if base else "")]
    lines += [f"{label.ljust(width)}  {m['precision']:<9.3f}  {m['recall']:<6.3f}  {m['f1-score']:<6.3f}  "
              f"{int(m['support']):<7}" + (f"  {base.get(label, 0.0):.3f}" if base else "") for label, m in rows]
    return "\n".join(lines)


def evaluate(run_dir: str | Path, data_path: str | Path | None = None, recipe: Recipe | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Score a labelled split with the run's adapter; record it as the block of RUN_DIR/metrics.json
    named after the split file (``test`` by default), with the split's predictions and confusion matrix."""
    run = Path(run_dir)
    recipe = recipe or run_recipe(run)
    labels = read_labels(run / "labels.json")
    data_path = Path(data_path) if data_path else Path(recipe.data.dir) / "test.parquet"
    split = data_path.stem
    rows = read_split(data_path, labels)
    if recipe.eval.max_samples:
        rows = rows.head(recipe.eval.max_samples)
    train_path = data_path.with_name("train.parquet")
    train = read_split(train_path) if train_path.is_file() else None
    train_departments = train["department"] if train is not None else rows["department"]

    predictor = Predictor.from_run(run, recipe)
    start = time.perf_counter()
    prediction = predictor.predict(rows["product_name"].tolist(), progress)
    seconds = time.perf_counter() - start

    truth = rows["department"].tolist()
    block = classification_metrics(truth, prediction.labels, labels)
    block.update(
        eval_data=str(data_path),
        scorer=predictor.scorer,
        eval_runtime_s=round(seconds, 2),
        eval_products_per_s=round(len(truth) / seconds, 1),
        majority_class=majority_baseline(train_departments, truth, labels),
    )
    if recipe.eval.baseline and train is not None:
        block["baseline"] = baseline_metrics(train_path, train, rows, labels)
    plot_confusion(truth, prediction.labels, labels, run / f"confusion_matrix_{split}.png")
    rows.assign(predicted=prediction.labels, confidence=prediction.confidences).to_parquet(
        run / f"predictions_{split}.parquet", index=False
    )

    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics[split] = block
    metrics_path.write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics
