"""Sweeps: a W&B-format spec expanded into configurations, run as one job array, ranked, promoted.

W&B's own agent pulls each configuration from W&B's servers, which compute nodes rarely
reach; so we expand the spec ourselves (deterministically, seeded) and submit all
configurations at once as a submitit ``map_array`` (one Slurm array). Runs still log to W&B
(offline, one group per sweep) for the sweep dashboards.

SWEEP_DIR holds ``sweep.json`` (the expanded configurations), ``runs/<name>/`` (one run
directory each), ``submitit/`` (task logs), ``wandb/``, ``leaderboard.{csv,md,png}``,
``promoted`` (a link to the run best on validation) and ``promoted.json`` (which, on what metric, why, and
its test figure: the promoted run is the only one scored on test, once, after the choice).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import math
import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.atomic import point_link, write_json_atomic
from pipeline.config import load_profile, load_recipe, read_yaml, shipped_file, split_overrides
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

DISTRIBUTIONS = {"constant", "categorical", "uniform", "int_uniform", "log_uniform_values", "q_uniform",
                 "normal"}


@dataclass
class SweepSpec:
    name: str
    method: str
    metric: str
    goal: str
    parameters: dict[str, dict[str, Any]]
    run_cap: int | None
    seed: int


# W&B's sweep keys: those we act on, and those we accept and leave to W&B (program, command, ...).
SWEEP_KEYS = {"name", "method", "metric", "parameters", "run_cap", "seed", "description", "program", "command",
              "project", "entity", "early_terminate"}
PARAMETER_KEYS = {"value", "values", "probabilities", "distribution", "min", "max", "q", "mu", "sigma"}


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a W&B sweep YAML whose parameter names are dotted recipe keys."""
    _, raw = read_yaml(path, "sweep file")
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(SWEEP_KEYS))}")
    method = raw.get("method", "grid")
    if method not in ("grid", "random"):
        raise ConfigError(f"{path}: method must be grid or random (bayes needs W&B's server), got {method!r}")
    metric = raw.get("metric") or {"name": "accuracy", "goal": "maximize"}
    if not isinstance(metric, dict) or set(metric) - {"name", "goal", "target"}:
        raise ConfigError(f"{path}: metric: expected a mapping with name and goal, got {metric!r}")
    if metric.get("goal", "maximize") not in ("maximize", "minimize"):
        raise ConfigError(f"{path}: metric.goal must be maximize or minimize")
    parameters = raw.get("parameters") or {}
    if not isinstance(parameters, dict) or not parameters:
        raise ConfigError(f"{path}: parameters: expected a mapping of recipe keys")
    for key, spec in parameters.items():
        if not isinstance(spec, dict) or not ({"value", "values", "min", "max", "distribution"} & set(spec)):
            raise ConfigError(f"{path}: parameters.{key}: expected value, values, or min/max")
        unknown = sorted(set(spec) - PARAMETER_KEYS)
        if unknown:
            raise ConfigError(f"{path}: parameters.{key}: unknown key(s) {', '.join(unknown)}")
        if spec.get("distribution", "uniform") not in DISTRIBUTIONS:
            raise ConfigError(f"{path}: parameters.{key}: unknown distribution {spec['distribution']!r}")
        if method == "grid" and "value" not in spec and "values" not in spec:
            raise ConfigError(f"{path}: parameters.{key}: grid search needs value or values")
    run_cap = raw.get("run_cap")
    if method == "random" and not run_cap:
        raise ConfigError(f"{path}: random search needs run_cap")
    return SweepSpec(name=str(raw.get("name") or Path(path).stem), method=method,
                     metric=metric.get("name", "accuracy"), goal=metric.get("goal", "maximize"),
                     parameters=parameters, run_cap=run_cap, seed=int(raw.get("seed", 0)))


def _sample(spec: dict[str, Any], rng: random.Random) -> Any:
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choices(spec["values"], weights=spec.get("probabilities"))[0]
    kind = spec.get("distribution", "int_uniform" if isinstance(spec.get("min"), int)
                    and isinstance(spec.get("max"), int) else "uniform")
    low, high = spec.get("min"), spec.get("max")
    if kind == "int_uniform":
        return rng.randint(int(low), int(high))
    if kind == "log_uniform_values":
        return math.exp(rng.uniform(math.log(float(low)), math.log(float(high))))
    if kind == "q_uniform":
        q = spec.get("q", 1)
        return round(rng.uniform(float(low), float(high)) / q) * q
    if kind == "normal":
        return rng.gauss(spec.get("mu", 0.0), spec.get("sigma", 1.0))
    return rng.uniform(float(low), float(high))


