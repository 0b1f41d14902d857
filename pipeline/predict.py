"""The one inference path: a run directory in, labels with confidences out.

``evaluate``, ``label`` and the benchmarks all score through a :class:`Predictor`, so they load
the same merged model the same way, choose the same scorer and cut names at the same prompt
budget, and apply the run's calibration (``pipeline.shipped``: the blend with the lexical model
and the temperature, fitted on validation) when it has one. A ``SWEEP_DIR/promoted`` link is a
run directory like any other.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from pipeline import scoring, trie
from pipeline.atomic import sha256_file
from pipeline.config import Recipe, load_recipe
from pipeline.data import read_labels, read_taxonomy
from pipeline.errors import ConfigError, ModelError
from pipeline.model import InferencePath, dtype_name, inference_path, load_for_inference, run_tokenizer, train_device
from pipeline.shipped import EXTRA_MODEL, Calibration, load_calibration, model_sha256, shipped_candidate


def run_recipe(run_dir: str | Path, overrides: list[str] | None = None) -> Recipe:
    """The recipe a run was trained with (``RUN_DIR/config.yaml``), plus evaluation overrides."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ModelError(f"{run}: not a run directory (no config.yaml)")
    return load_recipe(run / "config.yaml", overrides)


def run_identity(run_dir: str | Path) -> dict[str, str | None]:
    """What labeled a row: ``labeled_by`` names every artifact that changes labels: the run's name
    and its adapter's hash, plus the lexical model's hash when the run ships a blend
    (``run@<adapter>+lexical@<lexical>``) or the fused SVM's when that ships
    (``run@<adapter>+fused@<fused>``), or the lexical model's alone when it ships alone
    (``lexical@<lexical>``).

    Cheap (hashes only), so a labeling job fails on a wrong path before loading any model.
    """
    run = Path(run_dir)
    weights = run / "adapter" / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{run}: no adapter/adapter_model.safetensors (not a finished run directory)")
    adapter = sha256_file(weights)
    shipped = shipped_candidate(run) or "adapter"
    extra, stem = model_sha256(run, shipped), EXTRA_MODEL.get(shipped)
    if shipped == "lexical":
        labeled_by = f"lexical@{extra[:12]}"
    else:
        labeled_by = f"{run.resolve().name}@{adapter[:12]}" + (f"+{stem}@{extra[:12]}" if extra else "")
    return {"labeled_by": labeled_by, "shipped": shipped, "adapter_sha256": adapter,
            "lexical_sha256": extra if stem == "lexical" else None, "fused_sha256": extra if stem == "fused" else None}


_merged: dict[tuple, tuple[Any, PreTrainedTokenizerBase]] = {}


def merged_model(run: Path, recipe: Recipe, device: str, path: InferencePath, adapter_sha256: str,
                 tokenizer: PreTrainedTokenizerBase | None = None):
    """:func:`pipeline.model.load_for_inference`, kept for the last run loaded in this process.

    ``train`` calibrates and then evaluates each split, each through a Predictor of the same
    run, and a test session labels with one adapter dozens of times: each load re-quantizes the
    base and merges the adapter (5 s for the 135M model, minutes for a 7B one). Keyed by the
    adapter's hash, so a retrained run is reloaded; one model at a time, since a merged 7B model
    in fp32 is 28 GB.
    """
    key = (str(run), adapter_sha256, repr(recipe.model), device, path)
    if key not in _merged:
        _merged.clear()
        _merged[key] = load_for_inference(run, recipe.model, device, path, tokenizer)
    return _merged[key]


_adapter_scores: dict[tuple, tuple[weakref.ref, scoring.Prediction]] = {}
"""The last adapter scores, with a weak reference to the model that made them: a benchmark that
quantizes a model in place gets a new model object, never another model's scores."""


@dataclass
class Prepared:
    """Names with the model-free work done (:meth:`Predictor.prepare`)."""

    names: list[str | None]
    encoded: scoring.Encoded | None
    """The prompts; None where the lexical model ships alone (no language model)."""
    offsets: torch.Tensor | None = None
    """(names, labels): what the shipped scores add to the adapter's, the blend's lexical part
    (zeros without a blend or calibration); None for the adapter's own prediction."""

    @property
    def calibrated(self) -> bool:
        """For the shipped prediction (else the adapter's own)."""
        return self.offsets is not None


