"""The faults a nightly job meets on a shared file system, made real: a full disk (a small tmpfs),
damaged committed parts, a folder that cannot be written, two processes on one output folder.
After each: nothing half-written is visible, a rerun labels every input row exactly once, and the
outputs equal an uninterrupted run's (but for ``labeled_at`` where resumed).

Every labeling runs in a fresh process under MKL_CBWR=COMPATIBLE in fp32, whose bits then repeat
across processes (tests/test_label.py says why)."""

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

from pipeline.errors import LabelError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "MKL_CBWR": "COMPATIBLE"}
EXACT = ["eval.dtype=float32", "label.overlap=false"]
ROWS = 300


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, data_dir) -> Path:
    names = pd.read_parquet(data_dir / "test.parquet")["product_name"].head(ROWS + 50).tolist()
    root = tmp_path_factory.mktemp("faults") / "catalog"
    root.mkdir()
    pq.write_table(pa.table({"product_id": list(range(ROWS)), "product_name": names[:ROWS]}), root / "a.parquet",
                   row_group_size=100)
    pq.write_table(pa.table({"product_id": list(range(ROWS, ROWS + 50)), "product_name": names[ROWS:]}),
                   root / "b.parquet")
    return root


def label(adapter, catalog, out, *extra, batch: int = 25, check: int | None = 0) -> subprocess.CompletedProcess:
    # the overrides right after the catalog's path, where --catalog's list takes them in
    result = subprocess.run([sys.executable, "-m", "pipeline", "label", "--adapter", str(adapter), "--catalog",
                             str(catalog), *EXACT, "--output", str(out), "--rows-per-batch", str(batch),
                             "--batch-size", "25", *extra], cwd=REPO, env=ENV, capture_output=True, text=True)
    if check is not None:
        assert result.returncode == check, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def reference(short_adapter_run, catalog, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    label(short_adapter_run, catalog, out)
    return out


def same_as_reference(out: Path, reference: Path, names=("a.parquet", "b.parquet")) -> None:
    for name in names:
        got, expected = (pq.read_table(root / name).drop_columns(["labeled_at"]) for root in (out, reference))
        assert got.equals(expected), name
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # nothing half-written left


@pytest.fixture()
def tmpfs(tmp_path):
    """A real 2 MiB tmpfs (root only), unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("this machine does not let root mount a tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill the disk but ``leave`` bytes with one file, which the test removes to free the space."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - leave))
    return filler


def test_a_full_disk_fails_the_file_by_name_and_the_rerun_completes(short_adapter_run, catalog, reference, tmpfs):
    out = tmpfs / "out"
    output_bytes = sum((reference / n).stat().st_size for n in ("a.parquet", "b.parquet"))
    filler = fill(tmpfs, leave=output_bytes)  # room for some batches, not for the parts and the joined file
    result = label(short_adapter_run, catalog, out, check=1)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert failed and all("No space left on device (ENOSPC)" in line for line in failed), result.stdout
    assert failed[0].startswith(f"FAILED {catalog / 'a.parquet'}: cannot write {out}/")
    committed = int(failed[0].split("; ")[-1].split(" of ")[0])
    assert 0 < committed < ROWS and f"{committed} of {ROWS} rows committed, kept for the rerun" in failed[0]
    assert not (out / "a.parquet").exists() and not [p for p in out.rglob("*") if ".tmp-" in p.name]

    filler.unlink()  # space freed: the rerun resumes what was committed and completes
    label(short_adapter_run, catalog, out)
    same_as_reference(out, reference)
    manifest = json.loads((out / "_manifest" / "a.parquet.json").read_text())
    assert manifest["resumed_rows"] == committed and manifest["rows"] == ROWS


def test_no_room_for_one_batch_is_refused_before_the_model_loads(short_adapter_run, catalog, tmpfs):
    fill(tmpfs, leave=16384)  # room to create the folder, not for a default batch of 4,096 rows
    result = label(short_adapter_run, catalog, tmpfs / "out", batch=4096, check=2)
    assert result.stderr.strip().splitlines()[-1].startswith(f"catalog-tuner label: error: {tmpfs / 'out'}: ")
    assert "bytes free, a record batch needs about" in result.stderr
    assert "pipeline.model" not in result.stderr  # no model was loaded


def test_an_unwritable_output_folder_is_refused_before_the_model_loads(short_adapter_run, catalog, tmp_path,
                                                                       monkeypatch):
    import pipeline.label as label_module

    monkeypatch.setattr(label_module, "Labeler", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(LabelError, match="a-file/out: cannot be written: Not a directory"):
        label_module.label_catalogs(short_adapter_run, [str(catalog)], tmp_path / "a-file" / "out", progress=False)
    if os.geteuid() == 0:  # root passes permission checks: a read-only mount is what stops it
        readonly = tmp_path / "ro"
        readonly.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)]).returncode == 0:
            try:
                with pytest.raises(LabelError, match=r"ro: cannot be written: Read-only file system \(EROFS\)"):
                    label_module.label_catalogs(short_adapter_run, [str(catalog)], readonly, progress=False)
            finally:
                subprocess.run(["umount", "-l", str(readonly)], check=True)


def stopped_with_parts(adapter, catalog, out, part: str) -> None:
    """Label until ``part`` is committed, then SIGTERM (the batch in hand is committed, exit 75)."""
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "label", "--adapter", str(adapter), "--catalog",
                                str(catalog), "--output", str(out), "--rows-per-batch", "25", "--batch-size", "25",
                                *EXACT], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list(out.rglob(part)):
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-2000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait() == 75


def test_damaged_committed_parts_are_relabeled_not_joined(short_adapter_run, catalog, reference, tmp_path):
    out = tmp_path / "out"
    stopped_with_parts(short_adapter_run, catalog / "a.parquet", out, "part-000004.parquet")
    parts = out / "_partial" / "a.parquet"
    recorded = json.loads((parts / "progress.json").read_text())["parts"]
    assert len(recorded) >= 5
    truncated, flipped = parts / "part-000001.parquet", parts / "part-000003.parquet"
    truncated.write_bytes(truncated.read_bytes()[:100])  # a crashed client's leftovers
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    flipped.write_bytes(bytes(data))

    result = label(short_adapter_run, catalog, out)
    for name in (truncated.name, flipped.name):
        assert (f"committed part {name} is not resumed, its bytes differ from those committed: relabeling its batch"
                in result.stderr)
    same_as_reference(out, reference)
    manifest = json.loads((out / "_manifest" / "a.parquet.json").read_text())
    assert manifest["resumed_rows"] == 25 * (len(recorded) - 2)


def paused_with_a_part(adapter, catalog: Path, out: Path) -> subprocess.Popen:
    """A labeling of ``catalog`` into ``out``, stopped (SIGSTOP) once its first part is committed:
    it holds the output's lock for as long as the test wants."""
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "label", "--adapter", str(adapter), "--catalog",
                                str(catalog), "--output", str(out), "--rows-per-batch", "25", "--batch-size", "25",
                                *EXACT], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 300
    while not list(out.rglob("part-000000.parquet")):
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-2000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGSTOP)
    return process