def expand(spec: SweepSpec) -> list[dict[str, Any]]:
    """The sweep's configurations, as {dotted key: value}: every grid point, or run_cap samples."""
    keys = sorted(spec.parameters)
    if spec.method == "grid":
        axes = [spec.parameters[k]["values"] if "values" in spec.parameters[k] else [spec.parameters[k]["value"]]
                for k in keys]
        configs = [dict(zip(keys, point)) for point in itertools.product(*axes)]
        return configs[: spec.run_cap] if spec.run_cap else configs
    rng = random.Random(spec.seed)
    return [{k: _sample(spec.parameters[k], rng) for k in keys} for _ in range(spec.run_cap or 0)]


def as_overrides(config: dict[str, Any]) -> list[str]:
    """``key=value`` strings; values as JSON, which the recipe loader reads as YAML."""
    return [f"{k}={json.dumps(v)}" for k, v in sorted(config.items())]


def sweep_id(spec: SweepSpec, recipe_path: str, configs: list[dict[str, Any]],
             overrides: list[str] | None = None) -> str:
    """The W&B group's suffix: the same sweep, recipe, configurations and overrides, the same id."""
    blob = json.dumps({"spec": spec.__dict__, "recipe": str(recipe_path), "configs": configs,
                       **({"overrides": overrides} if overrides else {})}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


# --- ranking and promotion -------------------------------------------------------------------


def metric_value(block: dict[str, Any], name: str) -> float | None:
    """A split block's figure for the sweep's ``metric.name``: the block's own (``accuracy``,
    ``macro_f1``), or ``department_<measure>``, defined for both kinds of run: a department-level
    run's own figure, an aisle-level run's departments implied by its aisles. So one sweep can rank
    department-level and aisle-level runs for the department task."""
    if name.startswith("department_"):
        measure = name.removeprefix("department_")
        own = block.get("label_level", "department") == "department"
        return block.get(measure) if own else block.get("department", {}).get(measure)
    return block.get(name)


def leaderboard(sweep_dir: Path, names: list[str], configs: list[dict[str, Any]], metric: str, goal: str,
                logs: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rank finished runs on their validation ``metric``; unfinished ones follow with their log path.

    A run's test figure, where it has one (only the promoted run is scored on test), is shown beside
    it but never read for the ranking.
    """
    rows = []
    for name, config in zip(names, configs):
        metrics_path = sweep_dir / "runs" / name / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        validation, test = metrics.get("validation", {}), metrics.get("test", {})
        value = metric_value(validation, metric)
        rows.append({"run": name, f"validation_{metric}": value,
                     f"baseline_validation_{metric}": baseline_value(validation, metric),
                     "n_validation": validation.get("n_eval"), f"test_{metric}": metric_value(test, metric),
                     f"baseline_test_{metric}": baseline_value(test, metric),
                     "train_runtime_s": metrics.get("train_runtime_s"),
                     "ships": validation.get("predictor"),
                     "status": "ok" if value is not None else "failed",
                     "log": (logs or {}).get(name, ""), **config})
    ranked_on = f"validation_{metric}"
    finished = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r[ranked_on],
                      reverse=goal == "maximize")
    ranked = finished + [r for r in rows if r["status"] != "ok"]
    for rank, row in enumerate(ranked, 1):
        row["rank"] = rank if row["status"] == "ok" else None
    _write_leaderboard(sweep_dir, ranked, metric)
    return ranked


def baseline_value(block: dict[str, Any], name: str) -> float | None:
    """The baseline's figure for ``name`` on the same rows (an aisle-level run's baseline at the
    department level: its aisles mapped to their departments)."""
    return metric_value({"label_level": block.get("label_level"), **block.get("baseline", {})}, name)


def _write_leaderboard(sweep_dir: Path, rows: list[dict[str, Any]], metric: str) -> None:
    ranked_on, baseline = f"validation_{metric}", f"baseline_validation_{metric}"
    columns = ["rank", "run", "status", "ships", ranked_on, baseline, "n_validation", f"test_{metric}",
               f"baseline_test_{metric}", "train_runtime_s"]
    columns += [k for k in rows[0] if k not in columns and k != "log"] + ["log"]
    with open(sweep_dir / "leaderboard.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    shown = [c for c in columns if c != "log"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join("" if r.get(c) is None else f"{r[c]:.4g}" if isinstance(r.get(c), float)
                                else str(r[c]) for c in shown) + " |" for r in rows]
    baselines = {r[baseline] for r in rows if r.get(baseline) is not None}
    lines += ["", f"Ranked on {ranked_on}; test_{metric} is scored once, for the promoted run only. "
              f"baseline_*: the TF-IDF + linear SVM baseline on the same rows."]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed runs:"] + [f"- {r['run']}: {r['log']}" for r in failed]
    (sweep_dir / "leaderboard.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6, 0.4 * max(3, len(finished)) + 1))
    ax.barh([r["run"] for r in finished][::-1], [r[ranked_on] for r in finished][::-1], color="tab:blue")
    for value in sorted(baselines):
        ax.axvline(value, color="tab:gray", linestyle="--", label="TF-IDF + linear SVM")
    if baselines:
        ax.legend(loc="lower right")
    ax.set_xlabel(ranked_on)
    ax.set_title(f"{sweep_dir.name}: validation {metric} per configuration")
    fig.tight_layout()
    fig.savefig(sweep_dir / "leaderboard.png", dpi=110)
    plt.close(fig)


def promote(sweep_dir: Path, ranked: list[dict[str, Any]], metric: str, goal: str) -> dict[str, Any] | None:
    """Point SWEEP_DIR/promoted at the run best on validation and record why."""
    if not ranked or ranked[0]["status"] != "ok":
        return None
    best = ranked[0]
    point_link(sweep_dir / "promoted", Path("runs") / best["run"])  # a labeling job never sees no link
    finished = [r for r in ranked if r["status"] == "ok"]
    ranked_on = f"validation_{metric}"
    decision = {"run": best["run"], "run_dir": str((sweep_dir / "runs" / best["run"]).resolve()),
                "metric": metric, "goal": goal, "ranked_on": "validation", "value": best[ranked_on],
                "reason": f"best validation {metric} ({goal}) of {len(finished)} finished runs"
                          + (f"; runner-up {finished[1]['run']} at {finished[1][ranked_on]:.4f}"
                             if len(finished) > 1 else ""),
                "failed_runs": [r["run"] for r in ranked if r["status"] != "ok"]}
    write_decision(sweep_dir, decision)
    return decision


def write_decision(sweep_dir: Path, decision: dict[str, Any]) -> None:
    write_json_atomic(sweep_dir / "promoted.json", decision)


def summarize_test(block: dict[str, Any], metric: str = "accuracy") -> dict[str, Any]:
    """The promoted run's test figures, as promoted.json reports them beside its validation figure
    (``metric``: the sweep's, under its own name)."""
    baseline = block.get("baseline", {})
    return {"accuracy": block["accuracy"], "macro_f1": block["macro_f1"], "n_eval": block["n_eval"],
            metric: metric_value(block, metric), "baseline_accuracy": baseline.get("accuracy"),
            "baseline_macro_f1": baseline.get("macro_f1")}


# --- the driver --------------------------------------------------------------------------------


def run_sweep(sweep_path: str, recipe_path: str, output: str, executor_kind: str = "slurm",
              profile_path: str | None = None, overrides: list[str] | None = None,
              label_catalog: str | None = None, label_output: str | None = None,
              label_array: str | None = None) -> dict[str, Any]:
    """Expand, submit as one array, wait, rank, promote; optionally queue the labeling job.

    ``overrides`` (``section.key=value``) apply to every run's recipe, under the sweep's own
    parameters; ``profile.key=value`` ones to the cluster profile."""
    from pipeline.launcher import EvaluateTask, TrainTask, make_executor

    spec = load_sweep(sweep_path)
    recipe_path = str(shipped_file(recipe_path, what="recipe file"))  # the tasks may start elsewhere
    profile_overrides, recipe_overrides = split_overrides(overrides or [], "profile")
    configs = expand(spec)
    if not configs:
        raise ConfigError(f"{sweep_path}: the sweep expands to no configuration")
    for config in configs:  # fail on a typo now, not in every array task
        if load_recipe(recipe_path, recipe_overrides + as_overrides(config)).data.validation_size <= 0:
            raise ConfigError(f"{recipe_path}: a sweep ranks its runs on validation, and data.validation_size "
                              f"is 0 for {config or 'the recipe'}; set it above 0")
    recipe = load_recipe(recipe_path, recipe_overrides)
    profile = load_profile(profile_path or "jobs/clusters/dev.yaml", profile_overrides)
    group = f"{spec.name}-{sweep_id(spec, recipe_path, configs, recipe_overrides)}"
    sweep_dir = Path(output).resolve()
    (sweep_dir / "runs").mkdir(parents=True, exist_ok=True)
    names = [f"{spec.name}-{i:03d}" for i in range(len(configs))]
    (sweep_dir / "sweep.json").write_text(json.dumps(
        {"name": spec.name, "group": group, "method": spec.method, "metric": spec.metric, "goal": spec.goal,
         "recipe": recipe_path, "overrides": recipe_overrides, "runs": dict(zip(names, configs))}, indent=1) + "\n")

    env = {"WANDB_RUN_GROUP": group, "WANDB_DIR": str(sweep_dir), "WANDB_JOB_TYPE": "train",
           "WANDB_PROJECT": recipe.tracking.project, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    task = TrainTask(recipe_path, recipe.launch.accelerate_config, profile, env)
    # Tasks score validation only: the test split is for the one run the driver promotes.
    run_overrides = [recipe_overrides + as_overrides(c)
                     + ["tracking.wandb=true", f"tracking.group={group}", "eval.splits=[validation]"] for c in configs]
    executor = make_executor(executor_kind, sweep_dir / "submitit", profile, f"sweep-{spec.name}")
    jobs = executor.map_array(task, names, run_overrides, [str(sweep_dir / "runs" / n) for n in names])
    log.info("submitted %d runs of sweep %s as %s", len(jobs), group, jobs[0].job_id.split("_")[0])

    logs = {}
    for name, job in zip(names, jobs):
        try:
            job.result()
        except Exception as exc:  # a failed task must not stop the ranking of the others
            logs[name] = str(job.paths.stdout)
            log.error("run %s failed (%s); log: %s", name, str(exc).splitlines()[-1] if str(exc) else exc,
                      job.paths.stdout)
    ranked = leaderboard(sweep_dir, names, configs, spec.metric, spec.goal, logs)
    decision = promote(sweep_dir, ranked, spec.metric, spec.goal)
    if decision:
        # The one look at test: the promoted run, scored as a job of its own (this driver loads no model).
        run_dir = sweep_dir / "runs" / decision["run"]
        test_data = Path(load_recipe(run_dir / "config.yaml").data.dir) / "test.parquet"
        job = executor.submit(EvaluateTask(profile), str(run_dir), str(test_data))
        try:
            decision["test"] = summarize_test(job.result(), spec.metric)
        except Exception as exc:  # the promotion stands; say why its test figure is missing
            decision["test"] = None
            decision["test_error"] = f"{str(exc).splitlines()[-1] if str(exc) else exc}; log: {job.paths.stdout}"
            log.error("scoring %s on test failed: %s", decision["run"], decision["test_error"])
        ranked = leaderboard(sweep_dir, names, configs, spec.metric, spec.goal, logs)
        write_decision(sweep_dir, decision)
    swept = [k for k in configs[0] if len({json.dumps(c.get(k)) for c in configs}) > 1] or list(configs[0])
    from pipeline.sweep_report import write_sweep_report

    write_sweep_report(sweep_dir, ranked, swept, spec.metric, decision)
    tracking.log_sweep_summary(sweep_dir, group, recipe.tracking.project, ranked, swept, spec.metric)
    if decision and label_catalog:
        decision["label_job"] = submit_labeling(sweep_dir / "promoted", label_catalog, label_output,
                                                 label_array)
        write_decision(sweep_dir, decision)
    return {"sweep_dir": str(sweep_dir), "group": group, "ranked": ranked, "promoted": decision}


def submit_labeling(adapter: Path, catalog: str, output: str | None, array: str | None = None) -> str:
    """Queue slurm/label_catalog.sh after this driver job ends well (afterok), as ``array``'s tasks."""
    command = ["sbatch", "--parsable", f"--output={adapter.parent / 'label-%A_%a.out'}"]
    if array:
        command.append(f"--array={array}")
    if "SLURM_JOB_ID" in os.environ:
        command.append(f"--dependency=afterok:{os.environ['SLURM_JOB_ID']}")
    script = shipped_file("slurm/label_catalog.sh", what="labeling script")
    command += [str(script), catalog, output or str(adapter.parent / "labeled")]
    # Not WANDB_SERVICE: it names this driver's W&B service, gone by the time the labeling runs.
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "CATALOG_TUNER_ADAPTER": str(adapter)}
    return subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout.strip()
