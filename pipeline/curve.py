"""The validation curve: every K optimizer steps, the model being trained scores a fixed slice of
validation, so that a run shows when it reached an accuracy (and the baseline's) and can stop
there (``train.curve_every``, ``train.curve_samples``, ``train.stop_at``; the training benchmark
adds a time budget). Scoring time is kept out of the training time it records.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from pipeline import scoring
from pipeline.atomic import write_json_atomic
from pipeline.metrics import classification_metrics
from pipeline.model import scoring_mode, synchronize

log = logging.getLogger(__name__)


def examples_per_step(args) -> int:
    """Examples one optimizer step consumes, over every process of a data-parallel run
    (``transformers.TrainingArguments``)."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


class AccuracyCurve(TrainerCallback):
    """Times every optimizer step and, every K steps, scores a fixed validation slice with the model being
    trained. Evaluation time is kept out of ``train_seconds``, so recipes compare on training cost.
    Stops the training once ``budget_s`` of training time is spent, or once a curve point reaches
    ``stop_at`` accuracy (a time-to-accuracy run need not train on past its answer)."""

    def __init__(self, names: list[str], truth: list[str], labels: list[str], every: int, budget_s: float | None,
                 batch_size: int, stop_at: float | None = None, completion: str = "label",
                 path: Path | None = None) -> None:
        self.names, self.truth, self.labels, self.completion = names, truth, labels, completion
        self.every, self.budget_s, self.batch_size, self.stop_at = every, budget_s, batch_size, stop_at
        self.step_seconds: list[float] = []
        self.points: list[dict[str, Any]] = []
        self.seconds_before = 0.0
        self.path = path
        """Where :meth:`save` writes the curve (RUN_DIR/curve.json); a resumed run keeps the points
        it had before its checkpoint."""

    def resume(self, step: int) -> None:
        """Keep the saved points up to ``step`` (the checkpoint a run resumes from): the steps after
        it are trained again."""
        if self.path is not None and self.path.is_file():
            saved = json.loads(self.path.read_text())
            self.points = [p for p in saved["points"] if p["step"] <= step]
            self.seconds_before = self.points[-1]["train_seconds"] if self.points else 0.0

    def save(self) -> None:
        write_json_atomic(self.path, {"split": "validation", "samples": len(self.names), "every": self.every,
                                      "stop_at": self.stop_at, "points": self.points})

    @property
    def train_seconds(self) -> float:
        """Training time so far, scoring excluded; a resumed run's counts on from its last kept point."""
        return self.seconds_before + sum(self.step_seconds)

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize()
        self.step_start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        synchronize()
        self.step_seconds.append(time.perf_counter() - self.step_start)
        last = state.global_step >= state.max_steps or (self.budget_s and self.train_seconds >= self.budget_s)
        if self.every and (state.global_step % self.every == 0 or last):
            self.points.append({"step": state.global_step, "examples": state.global_step * examples_per_step(args),
                                "train_seconds": round(self.train_seconds, 1),
                                **self.score(model, processing_class)})
            log.info("validation curve: %s", self.points[-1])
            if self.path is not None:  # each point at once: a preempted run keeps its curve
                self.save()
            if self.stop_at is not None and self.points[-1]["accuracy"] >= self.stop_at:
                control.should_training_stop = True
        if self.budget_s and self.train_seconds >= self.budget_s:
            control.should_training_stop = True
        return control

    def score(self, model, tokenizer) -> dict[str, Any]:
        start = time.perf_counter()
        with scoring_mode(model):
            texts = scoring.completion_texts(tokenizer, self.labels, self.completion)
            predicted = scoring.predict(model, tokenizer, self.names, self.labels, batch_size=self.batch_size,
                                        texts=texts).labels
        metrics = classification_metrics(self.truth, predicted, self.labels)
        return {"accuracy": round(metrics["accuracy"], 4), "macro_f1": round(metrics["macro_f1"], 4),
                "eval_seconds": round(time.perf_counter() - start, 1)}


def first_reaching(points: list[dict[str, Any]], accuracy: float) -> dict[str, Any] | None:
    """The first curve point at or above ``accuracy`` (a conservative time-to-accuracy)."""
    hit = next((p for p in points if p["accuracy"] >= accuracy), None)
    return None if hit is None else {"step": hit["step"], "train_seconds": hit["train_seconds"]}
