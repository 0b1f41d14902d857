"""Benchmarks that print JSON; numbers, never asserts.

``python -m pipeline.bench label --adapter RUN_DIR --data DATA_DIR``
    the tutorial's free generation vs the constrained labeler on the same held-out products,
    same adapter, same process: products/s, their ratio, accuracy, and the labeler's achieved
    GFLOP/s against a matmul peak measured in the same run.
``python -m pipeline.bench label-memory --adapter RUN_DIR --data DATA_DIR --rows 10000 100000``
    peak memory of ``catalog-tuner label`` on synthetic catalogs of growing size (one fresh
    process per size); ``--new-fraction 0.01`` pre-labels the rest, like a nightly
    ``--only-missing`` run.
"""

from __future__ import annotations

import argparse
import json
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


def matmul_peak_gflops(dtype: torch.dtype, size: int = 2048, repeat: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * size**3 * repeat / (time.perf_counter() - start) / 1e9


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("label")
    p.add_argument("--adapter", default="runs/demo")
    p.add_argument("--data", default="data/instacart")
    p.add_argument("--products", type=int, default=2000)
    p.add_argument("--tutorial-products", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
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

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "label":
        result = bench_label(Path(args.adapter), Path(args.data), args.products, args.tutorial_products,
                             args.batch_size)
    elif args.command == "label-memory":
        result = bench_label_memory(Path(args.adapter), Path(args.data), args.rows, args.new_fraction)
    else:
        result = bench_label_memory_one(Path(args.adapter), Path(args.catalog), Path(args.output), args.only_missing)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
