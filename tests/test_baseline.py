"""The classical baseline: fit with C chosen on training data only, predict, report, cache."""

import numpy as np
import pandas as pd

from pipeline import baseline
from pipeline.data import read_labels, read_split
from pipeline.evaluate import baseline_metrics, format_per_label, format_table


def small_split(data_dir, folder, rows=2000):
    folder.mkdir()
    read_split(data_dir / "train.parquet").head(rows).to_parquet(folder / "train.parquet", index=False)
    return folder / "train.parquet"


def test_fit_chooses_c_on_train_and_predicts_known_labels(data_dir):
    train = read_split(data_dir / "train.parquet").head(2000)
    fitted = baseline.fit(train)
    assert fitted["c"] in baseline.C_GRID and set(fitted["dev_accuracy"]) == {str(c) for c in baseline.C_GRID}
    assert fitted["n_train"] == 2000
    names = ["Bread Rolls", "", "Milk ->: household", "🍌 Banana"]
    predicted = fitted["model"].predict(names)
    assert len(predicted) == 4 and set(predicted) <= set(train["department"])


def test_report_sits_next_to_the_model_and_is_cached(data_dir, tmp_path):
    train_path = small_split(data_dir, tmp_path / "split")
    labels = read_labels(data_dir / "labels.json")
    test = read_split(data_dir / "test.parquet", labels).head(300)
    train = read_split(train_path)
    report, predicted = baseline_metrics(train_path, train, test, labels)
    assert len(predicted) == 300 and set(predicted) <= set(labels)
    assert report["name"] == "tfidf+linear-svm" and report["n_train"] == 2000
    assert 0 <= report["accuracy"] <= 1 and 0 <= report["macro_f1"] <= 1
    assert set(report["per_label_f1"]) <= set(labels)
    assert train_path.with_name("baseline.json").is_file() and train_path.with_name("baseline.safetensors").is_file()
    assert baseline_metrics(train_path, train, test, labels) == (report, predicted)  # from the cache, the same

    block = {"accuracy": 0.9, "macro_f1": 0.8, "n_eval": 300,
             "majority_class": {"label": "produce", "accuracy": 0.1, "macro_f1": 0.01},
             "per_label": {"bakery": {"precision": 1.0, "recall": 1.0, "f1-score": 1.0, "support": 3}},
             "baseline": report}
    assert "baseline (tfidf+linear-svm)" in format_table({"train_runtime_s": 60.0, "test": block}, "test")
    assert "baseline f1" in format_per_label(block).splitlines()[0]


def test_a_changed_training_split_refits(data_dir, tmp_path):
    train_path = small_split(data_dir, tmp_path / "split", rows=1500)
    first = baseline.fitted(train_path, read_split(train_path))
    pd.read_parquet(train_path).head(1200).to_parquet(train_path, index=False)
    second = baseline.fitted(train_path, read_split(train_path))
    assert (first["n_train"], second["n_train"]) == (1500, 1200)
    train_path.with_name("baseline.safetensors").write_bytes(b"not safetensors")
    assert baseline.fitted(train_path, read_split(train_path))["n_train"] == 1200


def test_the_cache_rebuilds_the_model_without_pickle(data_dir, tmp_path):
    train_path = small_split(data_dir, tmp_path / "split", rows=1500)
    fitted = baseline.fitted(train_path, read_split(train_path))
    names = read_split(data_dir / "test.parquet").head(200)["product_name"].tolist() + ["", "🍌 Banana"]
    labels = read_labels(data_dir / "labels.json")
    loaded = baseline.load(train_path.parent)
    assert {k: v for k, v in loaded.items() if k != "model"} == {k: v for k, v in fitted.items() if k != "model"}
    assert np.array_equal(baseline.decision_matrix(loaded["model"], names, labels),
                          baseline.decision_matrix(fitted["model"], names, labels))
    assert list(loaded["model"].predict(names)) == list(fitted["model"].predict(names))
    for path in train_path.parent.iterdir():
        assert not path.read_bytes().startswith(b"\x80"), f"{path} is a pickle"
