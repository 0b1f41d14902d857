"""Sweep expansion, ranking, promotion and the task command lines (no cluster needed)."""

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline.config import ClusterProfile, ConfigError, load_profile, load_recipe
from pipeline.launcher import accelerate_config_path, container_prefix, distributed_args, train_command
from pipeline.sweep import as_overrides, expand, leaderboard, load_sweep, promote

REPO = Path(__file__).resolve().parents[1]


def _spec(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return load_sweep(path)


def test_grid_expands_every_point_in_order(tmp_path):
    spec = _spec(tmp_path, """
name: g
method: grid
parameters:
  lora.r: {values: [8, 16]}
  train.learning_rate: {values: [5.0e-4, 1.0e-3]}
  train.max_steps: {value: 10}
""")
    assert expand(spec) == [
        {"lora.r": 8, "train.learning_rate": 5e-4, "train.max_steps": 10},
        {"lora.r": 8, "train.learning_rate": 1e-3, "train.max_steps": 10},
        {"lora.r": 16, "train.learning_rate": 5e-4, "train.max_steps": 10},
        {"lora.r": 16, "train.learning_rate": 1e-3, "train.max_steps": 10},
    ]
    assert spec.metric == "accuracy" and spec.goal == "maximize"


def test_random_is_seeded_capped_and_in_range(tmp_path):
    text = """
name: r
method: random
run_cap: 5
seed: 3
parameters:
  train.learning_rate: {distribution: log_uniform_values, min: 1.0e-4, max: 1.0e-2}
  lora.r: {values: [4, 8, 16]}
  lora.dropout: {min: 0.0, max: 0.2}
  train.max_steps: {min: 10, max: 20}
"""
    configs = expand(_spec(tmp_path, text))
    assert configs == expand(_spec(tmp_path, text)) and len(configs) == 5
    for c in configs:
        assert 1e-4 <= c["train.learning_rate"] <= 1e-2 and c["lora.r"] in (4, 8, 16)
        assert 0 <= c["lora.dropout"] <= 0.2 and isinstance(c["train.max_steps"], int)
    assert expand(_spec(tmp_path, text.replace("seed: 3", "seed: 4"))) != configs


def test_shipped_sweeps_expand_to_valid_recipes():
    for path in (REPO / "jobs" / "sweeps").glob("*.yaml"):
        for config in expand(load_sweep(path)):
            load_recipe(REPO / "jobs" / "recipes" / "instacart-smollm2.yaml", as_overrides(config))


@pytest.mark.parametrize("text, message", [
    ("method: bayes\nparameters: {lora.r: {values: [1]}}", "grid or random"),
    ("method: random\nparameters: {lora.r: {values: [1]}}", "needs run_cap"),
    ("method: grid\nparameters: {lora.r: {min: 1, max: 2}}", "grid search needs value or values"),
    ("method: grid\nparameters: {lora.r: 3}", "expected value, values, or min/max"),
    ("method: grid\nmetric: {name: accuracy, goal: up}\nparameters: {lora.r: {value: 1}}", "maximize or minimize"),
])
def test_bad_sweeps_are_rejected(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        _spec(tmp_path, text)


def _block(accuracy: float, predictor: str = "blend") -> dict:
    return {"accuracy": accuracy, "macro_f1": accuracy - 0.1, "n_eval": 100, "predictor": predictor,
            "baseline": {"name": "tfidf+linear-svm", "accuracy": 0.8, "macro_f1": 0.7}}


def test_leaderboard_ranks_lists_failures_and_promotes(tmp_path):
    names = ["s-000", "s-001", "s-002"]
    for name, accuracy in (("s-000", 0.71), ("s-002", 0.83)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "metrics.json").write_text(json.dumps(
            {"train_runtime_s": 5.0, "validation": _block(accuracy)}))
    configs = [{"lora.r": 4}, {"lora.r": 8}, {"lora.r": 16}]
    ranked = leaderboard(tmp_path, names, configs, "accuracy", "maximize", {"s-001": "/logs/s-001.out"})
    assert [(r["run"], r["rank"], r["status"]) for r in ranked] == [
        ("s-002", 1, "ok"), ("s-000", 2, "ok"), ("s-001", None, "failed")]
    assert "s-001: /logs/s-001.out" in (tmp_path / "leaderboard.md").read_text()
    csv_lines = (tmp_path / "leaderboard.csv").read_text().splitlines()
    assert csv_lines[0].startswith("rank,run,status,ships,validation_accuracy,baseline_validation_accuracy,")
    assert csv_lines[1].startswith("1,s-002,ok,blend,0.83,0.8,")  # what it ships, next to the classical baseline
    assert (tmp_path / "leaderboard.png").stat().st_size > 0
    decision = promote(tmp_path, ranked, "accuracy", "maximize")
    assert (tmp_path / "promoted").resolve() == (tmp_path / "runs" / "s-002").resolve()
    assert decision["value"] == 0.83 and decision["failed_runs"] == ["s-001"]
    assert json.loads((tmp_path / "promoted.json").read_text())["run"] == "s-002"
    ranked = leaderboard(tmp_path, names, configs, "accuracy", "minimize")
    assert ranked[0]["run"] == "s-000"


def test_sweep_report_and_wandb_summary(tmp_path, monkeypatch):
    """sweep_report.html shows every run (a failed one too) and opens in a real browser; the W&B
    summary run is written offline in the sweep's group."""
    import shutil

    from pipeline.sweep_report import write_sweep_report
    from pipeline.tracking import log_sweep_summary

    names = ["s-000", "s-001", "s-002"]
    configs = [{"lora.r": 4, "train.learning_rate": 1e-3}, {"lora.r": 8, "train.learning_rate": 5e-4},
               {"lora.r": 16, "train.learning_rate": 2e-4}]
    for name, accuracy in (("s-000", 0.71), ("s-002", 0.83)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "metrics.json").write_text(json.dumps({"validation": _block(accuracy)}))
        (tmp_path / "runs" / name / "train_log.json").write_text(json.dumps(
            [{"step": s, "loss": 3.0 / s + accuracy} for s in range(1, 20)]))
    ranked = leaderboard(tmp_path, names, configs, "accuracy", "maximize", {"s-001": "/logs/s-001.out"})
    decision = promote(tmp_path, ranked, "accuracy", "maximize")
    page = write_sweep_report(tmp_path, ranked, ["lora.r", "train.learning_rate"], "accuracy", decision)
    text = page.read_text()
    assert "Promoted <b>s-002</b>" in text and all(name in text for name in names)
    assert text.count("data:image/png;base64,") == 2  # parallel coordinates and loss curves, inline
    if shutil.which("chromium"):
        shot = tmp_path / "sweep.png"
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                        "--window-size=1200,1600", page.as_uri()], check=True, capture_output=True, timeout=120)
        assert shot.stat().st_size > 20_000
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    folder = log_sweep_summary(tmp_path, "s-abc123", "catalog-tuner", ranked, ["lora.r"], "accuracy")
    assert folder.name.startswith("offline-run-") and list(folder.glob("run-*.wandb"))


