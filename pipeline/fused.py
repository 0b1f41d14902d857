"""The fused candidate: one linear SVM over both models' evidence, the lexical model's TF-IDF
features and the tuned model's hidden state at the answer position.

The blend adds two finished score vectors with one weight; fusion lets one linear model weigh the
tuned model's reading of a name as a whole against each word and character n-gram, per label.

- **Features.** ``pipeline.baseline``'s TF-IDF (word 1-2 + char_wb 2-5), fitted on the training
  names, beside ``alpha * h / |h|``: ``h`` is the merged model's last hidden state at the prompt's
  last token (``" ->:"``, where the label's first token is read), computed by the inference path
  (its dtype, its merged adapter) and kept in float32.
- **Fitting.** On the training rows; C, then alpha, chosen on validation (accuracy, then macro-F1).
  The training rows' hidden states are computed once per adapter and cached in
  ``RUN_DIR/hidden/train.safetensors`` (keyed by the split's and the adapter's hashes and the
  inference path), so a refit of the calibration does not score 37k names again.
- **Saved** like the lexical model (``baseline.save``: JSON + safetensors, no pickle) as
  ``RUN_DIR/fused.json`` + ``fused.safetensors``; its coefficient matrix holds the TF-IDF columns
  then the hidden state's.
- **Scoring** splits along the features: the TF-IDF part needs no model and is computed with the
  prompts, ahead of the model (:meth:`FusedModel.lexical_part`); the hidden part once the model
  has run (:meth:`FusedModel.scores`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
import torch
from safetensors.torch import load_file, save_file
from sklearn.pipeline import Pipeline
from sklearn.svm import LinearSVC

from pipeline import baseline
from pipeline.atomic import sha256_file, write_atomic

log = logging.getLogger(__name__)

STEM = "fused"
C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)
ALPHA_GRID = (0.25, 0.5, 1.0, 2.0, 4.0)
"""The hidden state's weight against the TF-IDF block (each row of which has unit norm per
vectorizer). Each grid is walked from its middle (:func:`walk`): an SVM fit on 37k rows takes
30-50 s on one core for 21 departments, about a minute on two for 134 aisles, so the fit tries
a handful of settings, not all 25."""
HIDDEN_CACHE = "hidden"


def walk(grid: tuple[float, ...], score) -> float:
    """The grid value with the best ``score`` found by walking from the middle of ``grid`` in each
    direction while the score improves; a tie keeps the value nearer the middle."""
    best = len(grid) // 2
    start = best
    for step in (-1, 1):
        i = start + step
        while 0 <= i < len(grid) and score(grid[i]) > score(grid[best]):
            best, i = i, i + step
    return grid[best]


def hidden_features(hidden: torch.Tensor | np.ndarray, alpha: float) -> np.ndarray:
    """``alpha * h / |h|``, row by row: the length of a hidden state varies with the name, its
    direction is what the labels differ in."""
    h = torch.as_tensor(hidden, dtype=torch.float32)
    return (alpha * h / h.norm(dim=-1, keepdim=True).clamp(min=1e-6)).numpy()


def fit_svm(x: scipy.sparse.spmatrix, y: list[str], c: float, threads: int | None = None) -> LinearSVC:
    """``LinearSVC(C=c).fit(x, y)``, its one-vs-rest binary problems solved on ``threads`` threads
    (all this process may use by default). liblinear solves the classes one after another on one
    core and releases the GIL while it does, so threads share the one feature matrix without a
    copy: an aisle-level fit (134 classes, 37k rows with a dense hidden block) takes minutes a
    setting on one core. The same binary problems as LinearSVC's own one-vs-rest, into the same
    attributes, so saving, loading and scoring are unchanged."""
    from joblib import parallel_config
    from sklearn.multiclass import OneVsRestClassifier

    threads = threads or len(os.sched_getaffinity(0))
    if threads == 1 or len(set(y)) < 3:
        return LinearSVC(C=c).fit(x, y)
    with parallel_config(backend="threading", n_jobs=threads):
        ovr = OneVsRestClassifier(LinearSVC(C=c), n_jobs=threads).fit(x, y)
    svm = LinearSVC(C=c)
    svm.classes_ = ovr.classes_
    svm.coef_ = np.vstack([estimator.coef_ for estimator in ovr.estimators_])
    svm.intercept_ = np.concatenate([estimator.intercept_ for estimator in ovr.estimators_])
    svm.n_features_in_ = x.shape[1]
    return svm


def stacked(tfidf: scipy.sparse.spmatrix, hidden: torch.Tensor, alpha: float) -> scipy.sparse.csr_matrix:
    """The fused SVM's input: TF-IDF columns, then the weighted hidden state's."""
    return scipy.sparse.hstack([tfidf, hidden_features(hidden, alpha)]).tocsr()


@dataclass
class FusedModel:
    """A fitted fused SVM, scoring in a run's label order."""

    model: Pipeline
    """The TF-IDF features and an SVM whose coefficients cover them and then the hidden state."""
    alpha: float
    hidden_size: int
    labels: list[str]

    def __post_init__(self) -> None:
        svm = self.model.named_steps["svm"]
        column = {str(label): i for i, label in enumerate(svm.classes_)}
        self._rows = [column.get(label) for label in self.labels]  # None: a label unseen in training
        self._lexical_width = svm.coef_.shape[1] - self.hidden_size

    def _in_label_order(self, coef: np.ndarray) -> np.ndarray:
        out = np.zeros((len(self.labels), coef.shape[1]), dtype=np.float32)
        for j, row in enumerate(self._rows):
            if row is not None:
                out[j] = coef[row]
        return out

    def lexical_part(self, names: list[str]) -> torch.Tensor:
        """(names, labels): the TF-IDF features' part of the decision values, intercept included;
        NaN in the columns of labels the SVM never saw."""
        svm = self.model.named_steps["svm"]
        features = self.model.named_steps["tfidf"].transform(names)
        coef = self._in_label_order(svm.coef_[:, : self._lexical_width])
        intercept = np.array([svm.intercept_[r] if r is not None else np.nan for r in self._rows], dtype=np.float32)
        return torch.from_numpy(np.asarray(features @ coef.T, dtype=np.float32) + intercept)

    def scores(self, lexical_part: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The decision values: ``lexical_part`` plus the hidden states' part. A label the SVM never
        saw gets each row's lowest score minus one (as ``baseline.decision_matrix`` does); rows of
        empty names (NaN hidden states) stay NaN."""
        coef = self._in_label_order(self.model.named_steps["svm"].coef_[:, self._lexical_width:])
        total = lexical_part + torch.from_numpy(hidden_features(hidden, self.alpha) @ coef.T)
        unseen = torch.tensor([r is None for r in self._rows])
        if unseen.any():
            floor = torch.where(unseen[None], torch.inf, total).amin(-1, keepdim=True) - 1
            total = torch.where(unseen[None], floor, total)
        return total


def fit(train_names: list[str], train_labels: list[str], train_hidden: torch.Tensor,
        validation_names: list[str], validation_labels: list[str], validation_hidden: torch.Tensor,
        labels: list[str]) -> tuple[FusedModel, dict[str, Any]]:
    """Fit on the training rows, choosing C (at alpha=1), then alpha, on validation accuracy (then
    macro-F1), each by :func:`walk`. Returns the model and every setting tried with its figures."""
    from sklearn.metrics import f1_score

    start = time.perf_counter()
    tfidf = baseline.make_pipeline(1.0).named_steps["tfidf"]
    train_x, validation_x = tfidf.fit_transform(train_names), tfidf.transform(validation_names)
    truth = np.asarray(validation_labels, dtype=object)
    grid: dict[str, dict[str, float]] = {}
    fitted: dict[str, LinearSVC] = {}

    def attempt(c: float, alpha: float) -> tuple[float, float]:
        key = f"C={c},alpha={alpha}"
        if key not in grid:
            svm = fit_svm(stacked(train_x, train_hidden, alpha), train_labels, c)
            predicted = svm.predict(stacked(validation_x, validation_hidden, alpha))
            present = sorted(set(truth) | set(predicted))
            grid[key] = {"accuracy": round(float((predicted == truth).mean()), 4),
                         "macro_f1": round(float(f1_score(truth, predicted, labels=present, average="macro",
                                                          zero_division=0)), 4)}
            fitted[key] = svm
            log.info("fused SVM %s: validation accuracy %.4f", key, grid[key]["accuracy"])
        return grid[key]["accuracy"], grid[key]["macro_f1"]

    c = walk(C_GRID, lambda c: attempt(c, 1.0))
    alpha = walk(ALPHA_GRID, lambda a: attempt(c, a))
    model = Pipeline([("tfidf", tfidf), ("svm", fitted[f"C={c},alpha={alpha}"])])
    hidden_size = int(train_hidden.shape[1])
    return FusedModel(model, alpha, hidden_size, labels), {
        "c": c, "alpha": alpha, "hidden_size": hidden_size, "n_train": len(train_names), "grid": grid,
        "fit_seconds": round(time.perf_counter() - start, 1)}


def save(fused: FusedModel, described: dict[str, Any], run_dir: Path) -> None:
    """``RUN_DIR/fused.json`` + ``fused.safetensors`` through ``baseline.save``, with alpha and
    the hidden size beside C."""
    baseline.save({**described, "name": f"{baseline.NAME}+hidden-state", "model": fused.model}, run_dir, STEM)


def load(run_dir: Path, labels: list[str]) -> FusedModel:
    saved = baseline.load(run_dir, STEM)
    return FusedModel(saved["model"], float(saved["alpha"]), int(saved["hidden_size"]), labels)


def cached_hidden(run_dir: Path, split_path: Path, key: dict[str, str], compute) -> torch.Tensor:
    """The hidden states of ``split_path``'s rows from ``RUN_DIR/hidden/<split>.safetensors`` when
    it was written for the same split file, adapter and inference path (``key``), else
    ``compute()``'s, then cached (atomically; a read-only run folder computes them again)."""
    path = run_dir / HIDDEN_CACHE / f"{split_path.stem}.safetensors"
    key = {**key, "split_sha256": sha256_file(split_path)}
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as cached:
                if cached.metadata() == key:
                    return load_file(str(path))["hidden"]
        except Exception as exc:  # a damaged or foreign cache is recomputed, never trusted
            log.warning("%s: unreadable (%s); computing the hidden states again", path, exc)
    hidden = compute()
    try:
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, lambda tmp: save_file({"hidden": hidden.contiguous()}, str(tmp), metadata=key))
    except OSError as exc:
        log.warning("cannot cache hidden states in %s: %s", path, exc)
    return hidden
