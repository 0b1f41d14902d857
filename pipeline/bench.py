"""Benchmarks that print JSON; numbers, never asserts.

``python -m pipeline.bench label --adapter RUN_DIR --data DATA_DIR``
    the tutorial's free generation vs the constrained labeler on the same held-out products,
    same adapter, same process: products/s, their ratio, accuracy, and the labeler's achieved
    GFLOP/s against a matmul peak measured in the same run.
``python -m pipeline.bench train --config RECIPE [--minutes M] [--stop-at A] [--eval-every K] [key=value ...]``
    trains a recipe for a fixed budget (of training time, evaluations excluded) and records
    throughput (s/step, examples/s, tokens/s) and the accuracy curve on a fixed slice of test
    (the first ``--eval-samples`` products), then the final metrics on the whole split;
    ``--stop-at`` ends it once a curve point reaches that accuracy.
``python -m pipeline.bench label-memory --adapter RUN_DIR --data DATA_DIR --rows 10000 100000``
    peak memory of ``catalog-tuner label`` on synthetic catalogs of growing size (one fresh
    process per size); ``--new-fraction 0.01`` pre-labels the rest, like a nightly
    ``--only-missing`` run.
``python -m pipeline.bench errors --run RUN_DIR [--train-samples N] [--ensemble]``
    where a finished run's test predictions and the classical baseline's agree and differ (both
    right, only one right, neither), how often products whose names repeat between train and
    test carry the same department (a ceiling set by the labels themselves), how many rows of
    each kind a rare, telling training word decides, how well the model fits its own
    training rows, and what the model and the baseline score together.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import TrainerCallback

log = logging.getLogger(__name__)


def matmul_peak_gflops(dtype: torch.dtype, size: int = 2048, repeat: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * size**3 * repeat / (time.perf_counter() - start) / 1e9


def machine(device: str | None) -> dict[str, Any]:
    """What a throughput figure depends on: results from different machines are not comparable
    (one dev machine had AMX, bf16 matmuls at 5.9x fp32's rate; another had neither AMX nor
    AVX512-BF16, bf16 at a third to half of fp32's)."""
    from pipeline.model import cpu_has_native_bf16

    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), None) if Path("/proc/cpuinfo").is_file() else None
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": device, "cpu": cpu_model, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_native_bf16": cpu_has_native_bf16(),
            "matmul_peak_gflops": {"fp32": round(matmul_peak_gflops(torch.float32), 1),
                                   "bf16": round(matmul_peak_gflops(torch.bfloat16), 1)}}


def parse_generation(text: str, prompt: str, labels: list[str]) -> str | None:
    """The tutorial's answer: the label named first after the prompt (longest on ties), if any."""
    answer = text[len(prompt):].lower() if text.startswith(prompt) else text.lower()
    found = [(answer.find(l), -len(l), l) for l in labels if l in answer]
    return min(found)[2] if found else None


def forward_flops(model, prompts: list[list[int]], batch_size: int) -> tuple[float, int]:
    """FLOPs of the scorer's batches (padding included) and the real prompt tokens."""
    body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    head = model.get_output_embeddings().weight.numel()
    lengths = sorted(len(p) for p in prompts)
    padded = sum(max(lengths[i:i + batch_size]) * len(lengths[i:i + batch_size])
                 for i in range(0, len(lengths), batch_size))
    # 2 FLOPs per weight per token, plus attention scores (small at ~12 tokens), plus one head row per product
    return 2.0 * body * padded + 2.0 * head * len(prompts), sum(lengths)


