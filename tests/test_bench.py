"""The benchmark helpers (the benchmarks themselves print numbers; nothing is timed here)."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.bench.label import parse_generation, synthetic_catalog
from pipeline.bench.quality import implied_against_direct
from pipeline.bench.train import batches_padding_share, top_level_time_us

REPO = Path(__file__).resolve().parents[1]
LABELS = ["dairy eggs", "frozen", "snacks", "pets"]


def test_parse_generation_takes_the_first_label_after_the_prompt():
    prompt = "Frozen Peas ->:"
    assert parse_generation(prompt + " frozen<|im_end|>", prompt, LABELS) == "frozen"
    assert parse_generation(prompt + " Department - Snacks, or frozen", prompt, LABELS) == "snacks"
    assert parse_generation(prompt + " everybody is happy!", prompt, LABELS) is None


def test_implied_departments_are_compared_only_on_the_products_both_runs_scored(tmp_path):
    pd.DataFrame({"product_id": [1, 2, 3, 4], "department": ["frozen", "snacks", "pets", "frozen"],
                  "predicted_department": ["frozen", "snacks", "snacks", "frozen"]}).to_parquet(
        tmp_path / "aisle.parquet")
    pd.DataFrame({"product_id": [2, 3, 4, 9], "predicted": ["pets", "pets", "frozen", "frozen"]}).to_parquet(
        tmp_path / "department.parquet")
    compared = implied_against_direct(tmp_path / "aisle.parquet", tmp_path / "department.parquet")
    assert compared["rows"] == 3  # products 2, 3, 4
    assert compared["implied_accuracy"] == pytest.approx(2 / 3, abs=1e-3)
    assert compared["direct_accuracy"] == pytest.approx(2 / 3, abs=1e-3)
    assert compared["implied_minus_direct"]["accuracy"]["difference"] == 0



def test_padding_share_pads_each_batch_to_its_longest_example():
    lengths = [10, 2, 10, 2]
    assert batches_padding_share(lengths, [0, 1, 2, 3], 2) == pytest.approx(16 / 40)  # 10+2 padded to 10+10, twice
    assert batches_padding_share(lengths, [0, 2, 1, 3], 2) == 0.0  # grouped by length: nothing padded
    assert batches_padding_share(lengths, [0, 1, 2], 2) == pytest.approx(8 / 30, abs=1e-4)  # a last, shorter batch


def test_dequantization_time_counts_a_nested_dequantization_once():
    from types import SimpleNamespace as Event

    root = Event(name="train_step/forward", cpu_parent=None, cpu_time_total=100.0)
    outer = Event(name="bitsandbytes::dequantize_4bit", cpu_parent=root, cpu_time_total=30.0)
    inner = Event(name="bitsandbytes::dequantize_blockwise", cpu_parent=outer, cpu_time_total=10.0)
    alone = Event(name="bitsandbytes::dequantize_blockwise", cpu_parent=root, cpu_time_total=5.0)
    matmul = Event(name="aten::mm", cpu_parent=root, cpu_time_total=50.0)
    assert top_level_time_us([root, outer, inner, alone, matmul], ("dequantize",)) == (35.0, 2)

def test_the_model_shape_cap_times_each_decoder_shape_once_and_leaves_the_head_out():
    import torch

    from pipeline.bench.machine import linear_shapes_gflops

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.gate, self.down = torch.nn.Linear(64, 128), torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)
            self.head = torch.nn.Linear(64, 1000)

        def get_output_embeddings(self):
            return self.head

    cap = linear_shapes_gflops(Tiny(), rows=32, dtype=torch.float32, budget_s=0.05)
    assert [(s["in"], s["out"], s["layers"]) for s in cap["shapes"]] == [(64, 128, 2), (128, 64, 1)]
    rates = [s["gflops"] for s in cap["shapes"]]
    # all FLOPs over all seconds: a rate between the slowest and the fastest shape's
    assert min(rates) - 0.1 <= cap["gflops"] <= max(rates) + 0.1


def test_synthetic_catalog_prelabels_all_but_the_new_fraction(data_dir, tmp_path):
    path = tmp_path / "catalog.parquet"
    synthetic_catalog(data_dir, 70_000, 0.01, "demo@0123456789ab", path)
    table = pq.read_table(path)
    assert table.num_rows == 70_000 and pq.ParquetFile(path).metadata.num_row_groups == 2
    new = table.column("department").null_count
    assert 0.005 < new / 70_000 < 0.02
    assert table.column("labeled_by").null_count == new


@pytest.mark.slow
def test_train_benchmark_writes_its_json_schema(data_dir, base_model_path, tmp_path):
    """The schema on a tiny budget; the figures themselves live in results/, never in asserts."""
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.bench", "train", "--run", str(tmp_path / "run"), "--eval-every", "2",
         "--eval-samples", "20", "--output", str(out), f"data.dir={data_dir}", "data.max_train_samples=48",
         "train.max_steps=3", "train.per_device_train_batch_size=4", "train.logging_steps=1",
         "eval.max_samples=20", "lora.target_modules=[q_proj,v_proj]", "model.quantization=4bit"],
        capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    bench = json.loads(out.read_text())
    assert json.loads(result.stdout.strip().splitlines()[-1]) == bench
    assert bench["benchmark"] == "train" and bench["steps"] == 3 and bench["eval_samples"] == 20
    assert bench["curve_split"] == "validation"  # a choice made during training never looks at test
    assert set(bench["throughput"]) == {"steps_timed", "seconds_per_step", "examples_per_s", "tokens_per_s",
                                        "tokens_per_example"}
    assert bench["throughput"]["seconds_per_step"] > 0 and bench["throughput"]["tokens_per_s"] > 0
    assert [p["step"] for p in bench["curve"]] == [2, 3]
    assert all({"examples", "train_seconds", "accuracy", "macro_f1", "eval_seconds"} <= set(p) for p in bench["curve"])
    assert set(bench["time_to_accuracy"]) == {"0.8"}
    assert {split: bench["final"][split]["n_eval"] for split in bench["final"]} == {"validation": 20, "test": 20}
    assert "accuracy" in bench["final"]["test"]["baseline"]
    assert "--eval-every 2" in bench["command"]
    assert bench["training_path"]["quantization"] == "4bit" and bench["training_path"]["base_dtype"] is None
    assert bench["config"]["train"]["max_steps"] == 3 and bench["config"]["lora"]["target_modules"] == ["q_proj",
                                                                                                      "v_proj"]
    # Scoring mid-training must not break training: with 4-bit layers left in eval mode,
    # bitsandbytes repacked them for its CPU inference kernel and no gradient reached q/v again.
    history = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert [h["grad_norm"] > 0 for h in history if "grad_norm" in h] == [True, True, True]


def test_curve_stops_the_training_once_it_reaches_stop_at(adapter_run, data_dir):
    """``--stop-at``: a time-to-accuracy run ends at the first curve point at or above the target."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from pipeline.curve import AccuracyCurve
    from pipeline.data import read_split
    from pipeline.predict import Predictor

    predictor = Predictor.from_run(adapter_run)
    model, tokenizer, labels = predictor.model, predictor.tokenizer, predictor.labels
    test = read_split(data_dir / "test.parquet", labels).head(8)
    args = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=1, world_size=1)
    for stop_at, stops in ((0.0, True), (1.01, False), (None, False)):
        curve = AccuracyCurve(test["product_name"].tolist(), test["department"].tolist(), labels, every=2,
                              budget_s=None, batch_size=8, stop_at=stop_at)
        control = TrainerControl()
        curve.on_step_begin(args, TrainerState(), control)
        curve.on_step_end(args, TrainerState(global_step=2, max_steps=10), control, model=model,
                          processing_class=tokenizer)
        assert [p["step"] for p in curve.points] == [2]
        assert control.should_training_stop is stops


def test_cost_scores_each_candidate_as_it_ships(calibrated_run, data_dir, tmp_path):
    """``bench cost`` times every candidate the calibration scored; the shipped one's labels on
    the rows it timed are evaluate's on the same rows, so the price is that of what ships."""
    import shutil

    from pipeline.bench.quality import bench_cost
    from pipeline.evaluate import evaluate
    from pipeline.predict import run_recipe

    run = tmp_path / "run"
    shutil.copytree(calibrated_run[0], run)
    result = bench_cost(run, 80, [])
    calibration = json.loads((run / "calibration.json").read_text())
    assert set(result["candidates"]) == set(calibration["candidates"]) and result["shipped"] == calibration["shipped"]
    for name, cost in result["candidates"].items():
        assert cost["n_eval"] == 80 and cost["products_per_s"] > 0 and cost["core_hours_per_million"] > 0
        assert cost["shipped"] == (name == calibration["shipped"])
    metrics = evaluate(run, data_dir / "validation.parquet", run_recipe(run, ["eval.max_samples=80"]), progress=False)
    assert result["candidates"][calibration["shipped"]]["accuracy"] == round(metrics["validation"]["accuracy"], 4)
