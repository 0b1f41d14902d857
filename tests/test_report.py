"""The labeling report, from real labeling runs of a calibrated (blended) tiny adapter."""

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.label import label_catalogs
from pipeline.report import review_order

ODD = ["word " * 400, "", "Crème brûlée 🍮"]


@pytest.fixture(scope="module")
def nightly(data_dir, tmp_path_factory) -> Path:
    """600 test products drawn like the training split, in two files, plus odd names."""
    test = pd.read_parquet(data_dir / "test.parquet").head(600)
    root = tmp_path_factory.mktemp("nightly")
    for k, part in enumerate((test.iloc[:300], test.iloc[300:])):
        pq.write_table(pa.table({"product_id": part["product_id"].tolist(),
                                 "product_name": part["product_name"].tolist()}), root / f"part{k}.parquet",
                       row_group_size=100)
    pq.write_table(pa.table({"product_id": [90_000 + i for i in range(len(ODD))], "product_name": ODD}),
                   root / "odd.parquet")
    return root


@pytest.fixture(scope="module")
def one_process(calibrated_run, nightly, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "out"
    label_catalogs(calibrated_run[0], [str(nightly)], out, batch_size=32, progress=False, review_max=40)
    return out


def outputs(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p).assign(file=p.name) for p in sorted(out.glob("*.parquet"))])


def test_the_report_counts_what_the_outputs_hold(one_process):
    summary = json.loads((one_process / "_report" / "latest" / "summary.json").read_text())
    rows = outputs(one_process)
    assert summary["rows"] == summary["labeled"] == len(rows) == 603
    assert summary["by_label_status"] == rows["label_status"].value_counts().to_dict()
    counts = rows["department"].value_counts()
    assert {k: v["count"] for k, v in summary["label_distribution"].items() if v["count"]} == counts.to_dict()
    assert sum(summary["confidence_histogram"]["counts"]) == rows["department_confidence"].notna().sum()
    assert summary["files"]["labeled"] == 3 and summary["adapter"]["labeled_by"] == rows["labeled_by"].iloc[0]
    assert (one_process / "_report" / "latest" / "report.html").stat().st_size > 10_000  # with its inline charts


def test_the_review_queue_is_sorted_bounded_and_real(one_process, nightly):
    queue = pd.read_parquet(one_process / "_report" / "latest" / "review_queue.parquet")
    assert len(queue) == 40  # --review-max
    assert queue.iloc[0]["label_status"] == "truncated"  # the model never saw all of that name
    rest = queue[queue["label_status"] != "truncated"]
    assert rest["confidence"].is_monotonic_increasing and (rest["confidence"] < 0.6).all()
    assert review_order(queue.to_dict("records")) == queue.to_dict("records")
    for row in queue.itertuples():
        source = pq.read_table(row.source).slice(row.row, 1).to_pylist()[0]
        assert str(source["product_id"]) == row.id and source["product_name"] == row.name
        labeled = pd.read_parquet(one_process / Path(row.source).name)
        assert labeled.iloc[row.row]["department"] == row.label == row.top1_label
        assert labeled.iloc[row.row]["department_confidence"] == pytest.approx(row.top1_probability, abs=1e-3)
        assert row.top1_probability >= row.top2_probability >= row.top3_probability


def test_drift_is_flagged_for_two_departments_only(one_process, calibrated_run, data_dir, tmp_path):
    summary = json.loads((one_process / "_report" / "latest" / "summary.json").read_text())
    assert not summary["drift"]["against_training"]["flagged"]
    test = pd.read_parquet(data_dir / "test.parquet")
    narrow = test[test["department"].isin(["frozen", "personal care"])].head(200)
    catalog = tmp_path / "narrow.parquet"
    pq.write_table(pa.table({"product_id": narrow["product_id"].tolist(),
                             "product_name": narrow["product_name"].tolist()}), catalog)
    out = tmp_path / "out"
    label_catalogs(calibrated_run[0], [str(catalog)], out, batch_size=32, progress=False)
    drifted = json.loads((out / "_report" / "latest" / "summary.json").read_text())
    assert drifted["drift"]["flagged"] and drifted["drift"]["against_training"]["flagged"]
    moved = {m["label"] for m in drifted["drift"]["against_training"]["moved_most"][:2]}
    assert moved == {"frozen", "personal care"}


