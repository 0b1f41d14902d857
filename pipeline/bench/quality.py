"""What a run ships and what it is worth: calibration and evaluation in one record, each
candidate on test, and each candidate's cost on this machine."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.bench.machine import command_line, machine


def bench_quality(run: Path, rescore: bool = True, against: Path | None = None,
                  versus: Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """What ``catalog-tuner calibrate`` then ``evaluate`` on validation and test give, in one record.

    ``rescore=False`` reads what the run's own training wrote (``metrics.json``, ``calibration.json``)
    instead of scoring again: a long run is not calibrated twice (each candidate is still scored on
    test, one adapter pass for them all). ``against``, a department-level
    run, compares the department an aisle-level run implies with that run's own predictions on the
    test rows both scored (paired bootstrap). ``overrides`` (``section.key=value``) change the run's
    recipe for this rescoring, e.g. ``eval.candidates=[lexical,adapter,blend,fused]``."""
    from pipeline import calibrate
    from pipeline.evaluate import evaluate
    from pipeline.predict import run_recipe

    recipe = run_recipe(run, overrides)
    calibrate_s = None
    if rescore:
        start = time.perf_counter()
        calibration = calibrate.fit(run, recipe, progress=False)
        calibrate_s = round(time.perf_counter() - start, 1)
        data_dir = Path(recipe.data.dir)
        for split in ("validation", "test"):
            metrics = evaluate(run, data_dir / f"{split}.parquet", recipe, progress=False)
    else:
        calibration = json.loads((run / "calibration.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())

    def summary(block: dict[str, Any]) -> dict[str, Any]:
        keep = ("predictor", "accuracy", "macro_f1", "n_eval", "adapter", "baseline", "calibration",
                "versus_baseline", "behind_baseline", "eval_products_per_s", "department")
        out = {k: block[k] for k in keep if k in block}
        out["per_label_f1"] = {label: m["f1-score"] for label, m in block["per_label"].items()}
        return out

    result = {"benchmark": "quality", "command": command_line(), "run": str(run), "config": recipe.to_dict(),
              "machine": machine(), "train_steps": metrics.get("train_steps"),
              "calibrate_seconds": calibrate_s,
              "calibration": {k: calibration.get(k) for k in ("shipped", "rule", "candidates", "versus_best", "blend",
                                                               "fused", "temperature", "validation", "n_validation")},
              "validation": summary(metrics["validation"]) if "validation" in metrics else None,  # calibration's own
              "test": summary(metrics["test"])}
    if calibration.get("candidates"):
        result["candidates_on_test"] = candidates_on_test(run, recipe, calibration)
    if versus is not None:
        result["versus_run"] = versus_run(run, versus)
    if recipe.data.label_level != "department" and (run / "predictions_test.parquet").is_file():
        result["department_versus_department_baseline"] = implied_against_department_baseline(
            run / "predictions_test.parquet", Path(recipe.data.dir))
    if against is not None:
        result["department_against_run"] = {"run": str(against), **implied_against_direct(
            run / "predictions_test.parquet", against / "predictions_test.parquet")}
    return result


def candidates_on_test(run: Path, recipe, calibration: dict[str, Any]) -> dict[str, Any]:
    """Every candidate that competed on validation, scored on the test split for the report (the
    choice was made before, on validation); the adapter's pass is the evaluation's own, reused."""
    return score_candidates(run, recipe, calibration, "test", recipe.eval.max_samples)


def score_candidates(run: Path, recipe, calibration: dict[str, Any], split: str, rows: int | None) -> dict[str, Any]:
    """Each candidate of ``calibration`` on the first ``rows`` of DATA_DIR/<split>.parquet, as if
    it shipped (through ``pipeline.shipped``, with its own validation temperature): accuracy,
    macro-F1, ECE and scoring speed here. A candidate's time is the adapter's pass where it needs
    the language model (one pass serves them all) plus its own lexical or fused part; the core
    count is the torch threads where the model runs, one for the lexical model alone."""
    from pipeline import baseline, fused
    from pipeline.data import read_labels, read_split
    from pipeline.metrics import classification_metrics, confidence_report
    from pipeline.predict import Predictor
    from pipeline.shipped import Calibration

    labels = read_labels(run / "labels.json")
    level = recipe.data.label_level
    data_dir = Path(recipe.data.dir)
    frame = read_split(data_dir / f"{split}.parquet", labels, level)
    if rows:
        frame = frame.head(rows)
    names, truth = frame["product_name"].tolist(), frame[level].tolist()
    predictor = Predictor.from_run(run, recipe, calibrated=False)
    adapter = predictor.predict(names, calibrated=False, hidden="fused" in calibration["candidates"])
    fitted = baseline.fitted(data_dir / "train.parquet", read_split(data_dir / "train.parquet", level=level), level)
    index = torch.tensor([labels.index(t) for t in truth])
    out = {}
    for name, figures in calibration["candidates"].items():  # each as if it shipped
        candidate = Calibration(labels, figures["temperature"], figures.get("blend_weight", 0.0), name,
                                lexical=fitted["model"], fused=fused.load(run, labels) if name == "fused" else None)
        prediction = candidate.apply(adapter, candidate.offsets(names))
        seconds = ((adapter.seconds or 0.0) if candidate.needs_adapter else 0.0) + candidate.lexical_seconds
        cores = torch.get_num_threads() if candidate.needs_adapter else 1
        metrics = classification_metrics(truth, prediction.labels, labels)
        out[name] = {"accuracy": round(metrics["accuracy"], 4), "macro_f1": round(metrics["macro_f1"], 4),
                     "ece": confidence_report(prediction.log_probs, index)["ece"], "n_eval": len(truth),
                     "products_per_s": round(len(names) / seconds, 1) if seconds else None, "cores": cores,
                     "core_hours_per_million": round(cores * seconds / len(names) * 1e6 / 3600, 3) if seconds else None,
                     "shipped": name == calibration["shipped"]}
        if predictor.parent is not None:  # an aisle-level run: what it is worth for the department task
            departments = sorted(set(predictor.parent.values()))
            true_departments = [predictor.parent[t] for t in truth]
            # the department of the most probable aisle, as labeling writes it; and, to measure
            # only, the department whose aisles sum to the most probability (may disagree with the aisle)
            department = classification_metrics(true_departments, predictor.parent_prediction(prediction)[0],
                                                departments)
            membership = torch.tensor([[float(predictor.parent[label] == d) for d in departments] for label in labels])
            marginal = [departments[i] for i in (prediction.log_probs.exp() @ membership).argmax(-1).tolist()]
            summed = classification_metrics(true_departments, marginal, departments)
            out[name]["department"] = {"accuracy": round(department["accuracy"], 4),
                                       "macro_f1": round(department["macro_f1"], 4),
                                       "marginal_accuracy": round(summed["accuracy"], 4),
                                       "marginal_macro_f1": round(summed["macro_f1"], 4)}
    return out


def bench_cost(run: Path, products: int, overrides: list[str]) -> dict[str, Any]:
    """What each shippable candidate of a run costs on this machine and what it is worth on
    validation: the first ``products`` validation rows scored by each, timed here (products/s,
    core-hours per million rows), beside the validation figures calibration chose on."""
    from pipeline.predict import run_recipe

    recipe = run_recipe(run, overrides)
    calibration = json.loads((run / "calibration.json").read_text())
    measured = score_candidates(run, recipe, calibration, "validation", products)
    table = {name: {**measured[name], "validation_accuracy_all_rows": figures["accuracy"],
                    "validation_macro_f1_all_rows": figures["macro_f1"]}
             for name, figures in calibration["candidates"].items()}
    return {"benchmark": "cost", "command": command_line(), "run": str(run), "config": recipe.to_dict(),
            "machine": machine(), "shipped": calibration["shipped"], "rule": calibration["rule"],
            "products": products, "candidates": table}


def versus_run(run: Path, other: Path) -> dict[str, Any]:
    """This run's adapter alone against another run's of the same label level, on the rows both
    scored, per split (paired bootstrap of this minus the other): an A/B of two trainings."""
    from pipeline.data import read_labels
    from pipeline.metrics import paired_bootstrap

    labels = read_labels(run / "labels.json")
    level = run_recipe_level(run)
    out = {"run": str(other)}
    for split in ("validation", "test"):
        mine, theirs = (run / f"predictions_{split}.parquet", other / f"predictions_{split}.parquet")
        if not (mine.is_file() and theirs.is_file()):
            continue
        both = pd.read_parquet(mine).merge(pd.read_parquet(theirs)[["product_id", "adapter_predicted"]],
                                           on="product_id", suffixes=("", "_other"))
        out[split] = {"rows": len(both), "adapter_minus_other_adapter": paired_bootstrap(
            both[level].tolist(), both["adapter_predicted"].tolist(), both["adapter_predicted_other"].tolist(),
            labels)}
    return out


def run_recipe_level(run: Path) -> str:
    from pipeline.predict import run_recipe

    return run_recipe(run).data.label_level


def implied_against_direct(aisle_predictions: Path, department_predictions: Path) -> dict[str, Any]:
    """The department an aisle-level run's prediction implies against a department-level run's own
    prediction, on the products both scored (their evaluations may cover different rows)."""
    from pipeline.evaluate import paired_bootstrap

    theirs = pd.read_parquet(department_predictions, columns=["product_id", "predicted"])
    both = pd.read_parquet(aisle_predictions).merge(theirs.rename(columns={"predicted": "predicted_direct"}),
                                                    on="product_id")
    truth, implied, direct = (both[c].tolist() for c in ("department", "predicted_department", "predicted_direct"))
    return {"rows": len(both),
            "implied_accuracy": round(float((both["predicted_department"] == both["department"]).mean()), 4),
            "direct_accuracy": round(float((both["predicted_direct"] == both["department"]).mean()), 4),
            "implied_minus_direct": paired_bootstrap(truth, implied, direct, sorted(set(truth) | set(implied)
                                                                                    | set(direct)))}


def implied_against_department_baseline(aisle_predictions: Path, data_dir: Path) -> dict[str, Any]:
    """The department an aisle-level run's shipped prediction implies against the classical
    baseline fitted for the department task itself (the department-level TF-IDF + SVM on the same
    training rows), on every test row the run scored: the bar a department-task target is set
    against."""
    from pipeline import baseline
    from pipeline.data import read_split
    from pipeline.metrics import paired_bootstrap

    rows = pd.read_parquet(aisle_predictions)
    train_path = data_dir / "train.parquet"
    fitted = baseline.fitted(train_path, read_split(train_path, level="department"), "department")
    direct = [str(d) for d in fitted["model"].predict(rows["product_name"].tolist())]
    truth, implied = rows["department"].tolist(), rows["predicted_department"].tolist()
    labels = sorted(set(truth) | set(implied) | set(direct))
    return {"rows": len(rows),
            "implied_accuracy": round(float((rows["predicted_department"] == rows["department"]).mean()), 4),
            "department_baseline_accuracy": round(float(np.mean([d == t for d, t in zip(direct, truth)])), 4),
            "implied_minus_department_baseline": paired_bootstrap(truth, implied, direct, labels)}
