"""One report per labeling job: partials merged once per complete set, never across jobs; the
history, ``latest``, pruning, and ``catalog-tuner report``. Built from real partials written by
:func:`pipeline.report.finish_job` (no model: the figures are the report's own input)."""

import json
import multiprocessing
import os
import time
from pathlib import Path

import pyarrow as pa

from pipeline.cli import main
from pipeline.config import LabelConfig, TrackingConfig
from pipeline.report import JobContext, LabelStats, finish_job, merge_job, read_history

LABELS = ["bakery", "dairy eggs", "frozen"]
TRAINING = {"counts": {"bakery": 50, "dairy eggs": 30, "frozen": 20}}


def stats_of(labels: list[str], confidence: float = 0.9) -> LabelStats:
    """The figures of one file whose rows got these labels, counted as labeling counts them."""
    table = pa.table({"product_id": list(range(len(labels))), "product_name": [f"p{i}" for i in range(len(labels))],
                      "department": labels, "department_confidence": [confidence] * len(labels),
                      "label_status": ["ok"] * len(labels), "labeled_by": ["run@abc"] * len(labels),
                      "labeled_at": [1] * len(labels)})
    stats = LabelStats()
    stats.add(table, level="department", labeled_by="run@abc", labeled_at=1, previous=None, source=Path("x.parquet"),
              first_row=0, id_column="product_id", text_column="product_name", settings=LabelConfig())
    return stats


def task(out: Path, job: str, shard: tuple[int, int], labels: list[str], keep: int = 30,
         confidence: float = 0.9) -> Path | None:
    context = JobContext(LABELS, {"labeled_by": "run@abc"}, LabelConfig(report_keep=keep), TrackingConfig(),
                         TRAINING)
    files = {"labeled": 1, "skipped": 0, "failed": [], "resumed_rows": 0, "failed_rows": 0}
    return finish_job(out, job, shard, [stats_of(labels, confidence)], files, 1.0, context)


def summary(out: Path, job: str = "latest") -> dict:
    return json.loads((out / "_report" / job / "summary.json").read_text())


def test_a_job_merges_only_its_own_tasks_and_drift_is_against_the_previous_job(tmp_path):
    out = tmp_path / "out"
    assert task(out, "100", (0, 2), ["bakery"] * 10) is None
    assert task(out, "100", (1, 2), ["bakery"] * 10) == out / "_report" / "100"
    # Tonight, one task has finished: last night's partials of the other shard must not complete the set.
    assert task(out, "200", (0, 2), ["frozen"] * 5) is None
    assert summary(out)["job"] == "100" and not (out / "_report" / "200" / "summary.json").exists()
    task(out, "200", (1, 2), ["frozen"] * 5)
    tonight = summary(out)
    assert tonight["job"] == "200" and tonight["rows"] == 10 and tonight["label_distribution"]["frozen"]["count"] == 10
    assert {t["job"] for t in tonight["tasks"]} == {"200"}
    assert tonight["previous_job"] == "100"
    assert tonight["drift"]["against_previous_job"]["jensen_shannon"] == 1.0  # all bakery -> all frozen
    assert [e["job"] for e in read_history(out)] == ["100", "200"]
    assert summary(out, "100")["rows"] == 20  # last night's report is still there
    page = (out / "_report" / "200" / "report.html").read_text()
    assert 'href="../100/report.html"' in page


def test_a_rerun_shard_updates_its_own_job_and_latest_stays(tmp_path):
    out = tmp_path / "out"
    for job in ("100", "200"):
        for i in range(2):
            task(out, job, (i, 2), ["bakery"] * 4)
    task(out, "100", (1, 2), ["dairy eggs"] * 6)  # shard 1 of last night's job, rerun
    assert summary(out, "100")["rows"] == 10 and summary(out, "100")["label_distribution"]["dairy eggs"]["count"] == 6
    assert summary(out)["job"] == "200"
    history = read_history(out)
    assert [e["job"] for e in history] == ["100", "200"] and history[0]["rows"] == 10
    assert len((out / "_report" / "history.jsonl").read_text().splitlines()) == 3  # append-only


def _merge_at_once(out: str, job: str, barrier) -> None:
    barrier.wait()
    merge_job(Path(out), job, count=2)


def test_tasks_finishing_together_merge_each_job_once(tmp_path):
    """Two tasks of job 300 and two of job 301 (a manual run beside the nightly one) merge at the
    same instant into one OUT_DIR: each job is merged once and the history holds both."""
    out = tmp_path / "out"
    for job in ("300", "301"):
        for i in range(2):
            task(out, job, (i, 2), ["bakery"] * 3)
        (out / "_report" / job / "summary.json").unlink()
    (out / "_report" / "history.jsonl").unlink()
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(4)
    processes = [context.Process(target=_merge_at_once, args=(str(out), job, barrier))
                 for job in ("300", "300", "301", "301")]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
        assert p.exitcode == 0
    lines = [json.loads(line)["job"] for line in (out / "_report" / "history.jsonl").read_text().splitlines()]
    assert sorted(lines) == ["300", "301"]
    assert summary(out, "300")["rows"] == summary(out, "301")["rows"] == 6
    assert os.readlink(out / "_report" / "latest") == lines[-1]


def test_history_outlives_pruned_folders_and_damaged_lines_are_skipped(tmp_path, caplog):
    out = tmp_path / "out"
    task(out, "1", (0, 1), ["bakery"])
    with open(out / "_report" / "history.jsonl", "a") as f:
        f.write('{"job": "cut sho')  # a line a full disk cut short
    task(out, "0", (0, 2), ["bakery"])  # a job one of whose tasks never finished, two days ago
    os.utime(out / "_report" / "0", (time.time() - 2 * 86400,) * 2)
    task(out, "9", (0, 2), ["bakery"])  # a job whose other task is still running
    for job in ("2", "3"):
        task(out, job, (0, 1), ["bakery"], keep=2)
    assert sorted(p.name for p in (out / "_report").iterdir() if not p.name.startswith(".")) == [
        "2", "3", "9", "history.jsonl", "latest"]
    assert [e["job"] for e in read_history(out)] == ["1", "2", "3"]
    assert "history.jsonl, line 2: damaged, skipped" in caplog.text
    assert os.readlink(out / "_report" / "latest") == "3"


def test_the_report_command_rebuilds_a_job_and_names_what_is_missing(tmp_path, capsys):
    out = tmp_path / "out"
    for i in range(2):
        task(out, "400", (i, 2), ["bakery", "frozen"], confidence=0.4)
    before = summary(out, "400")
    for name in ("summary.json", "report.html"):
        (out / "_report" / "400" / name).unlink()
    assert main(["report", str(out), "--job", "400"]) == 0
    after = summary(out, "400")
    assert {k: v for k, v in after.items() if k != "written_at"} == {k: v for k, v in before.items()
                                                                      if k != "written_at"}
    assert after["low_confidence"] == {"rows": 4, "below": 0.6, "share": 1.0}
    assert (out / "_report" / "400" / "report.html").is_file()

    (out / "_report" / "400" / "partial" / "shard-1-of-2.json").write_text('{"shard": "1/2", "st')
    assert main(["report", str(out), "--job", "400"]) == 2
    assert "shard-1-of-2.json is damaged" in capsys.readouterr().err
    (out / "_report" / "400" / "partial" / "shard-1-of-2.json").unlink()
    assert main(["report", str(out)]) == 2
    assert "no partial yet from shard(s) 1/2" in capsys.readouterr().err
