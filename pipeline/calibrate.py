"""What a run ships, chosen on the validation split only: every shippable candidate competes, the
cheapest wins a tie, and each gets its own temperature.

- **Candidates**, cheapest first (``CANDIDATES``): ``lexical``, the TF-IDF + linear SVM of
  ``pipeline.baseline`` fitted on the run's training rows, which labels without the language
  model (tens of thousands of products a second on one core); ``adapter``, the tuned model's
  label log-probabilities; ``blend``, those plus w x the lexical model's decision values (the two
  err on different rows: the SVM keeps one weight per word, the model reads a name as a whole),
  w chosen on validation from a grid.
- **The choice.** The candidate with the best validation accuracy (then macro-F1), unless a
  cheaper one is within the 95% paired-bootstrap interval of its accuracy: then the cheapest
  of those ships. ``calibration.json`` says which rule decided.
- **Temperature.** One T per candidate, softmax(scores / T), fitted by minimising the negative
  log-likelihood of the validation labels, so that ``<level>_confidence`` means what it says.

Written to RUN_DIR/calibration.json with every candidate's validation accuracy, macro-F1, ECE
after its temperature and labeling speed; the lexical model, when it ships alone or in the blend,
as ``lexical.json`` + ``lexical.safetensors`` (no pickle: run folders are shared).
:class:`Calibration` applies it; ``pipeline.predict`` loads it, so evaluation and labeling ship
the same thing, and a run that ships the lexical model loads no language model.
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
from pipeline.metrics import paired_bootstrap
from pipeline.scoring import Prediction, best_labels, blend_log_probs

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
LEXICAL_STEM = "lexical"
CANDIDATES = ("lexical", "adapter", "blend")
"""Every shippable candidate, cheapest to run first: a tie on validation goes to the earlier."""
BLEND_WEIGHTS = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 40.0, 80.0, 160.0)
"""Tried against w=0 (the adapter alone): the SVM's decision values span a few units, the
adapter's log-probabilities tens. The earlier study on test halves chose 5 and 12; the demo and
the aisle run both chose 40, the largest weight then, with validation accuracy still rising."""
ECE_BINS = 15
CONFIDENT = 0.9
"""The confidence a reviewer trusts a label at: its share of rows and their accuracy are reported."""


@dataclass
class Calibration:
    """How a run's scores become the shipped labels and confidences: the shipped candidate (the
    adapter's label log-probabilities, the blend, or the lexical model alone) and its temperature."""

    labels: list[str]
    temperature: float = 1.0
    blend_weight: float = 0.0
    shipped: str = "adapter"
    """One of :data:`CANDIDATES`."""
    lexical: Any = None
    """The fitted lexical model (a scikit-learn pipeline) when it ships, alone or in the blend."""
    lexical_sha256: str | None = None
    lexical_seconds: float = 0.0
    """Time spent in the lexical model so far, so labeling can report its share."""

    @property
    def needs_adapter(self) -> bool:
        """Whether the shipped scores need the language model (not for the lexical model alone)."""
        return self.shipped != "lexical"

    def offsets(self, names: list[str | None]) -> torch.Tensor:
        """(names, labels): the lexical model's part of the shipped scores, its decision values
        (times w in the blend); zeros when the adapter ships alone, and for empty names."""
        out = torch.zeros((len(names), len(self.labels)))
        rows = [i for i, name in enumerate(names) if name is not None and str(name).strip()]
        if self.shipped != "adapter" and rows:
            start = time.perf_counter()
            decisions = baseline.decision_matrix(self.lexical, [str(names[i]) for i in rows], self.labels)
            self.lexical_seconds += time.perf_counter() - start
            weight = self.blend_weight if self.shipped == "blend" else 1.0
            out[rows] = weight * torch.from_numpy(decisions).float()
        return out

    def blended(self, log_probs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Uncalibrated shipped scores: the adapter's log-probabilities, plus the blend's
        ``offsets`` (:meth:`offsets` of the same names) when the blend ships, or the offsets
        alone when the lexical model ships alone. Rows of NaN (empty names) stay NaN."""
        if self.shipped == "lexical":
            return offsets + 0 * log_probs  # keeps the NaN rows of empty names
        if self.shipped == "adapter":
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
        return {"shipped": self.shipped, "temperature": self.temperature, "blend_weight": self.blend_weight,
                "lexical_sha256": self.lexical_sha256}


def lexical_sha256(run_dir: Path) -> str:
    """One hash over the lexical model's two files: what ``labeled_by`` names."""
    return sha256_file(*(run_dir / f"{LEXICAL_STEM}{suffix}" for suffix in (".json", ".safetensors")))


def shipped_candidate(run_dir: Path) -> str | None:
    """What RUN_DIR ships (one of :data:`CANDIDATES`), from calibration.json alone; None without one.
    A file written before candidates competed says whether its blend was kept."""
    path = run_dir / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        shipped = saved.get("shipped") or ("blend" if saved["blend"]["kept"] else "adapter")
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: not a calibration file ({exc})") from exc
    if shipped not in CANDIDATES:
        raise ModelError(f"{path}: shipped is {shipped!r}, not one of {', '.join(CANDIDATES)}")
    return shipped


def load(run_dir: Path, labels: list[str]) -> Calibration | None:
    """The run's calibration, or None for a run fitted without one (no validation rows)."""
    shipped = shipped_candidate(run_dir)
    if shipped is None:
        return None
    path = run_dir / CALIBRATION_FILE
    try:
        saved = json.loads(path.read_text())
        calibration = Calibration(labels, temperature=float(saved["temperature"]), shipped=shipped,
                                  blend_weight=float(saved["blend"]["weight"]) if shipped == "blend" else 0.0)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: not a calibration file ({exc})") from exc
    if shipped != "adapter":
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
                 weights: tuple[float, ...] = BLEND_WEIGHTS) -> tuple[float, dict[str, dict[str, float]]]:
    """The blend's weight: the best validation accuracy (then macro-F1, then the smaller weight)
    among ``weights``; also every weight's figures, w=0 (the adapter alone) among them."""
    grid = {}
    for weight in (0.0, *weights):
        predicted = blend_log_probs(log_probs, decisions, weight).argmax(-1).numpy()
        accuracy, macro_f1 = _accuracy_and_f1(truth.numpy(), predicted)
        grid[str(float(weight))] = {"accuracy": round(accuracy, 4), "macro_f1": round(macro_f1, 4)}
    best = max(weights, key=lambda w: (grid[str(float(w))]["accuracy"], grid[str(float(w))]["macro_f1"], -w))
    return float(best), grid


