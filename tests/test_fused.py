"""The fused candidate: one SVM over the TF-IDF features and the tuned model's hidden state."""

import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse
import torch

from pipeline import calibrate, fused
from pipeline.errors import ConfigError
from pipeline.evaluate import evaluate
from pipeline.label import label_catalogs
from pipeline.predict import Predictor, run_identity, run_recipe
from pipeline.shipped import load_calibration, model_sha256

LABELS = ["dairy eggs", "frozen", "produce"]


def hidden_that_knows(labels: list[str], seed: int, width: int = 16) -> torch.Tensor:
    """Hidden states that point one way per label, with noise: the evidence names alone lack."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.eye(width)[: len(LABELS)] * 3
    return torch.stack([directions[LABELS.index(label)] for label in labels]) + torch.randn(
        len(labels), width, generator=generator)


def test_the_fused_svm_reads_the_hidden_state_where_names_say_nothing():
    """Every name is the same two words, so TF-IDF alone cannot beat chance: a fused model that
    scores well on validation must have used the hidden states."""
    rng = np.random.default_rng(0)
    train_labels = [LABELS[i] for i in rng.integers(0, 3, 300)]
    validation_labels = [LABELS[i] for i in rng.integers(0, 3, 150)]
    model, fit = fused.fit(["plain item"] * 300, train_labels, hidden_that_knows(train_labels, 1),
                           ["plain item"] * 150, validation_labels, hidden_that_knows(validation_labels, 2), LABELS)
    scores = model.scores(model.lexical_part(["plain item"] * 150), hidden_that_knows(validation_labels, 2))
    predicted = [LABELS[i] for i in scores.argmax(-1)]
    accuracy = np.mean([p == t for p, t in zip(predicted, validation_labels)])
    assert accuracy > 0.9 and fit["grid"][f"C={fit['c']},alpha={fit['alpha']}"]["accuracy"] == pytest.approx(
        accuracy, abs=1e-4)


def test_the_threaded_one_vs_rest_fit_is_linear_svcs_own():
    """fit_svm solves LinearSVC's one-vs-rest problems on threads: the same decision values and
    predictions as one LinearSVC on one core, with the attributes saving and scoring read."""
    from sklearn.svm import LinearSVC

    rng = np.random.default_rng(0)
    x = scipy.sparse.random(400, 60, density=0.2, format="csr", random_state=1)
    y = [["a", "b", "c", "d", "e"][i] for i in rng.integers(0, 5, 400)]
    x = scipy.sparse.hstack([x, np.eye(5)[["abcde".index(v) for v in y]] * rng.random((400, 1))]).tocsr()
    threaded, single = fused.fit_svm(x, y, 0.5, threads=2), LinearSVC(C=0.5).fit(x, y)
    assert list(threaded.classes_) == list(single.classes_)
    assert threaded.decision_function(x) == pytest.approx(single.decision_function(x), abs=1e-3)
    assert (threaded.predict(x) == single.predict(x)).all()


def test_the_fused_model_round_trips_with_identical_scores(tmp_path):
    names = ["Greek Yogurt", "Frozen Peas", "Baby Spinach", "Whole Milk", "Ice Cream Bars", "Red Apples"] * 20
    labels = ["dairy eggs", "frozen", "produce", "dairy eggs", "frozen", "produce"] * 20
    hidden = hidden_that_knows(labels, 3)
    model, fit = fused.fit(names, labels, hidden, names[:30], labels[:30], hidden[:30], [*LABELS, "bakery"])
    fused.save(model, fit, tmp_path)
    loaded = fused.load(tmp_path, [*LABELS, "bakery"])
    before = model.scores(model.lexical_part(names[:30]), hidden[:30])
    after = loaded.scores(loaded.lexical_part(names[:30]), hidden[:30])
    assert torch.equal(before, after)
    # a label the SVM never saw scores below every other label of its row, never NaN
    assert (after[:, 3] < after[:, :3].min(-1).values).all()
    assert not any(p.suffix in (".pkl", ".pickle") for p in tmp_path.iterdir())
    umask = os.umask(0o022)
    os.umask(umask)  # safetensors writes 0600; run folders are read by other accounts (the nightly job's)
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {0o666 & ~umask}
    assert json.loads((tmp_path / "fused.json").read_text())["alpha"] == fit["alpha"]


@pytest.fixture(scope="module")
def fused_run(calibrated_run, tmp_path_factory):
    """A copy of the tiny calibrated run that ships the fused candidate (the only one allowed),
    fitted on the first 240 training rows, chosen on 300 validation rows."""
    run = tmp_path_factory.mktemp("fused") / "run"
    shutil.copytree(calibrated_run[0], run)
    overrides = ["eval.max_samples=300", "eval.candidates=[fused]", "data.max_train_samples=240"]
    return run, calibrate.fit(run, run_recipe(run, overrides), progress=False), overrides


def test_the_fused_candidate_ships_through_evaluate_and_label(fused_run, data_dir, tmp_path):
    run, result, _ = fused_run
    assert result["shipped"] == "fused" and result["fused"]["sha256"] == model_sha256(run, "fused")
    assert result["fused"]["n_train"] == 240 and result["candidates"]["fused"]["products_per_s"] > 0
    identity = run_identity(run)
    assert identity["labeled_by"].endswith(f"+fused@{model_sha256(run, 'fused')[:12]}")

    fp32 = ["eval.dtype=float32"]  # evaluation and labeling batch rows differently: equal to 1e-5 in fp32
    metrics = evaluate(run, data_dir / "test.parquet", run_recipe(run, ["eval.max_samples=100", *fp32]),
                       progress=False)
    assert metrics["test"]["predictor"] == "fused" and metrics["test"]["labeled_by"] == identity["labeled_by"]
    predictions = pd.read_parquet(run / "predictions_test.parquet")
    catalog = tmp_path / "catalog.parquet"
    names = [*predictions["product_name"][:-1], " "]  # and an empty name
    pq.write_table(pa.table({"product_id": predictions["product_id"], "product_name": names}), catalog)
    label_catalogs(run, [str(catalog)], tmp_path / "labeled", batch_size=32, progress=False, overrides=fp32)
    labeled = pd.read_parquet(tmp_path / "labeled" / "catalog.parquet")
    assert (labeled["labeled_by"] == identity["labeled_by"]).all()
    assert labeled["department"].tolist()[:-1] == predictions["predicted"].tolist()[:-1]
    assert labeled["department_confidence"][:-1].to_numpy() == pytest.approx(
        predictions["confidence"][:-1].to_numpy(), abs=1e-5)
    assert labeled["label_status"].tolist()[-1] == "empty_name"


def test_the_training_rows_hidden_states_are_computed_once_per_adapter(fused_run, monkeypatch):
    run, result, overrides = fused_run
    cache = run / fused.HIDDEN_CACHE / "train.safetensors"
    written = cache.stat().st_mtime_ns
    scored = []
    original = Predictor.predict
    monkeypatch.setattr(Predictor, "predict", lambda self, names, *a, **k: scored.append(len(
        names)) or original(self, names, *a, **k))
    again = calibrate.fit(run, run_recipe(run, overrides), progress=False)
    assert cache.stat().st_mtime_ns == written and scored == [300]  # validation only, not the 240 training rows
    assert again["fused"]["c"] == result["fused"]["c"] and again["fused"]["alpha"] == result["fused"]["alpha"]
    loaded = load_calibration(run, json.loads((run / "labels.json").read_text()))
    assert loaded.fused is not None and loaded.fused.alpha == result["fused"]["alpha"]


def test_the_fused_candidate_needs_first_token_labels(aisle_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(aisle_run, run)
    result = calibrate.fit(run, run_recipe(run, ["eval.max_samples=10", "eval.candidates=[adapter,fused]"]),
                           progress=False)
    assert result["shipped"] == "adapter" and "first-token" in result["fused"]["skipped"]
    with pytest.raises(ConfigError, match="first-token scorer only"):
        Predictor.from_run(run, calibrated=False).predict(["Baby Spinach"], calibrated=False, hidden=True)
    with pytest.raises(ConfigError, match="unknown"):
        calibrate.fit(run, run_recipe(run, ["eval.candidates=[adapter,stacker]"]), progress=False)


def test_the_walk_follows_the_score_to_a_grid_edge_and_keeps_the_middle_on_a_tie():
    grid = (0.1, 0.3, 1.0, 3.0, 10.0)
    tried = []
    assert fused.walk(grid, lambda c: tried.append(c) or -c) == 0.1 and 10.0 not in tried
    assert fused.walk(grid, lambda c: 0.5) == 1.0
    assert fused.walk(grid, lambda c: -abs(c - 3.0)) == 3.0
