"""Shared fixtures: the embedded model is converted once per machine and cached.

The cache lives in ``<repo>/.cache`` unless CATALOG_TUNER_CACHE points elsewhere, so a rerun of
the suite (or CI on the same machine) skips the ~15 s GGUF conversion.

Markers: ``slow`` for a test that trains for real, itself or through a trained-adapter fixture, or compiles
(marked here, so that a new test using one cannot forget it); ``cluster`` for the Slurm tests.
``make test-fast`` runs the rest.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("CATALOG_TUNER_CACHE", str(REPO / ".cache"))
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # Several pytest-xdist workers (`make test`): a share of the cores each, set before torch loads
    # and inherited by the processes and Slurm jobs they start. Two OpenMP pools of a thread per
    # core on the same cores spin against each other (steps up to 10x slower).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1)
                                                    // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
os.environ.setdefault("WANDB_MODE", "disabled")


TRAINED_FIXTURES = {"adapter_run", "short_adapter_run", "tiny_run", "aisle_run", "calibrated_run"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def base_model_path() -> str:
    from pipeline.model import resolve_base_model

    return resolve_base_model("embedded:smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(base_model_path):
    from pipeline.config import ModelConfig
    from pipeline.model import load_tokenizer

    return load_tokenizer(base_model_path, ModelConfig())


@pytest.fixture(scope="session")
def base_model(base_model_path):
    """The pretrained model in fp32, for scoring tests (no adapter)."""
    import torch

    from pipeline.config import ModelConfig
    from pipeline.model import load_base_model

    return load_base_model(base_model_path, ModelConfig(), "cpu", quantize=False, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def short_model(tmp_path_factory, base_model_path) -> str:
    """The embedded model's first two decoder layers, saved as a model of its own with its tokenizer.

    For tests of orchestration (arrays, signals, requeues, promotion, chained labeling), of the
    labeler's resume and commit protocol (``short_adapter_run``) and of a compile: the same
    architecture, tokenizer and code path at an eighth of the cost of a step. Tests of what a
    model predicts use the whole one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("short_model")
    model = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch.float32)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_model_path).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The embedded catalog prepared with the default options."""
    from pipeline.config import DataConfig
    from pipeline.data import prepare

    out = tmp_path_factory.mktemp("data")
    prepare(DataConfig(), out)
    return out


@pytest.fixture(scope="session")
def adapter_run(tmp_path_factory, data_dir, base_model_path) -> Path:
    """A real (barely trained) adapter: 3 steps of the embedded recipe on this machine's training path
    (``model.quantization: auto``: plain LoRA on a CPU), no evaluation. Tests must not change it."""
    from pipeline.config import load_recipe
    from pipeline.train import train

    run = tmp_path_factory.mktemp("adapter_run") / "tiny"
    recipe = load_recipe(REPO / "jobs" / "recipes" / "instacart-smollm2.yaml", [
        f"data.dir={data_dir}", "data.max_train_samples=48", "train.max_steps=3", "train.save_steps=100",
        "train.per_device_train_batch_size=8"])
    train(recipe, run, evaluate_after=False)
    return run


@pytest.fixture(scope="session")
def short_adapter_run(tmp_path_factory, data_dir, short_model) -> Path:
    """``adapter_run`` on ``short_model``: for the labeler's protocol (resume, commit, faults, arrays),
    which must hold for any model, in fresh processes that load and run it in a fraction of the time.
    Tests must not change it."""
    from pipeline.config import load_recipe
    from pipeline.train import train

    run = tmp_path_factory.mktemp("short_adapter_run") / "short"
    recipe = load_recipe(REPO / "jobs" / "recipes" / "instacart-smollm2.yaml", [
        f"data.dir={data_dir}", f"model.base_model={short_model}", "data.max_train_samples=48", "train.max_steps=3",
        "train.save_steps=100", "train.per_device_train_batch_size=8"])
    train(recipe, run, evaluate_after=False)
    return run


@pytest.fixture(scope="session")
def aisle_run(tmp_path_factory, data_dir, base_model_path) -> Path:
    """A real (barely trained) aisle-level adapter: 3 steps, as ``adapter_run``. Tests must not change it."""
    from pipeline.config import load_recipe
    from pipeline.train import train

    run = tmp_path_factory.mktemp("aisle_run") / "aisles"
    recipe = load_recipe(REPO / "jobs" / "recipes" / "instacart-smollm2.yaml", [
        f"data.dir={data_dir}", "data.label_level=aisle", "data.max_train_samples=48", "train.max_steps=3",
        "train.save_steps=100", "train.per_device_train_batch_size=8"])
    train(recipe, run, evaluate_after=False)
    return run


@pytest.fixture(scope="session")
def calibrated_run(adapter_run, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the tiny adapter run, calibrated on the first 300 validation rows: it ships the
    blend with the lexical model (the adapter alone is barely trained). Tests must not change it."""
    import shutil

    from pipeline import calibrate
    from pipeline.predict import run_recipe

    run = tmp_path_factory.mktemp("calibrated") / "run"
    shutil.copytree(adapter_run, run)
    # the adapter and the blend only: the lexical model alone would win against a 3-step adapter,
    # and these tests are of the blend (tests/test_calibrate.py has the lexical model's own)
    result = calibrate.fit(run, run_recipe(run, ["eval.max_samples=300", "eval.candidates=[adapter,blend]"]),
                           progress=False)
    return run, result
