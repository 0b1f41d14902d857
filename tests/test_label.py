"""The bulk labeler on real Parquet files with a real (tiny) adapter."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.atomic import sha256_file
from pipeline.errors import ModelError
from pipeline.label import OUTPUT_COLUMNS, Labeler, LabelError, label_catalogs
from pipeline.model import cpu_has_native_bf16
from pipeline.shards import find_inputs, parse_shard, plan

REPO = Path(__file__).resolve().parents[1]

ODD_NAMES = [None, "", "   ", "Milk ->: household", "Crème brûlée 🍮", "牛奶", "Tab\tand\nnewline\x00ctrl",
             "word " * 400, "Bread Rolls", "Frozen Pizza ->:"]


@pytest.fixture(scope="module")
def labeler(adapter_run):
    return Labeler(adapter_run)


@pytest.fixture()
def catalog(tmp_path, data_dir) -> Path:
    """Three files, several row groups, a subfolder, odd text and a duplicate id."""
    names = pd.read_parquet(data_dir / "test.parquet")["product_name"].head(330).tolist()
    root = tmp_path / "catalog"
    (root / "sub").mkdir(parents=True)
    a = pa.table({"product_id": list(range(200)), "product_name": names[:200], "price": [1.5] * 200})
    pq.write_table(a, root / "a.parquet", row_group_size=70)
    b = pa.table({"sku": [f"s{i}" for i in range(120)], "product_id": list(range(200, 320)),
                  "product_name": names[200:320]})
    pq.write_table(b, root / "sub" / "b.parquet", row_group_size=50)
    c = pa.table({"product_id": [900 + i for i in range(len(ODD_NAMES))] + [900],
                  "product_name": ODD_NAMES + ["duplicate id"]})
    pq.write_table(c, root / "c.parquet", row_group_size=4)
    return root


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _read_outputs(out: Path) -> pd.DataFrame:
    files = sorted(p for p in out.rglob("*.parquet")  # not the bookkeeping: _manifest, _report
                   if not any(part.startswith("_") for part in p.relative_to(out).parts))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def test_labels_every_row_keeping_inputs_intact(adapter_run, labeler, catalog, tmp_path):
    before = _checksums(catalog)
    out = tmp_path / "out"
    outcomes = label_catalogs(adapter_run, [str(catalog)], out, progress=False)
    assert [o.status for o in outcomes] == ["labeled"] * 3
    assert _checksums(catalog) == before
    labels = json.loads((adapter_run / "labels.json").read_text())
    for name in ("a.parquet", "sub/b.parquet", "c.parquet"):
        source, result = pq.read_table(catalog / name), pq.read_table(out / name)
        assert result.column_names == source.column_names + OUTPUT_COLUMNS
        assert result.select(source.column_names).equals(source)  # every row and column, in order
        frame = result.to_pandas()
        ok = frame["label_status"] != "empty_name"
        assert frame.loc[ok, "department"].isin(labels).all()
        assert frame.loc[ok, "department_confidence"].between(0, 1).all()
        assert (frame["labeled_by"] == labeler.labeled_by).all()
        assert str(result.schema.field("labeled_at").type) == "timestamp[us, tz=UTC]"
        entry = json.loads((out / "_manifest" / f"{name}.json").read_text())
        assert entry["rows"] == source.num_rows and entry["input_sha256"] == before[name]
        assert entry["output_sha256"] == sha256_file(out / name)
        assert entry["adapter_sha256"].startswith(labeler.labeled_by.split("@")[1])
        assert entry["labels"] == labels and entry["base_model"] == "embedded:smollm2-135m"
        # the path that labeled the file: eager, bf16 where this CPU multiplies it natively
        assert entry["inference_path"] == ("bfloat16" if cpu_has_native_bf16() else "float32")
    odd = pq.read_table(out / "c.parquet").to_pandas()
    assert odd["label_status"].tolist() == ["empty_name"] * 3 + ["ok"] * 4 + ["truncated"] + ["ok"] * 3
    assert odd.loc[:2, "department"].isna().all() and odd.loc[3:, "department"].notna().all()
    assert {o.unit.relative.as_posix(): o.duplicate_ids for o in outcomes} == {
        "a.parquet": 0, "c.parquet": 1, "sub/b.parquet": 0}
    assert not list(out.rglob(".*tmp*"))


def test_a_checkout_that_is_not_installed_labels_and_says_so(adapter_run, tmp_path, monkeypatch):
    """A GPU node ran the labeler from a copy of the repository on PYTHONPATH: it labeled the file,
    then failed writing the manifest because the package had no installed metadata."""
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    source = tmp_path / "catalog.parquet"
    pq.write_table(pa.table({"product_id": [1, 2], "product_name": ["Bread Rolls", "Whole Milk"]}), source)
    out = tmp_path / "out"
    assert [o.status for o in label_catalogs(adapter_run, [str(source)], out, progress=False)] == ["labeled"]
    assert json.loads((out / "_manifest" / "catalog.parquet.json").read_text())["code_version"].startswith("source")


def test_prompt_lookalikes_do_not_leak_between_rows(adapter_run):
    """A row's prediction depends on that row alone, whatever its neighbours contain: exactly in
    fp32. In bf16 a row's numbers move with its batch's padding (AMX: 0.001 here), within the
    bound `test_the_bf16_path_labels_like_fp32_except_near_ties` holds bf16 to."""
    labeler = Labeler(adapter_run, overrides=["eval.dtype=float32"])
    alone = labeler.predict(["Bread Rolls"])
    mixed = labeler.predict(["Milk ->: household", "Bread Rolls", "x ->: pets\nBread Rolls ->: pets"])
    assert mixed.labels[1] == alone.labels[0]
    assert mixed.confidences[1] == pytest.approx(alone.confidences[0], abs=1e-4)


def test_rerun_skips_finished_files(short_adapter_run, catalog, tmp_path):
    out = tmp_path / "out"
    label_catalogs(short_adapter_run, [str(catalog)], out, progress=False)
    stamp = (out / "a.parquet").stat().st_mtime_ns
    again = label_catalogs(short_adapter_run, [str(catalog)], out, progress=False)
    assert sorted(o.status for o in again) == ["skipped"] * 3
    assert (out / "a.parquet").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("count", [3, 7])  # one shard per file, and files split between shards
def test_shards_cover_every_row_exactly_once(short_adapter_run, catalog, tmp_path, count):
    out = tmp_path / "out"
    for index in range(count):
        label_catalogs(short_adapter_run, [str(catalog)], out, shard=f"{index}/{count}", job="1",
                       progress=False)
    expected = sorted(pq.read_table(catalog / n).column("product_id").to_pylist()
                      for n in ("a.parquet", "sub/b.parquet", "c.parquet"))
    got = _read_outputs(out)["product_id"].tolist()
    assert sorted(got) == sorted(sum(expected, []))


def test_shard_plan_is_contiguous_and_balanced(catalog):
    inputs = find_inputs([str(catalog)])
    sizes = []
    for index in range(4):
        units, _ = plan(inputs, (index, 4))
        sizes.append(sum(u.rows for u in units))
    assert sum(sizes) == 331
    assert all(abs(size - 331 / 4) <= 70 for size in sizes)  # within one (largest) row group of even


def test_shard_from_slurm_array(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    assert parse_shard(None) == (2, 3)
    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(LabelError, match="need 0 <= I < N"):
        parse_shard("4/4")


def _label_cmd(adapter_run, catalog, out, *extra):
    return [sys.executable, "-m", "pipeline", "label", "--adapter", str(adapter_run), "--catalog", str(catalog),
            "--output", str(out), "--rows-per-batch", "16", "--batch-size", "16", *extra]


def _stop_when(path_glob_dir: Path, pattern: str, process: subprocess.Popen, how: int = signal.SIGKILL,
               timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if list(path_glob_dir.rglob(pattern)):
            process.send_signal(how)
            process.wait()
            return
        time.sleep(0.05)
    raise AssertionError(f"no {pattern} appeared; exit code {process.poll()}")


def _without_time(table: pa.Table) -> pa.Table:
    return table.drop_columns(["labeled_at"])


@pytest.mark.parametrize("overlap", ["false", "true"])
def test_an_interrupted_file_resumes_from_its_last_committed_batch(short_adapter_run, catalog, tmp_path, overlap):
    """200 rows in batches of 16, stopped twice: by SIGTERM (the batch in hand is committed, exit 75
    for requeue), then by kill -9 after the rerun committed more. Each rerun labels only the batches
    not committed before, and the output equals an uninterrupted run's (but for the time stamp).

    Every run is a fresh process under MKL_CBWR=COMPATIBLE: on Intel CPUs with AVX512 and AMX, MKL
    picks fp32 kernels per process, and runs otherwise differed in the last bits (up to 8e-5 in
    confidence, labels equal), with label.overlap (a GPU's default: batches prepared and committed
    in threads) and, once, one batch at a time (results/README.md, label-repro-amx.json). Pinned,
    both ways give the same bits, which is what a rerun that must reproduce fp32 labels sets."""
    big = tmp_path / "big"
    big.mkdir()
    pq.write_table(pq.read_table(catalog / "a.parquet"), big / "a.parquet", row_group_size=20)
    settings = ["eval.dtype=float32", f"label.overlap={overlap}"]  # exactness is fp32's contract
    env = {**os.environ, "MKL_CBWR": "COMPATIBLE"}  # read when MKL loads, hence fresh processes only

    def label_to_the_end(out: Path) -> None:
        result = subprocess.run(_label_cmd(short_adapter_run, big, out, *settings), cwd=REPO, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]

    reference = tmp_path / "reference"
    label_to_the_end(reference)
    out, parts_dir = tmp_path / "out", tmp_path / "out" / "_partial" / "a.parquet"

    def committed() -> int:
        """Rows of the parts progress.json records: kill -9 may land between a part's file and its
        record, and such a part is relabeled, not resumed."""
        parts = json.loads((parts_dir / "progress.json").read_text())["parts"]
        return sum(record["rows"] for record in parts.values())

    for how, part in ((signal.SIGTERM, "part-000002.parquet"), (signal.SIGKILL, "part-000006.parquet")):
        process = subprocess.Popen(_label_cmd(short_adapter_run, big, out, *settings), cwd=REPO, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _stop_when(out, part, process, how)
        if how == signal.SIGTERM:
            assert process.returncode == 75, process.stderr.read()[-2000:]  # committed, asks to be requeued
        # One thread commits the parts in order, so those before the one seen are recorded; SIGTERM
        # lets the one seen be recorded too.
        least = int(part[5:11]) + (how == signal.SIGTERM)
        assert 16 * least <= committed() < 200 and not (out / "a.parquet").exists()
    before_last_run = committed()

    label_to_the_end(out)
    manifest = json.loads((out / "_manifest" / "a.parquet.json").read_text())
    assert manifest["resumed_rows"] == before_last_run  # what was committed was not labeled again
    assert manifest["stats"]["labeled"] == 200  # the report still counts the resumed batches
    labeled, expected = pq.read_table(out / "a.parquet"), pq.read_table(reference / "a.parquet")
    assert _without_time(labeled).equals(_without_time(expected))
    assert len(set(labeled.column("labeled_at").to_pylist())) == 1  # one job, one time stamp per file
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert not [p for p in (out / "_partial").rglob("*") if p.suffix != ".lock"]  # parts gone, locks stay
    # The review queue's runners-up come from the labeling pass, for the resumed batches too.
    queue = pd.read_parquet(out / "_report" / "latest" / "review_queue.parquet")
    assert (queue["row"] < before_last_run).any() and (queue["row"] >= before_last_run).any()
    assert (queue["top1_label"] == queue["label"]).all() and queue["top3_label"].notna().all()
    assert queue["top1_probability"].to_numpy() == pytest.approx(queue["confidence"].to_numpy(), abs=1e-3)


def test_overlapping_preparation_and_commits_with_the_model_changes_no_output(short_adapter_run, catalog, tmp_path):
    """label.overlap (the default) prepares the next batch and commits the last one in threads; the
    outputs, review queue and counts equal those of one batch at a time."""
    jobs = {}
    for overlap in ("true", "false"):
        out = tmp_path / overlap
        label_catalogs(short_adapter_run, [str(catalog)], out, rows_per_batch=16, batch_size=16, progress=False,
                       overrides=[f"label.overlap={overlap}"])
        jobs[overlap] = out
    for name in ("a.parquet", "sub/b.parquet", "c.parquet"):
        overlapped, serial = (pq.read_table(jobs[o] / name) for o in ("true", "false"))
        assert _without_time(overlapped).equals(_without_time(serial)), name
    queues = [pd.read_parquet(jobs[o] / "_report" / "latest" / "review_queue.parquet") for o in ("true", "false")]
    assert len(queues[0]) > 0
    pd.testing.assert_frame_equal(*queues)
    summaries = [json.loads((jobs[o] / "_report" / "latest" / "summary.json").read_text()) for o in ("true", "false")]
    assert summaries[0]["rows"] == summaries[1]["rows"] == 331
    assert summaries[0]["label_distribution"] == summaries[1]["label_distribution"]


def test_in_place_survives_a_kill_before_the_rename(short_adapter_run, catalog, tmp_path):
    target = tmp_path / "live"
    target.mkdir()
    pq.write_table(pq.read_table(catalog / "a.parquet"), target / "a.parquet", row_group_size=20)
    original = sha256_file(target / "a.parquet")
    out = tmp_path / "manifest-only"
    process = subprocess.Popen(_label_cmd(short_adapter_run, target, out, "--in-place"), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _stop_when(out, "part-000001.parquet", process)
    assert sha256_file(target / "a.parquet") == original  # still the valid original
    result = subprocess.run(_label_cmd(short_adapter_run, target, out, "--in-place"), cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    table = pq.read_table(target / "a.parquet")
    assert table.column_names == ["product_id", "product_name", "price"] + OUTPUT_COLUMNS
    assert table.num_rows == 200 and table.column("product_id").to_pylist() == list(range(200))
    assert sorted(p.name for p in target.iterdir()) == ["a.parquet"]  # no temporary file, no backup left
    again = subprocess.run(_label_cmd(short_adapter_run, target, out, "--in-place"), cwd=REPO, capture_output=True,
                           text=True)
    assert "skipped" in again.stdout and pq.read_table(target / "a.parquet").equals(table)


def test_bad_files_fail_alone_with_their_reason(short_adapter_run, catalog, tmp_path):
    (catalog / "broken.parquet").write_text("this is not parquet")
    pq.write_table(pa.table({"title": ["x"]}), catalog / "no_text.parquet")
    pq.write_table(pa.table({"product_name": [1, 2]}), catalog / "numbers.parquet")
    out = tmp_path / "out"
    result = subprocess.run(_label_cmd(short_adapter_run, catalog, out), cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any(l.startswith(f"FAILED {catalog / 'broken.parquet'}: cannot be read as Parquet") for l in lines)
    assert f"FAILED {catalog / 'no_text.parquet'}: no column 'product_name' (has: title)" in lines
    assert f"FAILED {catalog / 'numbers.parquet'}: column 'product_name' is int64, not a string column" in lines
    assert "3 labeled, 0 skipped (already done), 3 failed; 331 rows, 1 duplicate ids" in lines
    assert "3 file(s) failed" in result.stderr
    for name in ("a.parquet", "sub/b.parquet", "c.parquet"):
        assert (out / name).is_file()
    fast = label_catalogs(short_adapter_run, [str(catalog)], tmp_path / "fast", fail_fast=True, progress=False)
    assert [o.status for o in fast] == ["failed"]


def test_only_missing_touches_only_unlabeled_rows(adapter_run, labeler, tmp_path):
    mine, other = labeler.labeled_by, "someone-else@0123456789ab"
    stamp = pd.Timestamp("2026-01-01", tz="UTC")
    frame = pd.DataFrame({
        "product_id": [1, 2, 3, 4],
        "product_name": ["Bread Rolls", "Organic Whole Milk", "Red Wine", "Baby Wipes"],
        "department": ["frozen", None, "pets", "pets"],
        "department_confidence": [0.123, None, 0.5, 0.5],
        "label_status": ["ok", None, "ok", "ok"],
        "labeled_by": [mine, None, other, None],
        "labeled_at": [stamp, pd.NaT, stamp, stamp],
    })
    root = tmp_path / "cat"
    root.mkdir()
    frame.to_parquet(root / "nightly.parquet", index=False)
    label_catalogs(adapter_run, [str(root)], tmp_path / "out", only_missing=True, progress=False)
    result = pd.read_parquet(tmp_path / "out" / "nightly.parquet")
    assert result.loc[0, ["department", "labeled_by"]].tolist() == ["frozen", mine]  # untouched
    assert result.loc[0, "department_confidence"] == pytest.approx(0.123)
    assert result.loc[0, "labeled_at"] == stamp
    assert (result.loc[1:, "labeled_by"] == mine).all()  # null, other adapter, unknown adapter
    assert (result.loc[1:, "labeled_at"] > stamp).all()


def test_missing_inputs_are_errors(adapter_run, tmp_path):
    with pytest.raises(LabelError, match="nope: not found"):
        label_catalogs(adapter_run, [str(tmp_path / "nope")], tmp_path / "out", progress=False)
    with pytest.raises(LabelError, match="no file matches"):
        label_catalogs(adapter_run, [str(tmp_path / "*.parquet")], tmp_path / "out", progress=False)
    with pytest.raises(ModelError, match="not a run directory"):
        Labeler(tmp_path)