def test_the_validation_winner_is_promoted_when_test_disagrees(tmp_path):
    """Selection never reads test: a run that would win on test but loses on validation stays second."""
    names, configs = ["a", "b"], [{"lora.r": 4}, {"lora.r": 8}]
    for name, validation, test in (("a", 0.80, 0.90), ("b", 0.85, 0.70)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "metrics.json").write_text(json.dumps(
            {"validation": _block(validation), "test": _block(test)}))
    ranked = leaderboard(tmp_path, names, configs, "accuracy", "maximize")
    assert [r["run"] for r in ranked] == ["b", "a"] and ranked[0]["test_accuracy"] == 0.70
    decision = promote(tmp_path, ranked, "accuracy", "maximize")
    assert decision["run"] == "b" and decision["ranked_on"] == "validation" and decision["value"] == 0.85
    assert "Ranked on validation_accuracy" in (tmp_path / "leaderboard.md").read_text()


def test_one_sweep_ranks_department_and_aisle_runs_on_the_department_task(tmp_path):
    """metric.name department_accuracy: a department-level run's own accuracy, an aisle-level
    run's implied departments; the baseline beside each at the department level too."""
    names, configs = ["dept", "aisle"], [{"data.label_level": "department"}, {"data.label_level": "aisle"}]
    blocks = {"dept": {**_block(0.85), "label_level": "department"},
              "aisle": {**_block(0.78), "label_level": "aisle",  # aisle accuracy below, departments above
                        "department": {"accuracy": 0.87, "macro_f1": 0.78},
                        "baseline": {"accuracy": 0.77, "department": {"accuracy": 0.86, "macro_f1": 0.77}}}}
    for name, block in blocks.items():
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "metrics.json").write_text(json.dumps({"validation": block}))
    ranked = leaderboard(tmp_path, names, configs, "department_accuracy", "maximize")
    assert [(r["run"], r["validation_department_accuracy"], r["baseline_validation_department_accuracy"])
            for r in ranked] == [("aisle", 0.87, 0.86), ("dept", 0.85, 0.8)]
    assert [r["run"] for r in leaderboard(tmp_path, names, configs, "accuracy", "maximize")] == ["dept", "aisle"]
    assert promote(tmp_path, ranked, "department_accuracy", "maximize")["run"] == "aisle"