def choose_candidate(scores: dict[str, torch.Tensor], truth: torch.Tensor, labels: list[str]
                     ) -> tuple[str, str, dict[str, Any]]:
    """The candidate to ship among ``scores`` (name -> validation scores, names from
    :data:`CANDIDATES`): the best validation accuracy (then macro-F1), unless a cheaper candidate
    is within the 95% paired-bootstrap interval of the best's accuracy: then the cheapest of
    those. Returns the choice, the rule that decided, and each candidate's bootstrap against the best."""
    truth_labels = [labels[i] for i in truth.tolist()]
    predicted = {name: [labels[i] for i in s.argmax(-1).tolist()] for name, s in scores.items()}
    figures = {name: _accuracy_and_f1(truth.numpy(), s.argmax(-1).numpy()) for name, s in scores.items()}
    best = max(scores, key=lambda name: (*figures[name], -CANDIDATES.index(name)))
    versus = {name: paired_bootstrap(truth_labels, predicted[best], predicted[name], labels)
              for name in scores if name != best}
    tied = [name for name in scores if name == best or versus[name]["accuracy"]["low"] <= 0]
    shipped = min(tied, key=CANDIDATES.index)
    if shipped == best:
        rule = f"{best}: the best validation accuracy" + (
            ", and no cheaper candidate within the 95% paired-bootstrap interval of it" if len(scores) > 1 else "")
    else:
        rule = (f"{shipped}: within the 95% paired-bootstrap interval of {best}'s validation accuracy "
                f"({versus[shipped]['accuracy']['difference']:+.4f} [{versus[shipped]['accuracy']['low']:+.4f}, "
                f"{versus[shipped]['accuracy']['high']:+.4f}]), and cheaper to run: a tie goes to the cheapest")
    return shipped, rule, versus


