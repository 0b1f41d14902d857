"""What a run ships, chosen on the validation split only: every shippable candidate competes, the
cheapest wins a tie, and each gets its own temperature.

- **Candidates**, cheapest first (``CANDIDATES``): ``lexical``, the TF-IDF + linear SVM of
  ``pipeline.baseline`` fitted on the run's training rows, which labels without the language
  model (tens of thousands of products a second on one core); ``adapter``, the tuned model's
  label log-probabilities; ``blend``, those plus w x the lexical model's decision values (the two
  err on different rows: the SVM keeps one weight per word, the model reads a name as a whole),
  w chosen on validation from a grid; ``fused``, one linear SVM over the TF-IDF features and the
  tuned model's hidden state (``pipeline.fused``), fitted on the training rows, for first-token
  label sets.
- **The choice.** The candidate with the best validation accuracy (then macro-F1), unless a
  cheaper one is within the 95% paired-bootstrap interval of its accuracy: then the cheapest
  of those ships. ``calibration.json`` says which rule decided.
- **Temperature.** One T per candidate, softmax(scores / T), fitted by minimising the negative
  log-likelihood of the validation labels, so that ``<level>_confidence`` means what it says.

Written to RUN_DIR/calibration.json with every candidate's validation accuracy, macro-F1, ECE
after its temperature and labeling speed; the lexical model, when it ships alone or in the blend,
as ``lexical.json`` + ``lexical.safetensors`` (no pickle: run folders are shared).
``pipeline.shipped`` reads and applies it for ``pipeline.predict``, so evaluation and labeling
ship the same thing, and a run that ships the lexical model loads no language model.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.optimize import minimize_scalar

from pipeline import baseline, fused
from pipeline.atomic import write_json_atomic
from pipeline.config import Recipe
from pipeline.data import read_split
from pipeline.errors import ConfigError, DataError
from pipeline.metrics import confidence_report, negative_log_likelihood, paired_bootstrap
from pipeline.predict import Predictor
from pipeline.scoring import blend_log_probs
from pipeline.shipped import CALIBRATION_FILE, CANDIDATES, EXTRA_MODEL, LEXICAL_STEM, model_sha256

log = logging.getLogger(__name__)

BLEND_WEIGHTS = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 40.0, 80.0, 160.0)
"""Tried against w=0 (the adapter alone): the SVM's decision values span a few units, the
adapter's log-probabilities tens. The earlier study on test halves chose 5 and 12; the demo and
the aisle run both chose 40, the largest weight then, with validation accuracy still rising."""


def fit_temperature(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """The T > 0 that minimises the NLL of softmax(scores / T) on these rows (searched in log T)."""
    def nll(log_t: float) -> float:
        return negative_log_likelihood((scores / float(np.exp(log_t))).log_softmax(-1), truth)

    found = minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


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


def implied_department(scores: torch.Tensor, predictor: Predictor, rows: pd.DataFrame) -> dict[str, float]:
    """An aisle-level candidate's department figures: the departments its predicted aisles imply,
    against those the rows' own aisles imply. One sweep ranks department- and aisle-level runs for the department task
    on them, so each candidate of an aisle-level run says what it is worth there too."""
    implied = np.asarray([predictor.parent[predictor.labels[i]] for i in scores.argmax(-1).tolist()], dtype=object)
    truth = np.asarray([predictor.parent[label] for label in rows[predictor.level]], dtype=object)
    accuracy, macro_f1 = _accuracy_and_f1(truth, implied)
    return {"accuracy": round(accuracy, 4), "macro_f1": round(macro_f1, 4)}


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


def training_hidden(run: Path, predictor: Predictor, train_path: Path, level: str, max_rows: int | None,
                    progress: bool) -> tuple[pd.DataFrame, torch.Tensor]:
    """The training rows (the first ``max_rows``, as training saw them) and the tuned model's
    hidden states of their names (the fused candidate's features), cached in the run directory
    for this adapter and inference path."""
    train = read_split(train_path, level=level)
    if max_rows:
        train = train.head(max_rows)
    names = train["product_name"].tolist()
    key = {"adapter_sha256": str(predictor.identity["adapter_sha256"]), "inference_path": predictor.path.name,
           "max_prompt_tokens": str(predictor.max_prompt_tokens), "rows": str(len(names))}
    log.info("fused candidate: hidden states of %d training rows", len(names))
    hidden = fused.cached_hidden(run, train_path, key, lambda: predictor.predict(
        names, progress=progress, calibrated=False, hidden=True).hidden)
    usable = torch.isfinite(hidden).all(1)  # an empty name has none
    return train[usable.numpy()], hidden[usable]


def fit(run_dir: str | Path, recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """Score every candidate on DATA_DIR/validation.parquet, fit each one's temperature, choose the
    one to ship and write RUN_DIR/calibration.json (plus the lexical model when it ships)."""
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

    unknown = sorted(set(recipe.eval.candidates) - set(CANDIDATES))
    if unknown:
        raise ConfigError(f"eval.candidates: {', '.join(unknown)} unknown (candidates: {', '.join(CANDIDATES)})")
    allowed = [c for c in recipe.eval.candidates if recipe.eval.blend or c == "adapter"]
    fused_model, fused_fit, train = None, None, None
    if "fused" in allowed and predictor.scorer != "first_token":
        fused_fit = {"skipped": f"the fused candidate reads the first-token scorer's hidden states; this run's "
                                f"labels use the {predictor.scorer} scorer (data.completion=distinct_first)"}
        log.info("%s", fused_fit["skipped"])
    elif "fused" in allowed:  # before validation, whose scores then stay cached for evaluate
        train, train_hidden = training_hidden(run, predictor, data_dir / "train.parquet", level,
                                              recipe.data.max_train_samples, progress)

    log.info("calibrating %s on %d validation rows", run, len(names))
    adapter_prediction = predictor.predict(names, progress=progress, calibrated=False, hidden=train is not None)
    adapter = adapter_prediction.log_probs
    speed = {"adapter": len(names) / adapter_prediction.seconds if adapter_prediction.seconds else None}
    scores: dict[str, torch.Tensor] = {"adapter": adapter}
    lexical, best, grid = None, 0.0, None
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
    if train is not None:
        fused_model, fused_fit = fused.fit(train["product_name"].tolist(), train[level].tolist(), train_hidden,
                                           names, validation[level].tolist(), adapter_prediction.hidden,
                                           predictor.labels)
        start = time.perf_counter()
        scores["fused"] = fused_model.scores(fused_model.lexical_part(names), adapter_prediction.hidden)
        own = (time.perf_counter() - start) / len(names)
        speed["fused"] = 1 / (1 / speed["adapter"] + own) if speed["adapter"] else None
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
                            **({"blend_weight": best} if name == "blend" else {}),
                            **({"department": implied_department(candidate, predictor, validation)}
                               if predictor.parent is not None else {})}
    temperature = candidates[shipped]["temperature"]
    chosen = scores[shipped]
    # The models before the file that names them; no stale one beside the run. The fused model is
    # kept whenever it competed: it is the costly one to refit, and benchmarks score it on test.
    kept = {EXTRA_MODEL[shipped]} if shipped in ("lexical", "blend") else set()
    if fused_model is not None:
        fused.save(fused_model, fused_fit, run)
        kept.add(fused.STEM)
    for stem in set(EXTRA_MODEL.values()) - kept:
        for suffix in (".json", ".safetensors"):
            (run / f"{stem}{suffix}").unlink(missing_ok=True)
    if shipped in ("lexical", "blend"):
        baseline.save(lexical, run, LEXICAL_STEM)
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
                              "sha256": model_sha256(run, shipped) if shipped in ("lexical", "blend") else None}
                  if lexical else None},
        "fused": {**fused_fit, "sha256": model_sha256(run, "fused") if fused_model is not None else None}
        if fused_fit else None,
        "temperature": temperature,
        "validation": {"adapter": confidence_report(adapter, truth),
                       "shipped_before_temperature": confidence_report(chosen.log_softmax(-1), truth),
                       "shipped": confidence_report((chosen / temperature).log_softmax(-1), truth)},
    }
    write_json_atomic(run / CALIBRATION_FILE, result)
    log.info("ships %s (%s), temperature %.3f", shipped, rule, temperature)
    return result