@pytest.mark.slow
def test_local_executor_runs_the_same_path(tmp_path, data_dir, base_model_path):
    """`--executor local`: submitit's local executor, the accelerate launch, ranking, promotion."""
    from pipeline.sweep import run_sweep

    sweep = tmp_path / "local.yaml"
    sweep.write_text(f"""
name: local
method: grid
parameters:
  lora.r: {{values: [4]}}
  train.per_device_train_batch_size: {{value: 4}}
  data.max_train_samples: {{value: 16}}
  data.dir: {{value: "{data_dir}"}}
""")
    # The command line's overrides reach every run and the driver's test job; the sweep's own
    # parameters win over them (lora.r).
    result = run_sweep(str(sweep), str(REPO / "jobs" / "recipes" / "instacart-smollm2.yaml"), str(tmp_path / "out"),
                       "local", str(REPO / "jobs" / "clusters" / "dev.yaml"),
                       ["train.max_steps=2", "eval.max_samples=16", "lora.r=8", "profile.time_min=7"])
    promoted = result["promoted"]
    assert promoted["run"] == "local-000" and promoted["ranked_on"] == "validation"
    assert (tmp_path / "out" / "promoted" / "adapter" / "adapter_model.safetensors").is_file()
    run = tmp_path / "out" / "runs" / "local-000"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_steps"] == 2
    assert load_recipe(run / "config.yaml").lora.r == 4
    assert load_recipe(run / "config.yaml").eval.splits == ["validation"]  # the task never scored test...
    assert promoted["test"]["accuracy"] == metrics["test"]["accuracy"]  # ...the driver's job did, once
    assert promoted["test"]["n_eval"] == 16 and promoted["value"] == metrics["validation"]["accuracy"]
    assert json.loads((tmp_path / "out" / "promoted.json").read_text())["test"] == promoted["test"]


def test_a_sweep_without_validation_rows_is_refused(tmp_path):
    from pipeline.sweep import run_sweep

    sweep = tmp_path / "novalidation.yaml"
    sweep.write_text("method: grid\nparameters: {data.validation_size: {values: [0.05, 0]}}\n")
    with pytest.raises(ConfigError, match="ranks its runs on validation"):
        run_sweep(str(sweep), "jobs/recipes/instacart-smollm2.yaml", str(tmp_path / "out"), "debug")
    sweep.write_text("method: grid\nparameters: {lora.r: {values: [4, 8]}}\n")
    with pytest.raises(ConfigError, match="ranks its runs on validation"):  # an override reaches the check
        run_sweep(str(sweep), "jobs/recipes/instacart-smollm2.yaml", str(tmp_path / "out"), "debug", None,
                  ["data.validation_size=0"])


def test_task_command_bare_and_in_apptainer(tmp_path):
    bare = train_command("r.yaml", ["lora.r=8"], tmp_path, "cpu", ClusterProfile(), env={})
    assert bare[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert bare[4] == str(REPO / "jobs" / "accelerate" / "cpu.yaml")
    assert bare[5:] == ["-m", "pipeline", "train", "--config", "r.yaml", "--output", str(tmp_path), "lora.r=8"]
    profile = ClusterProfile(container_image="/img/ct.sif", container_binds=["/data", "/runs:/runs"],
                             gpus_per_node=4)
    wrapped = train_command("r.yaml", [], tmp_path, "multi_gpu", profile, env={})
    assert wrapped[:6] == ["apptainer", "exec", "--nv", "--bind", "/data,/runs:/runs", "/img/ct.sif"]
    assert wrapped[6:8] == ["python", "-m"] and "--num_processes" in wrapped
    assert wrapped[wrapped.index("--num_processes") + 1] == "4"
    assert container_prefix(ClusterProfile()) == []


def test_multi_node_rendezvous_comes_from_slurm(monkeypatch, tmp_path):
    scontrol = tmp_path / "scontrol"  # `scontrol show hostnames` as a tiny real program on PATH
    scontrol.write_text("#!/bin/sh\nprintf 'gpu017\\ngpu018\\n'\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_JOB_ID": "123456"}
    args = distributed_args(ClusterProfile(gpus_per_node=4, nodes=2), env)
    assert args == ["--num_processes", "8", "--num_machines", "2", "--machine_rank", "1",
                    "--main_process_ip", "gpu017", "--main_process_port", str(29500 + 456)]


def test_accelerate_configs_parse():
    for name in ("cpu", "single_gpu", "multi_gpu", "deepspeed_zero2", "deepspeed_zero3"):
        config = yaml.safe_load(accelerate_config_path(name).read_text())
        assert config["num_machines"] == 1 and "distributed_type" in config
    zero3 = yaml.safe_load(accelerate_config_path("deepspeed_zero3").read_text())["deepspeed_config"]
    assert zero3["zero3_init_flag"] is True and zero3["zero3_save_16bit_model"] is True
    with pytest.raises(ConfigError, match="not found"):
        accelerate_config_path("tpu")


def test_cluster_profiles_load():
    for path in (REPO / "jobs" / "clusters").glob("*.yaml"):
        profile = load_profile(path)
        assert profile.cpus_per_task >= 1 and profile.time_min > 0
    assert load_profile(REPO / "jobs" / "clusters" / "dev.yaml", ["time_min=5"]).time_min == 5
    with pytest.raises(ConfigError, match="unknown key"):
        load_profile(REPO / "jobs" / "clusters" / "dev.yaml", ["gpu=1"])


def test_container_pins_match_pyproject():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = dict(re.findall(r"^([a-z0-9-]+)==([\w.]+)$", "\n".join(
        pyproject["dependencies"] + sum(pyproject["optional-dependencies"].values(), [])), re.M))
    definition = (REPO / "containers" / "catalog-tuner.def").read_text()
    in_image = dict(re.findall(r"([a-z0-9-]+)==([\w.]+)", definition))
    assert {k: in_image.get(k) for k in pins} == pins
    assert "%runscript" in definition and "%test" in definition and "catalog-tuner" in definition
