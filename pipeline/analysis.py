"""Error analysis: why a run scores what it scores (the benchmarks in ``pipeline.bench`` say how fast).

``python -m pipeline.analysis errors --run RUN_DIR [--train-samples N]``
    where a finished run's test predictions (the adapter's own, before any blend) and the
    classical baseline's agree and differ (both right, only one right, neither), how often
    products whose names repeat between train and test carry the same department, how many rows
    of each kind a rare, telling training word decides, and how well the model fits its own
    training rows. What the two score together is the run's blend (``pipeline.calibrate``),
    chosen on validation and reported by ``evaluate``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import baseline
from pipeline.bench.machine import machine
from pipeline.data import read_split
from pipeline.predict import Predictor, run_recipe


def normalized_name(name: str) -> str:
    """Lower-case letters and single spaces: "Organic Whole Milk, 1 gal" and "organic whole milk gal"
    are one product name for the repeated-names count."""
    return " ".join("".join(c if c.isalpha() else " " for c in name.lower()).split())


def telling_words(train: pd.DataFrame, max_names: int = 20, min_purity: float = 0.9) -> dict[str, str]:
    """Words in at most ``max_names`` training names, at least ``min_purity`` of them in one
    department, mapped to that department.

    Such a word (a brand, mostly) is per-word memory that a TF-IDF model stores in one weight
    each and a low-rank adapter has to squeeze through shared matrices; counting the test rows
    where one names the truth tells how much of the baseline's lead that memory can explain.
    """
    departments: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for name, department in zip(train["product_name"], train["department"]):
        for word in set(normalized_name(name).split()):
            departments[word][department] += 1
    telling = {}
    for word, counts in departments.items():
        total = sum(counts.values())
        department, count = counts.most_common(1)[0]
        if total <= max_names and count >= min_purity * total:
            telling[word] = department
    return telling


def analyze_errors(run: Path, train_samples: int = 0) -> dict[str, Any]:
    """Where a finished run's test predictions and the classical baseline's agree and differ."""
    recipe = run_recipe(run)
    predictions = pd.read_parquet(run / "predictions_test.parquet")
    data_dir = Path(recipe.data.dir)
    train = read_split(data_dir / "train.parquet")
    svm = baseline.fitted(data_dir / "train.parquet", train)["model"]
    truth = predictions["department"].to_numpy()
    adapter = "adapter_predicted" if "adapter_predicted" in predictions else "predicted"  # before the blend
    model_right = predictions[adapter].to_numpy() == truth
    baseline_right = svm.predict(predictions["product_name"].tolist()) == truth

    def share(mask) -> float | None:
        return round(float(mask.mean()), 4) if mask.size else None

    # each normalised name's most frequent training department (the first by name on a tie)
    counts = train.assign(key=train["product_name"].map(normalized_name)).groupby(["key", "department"]).size()
    usual = (counts.rename("n").reset_index().sort_values(["key", "n", "department"], ascending=[True, False, True])
             .drop_duplicates("key").set_index("key")["department"])
    keys = predictions["product_name"].map(normalized_name)
    repeated = keys.isin(usual.index).to_numpy()
    max_names, min_purity = 20, 0.9
    telling = telling_words(train, max_names, min_purity)
    told_truth = np.array([any(telling.get(word) == department for word in key.split())
                           for key, department in zip(keys, truth)], dtype=bool)
    cells = {"both_right": model_right & baseline_right, "model_only_right": model_right & ~baseline_right,
             "baseline_only_right": ~model_right & baseline_right, "neither_right": ~model_right & ~baseline_right}
    result: dict[str, Any] = {
        "benchmark": "errors",
        "command": "python -m pipeline.analysis " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["errors"] else None,
        "run": str(run),
        "config": recipe.to_dict(),
        "machine": machine(),
        "test_products": len(truth),
        "model_accuracy": share(model_right),
        "baseline_accuracy": share(baseline_right),
        **{cell: share(mask) for cell, mask in cells.items()},
        "either_right": share(model_right | baseline_right),
        "repeated_names": {
            "test_products": int(repeated.sum()),
            "same_department_as_train": share(usual.reindex(keys[repeated]).to_numpy() == truth[repeated]),
            "model_accuracy": share(model_right[repeated]),
        },
        "telling_word_names_the_truth": {
            "rule": f"a word in at most {max_names} training names, "
                    f"at least {min_purity:.0%} of them in one department",
            **{cell: {"rows": int(mask.sum()), "told": int((mask & told_truth).sum())} for cell, mask in cells.items()},
        },
    }
    if train_samples:
        rows = train.head(train_samples)
        names, departments = rows["product_name"].tolist(), rows["department"].to_numpy()
        predicted = Predictor.from_run(run, recipe).predict(names, progress=True, calibrated=False).labels
        result["train_fit"] = {
            "train_products": len(rows),
            "model_accuracy": share(pd.Series(predicted).to_numpy() == departments),
            "baseline_accuracy": share(svm.predict(names) == departments),
        }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.analysis")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("errors", help="split a run's test rows between model and baseline")
    p.add_argument("--run", required=True, help="a run directory that has been evaluated")
    p.add_argument("--train-samples", type=int, default=0, help="also score the first N training products")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(json.dumps(analyze_errors(Path(args.run), args.train_samples)))


if __name__ == "__main__":
    main()
