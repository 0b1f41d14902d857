"""One short script for a GPU node, on random weights of the embedded architecture."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pipeline.bench.label import bench_label_overlap, forward_flops, lever_predictor, synthetic_catalog, timed_predict
from pipeline.bench.machine import command_line, machine
from pipeline.bench.scorers import bench_scorers
from pipeline.bench.train import bench_train

log = logging.getLogger(__name__)


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
    keep = ("recipe", "overrides", "training_path", "steps", "throughput", "train_seconds")

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
