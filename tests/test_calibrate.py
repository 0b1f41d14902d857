"""Calibration and the blend, fitted on validation only; the paired bootstrap; no pickle in run folders."""

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from pipeline import baseline, calibrate
from pipeline.evaluate import evaluate, format_table
from pipeline.label import label_catalogs
from pipeline.metrics import confidence_report, expected_calibration_error, paired_bootstrap
from pipeline.predict import Predictor, run_identity, run_recipe
from pipeline.shipped import CALIBRATION_FILE, load_calibration, model_sha256


def overconfident_case(rows: int = 4000, labels: int = 8, sharpen: float = 4.0, seed: int = 0):
    """Labels drawn from softmax(logits); the scores handed out are the logits x ``sharpen``."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, labels, generator=generator) * 1.5
    truth = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
    return logits * sharpen, truth


def test_the_temperature_undoes_overconfidence_and_lowers_nll():
    scores, truth = overconfident_case()
    before = confidence_report(scores.log_softmax(-1), truth)
    temperature = calibrate.fit_temperature(scores, truth)
    after = confidence_report((scores / temperature).log_softmax(-1), truth)
    assert temperature == pytest.approx(4.0, rel=0.15)
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"] / 3


def test_expected_calibration_error_by_hand():
    confidences = np.array([0.95, 0.95, 0.95, 0.95, 0.35, 0.35])
    correct = np.array([1, 1, 1, 0, 1, 0])
    # bin of 0.95: accuracy 0.75, gap 0.2, share 4/6; bin of 0.35: accuracy 0.5, gap 0.15, share 2/6
    assert expected_calibration_error(confidences, correct) == pytest.approx(0.2 * 4 / 6 + 0.15 * 2 / 6)


def test_the_blend_weight_is_chosen_on_validation():
    truth = torch.arange(300) % 5
    right = torch.nn.functional.one_hot(truth, 5).float() * 3
    noise = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    weight, grid = calibrate.choose_blend(noise.log_softmax(-1), right, truth)
    best = max(g["accuracy"] for g in grid.values())
    assert weight > 0 and grid[str(weight)]["accuracy"] == best > grid["0.0"]["accuracy"]


LABELS = ["a", "b", "c", "d", "e"]


def right_on(truth: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Scores whose top label is the truth where ``right``, the next label elsewhere."""
    return torch.nn.functional.one_hot(torch.where(right, truth, (truth + 1) % 5), 5).float() * 4


def test_every_candidate_competes_on_validation_and_the_cheapest_wins_a_tie():
    truth = torch.arange(400) % 5
    rows = torch.arange(400)
    # the lexical model alone is best, clearly: it ships
    shipped, rule, versus = calibrate.choose_candidate(
        {"lexical": right_on(truth, rows % 20 != 0), "adapter": right_on(truth, rows % 5 < 3),
         "blend": right_on(truth, rows % 5 < 4)}, truth, LABELS)
    assert shipped == "lexical" and rule.startswith("lexical: the best validation accuracy")
    assert versus["blend"]["accuracy"]["low"] > 0 and versus["adapter"]["accuracy"]["low"] > 0
    # the blend is best beyond the interval of both cheaper ones: it ships
    shipped, rule, versus = calibrate.choose_candidate(
        {"lexical": right_on(truth, rows % 10 < 7), "adapter": right_on(truth, rows % 10 < 6),
         "blend": right_on(truth, rows % 10 < 9)}, truth, LABELS)
    assert shipped == "blend" and "no cheaper candidate within" in rule and versus["lexical"]["accuracy"]["low"] > 0
    # the blend is ahead by two rows of 400: a tie, and the cheapest of the tied ships
    blend = rows % 10 < 9
    lexical = blend.clone()
    lexical[:2] = False
    shipped, rule, versus = calibrate.choose_candidate(
        {"lexical": right_on(truth, lexical), "adapter": right_on(truth, rows % 10 < 5),
         "blend": right_on(truth, blend)}, truth, LABELS)
    assert shipped == "lexical" and "within the 95% paired-bootstrap interval of blend's" in rule
    assert versus["lexical"]["accuracy"]["low"] <= 0 < versus["lexical"]["accuracy"]["difference"]