def bench_label(adapter: Path, data: Path, n: int, tutorial_n: int, batch_size: int) -> dict[str, Any]:
    import transformers

    from pipeline import scoring
    from pipeline.label import Labeler

    test = pd.read_parquet(data / "test.parquet").head(n)
    names, truth = test["product_name"].tolist(), test["department"].tolist()
    peak = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}

    labeler = Labeler(adapter, batch_size=batch_size)
    labeler.predict(names[:batch_size])  # warm-up
    start = time.perf_counter()
    predicted, _, _ = labeler.predict(names)
    labeler_s = time.perf_counter() - start
    prompts, _ = scoring.encode_prompts(labeler.tokenizer, names, labeler.max_prompt_tokens)
    flops, tokens = forward_flops(labeler.model, prompts, batch_size)

    generator = transformers.pipeline("text-generation", model=labeler.model, tokenizer=labeler.tokenizer)
    torch.manual_seed(0)
    answers = []
    start = time.perf_counter()
    for name in names[:tutorial_n]:
        prompt = name + " ->:"
        out = generator(prompt, do_sample=True, top_k=10, max_length=100, num_return_sequences=1,
                        eos_token_id=labeler.tokenizer.eos_token_id)
        answers.append(parse_generation(out[0]["generated_text"], prompt, labeler.labels))
    tutorial_s = time.perf_counter() - start

    def accuracy(pred: list[str | None], k: int) -> float:
        return sum(p == t for p, t in zip(pred, truth[:k])) / k

    labeler_rate, tutorial_rate = n / labeler_s, tutorial_n / tutorial_s
    return {
        "adapter": str(adapter), "products": n, "torch_threads": torch.get_num_threads(),
        "tutorial_generation": {"products": tutorial_n, "seconds": round(tutorial_s, 1),
                                "products_per_s": round(tutorial_rate, 2),
                                "accuracy": round(accuracy(answers, tutorial_n), 4),
                                "unparseable": sum(a is None for a in answers)},
        "labeler": {"seconds": round(labeler_s, 2), "products_per_s": round(labeler_rate, 1),
                    "accuracy": round(accuracy(predicted, n), 4), "scorer": labeler.scorer,
                    "dtype": str(next(labeler.model.parameters()).dtype), "batch_size": batch_size,
                    "prompt_tokens": tokens, "achieved_gflops": round(flops / labeler_s / 1e9, 1)},
        "speedup": round(labeler_rate / tutorial_rate, 1),
        "matmul_peak_gflops": {k: round(v, 1) for k, v in peak.items()},
        "labeler_fraction_of_fp32_peak": round(flops / labeler_s / 1e9 / peak["fp32"], 3),
    }


def synthetic_catalog(data: Path, rows: int, new_fraction: float, labeled_by: str, path: Path) -> None:
    """``rows`` products cycled from the Instacart names, written in 64k-row groups; all but
    ``new_fraction`` of them already carry this adapter's label."""
    source = pd.concat([pd.read_parquet(data / f) for f in ("train.parquet", "test.parquet")])
    names, departments = source["product_name"].to_numpy(), source["department"].to_numpy()
    schema = pa.schema([("product_id", pa.int64()), ("product_name", pa.string()), ("department", pa.string()),
                        ("department_confidence", pa.float32()), ("label_status", pa.string()),
                        ("labeled_by", pa.string()), ("labeled_at", pa.timestamp("us", tz="UTC"))])
    chunk = 65536
    stamp = pd.Timestamp("2026-01-01", tz="UTC")
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, chunk):
            ids = list(range(start, min(rows, start + chunk)))
            new = [(i * 7919) % 1000 < new_fraction * 1000 for i in ids]
            pick = [i % len(names) for i in ids]
            writer.write_table(pa.table({
                "product_id": ids,
                "product_name": [names[p] for p in pick],
                "department": [None if n else departments[p] for n, p in zip(new, pick)],
                "department_confidence": [None if n else 1.0 for n in new],
                "label_status": [None if n else "ok" for n in new],
                "labeled_by": [None if n else labeled_by for n in new],
                "labeled_at": [None if n else stamp for n in new],
            }, schema=schema))


