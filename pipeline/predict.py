"""The one inference path: a run directory in, labels with confidences out.

``evaluate``, ``label`` and the benchmarks all score through a :class:`Predictor`, so they load
the same merged model the same way, choose the same scorer and cut names at the same prompt
budget. A ``SWEEP_DIR/promoted`` link is a run directory like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from pipeline import scoring
from pipeline.config import Recipe, load_recipe
from pipeline.data import read_labels
from pipeline.errors import ModelError
from pipeline.model import load_for_inference, resolve_dtype, train_device


def run_recipe(run_dir: str | Path, overrides: list[str] | None = None) -> Recipe:
    """The recipe a run was trained with (``RUN_DIR/config.yaml``), plus evaluation overrides."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ModelError(f"{run}: not a run directory (no config.yaml)")
    return load_recipe(run / "config.yaml", overrides)


@dataclass
class Predictor:
    """A run's adapter merged into its base model, ready to score product names."""

    run_dir: Path
    recipe: Recipe
    model: Any
    tokenizer: PreTrainedTokenizerBase
    labels: list[str]
    scorer: str
    """``first_token`` or ``full``, chosen once for the run's label set."""
    max_prompt_tokens: int
    """Names longer than the recipe's ``train.max_length`` keep their head (status ``truncated``)."""
    batch_size: int
    device: str
    dtype: torch.dtype

    @classmethod
    def from_run(cls, run_dir: str | Path, recipe: Recipe | None = None, batch_size: int | None = None) -> Predictor:
        """Load RUN_DIR (or ``SWEEP_DIR/promoted``); ``recipe`` defaults to the run's own."""
        run = Path(run_dir).resolve()
        recipe = recipe or run_recipe(run)
        labels = read_labels(run / "labels.json")
        device = train_device()
        dtype = resolve_dtype(recipe.eval.dtype, device)
        model, tokenizer = load_for_inference(run, recipe.model, device, dtype)
        return cls(run_dir=run, recipe=recipe, model=model, tokenizer=tokenizer, labels=labels,
                   scorer=scoring.choose_scorer(recipe.eval.scorer, tokenizer, labels),
                   max_prompt_tokens=recipe.train.max_length, batch_size=batch_size or recipe.eval.batch_size,
                   device=device, dtype=dtype)

    def predict(self, names: list[str | None], progress: bool = False) -> scoring.Prediction:
        """Labels, confidences, label log-probabilities and statuses, row for row."""
        return scoring.predict(self.model, self.tokenizer, names, self.labels, scorer=self.scorer,
                               batch_size=self.batch_size, max_prompt_tokens=self.max_prompt_tokens,
                               progress=progress)

    def describe(self) -> dict[str, Any]:
        """How this predictor scores, for manifests and benchmark records."""
        return {"base_model": self.recipe.model.base_model, "scorer": self.scorer, "device": self.device,
                "dtype": str(self.dtype).removeprefix("torch."), "batch_size": self.batch_size,
                "max_prompt_tokens": self.max_prompt_tokens}
