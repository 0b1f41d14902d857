"""``python -m pipeline.bench <command>``: the benchmarks' command line; each prints one JSON object."""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from pipeline.bench.gpu import bench_gpu
from pipeline.bench.label import (
    LEVERS,
    bench_label,
    bench_label_memory,
    bench_label_memory_one,
    bench_label_overlap,
    bench_label_processes,
    bench_label_repro,
    bench_profile,
)
from pipeline.bench.quality import bench_cost, bench_quality
from pipeline.bench.scorers import bench_scorers, bench_search_depth
from pipeline.bench.train import bench_profile_train, bench_train


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
