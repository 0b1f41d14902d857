"""What a run ships, as ``pipeline.calibrate`` chose it on validation: the candidate (the lexical
model, the adapter, their blend, or the fused SVM of ``pipeline.fused``) and its temperature,
read from RUN_DIR/calibration.json (with the lexical model from ``lexical.json`` +
``lexical.safetensors``, the fused one from ``fused.*``, never a pickle) and applied to scores.
``pipeline.predict`` loads it, so evaluation and labeling ship the same thing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import baseline, fused
from pipeline.atomic import sha256_file
from pipeline.errors import ModelError
from pipeline.scoring import Prediction, best_labels, blend_log_probs

CALIBRATION_FILE = "calibration.json"
LEXICAL_STEM = "lexical"
CANDIDATES = ("lexical", "adapter", "blend", "fused")
"""Every shippable candidate, cheapest to run first: a tie on validation goes to the earlier."""
EXTRA_MODEL = {"lexical": LEXICAL_STEM, "blend": LEXICAL_STEM, "fused": fused.STEM}
"""The model file (stem in RUN_DIR) each candidate ships beside the adapter, or instead of it."""


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
    fused: fused.FusedModel | None = None
    """The fused SVM, when it ships."""
    model_sha256: str | None = None
    """The hash of the model shipped beside the adapter or instead of it (:func:`model_sha256`)."""
    lexical_seconds: float = 0.0
    """Time spent in the lexical model so far, so labeling can report its share."""

    @property
    def needs_adapter(self) -> bool:
        """Whether the shipped scores need the language model (not for the lexical model alone)."""
        return self.shipped != "lexical"

    @property
    def needs_hidden(self) -> bool:
        """Whether the shipped scores read the model's hidden states (the fused candidate)."""
        return self.shipped == "fused"

    def offsets(self, names: list[str | None]) -> torch.Tensor:
        """(names, labels): the model-free part of the shipped scores, computed ahead of the model:
        the lexical model's decision values (times w in the blend), or the fused SVM's TF-IDF part;
        zeros when the adapter ships alone, and for empty names."""
        out = torch.zeros((len(names), len(self.labels)))
        rows = [i for i, name in enumerate(names) if name is not None and str(name).strip()]
        if self.shipped != "adapter" and rows:
            start = time.perf_counter()
            kept = [str(names[i]) for i in rows]
            if self.shipped == "fused":
                out[rows] = self.fused.lexical_part(kept)
            else:
                decisions = baseline.decision_matrix(self.lexical, kept, self.labels)
                weight = self.blend_weight if self.shipped == "blend" else 1.0
                out[rows] = weight * torch.from_numpy(decisions).float()
            self.lexical_seconds += time.perf_counter() - start
        return out

    def blended(self, log_probs: torch.Tensor, offsets: torch.Tensor, hidden: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Uncalibrated shipped scores: the adapter's log-probabilities, plus the blend's
        ``offsets`` (:meth:`offsets` of the same names) when the blend ships, or the offsets
        alone when the lexical model ships alone; the fused SVM's decision values from the offsets
        and ``hidden`` (the prediction's hidden states) when it ships. Rows of NaN (empty names)
        stay NaN."""
        if self.shipped == "lexical":
            return offsets + 0 * log_probs  # keeps the NaN rows of empty names
        if self.shipped == "adapter":
            return log_probs
        if self.shipped == "fused":
            if hidden is None:
                raise ModelError("the fused candidate ships, but the prediction carries no hidden states")
            start = time.perf_counter()
            scores = self.fused.scores(offsets, hidden)
            self.lexical_seconds += time.perf_counter() - start
            return scores
        return blend_log_probs(log_probs, offsets, 1.0)  # offsets carry the weight

    def calibrated(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores / self.temperature).log_softmax(-1)

    def apply(self, prediction: Prediction, offsets: torch.Tensor) -> Prediction:
        """The adapter's prediction turned into the shipped one (statuses unchanged); ``offsets``
        are :meth:`offsets` of the names it scored."""
        log_probs = self.calibrated(self.blended(prediction.log_probs, offsets, prediction.hidden))
        usable = [i for i, label in enumerate(prediction.labels) if label is not None]
        labels, confidences = list(prediction.labels), list(prediction.confidences)
        if usable:
            best = best_labels(self.labels, log_probs[usable])
            for k, i in enumerate(usable):
                labels[i], confidences[i] = best.labels[k], best.confidence[k]
        return Prediction(labels, confidences, log_probs, prediction.statuses)

    def describe(self) -> dict[str, Any]:
        return {"shipped": self.shipped, "temperature": self.temperature, "blend_weight": self.blend_weight,
                f"{EXTRA_MODEL.get(self.shipped, LEXICAL_STEM)}_sha256": self.model_sha256}


def model_sha256(run_dir: Path, shipped: str) -> str | None:
    """One hash over the two files of the model ``shipped`` runs beside the adapter or instead
    of it (:data:`EXTRA_MODEL`): what ``labeled_by`` names; None for the adapter alone."""
    stem = EXTRA_MODEL.get(shipped)
    return None if stem is None else sha256_file(*(run_dir / f"{stem}{suffix}" for suffix in (".json", ".safetensors")))


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


def load_calibration(run_dir: Path, labels: list[str]) -> Calibration | None:
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
    if shipped == "fused":
        calibration.fused = fused.load(run_dir, labels)
    elif shipped != "adapter":
        calibration.lexical = baseline.load(run_dir, LEXICAL_STEM)["model"]
    calibration.model_sha256 = model_sha256(run_dir, shipped)
    return calibration