def test_paired_bootstrap_matches_the_point_figures_and_brackets_them():
    rng = np.random.default_rng(1)
    labels = ["a", "b", "c", "d"]
    truth = list(rng.choice(labels, 2000))
    theirs = [t if rng.random() < 0.7 else str(rng.choice(labels)) for t in truth]
    ours = [t if rng.random() < 0.85 else str(rng.choice(labels)) for t in truth]
    result = paired_bootstrap(truth, ours, theirs, labels, resamples=400)
    expected = accuracy_score(truth, ours) - accuracy_score(truth, theirs)
    assert result["accuracy"]["difference"] == pytest.approx(expected, abs=1e-4)
    expected_f1 = (f1_score(truth, ours, labels=labels, average="macro")
                   - f1_score(truth, theirs, labels=labels, average="macro"))
    assert result["macro_f1"]["difference"] == pytest.approx(expected_f1, abs=1e-4)
    for measure in ("accuracy", "macro_f1"):
        low, high = result[measure]["low"], result[measure]["high"]
        assert 0 < low < result[measure]["difference"] < high
    same = paired_bootstrap(truth, ours, ours, labels, resamples=50)
    assert same["accuracy"] == {"difference": 0.0, "low": 0.0, "high": 0.0}


def test_calibration_is_fitted_on_validation_and_recorded(calibrated_run, data_dir):
    run, result = calibrated_run
    saved = json.loads((run / CALIBRATION_FILE).read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["fitted_on"].endswith("validation.parquet") and saved["n_validation"] == 300
    assert saved["temperature"] > 0
    assert saved["validation"]["shipped"]["nll"] <= saved["validation"]["shipped_before_temperature"]["nll"]
    # a barely trained adapter: the lexical model carries it, and the record says what justified it
    grid = saved["blend"]["weights_tried"]
    assert saved["blend"]["kept"] and grid[str(saved["blend"]["weight"])]["accuracy"] > grid["0.0"]["accuracy"]


def test_the_lexical_model_round_trips_through_the_run_directory(calibrated_run, data_dir):
    run, _ = calibrated_run
    names = pd.read_parquet(data_dir / "test.parquet")["product_name"].head(100).tolist()
    labels = json.loads((run / "labels.json").read_text())
    fitted = baseline.fitted(data_dir / "train.parquet", pd.read_parquet(data_dir / "train.parquet"))
    loaded = load_calibration(run, labels)
    assert np.array_equal(baseline.decision_matrix(loaded.lexical, names, labels),
                          baseline.decision_matrix(fitted["model"], names, labels))


def test_evaluate_and_label_ship_the_blend(calibrated_run, data_dir, tmp_path):
    run, result = calibrated_run
    fp32 = ["eval.dtype=float32"]  # evaluation and labeling batch rows differently: equal to 1e-5 in fp32
    metrics = evaluate(run, data_dir / "test.parquet", run_recipe(run, ["eval.max_samples=120", *fp32]),
                       progress=False)
    block = metrics["test"]
    assert block["predictor"] == "blend" and "adapter" in block and block["calibration"]["temperature"] > 0
    difference = block["versus_baseline"]["shipped"]["accuracy"]
    assert difference["low"] <= difference["difference"] <= difference["high"]
    assert (run / "calibration_test.png").stat().st_size > 0

    predictions = pd.read_parquet(run / "predictions_test.parquet")
    catalog = tmp_path / "catalog.parquet"
    pq.write_table(pa.table({"product_id": predictions["product_id"], "product_name": predictions["product_name"]}),
                   catalog)
    label_catalogs(run, [str(catalog)], tmp_path / "labeled", batch_size=32, progress=False, overrides=fp32)
    labeled = pd.read_parquet(tmp_path / "labeled" / "catalog.parquet")
    identity = run_identity(run)
    assert "+lexical@" in identity["labeled_by"] and (labeled["labeled_by"] == identity["labeled_by"]).all()
    assert identity["lexical_sha256"] == result["blend"]["lexical"]["sha256"]
    assert labeled["department"].tolist() == predictions["predicted"].tolist()
    assert labeled["department_confidence"].to_numpy() == pytest.approx(predictions["confidence"].to_numpy(),
                                                                         abs=1e-5)
    manifest = json.loads(next((tmp_path / "labeled").glob("_manifest*/*.json")).read_text())
    assert manifest["calibration"]["temperature"] == pytest.approx(result["temperature"])
    assert manifest["calibration"]["blend_weight"] == result["blend"]["weight"]


def test_a_run_that_ships_the_lexical_model_labels_without_the_language_model(calibrated_run, data_dir, tmp_path,
                                                                              monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(calibrated_run[0], run)
    result = calibrate.fit(run, run_recipe(run, ["eval.max_samples=300", "eval.candidates=[lexical,adapter]"]),
                           progress=False)
    assert result["shipped"] == "lexical" and result["rule"].startswith("lexical: the best validation accuracy")
    for figures in result["candidates"].values():  # each with its own temperature, ECE and speed
        assert figures["temperature"] > 0 and 0 <= figures["ece"] <= 1 and figures["products_per_s"] > 0
    assert result["temperature"] == result["candidates"]["lexical"]["temperature"]
    identity = run_identity(run)
    assert identity["labeled_by"] == f"lexical@{model_sha256(run, 'lexical')[:12]}"

    test = pd.read_parquet(data_dir / "test.parquet").head(200)
    catalog = tmp_path / "catalog.parquet"
    pq.write_table(pa.table({"product_id": test["product_id"], "product_name": [*test["product_name"][:-1], "  "]}),
                   catalog)
    import pipeline.predict as predict_module

    with monkeypatch.context() as patch:
        patch.setattr(predict_module, "merged_model", lambda *a, **k: pytest.fail("the language model was loaded"))
        label_catalogs(run, [str(catalog)], tmp_path / "labeled", progress=False)
    labeled = pd.read_parquet(tmp_path / "labeled" / "catalog.parquet")
    assert (labeled["labeled_by"] == identity["labeled_by"]).all()
    lexical = load_calibration(run, json.loads((run / "labels.json").read_text())).lexical
    assert labeled["department"].tolist()[:-1] == [str(p) for p in lexical.predict(test["product_name"][:-1].tolist())]
    assert labeled["label_status"].tolist()[-1] == "empty_name" and labeled["department"].isna().tolist()[-1]
    manifest = json.loads(next((tmp_path / "labeled").glob("_manifest*/*.json")).read_text())
    assert manifest["scorer"] == "lexical" and manifest["calibration"]["shipped"] == "lexical"
    report = json.loads((tmp_path / "labeled" / "_report" / "latest" / "summary.json").read_text())
    assert report["adapter"]["labeled_by"] == identity["labeled_by"]

    metrics = evaluate(run, data_dir / "test.parquet", run_recipe(run, ["eval.max_samples=200"]), progress=False)
    block = metrics["test"]  # the lexical model is the baseline's TF-IDF + SVM, fitted on the same rows
    assert block["predictor"] == "lexical" and block["accuracy"] == block["baseline"]["accuracy"]
    table = format_table(metrics, "test")
    assert "shipped: lexical" in table and f"labeled_by={identity['labeled_by']}" in table


def test_a_dropped_blend_leaves_the_adapter_and_its_identity(calibrated_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(calibrated_run[0], run)
    result = calibrate.fit(run, run_recipe(run, ["eval.max_samples=100", "eval.blend=false"]), progress=False)
    assert not result["blend"]["kept"] and not (run / "lexical.safetensors").exists()
    assert "+lexical@" not in run_identity(run)["labeled_by"]
    predictor = Predictor.from_run(run)
    assert predictor.calibration.blend_weight == 0 and predictor.calibration.lexical is None


def is_pickle(path: Path) -> bool:
    """A raw pickle (protocol 2+ opens with 0x80) or torch.save's zip, which holds one (data.pkl)."""
    head = path.read_bytes()[:2]
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(".pkl") for name in archive.namelist())
    return False


# transformers reads these back with torch.load(weights_only=True): tensors and plain containers only
WEIGHTS_ONLY_STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"}


def test_no_run_or_data_folder_holds_a_pickle(calibrated_run, adapter_run, data_dir):
    folders = [calibrated_run[0], adapter_run, data_dir]
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and is_pickle(path):
                if path.name in WEIGHTS_ONLY_STATE and path.parent.name.startswith("checkpoint-"):
                    continue
                found.append(str(path))
    assert not found


def test_evaluation_reuses_the_adapter_scores_that_calibration_made(adapter_run, data_dir, tmp_path, monkeypatch):
    """``train`` calibrates on validation, then evaluates the same rows: the adapter scores them
    once. Another model object (a benchmark's quantized copy) never gets those scores."""
    import copy

    from pipeline import scoring
    from pipeline.data import read_split

    scored = []
    real_predict = scoring.predict
    monkeypatch.setattr(scoring, "predict", lambda *args, **kwargs: scored.append(args[2].size) or
                        real_predict(*args, **kwargs))
    run = tmp_path / "run"
    shutil.copytree(adapter_run, run)
    recipe = run_recipe(run, ["eval.max_samples=24", "eval.blend=false"])
    calibrate.fit(run, recipe, progress=False)
    metrics = evaluate(run, data_dir / "validation.parquet", recipe, progress=False)["validation"]
    assert scored == [24] and metrics["n_eval"] == 24 and metrics["eval_products_per_s"] > 0

    predictor = Predictor.from_run(run, recipe)
    names = read_split(data_dir / "validation.parquet", predictor.labels)["product_name"].head(24).tolist()
    predictor.predict(names, calibrated=False)
    assert scored == [24]  # the same rows and the same model: kept
    predictor.model = copy.deepcopy(predictor.model)
    predictor.predict(names, calibrated=False)
    assert scored == [24, 24]