@dataclass
class Predictor:
    """A run's shipped labeler, ready to score product names: its adapter merged into its base
    model (with the blend and temperature of its calibration), or, where the run ships the lexical
    model alone, that model and no language model at all (``model`` and ``tokenizer`` None)."""

    run_dir: Path
    recipe: Recipe
    model: Any
    tokenizer: PreTrainedTokenizerBase | None
    labels: list[str]
    texts: list[str]
    """What the model writes for each label, in label order (``data.completion``): scored in
    their place, so outputs carry the labels."""
    scorer: str
    """``first_token``, ``trie`` or ``full``, chosen once for the run's label set; ``lexical``
    where the lexical model ships alone."""
    max_prompt_tokens: int
    """Names longer than the recipe's ``train.max_length`` keep their head (status ``truncated``)."""
    batch_size: int
    device: str
    path: InferencePath | None
    """dtype and compiled or not (``eval.dtype``, ``eval.compile``), resolved for this machine;
    None without a language model."""
    calibration: Calibration | None = None
    identity: dict[str, str | None] = field(default_factory=dict)
    """``labeled_by`` and the hashes behind it (:func:`run_identity`)."""
    level: str = "department"
    """The label level the model predicts (``data.label_level``)."""
    parent: dict[str, str] | None = None
    """Each label's department, for an aisle-level run (from RUN_DIR/taxonomy.json)."""

    @classmethod
    def from_run(cls, run_dir: str | Path, recipe: Recipe | None = None, batch_size: int | None = None,
                 calibrated: bool = True) -> Predictor:
        """Load RUN_DIR (or ``SWEEP_DIR/promoted``); ``recipe`` defaults to the run's own.
        ``calibrated=False`` scores with the adapter alone (what calibration is fitted on)."""
        run = Path(run_dir).resolve()
        recipe = recipe or run_recipe(run)
        if recipe.model.quantization == "auto":  # a recipe file's: the run recorded what its adapter trained on
            trained = run_recipe(run).model.quantization
            recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, quantization=trained))
        identity = run_identity(run_dir)
        labels = read_labels(run / "labels.json")
        tree = read_taxonomy(run / "taxonomy.json")
        level = recipe.data.label_level
        parent = tree["parent"][level] if tree and level != "department" else None
        calibration = load_calibration(run, labels) if calibrated else None
        if calibration is not None and not calibration.needs_adapter:  # no language model to load
            return cls(run_dir=run, recipe=recipe, model=None, tokenizer=None, labels=labels, texts=labels,
                       scorer="lexical", max_prompt_tokens=recipe.train.max_length,
                       batch_size=batch_size or recipe.eval.batch_size, device="cpu", path=None,
                       calibration=calibration, identity=identity, level=level, parent=parent)
        device = train_device()
        tokenizer = run_tokenizer(run, recipe.model)  # the scorer, and with it the path, depend on it
        texts = scoring.completion_texts(tokenizer, labels, recipe.data.completion)
        scorer = scoring.choose_scorer(recipe.eval.scorer, tokenizer, texts)
        path = inference_path(recipe.eval.dtype, recipe.eval.compile, device, scorer=scorer)
        model, _ = merged_model(run, recipe, device, path, str(identity["adapter_sha256"]), tokenizer)
        return cls(run_dir=run, recipe=recipe, model=model, tokenizer=tokenizer, labels=labels, texts=texts,
                   level=level,
                   parent=parent,
                   scorer=scorer,
                   max_prompt_tokens=recipe.train.max_length, batch_size=batch_size or recipe.eval.batch_size,
                   device=device, path=path, identity=identity, calibration=calibration)

    def prepare(self, names: list[str | None], calibrated: bool = True) -> Prepared:
        """The model-free part of :meth:`predict`: prompts and, for shipped predictions, the
        blend's lexical scores. ``pipeline.label`` prepares the next record batch in a thread
        while the model scores this one."""
        encoded = None if self.model is None else scoring.encode_names(self.tokenizer, names, self.max_prompt_tokens)
        if not calibrated:
            return Prepared(names, encoded)
        offsets = self.calibration.offsets(names) if self.calibration else torch.zeros((len(names), len(self.labels)))
        return Prepared(names, encoded, offsets)

    def predict(self, names: list[str | None] | Prepared, progress: bool = False,
                calibrated: bool = True, hidden: bool | None = None) -> scoring.Prediction:
        """Labels, confidences, label log-probabilities and statuses, row for row: the shipped
        ones, or with ``calibrated=False`` the adapter's own (``names`` already :meth:`prepare`'d
        say which they are for). ``hidden`` keeps the model's hidden states in the prediction:
        by default where the shipped candidate reads them (the fused SVM).

        The adapter's own scores of the last list of names are kept for this process: ``train``
        calibrates on validation and then evaluates the same rows with the same adapter, and with
        the trie scorer (hundreds of labels) a pass over validation is most of a run's evaluation.
        Shipped predictions are never reused, so that benchmarks time real scoring.
        """
        prepared = names if isinstance(names, Prepared) else self.prepare(names, calibrated)
        if self.model is None:
            return self._lexical_predict(prepared)
        if hidden is None:
            hidden = bool(self.calibration and self.calibration.needs_hidden)
        key = None
        if not prepared.calibrated:  # labeling batches (shipped) never build the key
            key = (self.identity.get("adapter_sha256"), str(self.run_dir), self.path, self.scorer,
                   tuple(self.labels), tuple(self.texts), self.max_prompt_tokens, tuple(prepared.names))
            model, kept = _adapter_scores.get(key, (None, None))
            if kept is not None and model() is self.model and (kept.hidden is not None or not hidden):
                return kept
        start = time.perf_counter()
        search = self.search_space(prepared.offsets) if prepared.calibrated else None
        prediction = scoring.predict(self.model, self.tokenizer, prepared.encoded, self.labels, scorer=self.scorer,
                                     batch_size=self.batch_size, progress=progress, search=search, texts=self.texts,
                                     hidden=hidden)
        prediction.seconds = time.perf_counter() - start
        if key is not None:
            _adapter_scores.clear()
            _adapter_scores[key] = (weakref.ref(self.model), prediction)
        elif self.calibration and search is None:
            return self.calibration.apply(prediction, prepared.offsets)
        return prediction

    def _lexical_predict(self, prepared: Prepared) -> scoring.Prediction:
        """The lexical model's prediction, where it ships alone: its calibrated decision values."""
        if not prepared.calibrated:
            raise ModelError(f"{self.run_dir} ships the lexical model alone: no adapter is loaded to score with")
        start = time.perf_counter()
        usable = [name is not None and bool(str(name).strip()) for name in prepared.names]
        nothing = torch.full((len(prepared.names), len(self.labels)), float("nan"))
        nothing[torch.tensor(usable, dtype=torch.bool)] = 0.0  # the adapter's part of the shipped scores: none
        unscored = scoring.Prediction(["" if ok else None for ok in usable], [None] * len(usable), nothing,
                                      ["ok" if ok else "empty_name" for ok in usable])
        prediction = self.calibration.apply(unscored, prepared.offsets)
        prediction.seconds = time.perf_counter() - start
        return prediction

    def search_space(self, offsets: torch.Tensor) -> trie.SearchSpace | None:
        """Where the trie scorer's shipped predictions are searched: the calibration's blend
        (``offsets``, :meth:`prepare`'s) and temperature; None where every label is scored: other
        scorers, ``eval.trie_tolerance: 0``.

        Only shipped predictions search: calibration is fitted on, and evaluation reports, every
        label's exact score, and the search's top label is that exact score's top label."""
        tolerance = self.recipe.eval.trie_tolerance
        if not 0 <= tolerance < 1:
            raise ConfigError(f"eval.trie_tolerance must be in [0, 1), got {tolerance}")
        if self.scorer != "trie" or tolerance == 0:
            return None
        temperature = self.calibration.temperature if self.calibration else 1.0
        return trie.SearchSpace(offsets, temperature, tolerance)

    def parent_prediction(self, prediction: scoring.Prediction) -> tuple[list[str | None], list[float | None]]:
        """Each row's department: the parent of its predicted label, with the summed probability
        of that department's labels, so that the two levels never disagree."""
        if self.parent is None:
            raise ModelError(f"{self.run_dir}: a {self.level}-level run has no parent level")
        departments = sorted(set(self.parent.values()))
        column = {d: i for i, d in enumerate(departments)}
        membership = torch.zeros(len(self.labels), len(departments))
        for i, label in enumerate(self.labels):
            membership[i, column[self.parent[label]]] = 1
        summed = prediction.log_probs.exp() @ membership
        labels: list[str | None] = [None if label is None else self.parent[label] for label in prediction.labels]
        confidences = [None if d is None else float(summed[i, column[d]]) for i, d in enumerate(labels)]
        return labels, confidences

    def describe(self) -> dict[str, Any]:
        """How this predictor scores, for manifests and benchmark records."""
        return {**self.identity, "base_model": self.recipe.model.base_model, "scorer": self.scorer,
                "completion": self.recipe.data.completion,
                "device": self.device, "dtype": dtype_name(self.path.dtype) if self.path else None,
                "inference_path": self.path.name if self.path else "lexical",
                "batch_size": self.batch_size, "max_prompt_tokens": self.max_prompt_tokens,
                "label_level": self.level,
                "trie_tolerance": self.recipe.eval.trie_tolerance if self.scorer == "trie" else None,
                "calibration": self.calibration.describe() if self.calibration else None}