def test_two_shards_report_what_one_process_does(one_process, calibrated_run, nightly, tmp_path):
    out = tmp_path / "out"
    for index in range(2):
        label_catalogs(calibrated_run[0], [str(nightly)], out, shard=f"{index}/2", job="7", batch_size=32,
                       progress=False, review_max=40)
        assert (out / "_report" / "latest" / "summary.json").exists() == (index == 1)  # the last task merges
    one = json.loads((one_process / "_report" / "latest" / "summary.json").read_text())
    two = json.loads((out / "_report" / "latest" / "summary.json").read_text())
    for key in ("rows", "labeled", "by_label_status", "label_distribution", "confidence_histogram", "changes"):
        assert two[key] == one[key], key
    assert [t["shard"] for t in two["tasks"]] == ["0/2", "1/2"]
    pd.testing.assert_frame_equal(pd.read_parquet(one_process / "_report" / "latest" / "review_queue.parquet"),
                                  pd.read_parquet(out / "_report" / "latest" / "review_queue.parquet"))


def test_relabeling_counts_the_changes(one_process, calibrated_run, tmp_path):
    previous = pd.read_parquet(one_process / "part0.parquet").head(50)
    previous["department"] = ["frozen"] * 25 + previous["department"].tolist()[25:]
    previous["labeled_by"] = "an-older-adapter@000000000000"
    catalog = tmp_path / "labeled.parquet"
    previous.to_parquet(catalog)
    out = tmp_path / "out"
    label_catalogs(calibrated_run[0], [str(catalog)], out, only_missing=True, batch_size=32, progress=False)
    summary = json.loads((out / "_report" / "latest" / "summary.json").read_text())
    now = pd.read_parquet(out / "labeled.parquet")
    changed = (now["department"] != previous["department"]).sum()
    assert summary["changes"]["rows"] == changed >= 20
    assert sum(summary["changes"]["top_moves"].values()) == changed  # under 10 distinct moves here
    assert all(move.startswith("frozen -> ") for move in summary["changes"]["top_moves"])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_the_report_renders_in_a_real_browser(one_process, tmp_path):
    screenshot = tmp_path / "report.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={screenshot}", "--window-size=1200,2400",
                    (one_process / "_report" / "latest" / "report.html").as_uri()], check=True, capture_output=True,
                   timeout=120)
    assert screenshot.stat().st_size > 20_000  # charts and tables, not a blank page


def test_the_report_is_logged_to_wandb_offline(one_process, monkeypatch):
    pytest.importorskip("wandb")
    from pipeline.config import Recipe
    from pipeline.tracking import log_label_report

    monkeypatch.setenv("WANDB_MODE", "offline")
    recipe = Recipe()
    summary = json.loads((one_process / "_report" / "latest" / "summary.json").read_text())
    review = pq.read_table(one_process / "_report" / "latest" / "review_queue.parquet")
    assert log_label_report(one_process / "_report", summary, review, recipe.tracking) is None  # tracking.wandb off
    recipe.tracking.wandb = True
    folder = log_label_report(one_process / "_report", summary, review, recipe.tracking)
    assert folder.name.startswith("offline-run-") and list(folder.glob("run-*.wandb"))
    # W&B is a copy of the report: a failing W&B call is a warning, never a failed labeling
    import wandb

    monkeypatch.setattr(wandb, "init", lambda **kwargs: (_ for _ in ()).throw(RuntimeError("no W&B service")))
    assert log_label_report(one_process / "_report", summary, review, recipe.tracking) is None