def test_two_processes_on_one_output_folder_never_interleave(short_adapter_run, catalog, reference, tmp_path):
    out = tmp_path / "out"
    first = paused_with_a_part(short_adapter_run, catalog / "a.parquet", out)
    second = label(short_adapter_run, catalog, out, check=1)  # the whole catalog, while the first holds a.parquet
    lock = out / "_partial" / "a.parquet.lock"
    assert (f"FAILED {catalog / 'a.parquet'}: {out / 'a.parquet'} is being labeled by another process (it holds "
            f"{lock}); skipped: run again when it is done, or pass --wait-for-lock") in second.stdout
    assert f"labeled {catalog / 'b.parquet'}: 50 rows" in second.stdout
    first.send_signal(signal.SIGCONT)
    assert first.wait() == 0, first.stderr.read()[-2000:]
    same_as_reference(out, reference)

    out = tmp_path / "waiting"  # with --wait-for-lock the second waits, then finds the file done
    first = paused_with_a_part(short_adapter_run, catalog / "a.parquet", out)
    log = tmp_path / "second.log"
    with open(log, "w") as stderr:
        second = subprocess.Popen([sys.executable, "-m", "pipeline", "label", "--adapter", str(short_adapter_run),
                                   "--catalog", str(catalog), "--output", str(out), "--rows-per-batch", "25",
                                   "--batch-size", "25", *EXACT, "--wait-for-lock"], cwd=REPO, env=ENV,
                                  stdout=subprocess.PIPE, stderr=stderr, text=True)
        deadline = time.time() + 300
        while "is being labeled by another process: waiting for it" not in log.read_text():
            assert second.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        first.send_signal(signal.SIGCONT)
        assert first.wait() == 0 and second.wait() == 0, log.read_text()[-2000:]
    assert f"skipped {catalog / 'a.parquet'}: {ROWS} rows" in second.stdout.read()
    same_as_reference(out, reference, names=("a.parquet",))


def test_a_file_split_one_night_and_whole_the_next_is_never_read_twice(calibrated_run, catalog, tmp_path):
    """Night 1 splits a.parquet between two shards, night 2 labels it whole, night 3 cuts it in
    three: after each night OUT_DIR holds each of its rows once, and each output has its manifest.
    (A run that ships the lexical model: the layouts are what is tested, not the model.)"""
    import shutil

    from pipeline import calibrate
    from pipeline.label import label_catalogs
    from pipeline.predict import run_recipe

    run = tmp_path / "run"
    shutil.copytree(calibrated_run[0], run)
    calibrate.fit(run, run_recipe(run, ["eval.max_samples=100", "eval.candidates=[lexical]"]), progress=False)
    out = tmp_path / "out"
    for night, shards in (("n1", 2), ("n2", 1), ("n3", 3)):
        for index in range(shards):
            label_catalogs(run, [str(catalog)], out, shard=f"{index}/{shards}", job=night, progress=False)
        outputs = sorted(p.name for p in out.glob("a*.parquet"))
        rows = pd.concat([pd.read_parquet(out / name) for name in outputs])
        assert sorted(rows["product_id"]) == list(range(ROWS)), (night, outputs)
        manifests = sorted(p.name.removesuffix(".json") for p in (out / "_manifest").glob("a*.json"))
        assert manifests == outputs, night
    assert outputs != ["a.parquet"]  # night 3 left pieces, night 2's whole file is gone