def bench_label_memory_one(adapter: Path, catalog: Path, out: Path, only_missing: bool) -> dict[str, Any]:
    from pipeline.label import label_catalogs

    start = time.perf_counter()
    outcomes = label_catalogs(adapter, [str(catalog)], out, only_missing=only_missing, progress=False)
    seconds = time.perf_counter() - start
    return {"rows": sum(o.rows for o in outcomes), "seconds": round(seconds, 1),
            "status": [o.status for o in outcomes],
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def bench_label_memory(adapter: Path, data: Path, sizes: list[int], new_fraction: float) -> dict[str, Any]:
    from pipeline.label import adapter_identity

    labeled_by, _ = adapter_identity(adapter)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in sizes:
            catalog = Path(tmp) / f"catalog-{rows}.parquet"
            synthetic_catalog(data, rows, new_fraction, labeled_by, catalog)
            command = [sys.executable, "-m", "pipeline.bench", "label-memory-one", "--adapter", str(adapter),
                       "--catalog", str(catalog), "--output", str(Path(tmp) / f"out-{rows}")]
            if new_fraction < 1:
                command.append("--only-missing")
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["rows_labeled"] = round(rows * new_fraction) if new_fraction < 1 else rows
            results.append(result)
            catalog.unlink()
    return {"adapter": str(adapter), "new_fraction": new_fraction, "runs": results}


class AccuracyCurve(TrainerCallback):
    """Times every optimizer step and, every K steps, scores a fixed test slice with the model being
    trained. Evaluation time is kept out of ``train_seconds``, so recipes compare on training cost.
    Stops the training once ``budget_s`` of training time is spent, or once a curve point reaches
    ``stop_at`` accuracy (a time-to-accuracy run need not train on past its answer)."""

    def __init__(self, names: list[str], truth: list[str], labels: list[str], every: int, budget_s: float | None,
                 batch_size: int, stop_at: float | None = None) -> None:
        self.names, self.truth, self.labels = names, truth, labels
        self.every, self.budget_s, self.batch_size, self.stop_at = every, budget_s, batch_size, stop_at
        self.step_seconds: list[float] = []
        self.points: list[dict[str, Any]] = []
        self.prompts: list[list[int]] | None = None

    @property
    def train_seconds(self) -> float:
        return sum(self.step_seconds)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.step_seconds.append(time.perf_counter() - self.step_start)
        last = state.global_step >= state.max_steps or (self.budget_s and self.train_seconds >= self.budget_s)
        if self.every and (state.global_step % self.every == 0 or last):
            self.points.append({"step": state.global_step,
                                "examples": state.global_step * args.per_device_train_batch_size
                                * args.gradient_accumulation_steps * args.world_size,
                                "train_seconds": round(self.train_seconds, 1),
                                **self.score(model, processing_class)})
            log.info("bench: %s", self.points[-1])
            if self.stop_at is not None and self.points[-1]["accuracy"] >= self.stop_at:
                control.should_training_stop = True
        if self.budget_s and self.train_seconds >= self.budget_s:
            control.should_training_stop = True
        return control

    def score(self, model, tokenizer) -> dict[str, Any]:
        from bitsandbytes.nn import Linear4bit

        from pipeline import scoring
        from pipeline.evaluate import classification_metrics

        if self.prompts is None:
            self.prompts, _ = scoring.encode_prompts(tokenizer, self.names)
        start = time.perf_counter()
        model.eval()  # LoRA dropout off...
        for module in model.modules():
            # ...but bitsandbytes' 4-bit layers stay in training mode: in eval mode on CPU they repack
            # their weights in place for an inference kernel, and training on afterwards went wrong
            # (zero gradients, then the loss diverged: seen with the tutorial recipe).
            if isinstance(module, Linear4bit):
                module.train()
        try:
            predicted = scoring.score(model, tokenizer, self.prompts, self.labels, "auto", self.batch_size,
                                      progress=False).labels
        finally:
            model.train()
        metrics = classification_metrics(self.truth, predicted, self.labels)
        return {"accuracy": round(metrics["accuracy"], 4), "macro_f1": round(metrics["macro_f1"], 4),
                "eval_seconds": round(time.perf_counter() - start, 1)}


def first_reaching(points: list[dict[str, Any]], accuracy: float) -> dict[str, Any] | None:
    """The first curve point at or above ``accuracy`` (a conservative time-to-accuracy)."""
    hit = next((p for p in points if p["accuracy"] >= accuracy), None)
    return None if hit is None else {"step": hit["step"], "train_seconds": hit["train_seconds"]}


def bench_train(config: str, overrides: list[str], run: Path, minutes: float | None, eval_every: int,
                eval_samples: int, final_eval: bool, thresholds: list[float],
                stop_at: float | None = None) -> dict[str, Any]:
    from pipeline.config import load_recipe
    from pipeline.data import read_labels, read_split
    from pipeline.train import ensure_prepared, train

    if run.exists():
        raise SystemExit(f"{run}: exists; a benchmark trains a fresh run (choose another --run)")
    recipe = load_recipe(config, overrides)
    data_dir = ensure_prepared(recipe)
    labels = read_labels(data_dir / "labels.json")
    test = read_split(data_dir / "test.parquet", labels).head(eval_samples)
    curve = AccuracyCurve(test["product_name"].tolist(), test["department"].tolist(), labels, eval_every,
                          minutes * 60 if minutes else None, recipe.eval.batch_size, stop_at)
    started = time.time()
    metrics = train(recipe, run, evaluate_after=final_eval, callbacks=[curve])

    t = recipe.train
    examples_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps
    timed = curve.step_seconds[2:] or curve.step_seconds  # the first steps warm up allocators and caches
    seconds_per_step = float(pd.Series(timed).median())
    history = json.loads((run / "train_log.json").read_text())
    tokens = max((h.get("num_tokens", 0) for h in history), default=0)
    final_keys = ("accuracy", "macro_f1", "n_eval", "baseline", "majority_class", "per_label")
    return {
        "benchmark": "train",
        "command": "python -m pipeline.bench train " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["train"] else None,
        "recipe": config,
        "overrides": overrides,
        "config": recipe.to_dict(),
        "run": str(run),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": machine(metrics.get("device")),
        "quantization": recipe.model.quantization,
        "compute_dtype": metrics.get("compute_dtype"),
        "steps": metrics["train_steps"],
        "throughput": {
            "steps_timed": len(timed),
            "seconds_per_step": round(seconds_per_step, 3),
            "examples_per_s": round(examples_per_step / seconds_per_step, 2),
            "tokens_per_s": round(tokens / curve.train_seconds, 1) if tokens else None,
            "tokens_per_example": round(tokens / (metrics["train_steps"] * examples_per_step), 1) if tokens else None,
        },
        "train_seconds": round(curve.train_seconds, 1),
        "eval_samples": len(test),
        "curve": curve.points,
        "time_to_accuracy": {str(a): first_reaching(curve.points, a) for a in thresholds},
        "final": {k: metrics[k] for k in final_keys if k in metrics},
    }


def normalized_name(name: str) -> str:
    """Lower-case letters and single spaces: "Organic Whole Milk, 1 gal" and "organic whole milk gal"
    are one product name for the repeated-names count."""
    return " ".join("".join(c if c.isalpha() else " " for c in name.lower()).split())


def telling_words(train: pd.DataFrame, max_names: int = 20, min_purity: float = 0.9) -> dict[str, str]:
    """Words in at most ``max_names`` training names, at least ``min_purity`` of them in one
    department, mapped to that department.

    Such a word (a brand, mostly) is per-word memory that a TF-IDF model stores in one weight
    each and a low-rank adapter has to squeeze through shared matrices; counting the test rows
    where one names the truth tells how much of the baseline's lead that memory can explain.
    """
    departments: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for name, department in zip(train["product_name"], train["department"]):
        for word in set(normalized_name(name).split()):
            departments[word][department] += 1
    telling = {}
    for word, counts in departments.items():
        total = sum(counts.values())
        department, count = counts.most_common(1)[0]
        if total <= max_names and count >= min_purity * total:
            telling[word] = department
    return telling


ENSEMBLE_WEIGHTS = (0.5, 1, 2, 3, 5, 8, 12, 20, 40)


def ensemble_cross_fitted(log_probs, decisions, truth, labels: list[str],
                          weights: tuple[float, ...] = ENSEMBLE_WEIGHTS, seed: int = 0) -> dict[str, Any]:
    """Predict argmax(model log-probabilities + w * baseline decision values) for every test row, with
    w chosen on the other random half of the rows (both ways round).

    Choosing w on the rows it is scored on would flatter the ensemble; fitting it on one half and
    scoring the other is what a weight fitted on held-out data would give.
    """
    from pipeline.evaluate import classification_metrics

    rows = np.random.RandomState(seed).permutation(len(truth))
    halves = (rows[: len(rows) // 2], rows[len(rows) // 2:])
    names = np.asarray(labels)

    def accuracy(weight: float, part) -> float:
        return float((names[(log_probs[part] + weight * decisions[part]).argmax(1)] == truth[part]).mean())

    predicted = np.empty(len(truth), dtype=object)
    chosen = []
    for fit, held_out in (halves, halves[::-1]):
        weight = max(weights, key=lambda w: accuracy(w, fit))
        chosen.append(weight)
        predicted[held_out] = names[(log_probs[held_out] + weight * decisions[held_out]).argmax(1)]
    metrics = classification_metrics(list(truth), list(predicted), labels)
    return {"weights_tried": list(weights), "weights_chosen": chosen,
            "accuracy": round(metrics["accuracy"], 4), "macro_f1": round(metrics["macro_f1"], 4)}


def bench_errors(run: Path, train_samples: int, ensemble: bool = False) -> dict[str, Any]:
    from pipeline import baseline, scoring
    from pipeline.config import load_recipe
    from pipeline.data import read_labels, read_split
    from pipeline.model import load_for_inference, resolve_dtype, train_device

    recipe = load_recipe(run / "config.yaml")
    predictions = pd.read_parquet(run / "eval_predictions.parquet")
    data_dir = Path(recipe.data.dir)
    train = read_split(data_dir / "train.parquet")
    svm = baseline.fitted(data_dir / "train.parquet", train)["model"]
    truth = predictions["department"].to_numpy()
    model_right = predictions["predicted"].to_numpy() == truth
    baseline_right = svm.predict(predictions["product_name"].tolist()) == truth

    def share(mask) -> float | None:
        return round(float(mask.mean()), 4) if mask.size else None

    train_department = train.assign(key=train["product_name"].map(normalized_name)).groupby("key")["department"]
    usual = train_department.agg(lambda d: d.mode().iloc[0])
    keys = predictions["product_name"].map(normalized_name)
    repeated = keys.isin(usual.index).to_numpy()
    max_names, min_purity = 20, 0.9
    telling = telling_words(train, max_names, min_purity)
    told_truth = np.array([any(telling.get(word) == department for word in key.split())
                           for key, department in zip(keys, truth)], dtype=bool)
    cells = {"both_right": model_right & baseline_right, "model_only_right": model_right & ~baseline_right,
             "baseline_only_right": ~model_right & baseline_right, "neither_right": ~model_right & ~baseline_right}
    result: dict[str, Any] = {
        "benchmark": "errors",
        "run": str(run),
        "test_products": len(truth),
        "model_accuracy": share(model_right),
        "baseline_accuracy": share(baseline_right),
        **{cell: share(mask) for cell, mask in cells.items()},
        "either_right": share(model_right | baseline_right),
        "repeated_names": {
            "test_products": int(repeated.sum()),
            "same_department_as_train": share(usual.reindex(keys[repeated]).to_numpy() == truth[repeated]),
            "model_accuracy": share(model_right[repeated]),
        },
        "telling_word_names_the_truth": {
            "rule": f"a word in at most {max_names} training names, "
                    f"at least {min_purity:.0%} of them in one department",
            **{cell: {"rows": int(mask.sum()), "told": int((mask & told_truth).sum())} for cell, mask in cells.items()},
        },
    }
    if not (train_samples or ensemble):
        return result
    labels = read_labels(run / "labels.json")
    device = train_device()
    model, tokenizer = load_for_inference(run, recipe.model, device, resolve_dtype(recipe.eval.dtype, device))
    if train_samples:
        rows = train.head(train_samples)
        names, departments = rows["product_name"].tolist(), rows["department"].to_numpy()
        prompts, _ = scoring.encode_prompts(tokenizer, names, recipe.train.max_length)
        predicted = scoring.score(model, tokenizer, prompts, labels, recipe.eval.scorer, recipe.eval.batch_size).labels
        result["train_fit"] = {
            "train_products": len(rows),
            "model_accuracy": share(pd.Series(predicted).to_numpy() == departments),
            "baseline_accuracy": share(svm.predict(names) == departments),
        }
    if ensemble:
        prompts, _ = scoring.encode_prompts(tokenizer, predictions["product_name"].tolist(), recipe.train.max_length)
        log_probs = scoring.label_log_probs(model, tokenizer, prompts, labels, recipe.eval.scorer,
                                            recipe.eval.batch_size)
        decisions = svm.decision_function(predictions["product_name"].tolist())
        column = {label: i for i, label in enumerate(svm.classes_)}
        # a label the baseline never saw in training gets its lowest score
        decisions = np.stack([decisions[:, column[label]] if label in column else decisions.min(1) - 1
                              for label in labels], axis=1)
        result["ensemble"] = ensemble_cross_fitted(log_probs.numpy(), decisions, truth, labels)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("label")
    p.add_argument("--adapter", default="runs/demo")
    p.add_argument("--data", default="data/instacart")
    p.add_argument("--products", type=int, default=2000)
    p.add_argument("--tutorial-products", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p = commands.add_parser("train")
    p.add_argument("--config", default="jobs/recipes/instacart-smollm2.yaml")
    p.add_argument("--run", help="a fresh run directory (default runs/bench/<recipe>-<time>)")
    p.add_argument("--minutes", type=float, help="stop after this much training time (evaluations excluded)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between curve points (0: none)")
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--no-final-eval", action="store_true", help="skip the evaluation on the whole test split")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.8])
    p.add_argument("--stop-at", type=float, help="stop once a curve point reaches this accuracy")
    p.add_argument("--output", help="also write the JSON here")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides, key=value")
    p = commands.add_parser("label-memory")
    p.add_argument("--adapter", default="runs/demo")
    p.add_argument("--data", default="data/instacart")
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--new-fraction", type=float, default=1.0)
    p = commands.add_parser("label-memory-one")
    p.add_argument("--adapter", required=True)
    p.add_argument("--catalog", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--only-missing", action="store_true")
    p = commands.add_parser("errors")
    p.add_argument("--run", required=True, help="a run directory that has been evaluated")
    p.add_argument("--train-samples", type=int, default=0, help="also score the first N training products")
    p.add_argument("--ensemble", action="store_true",
                   help="also score the model's label log-probabilities plus w x the baseline's decision values")
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "train":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        run = Path(args.run or f"runs/bench/{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        result = bench_train(args.config, args.overrides, run, args.minutes, args.eval_every, args.eval_samples,
                             not args.no_final_eval, args.thresholds, args.stop_at)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    elif args.command == "label":
        result = bench_label(Path(args.adapter), Path(args.data), args.products, args.tutorial_products,
                             args.batch_size)
    elif args.command == "errors":
        result = bench_errors(Path(args.run), args.train_samples, args.ensemble)
    elif args.command == "label-memory":
        result = bench_label_memory(Path(args.adapter), Path(args.data), args.rows, args.new_fraction)
    else:
        result = bench_label_memory_one(Path(args.adapter), Path(args.catalog), Path(args.output), args.only_missing)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
