"""The classical baseline every evaluation is measured against: TF-IDF word 1-2-grams plus
char_wb 2-5-grams, and a linear SVM (scikit-learn).

It fits in well under a minute on one core and is hard to beat on short product names, so a
reader sees at once whether the adapter earns its cost. C is chosen on a held-out slice of the
training split only; the test split is never looked at before the final prediction. The fitted
model is cached beside the split (``DATA_DIR/baseline.json`` + ``baseline.safetensors``, keyed
by the training file's checksum), so the many evaluations of a sweep fit it once.

Never as a pickle: data and run folders are shared on a cluster, and loading a pickle runs
whatever code it holds. The cache keeps the vocabularies and settings as JSON and the idf
weights, coefficients and intercepts as safetensors, and :func:`load` rebuilds the scikit-learn
objects from them.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from safetensors.numpy import load_file, save_file
from sklearn.model_selection import train_test_split
from sklearn.pipeline import FeatureUnion, Pipeline
from sklearn.svm import LinearSVC

from pipeline.atomic import sha256_file, write_atomic

log = logging.getLogger(__name__)

NAME = "tfidf+linear-svm"
C_GRID = (0.1, 0.3, 1.0, 3.0)
FEATURES = {"words": {"analyzer": "word", "ngram_range": (1, 2)},
            "chars": {"analyzer": "char_wb", "ngram_range": (2, 5)}}


def make_pipeline(c: float) -> Pipeline:
    from sklearn.feature_extraction.text import TfidfVectorizer

    features = FeatureUnion([(name, TfidfVectorizer(sublinear_tf=True, lowercase=True, **options))
                             for name, options in FEATURES.items()])
    return Pipeline([("tfidf", features), ("svm", LinearSVC(C=c))])


def choose_c(names: list[str], departments: list[str], grid: tuple[float, ...] = C_GRID,
             slice_size: int = 10_000, seed: int = 42) -> tuple[float, dict[str, float]]:
    """C with the best accuracy on a 20% hold-out of the first ``slice_size`` training rows."""
    names, departments = names[:slice_size], departments[:slice_size]
    fit_x, dev_x, fit_y, dev_y = train_test_split(names, departments, test_size=0.2, random_state=seed)
    scores = {}
    for c in grid:
        predicted = make_pipeline(c).fit(fit_x, fit_y).predict(dev_x)
        scores[str(c)] = round(float((predicted == pd.Series(dev_y).to_numpy()).mean()), 4)
    best = max(grid, key=lambda c: scores[str(c)])
    return best, scores


def fit(train: pd.DataFrame, level: str = "department") -> dict[str, Any]:
    """Choose C, fit on the whole training split's ``level`` labels; returns the model and how it was made."""
    names, targets = train["product_name"].tolist(), train[level].tolist()
    start = time.perf_counter()
    c, dev_accuracy = choose_c(names, targets)
    model = make_pipeline(c).fit(names, targets)
    return {"model": model, "c": c, "dev_accuracy": dev_accuracy, "n_train": len(names),
            "fit_seconds": round(time.perf_counter() - start, 1)}


def _checksum(path: Path) -> str:
    return sha256_file(path)[:16]


def save(fitted: dict[str, Any], folder: Path, stem: str = "baseline") -> None:
    """Write a fitted baseline as ``<stem>.json`` (settings, classes, vocabularies) and
    ``<stem>.safetensors`` (idf weights, coefficients, intercepts), each atomically."""
    model = fitted["model"]
    vectorizers = dict(model.named_steps["tfidf"].transformer_list)
    svm = model.named_steps["svm"]
    tensors = {"svm.coef": svm.coef_, "svm.intercept": svm.intercept_}
    vocabularies = {}
    for name, vectorizer in vectorizers.items():
        tensors[f"{name}.idf"] = vectorizer.idf_
        terms = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.__getitem__)
        vocabularies[name] = terms  # a term's position is its column
    described = {k: v for k, v in fitted.items() if k != "model"}
    described.update(classes=[str(c) for c in svm.classes_], vocabularies=vocabularies)
    write_atomic(folder / f"{stem}.safetensors",  # sweep tasks may write at the same time
                 lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp)))
    write_atomic(folder / f"{stem}.json", lambda tmp: tmp.write_text(json.dumps(described)))


def load(folder: Path, stem: str = "baseline") -> dict[str, Any]:
    """Rebuild a baseline written by :func:`save`; same decision values, no pickle."""
    described = json.loads((folder / f"{stem}.json").read_text())
    tensors = load_file(str(folder / f"{stem}.safetensors"))
    model = make_pipeline(described["c"])
    for name, vectorizer in model.named_steps["tfidf"].transformer_list:
        vectorizer.vocabulary_ = {term: i for i, term in enumerate(described["vocabularies"][name])}
        vectorizer.idf_ = tensors[f"{name}.idf"]
    svm = model.named_steps["svm"]
    svm.coef_, svm.intercept_ = tensors["svm.coef"], tensors["svm.intercept"]
    svm.classes_ = np.asarray(described["classes"], dtype=object)
    del described["vocabularies"], described["classes"]
    return {**described, "model": model}


def fitted(train_path: Path, train: pd.DataFrame, level: str = "department") -> dict[str, Any]:
    """The baseline for this training split and label level, from the cache beside it when it matches."""
    folder = train_path.parent
    stem = "baseline" if level == "department" else f"baseline-{level}"
    checksum = _checksum(train_path)
    if (folder / f"{stem}.json").is_file():
        try:
            saved = load(folder, stem)
            if saved.get("train_checksum") == checksum and saved.get("name") == NAME:
                return saved
        except Exception as exc:  # a stale, partial or foreign file is refit, never trusted
            log.warning("%s: unreadable (%s); refitting the baseline", folder / f"{stem}.json", exc)
    log.info("fitting the %s baseline on %d training rows (%s level)", NAME, len(train), level)
    result = {"name": NAME, "train_checksum": checksum, **fit(train, level)}
    try:
        save(result, folder, stem)
    except OSError as exc:  # a read-only data folder: fit again next time
        log.warning("cannot cache the baseline in %s: %s", folder, exc)
    return result


def decision_matrix(model: Pipeline, names: list[str], labels: list[str]) -> np.ndarray:
    """The SVM's decision values for ``names`` as a (names, labels) matrix in ``labels``' order.

    A label the baseline never saw in training gets each row's lowest score minus one, so that
    adding these values to a model's log-probabilities never favours it.
    """
    decisions = model.decision_function(names)
    column = {label: i for i, label in enumerate(model.classes_)}
    floor = decisions.min(1) - 1
    return np.stack([decisions[:, column[label]] if label in column else floor for label in labels], axis=1)