def fit(run_dir: str | Path, recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """Score every candidate on DATA_DIR/validation.parquet, fit each one's temperature, choose the
    one to ship and write RUN_DIR/calibration.json (plus the lexical model when it ships)."""
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
    adapter_prediction = predictor.predict(names, progress=progress, calibrated=False)
    adapter = adapter_prediction.log_probs
    speed = {"adapter": len(names) / adapter_prediction.seconds if adapter_prediction.seconds else None}
    scores: dict[str, torch.Tensor] = {"adapter": adapter}
    lexical, best, grid = None, 0.0, None
    allowed = [c for c in recipe.eval.candidates if recipe.eval.blend or c == "adapter"]
    if "lexical" in allowed or "blend" in allowed:  # fitted (or read from its cache) only to be tried
        train_path = data_dir / "train.parquet"
        lexical = baseline.fitted(train_path, read_split(train_path, level=level), level)
        start = time.perf_counter()
        decisions = torch.from_numpy(baseline.decision_matrix(lexical["model"], names, predictor.labels)).float()
        speed["lexical"] = len(names) / (time.perf_counter() - start)
        if "lexical" in allowed:
            scores["lexical"] = decisions
        if "blend" in allowed:
            best, grid = choose_blend(adapter, decisions, truth)
            scores["blend"] = blend_log_probs(adapter, decisions, best)
            speed["blend"] = 1 / (1 / speed["adapter"] + 1 / speed["lexical"]) if speed["adapter"] else None
    if "adapter" not in allowed and len(scores) > 1:
        del scores["adapter"]  # scored all the same: the blend is built on it
    shipped, rule, versus = choose_candidate(scores, truth, predictor.labels)

    candidates = {}
    for name, candidate in scores.items():
        temperature = fit_temperature(candidate, truth)
        accuracy, macro_f1 = _accuracy_and_f1(truth.numpy(), candidate.argmax(-1).numpy())
        candidates[name] = {"accuracy": round(accuracy, 4), "macro_f1": round(macro_f1, 4),
                            **confidence_report((candidate / temperature).log_softmax(-1), truth),
                            "temperature": temperature,
                            "products_per_s": round(speed[name], 1) if speed.get(name) else None,
                            **({"blend_weight": best} if name == "blend" else {})}
    temperature = candidates[shipped]["temperature"]
    chosen = scores[shipped]
    if shipped != "adapter":  # the model before the file that names it
        baseline.save(lexical, run, LEXICAL_STEM)
    else:
        for suffix in (".json", ".safetensors"):
            (run / f"{LEXICAL_STEM}{suffix}").unlink(missing_ok=True)
    result = {
        "fitted_on": str(data_dir / "validation.parquet"),
        "n_validation": len(names),
        "fitted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "shipped": shipped,
        "rule": rule,
        "candidates": candidates,
        "versus_best": versus,
        "blend": {"kept": shipped == "blend", "weight": best if shipped == "blend" else 0.0, "weights_tried": grid,
                  "lexical": {"name": lexical["name"], "c": lexical["c"], "n_train": lexical["n_train"],
                              "sha256": lexical_sha256(run) if shipped != "adapter" else None} if lexical else None},
        "temperature": temperature,
        "validation": {"adapter": confidence_report(adapter, truth),
                       "shipped_before_temperature": confidence_report(chosen.log_softmax(-1), truth),
                       "shipped": confidence_report((chosen / temperature).log_softmax(-1), truth)},
    }
    write_json_atomic(run / CALIBRATION_FILE, result)
    log.info("ships %s (%s), temperature %.3f", shipped, rule, temperature)
    return result
