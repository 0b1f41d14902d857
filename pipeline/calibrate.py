"""What a run ships besides its adapter, fitted on the validation split only: a blend with the
lexical model and a temperature.

- **Blend.** The adapter's label log-probabilities plus w x the decision values of the lexical
  model (``pipeline.baseline``'s TF-IDF + linear SVM, fitted on the same training rows). The two
  err on different rows: the SVM keeps one weight per word (a brand decides a department), the
  model reads a name as a whole. w comes from a grid, chosen by validation accuracy (then
  macro-F1); the blend is kept only if it beats the adapter alone on validation.
- **Temperature.** One T for the shipped scores, softmax(scores / T), fitted by minimising the
  negative log-likelihood of the validation labels, so that ``department_confidence`` means what
  it says (expected calibration error is reported on test by ``evaluate``).

Written to RUN_DIR/calibration.json, with the lexical model as ``lexical.json`` +
``lexical.safetensors`` (no pickle: run folders are shared). :class:`Calibration` applies it;
``pipeline.predict`` loads it with the adapter, so evaluation and labeling both ship it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from pipeline import baseline
from pipeline.atomic import sha256_file, write_json_atomic
from pipeline.config import Recipe
from pipeline.data import read_split
from pipeline.errors import DataError, ModelError
from pipeline.scoring import Prediction, best_labels, blend_log_probs

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
LEXICAL_STEM = "lexical"
BLEND_WEIGHTS = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 40.0, 80.0, 160.0)
"""Tried against w=0 (the adapter alone): the SVM's decision values span a few units, the
adapter's log-probabilities tens. The earlier study on test halves chose 5 and 12; the demo and
the aisle run both chose 40, the largest weight then, with validation accuracy still rising."""
ECE_BINS = 15
CONFIDENT = 0.9
"""The confidence a reviewer trusts a label at: its share of rows and their accuracy are reported."""


@dataclass
class Calibration:
    """How the adapter's label log-probabilities become the shipped labels and confidences."""

    labels: list[str]
    temperature: float = 1.0
    blend_weight: float = 0.0
    lexical: Any = None
    """The fitted lexical model (a scikit-learn pipeline) when the blend is kept."""
    lexical_sha256: str | None = None
    lexical_seconds: float = 0.0
    """Time spent in the lexical model so far, so labeling can report its share."""

    def offsets(self, names: list[str | None]) -> torch.Tensor:
        """(names, labels): what the blend adds to the adapter's label log-probabilities, w x the
        lexical model's decision values; zeros without a blend and for empty names."""
        out = torch.zeros((len(names), len(self.labels)))
        rows = [i for i, name in enumerate(names) if name is not None and str(name).strip()]
        if self.blend_weight and rows:
            start = time.perf_counter()
            decisions = baseline.decision_matrix(self.lexical, [str(names[i]) for i in rows], self.labels)
            self.lexical_seconds += time.perf_counter() - start
            out[rows] = self.blend_weight * torch.from_numpy(decisions).float()
        return out

    def blended(self, log_probs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Uncalibrated shipped scores: the adapter's log-probabilities plus the blend's
        ``offsets`` (:meth:`offsets` of the same names), when the blend is kept. Rows of NaN
        (empty names) stay NaN."""
        if not self.blend_weight:
            return log_probs
        return blend_log_probs(log_probs, offsets, 1.0)  # offsets carry the weight

    def calibrated(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores / self.temperature).log_softmax(-1)

    def apply(self, prediction: Prediction, offsets: torch.Tensor) -> Prediction:
        """The adapter's prediction turned into the shipped one (statuses unchanged); ``offsets``
        are :meth:`offsets` of the names it scored."""
        log_probs = self.calibrated(self.blended(prediction.log_probs, offsets))
        usable = [i for i, label in enumerate(prediction.labels) if label is not None]
        labels, confidences = list(prediction.labels), list(prediction.confidences)
        if usable:
            best = best_labels(self.labels, log_probs[usable])
            for k, i in enumerate(usable):
                labels[i], confidences[i] = best.labels[k], best.confidence[k]
        return Prediction(labels, confidences, log_probs, prediction.statuses)

    def describe(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "blend_weight": self.blend_weight,
                "lexical_sha256": self.lexical_sha256}


def lexical_sha256(run_dir: Path) -> str:
    """One hash over the lexical model's two files: what ``labeled_by`` names."""
    return sha256_file(*(run_dir / f"{LEXICAL_STEM}{suffix}" for suffix in (".json", ".safetensors")))


def load(run_dir: Path, labels: list[str]) -> Calibration | None:
    """The run's calibration, or None for a run fitted without one (no validation rows)."""
    path = run_dir / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        calibration = Calibration(labels, temperature=float(saved["temperature"]),
                                  blend_weight=float(saved["blend"]["weight"] if saved["blend"]["kept"] else 0.0))
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: not a calibration file ({exc})") from exc
    if calibration.blend_weight:
        calibration.lexical = baseline.load(run_dir, LEXICAL_STEM)["model"]
        calibration.lexical_sha256 = lexical_sha256(run_dir)
    return calibration


# --- measures ----------------------------------------------------------------------------------


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins of |accuracy - mean confidence| x the bin's share."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidences, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            error += mask.mean() * abs(correct[mask].mean() - confidences[mask].mean())
    return float(error)


def negative_log_likelihood(log_probs: torch.Tensor, truth: torch.Tensor) -> float:
    return float(-log_probs.gather(1, truth[:, None]).mean())


def fit_temperature(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """The T > 0 that minimises the NLL of softmax(scores / T) on these rows (searched in log T)."""
    def nll(log_t: float) -> float:
        return negative_log_likelihood((scores / float(np.exp(log_t))).log_softmax(-1), truth)

    found = minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


def confidence_report(log_probs: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """ECE, NLL, and the share and accuracy of rows at confidence >= ``CONFIDENT``."""
    confidence, predicted = log_probs.exp().max(-1)
    correct = (predicted == truth).numpy()
    confident = (confidence >= CONFIDENT).numpy()
    return {"ece": round(expected_calibration_error(confidence.numpy(), correct), 4),
            "nll": round(negative_log_likelihood(log_probs, truth), 4),
            "confident_share": round(float(confident.mean()), 4),
            "confident_accuracy": round(float(correct[confident].mean()), 4) if confident.any() else None}


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


# --- fitting -----------------------------------------------------------------------------------


def _accuracy_and_f1(truth: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import f1_score

    present = sorted(set(truth) | set(predicted))
    return float((truth == predicted).mean()), float(f1_score(truth, predicted, labels=present, average="macro",
                                                              zero_division=0))


def choose_blend(log_probs: torch.Tensor, decisions: torch.Tensor, truth: torch.Tensor,
                 weights: tuple[float, ...] = BLEND_WEIGHTS) -> tuple[float, bool, dict[str, dict[str, float]]]:
    """The weight with the best validation accuracy (then macro-F1, then the smaller weight) among
    w=0 (the adapter alone) and ``weights``: the blend is kept when that is not w=0, that is when it
    beats the adapter alone on validation. Also every weight's figures."""
    grid = {}
    for weight in (0.0, *weights):
        predicted = blend_log_probs(log_probs, decisions, weight).argmax(-1).numpy()
        accuracy, macro_f1 = _accuracy_and_f1(truth.numpy(), predicted)
        grid[str(float(weight))] = {"accuracy": round(accuracy, 4), "macro_f1": round(macro_f1, 4)}
    best = max((0.0, *weights), key=lambda w: (grid[str(float(w))]["accuracy"], grid[str(float(w))]["macro_f1"], -w))
    return float(best), best > 0, grid


def fit(run_dir: str | Path, recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """Fit the blend and the temperature of a finished run on DATA_DIR/validation.parquet and write
    RUN_DIR/calibration.json (plus the lexical model when the blend is kept)."""
    from pipeline.predict import Predictor  # predict loads calibrations: import it late

    run = Path(run_dir)
    data_dir = Path(recipe.data.dir)
    predictor = Predictor.from_run(run, recipe, calibrated=False)
    level = recipe.data.label_level
    validation = read_split(data_dir / "validation.parquet", predictor.labels, level)
    if not len(validation):
        raise DataError(f"{data_dir / 'validation.parquet'}: no rows to calibrate on (data.validation_size=0)")
    if recipe.eval.max_samples:
        validation = validation.head(recipe.eval.max_samples)
    names = validation["product_name"].tolist()
    column = {label: i for i, label in enumerate(predictor.labels)}
    truth = torch.tensor([column[d] for d in validation[level]])

    log.info("calibrating %s on %d validation rows", run, len(names))
    adapter = predictor.predict(names, progress=progress, calibrated=False).log_probs
    lexical, decisions = None, torch.zeros_like(adapter)
    if recipe.eval.blend:  # the lexical model is fitted (or read from its cache) only to be tried
        train_path = data_dir / "train.parquet"
        lexical = baseline.fitted(train_path, read_split(train_path, level=level), level)
        decisions = torch.from_numpy(baseline.decision_matrix(lexical["model"], names, predictor.labels)).float()

    best, kept, grid = choose_blend(adapter, decisions, truth, BLEND_WEIGHTS if recipe.eval.blend else ())
    scores = blend_log_probs(adapter, decisions, best) if kept else adapter
    temperature = fit_temperature(scores, truth)
    calibrated = (scores / temperature).log_softmax(-1)

    if kept:  # the model before the file that names it
        baseline.save(lexical, run, LEXICAL_STEM)
    result = {
        "fitted_on": str(data_dir / "validation.parquet"),
        "n_validation": len(names),
        "fitted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "blend": {"kept": kept, "weight": best, "weights_tried": grid,
                  "lexical": {"name": lexical["name"], "c": lexical["c"], "n_train": lexical["n_train"],
                              "sha256": lexical_sha256(run) if kept else None} if lexical else None,
                  "reason": (f"w={best} beats the adapter alone on validation" if kept else
                             "no weight beats the adapter alone on validation" if recipe.eval.blend else
                             "eval.blend is false")},
        "temperature": temperature,
        "validation": {"adapter": confidence_report(adapter, truth),
                       "shipped_before_temperature": confidence_report(scores.log_softmax(-1), truth),
                       "shipped": confidence_report(calibrated, truth)},
    }
    write_json_atomic(run / CALIBRATION_FILE, result)
    if not kept:
        for suffix in (".json", ".safetensors"):
            (run / f"{LEXICAL_STEM}{suffix}").unlink(missing_ok=True)
    log.info("blend %s (w=%s), temperature %.3f", "kept" if kept else "dropped", best, temperature)
    return result
