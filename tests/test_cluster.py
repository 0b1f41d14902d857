"""On a real single-node Slurm cluster (slurm/dev-cluster.sh, started and stopped here): the
sweep driver and its job array, a requeue mid-training, the sharded labeling array and the
self-resubmitting nightly job."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_profile

REPO = Path(__file__).resolve().parents[1]
STATE = Path("/tmp/ct-slurm-test")  # short: unix socket paths are limited to 108 bytes
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(os.geteuid() != 0, reason="the dev cluster runs Slurm's daemons as root"),
    pytest.mark.skipif(shutil.which("slurmctld") is None,
                       reason="Slurm is not installed: run `slurm/dev-cluster.sh install` (make test does)"),
]


@pytest.fixture(scope="module")
def cluster():  # one per machine (its ports and state folder): `make test` keeps a file on one worker (loadfile)
    start = subprocess.run([str(REPO / "slurm" / "dev-cluster.sh"), "start", str(STATE)], capture_output=True,
                           text=True, env={**os.environ, "CATALOG_TUNER_SLURM_PORT": "6917",
                                           "CATALOG_TUNER_SLURM_DB_PORT": "3317"})
    assert start.returncode == 0, start.stderr
    conf = re.search(r"export SLURM_CONF=(\S+)", start.stdout).group(1)
    # a progress line a second in the jobs' logs: the tests watch training's steps go by there
    env = {**os.environ, "SLURM_CONF": conf, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "WANDB_MODE": "offline", "CATALOG_TUNER_LOG_INTERVAL_S": "1"}
    yield env
    subprocess.run(["scancel", "--user=root"], env=env)
    subprocess.run([str(REPO / "slurm" / "dev-cluster.sh"), "stop", str(STATE)], env=env, check=True)


def sbatch(env, *args, chdir: Path = REPO) -> str:
    """Submit from the checkout; the job itself starts in ``chdir``."""
    done = subprocess.run(["sbatch", "--parsable", f"--chdir={chdir}", *args], capture_output=True, text=True,
                          env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def sacct(env, job: str) -> dict[str, str]:
    """Final state of each job (array elements by their id), steps left out."""
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job, "-o", "JobID,State"], capture_output=True,
                         text=True, env=env).stdout
    return dict(line.split("|")[:2] for line in out.splitlines() if line)


def wait(env, job: str, timeout: float = 900) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = sacct(env, job)
        if states and all(s.split()[0] in TERMINAL for s in states.values()):
            return states
        time.sleep(2)
    raise AssertionError(f"job {job} not finished after {timeout} s: {sacct(env, job)}")


def tiny_sweep(tmp_path: Path, data_dir: Path, model: str, steps: int, ranks: list[int], save_steps: int = 2,
               levels: tuple[str, ...] = ("department",), eval_samples: int = 8) -> Path:
    """A sweep small enough for two cores: blend and baseline, tested elsewhere, are off."""
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""
name: tiny
method: grid
metric: {{name: accuracy, goal: maximize}}
parameters:
  model.base_model: {{value: "{model}"}}
  lora.r: {{values: {ranks}}}
  data.label_level: {{values: {list(levels)}}}
  train.max_steps: {{value: {steps}}}
  train.save_steps: {{value: {save_steps}}}
  train.logging_steps: {{value: 1}}
  train.per_device_train_batch_size: {{value: 4}}
  data.max_train_samples: {{value: 200}}
  data.dir: {{value: "{data_dir}"}}
  eval.max_samples: {{value: {eval_samples}}}
  eval.baseline: {{value: false}}
  eval.blend: {{value: false}}
""")
    return path


def test_sweep_runs_as_a_job_array_ranks_and_promotes(cluster, tmp_path, data_dir, short_model, catalog):
    sweep_dir = tmp_path / "sweep"
    # Started outside the checkout: the driver finds the recipe, the cluster profile, the accelerate
    # config and slurm/label_catalog.sh in the checkout, not in its working directory.
    driver = sbatch(cluster, f"--output={tmp_path}/driver-%j.out", "slurm/train_sweep.sh",
                    str(tiny_sweep(tmp_path, data_dir, short_model, steps=3, ranks=[4],
                                   levels=("department", "aisle"))),
                    "--output", str(sweep_dir),
                    "--label-catalog", str(catalog), "--label-output", str(tmp_path / "labeled"),
                    "--label-array", "0-1", chdir=tmp_path)
    states = wait(cluster, driver)
    log = next(tmp_path.glob("driver-*.out")).read_text()
    assert states == {driver: "COMPLETED"}, log[-3000:]
    array = re.search(r"submitted 2 runs of sweep (\S+) as (\d+)", log)
    assert array, log[-3000:]
    assert sacct(cluster, array.group(2)) == {f"{array.group(2)}_0": "COMPLETED", f"{array.group(2)}_1": "COMPLETED"}

    ranked = (sweep_dir / "leaderboard.csv").read_text().splitlines()
    assert len(ranked) == 3 and ranked[1].startswith("1,") and ranked[2].startswith("2,")
    promoted = json.loads((sweep_dir / "promoted.json").read_text())
    best = ranked[1].split(",")[1]
    assert promoted["run"] == best and (sweep_dir / "promoted").resolve() == (sweep_dir / "runs" / best).resolve()
    # Ranked on validation; the promoted run alone was then scored on test, by a job of its own.
    assert ranked[0].startswith("rank,run,status,ships,validation_accuracy,") and promoted["ranked_on"] == "validation"
    assert promoted["test"]["n_eval"] == 8
    tested = {run.name for run in (sweep_dir / "runs").iterdir() if "test" in json.loads(
        (run / "metrics.json").read_text())}
    assert tested == {best}
    assert (sweep_dir / "leaderboard.png").stat().st_size > 0
    for run in ("tiny-000", "tiny-001"):
        assert (sweep_dir / "runs" / run / "adapter" / "adapter_model.safetensors").is_file()
    records = [next(run.glob("run-*.wandb")).read_bytes() for run in (sweep_dir / "wandb").glob("offline-run-*")]
    summaries = [r for r in records if b"sweep-summary" in r]  # the driver's one run with the leaderboard table
    assert len(records) == 3 and len(summaries) == 1
    group = array.group(1).encode()
    for record in records:  # the offline log is protobuf records: look for the group and the final metrics
        assert group in record and (b"macro_f1" in record or record in summaries)
    assert (sweep_dir / "sweep_report.html").stat().st_size > 10_000
    # the sweep was over the label level: the aisle run reports the department its aisles imply
    levels = {run: json.loads((sweep_dir / "runs" / run / "metrics.json").read_text())["validation"]
              for run in ("tiny-000", "tiny-001")}
    assert [levels[r]["label_level"] for r in ("tiny-000", "tiny-001")] == ["department", "aisle"]
    assert levels["tiny-001"]["scorer"] == "trie" and "department" in levels["tiny-001"]

    # --label-catalog queued the labeling array on the promoted adapter, after the driver (afterok)
    labeling = wait(cluster, promoted["label_job"])
    assert set(labeling.values()) == {"COMPLETED"} and len(labeling) == 2, labeling
    labeled_by = set()
    for path in outputs(tmp_path / "labeled"):
        labeled_by |= set(pq.read_table(path).column("labeled_by").to_pylist())
    assert len(labeled_by) == 1 and labeled_by.pop().startswith(f"{best}@")


def assert_resumed_to_the_end(run: Path, steps: int) -> int:
    """The run trained every step exactly once, across a resume; returns the step it resumed from."""
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_steps"] == steps and metrics["resumed_from"] is not None
    history = json.loads((run / "train_log.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == list(range(1, steps + 1))
    return int(metrics["resumed_from"].rsplit("-", 1)[1])


def training_under_way(sweep_dir: Path, steps: int, past: int = 5, after: str | None = None) -> str:
    """The array task (JOBID_INDEX) of the sweep's first run, once its log shows training at a step
    from ``past`` to the last but one (counting only the log after the last ``after``, if given)."""
    deadline = time.time() + 600
    while time.time() < deadline:
        logs = list((sweep_dir / "submitit").glob("*_0_log.err")) if (sweep_dir / "submitit").is_dir() else []
        text = logs[0].read_text() if logs else ""
        if after is not None:
            text = text.rsplit(after, 1)[1] if after in text else ""
        if any(past <= int(step) < steps for step in re.findall(rf"\b(\d+)/{steps} ", text)):
            return logs[0].name.split("_log")[0].rsplit("_", 1)[0]
        time.sleep(1)
    raise AssertionError(f"training did not reach step {past}")


def test_a_run_survives_a_time_limit_signal_then_a_requeue(cluster, tmp_path, data_dir, short_model):
    """One training interrupted twice, resumed each time from the checkpoint the interruption saved:

    1. USR2, the signal Slurm sends signal_delay_s before the time limit -> submitit ->
       TrainTask.checkpoint -> RUN_DIR/STOP -> checkpoint and exit -> submitit requeues the task,
       spending one of the profile's max_timeouts;
    2. ``scontrol requeue`` (what a preemption does): SIGTERM, which submitit only bypasses -> the
       training checkpoints at the end of its step -> Slurm requeues the task.

    The test sends both signals itself once training is under way. Waiting for the timer of a
    2-minute allocation made the test depend on the machine's speed: on a slow one, the signal
    (30-60 s after each start) left time for 10-20 steps per allocation, and once training was done
    it kept landing before the rerun's evaluation ended (8 reruns, 18 minutes, no end)."""
    sweep_dir = tmp_path / "sweep"
    steps = 60  # 0.3 s each: time for both signals to land mid-training
    driver = sbatch(cluster, f"--output={tmp_path}/driver-%j.out", "slurm/train_sweep.sh",
                    str(tiny_sweep(tmp_path, data_dir, short_model, steps=steps, ranks=[4], save_steps=1000)),
                    "--output", str(sweep_dir), "profile.time_min=5", "profile.signal_delay_s=60")
    array_task = training_under_way(sweep_dir, steps)
    submission = next((sweep_dir / "submitit").glob("*_submission.sh")).read_text()
    assert "#SBATCH --signal=USR2@60" in submission and "#SBATCH --time=5" in submission
    subprocess.run(["scancel", "--signal=USR2", array_task], env=cluster, check=True)

    log_path = next((sweep_dir / "submitit").glob("*_0_log.err"))
    training_under_way(sweep_dir, steps, past=1, after="resuming from")
    first = int(re.search(r"resuming from \S+checkpoint-(\d+)", log_path.read_text()).group(1))
    training_under_way(sweep_dir, steps, past=first + 2, after="resuming from")
    subprocess.run(["scontrol", "requeue", array_task], env=cluster, check=True)
    assert wait(cluster, driver) == {driver: "COMPLETED"}

    last = assert_resumed_to_the_end(sweep_dir / "runs" / "tiny-000", steps)
    log = "".join(p.read_text() for p in (sweep_dir / "submitit").glob("*_0_log.*"))
    resumes = [int(n) for n in re.findall(r"resuming from \S+checkpoint-(\d+)", log)]
    assert resumes == [first, last] and 5 <= first < last < steps, resumes  # saved on each signal, not at save_steps
    # The time limit: submitit's USR2 handler called TrainTask.checkpoint and requeued the task itself.
    assert "Calling checkpoint method." in log, log[-3000:]
    max_timeouts = load_profile(REPO / "jobs" / "clusters" / "dev.yaml").max_timeouts
    assert f"Requeued job {array_task} ({max_timeouts - 1} remaining timeouts)" in log, log[-3000:]
    assert f"stopped at step {first} of {steps} after a checkpoint" in log, log[-3000:]
    # The requeue: the training's own SIGTERM handler saved the step in hand; Slurm brought the task back.
    second_attempt = log.split("resuming from", 2)[1]
    assert "received SIGTERM: checkpointing" in second_attempt and f"stopped at step {last} of {steps}" in log
    attempts = subprocess.run(["sacct", "-n", "-P", "-X", "--duplicates", "-j", array_task, "-o", "State"],
                              capture_output=True, text=True, env=cluster).stdout.split()
    assert attempts.count("REQUEUED") == 2 and attempts[-1] == "COMPLETED", attempts


CATALOG_ROWS = 120


@pytest.fixture()
def catalog(tmp_path, data_dir) -> Path:
    names = pq.read_table(data_dir / "test.parquet").column("product_name").to_pylist()[:CATALOG_ROWS]
    root = tmp_path / "catalog"
    root.mkdir()
    half = CATALOG_ROWS // 2
    for i in range(2):
        part = names[i * half:(i + 1) * half]
        pq.write_table(pa.table({"product_id": list(range(i * half, i * half + len(part))), "product_name": part}),
                       root / f"part-{i}.parquet", row_group_size=10)
    return root


def outputs(out: Path) -> list[Path]:
    """The labeled files, without the bookkeeping beside them (_manifest, _report)."""
    return [p for p in out.rglob("*.parquet") if not any(x.startswith("_") for x in p.relative_to(out).parts)]


def test_labeling_array_covers_every_row_once(cluster, tmp_path, catalog, short_adapter_run):
    out = tmp_path / "labeled"
    job = sbatch({**cluster, "CATALOG_TUNER_ADAPTER": str(short_adapter_run)}, "--array=0-2",
                 f"--output={tmp_path}/label-%A_%a.out", "slurm/label_catalog.sh", str(catalog), str(out))
    states = wait(cluster, job)
    assert set(states.values()) == {"COMPLETED"} and len(states) == 3, states
    ids = []
    for path in outputs(out):
        ids += pq.read_table(path).column("product_id").to_pylist()
    assert sorted(ids) == list(range(CATALOG_ROWS))
    assert len(list((out / "_manifest").glob("*.json"))) >= 3
    # whichever array task finished last merged the three partial reports into one
    summary = json.loads((out / "_report" / job / "summary.json").read_text())
    assert (out / "_report" / "latest").resolve() == (out / "_report" / job).resolve()
    assert summary["rows"] == CATALOG_ROWS and sorted(t["shard"] for t in summary["tasks"]) == ["0/3", "1/3", "2/3"]


def nightly(env, tmp_path: Path, catalog: Path, out: Path, *options: str) -> str:
    """One night: slurm/nightly.sh queues its next run and submits the labeling array; returns the
    array's job id once its tasks are done (the next run is cancelled)."""
    logs = tmp_path / f"night-{len(list(tmp_path.glob('night-*')))}"
    logs.mkdir()
    job = sbatch({**env, "NIGHTLY_LOGS": str(logs)}, f"--output={logs}/nightly-%j.out", "slurm/nightly.sh",
                 str(catalog), str(out), *options)
    assert wait(env, job) == {job: "COMPLETED"}
    log = next(logs.glob("nightly-*.out")).read_text()
    following = re.search(r"next nightly run: job (\d+)", log).group(1)
    queued = subprocess.run(["squeue", "-h", "-j", following, "-o", "%j|%T|%r"], capture_output=True, text=True,
                            env=env).stdout.strip()
    assert queued == "catalog-nightly|PENDING|BeginTime"
    subprocess.run(["scancel", following], env=env, check=True)
    labeling = log.strip().splitlines()[-1]
    wait(env, labeling)
    return labeling


def test_two_nights_each_report_their_own_rows_and_a_requeued_shard_leaves_one_report(cluster, tmp_path, catalog,
                                                                                     adapter_run, data_dir):
    """Night 1 labels the catalog with a 2-task array; night 2 (3 tasks) gets a new file and renamed
    products (their labels cleared), labels only those (--only-missing), and the tasks labeling are
    requeued (SIGTERM: each commits and exits, Slurm reruns it). Each night's report counts its own rows."""
    env = {**cluster, "CATALOG_TUNER_ADAPTER": str(adapter_run), "NIGHTLY_AT": "now+1hour", "NIGHTLY_ARRAY": "0-1"}
    out = tmp_path / "labeled"
    first = nightly(env, tmp_path, catalog, out)
    assert sacct(env, first) == {f"{first}_0": "COMPLETED", f"{first}_1": "COMPLETED"}
    night1 = json.loads((out / "_report" / first / "summary.json").read_text())
    assert night1["rows"] == night1["labeled"] == CATALOG_ROWS and night1["previous_job"] is None

    # Night 2's catalog: last night's outputs, 10 products renamed (labels cleared), and a new file.
    tonight = tmp_path / "tonight"
    tonight.mkdir()
    names = pq.read_table(data_dir / "test.parquet").column("product_name").to_pylist()
    for path in sorted(catalog.glob("*.parquet")):
        table = pq.read_table(out / path.name)
        if path.name == "part-0.parquet":
            frame = table.to_pandas()
            frame.loc[:9, "product_name"] = names[-10:]
            frame.loc[:9, ["labeled_by"]] = None
            table = pa.Table.from_pandas(frame, schema=table.schema, preserve_index=False)
        pq.write_table(table, tonight / path.name, row_group_size=5)
    pq.write_table(pa.table({"product_id": list(range(1000, 1060)), "product_name": names[-70:-10]}),
                   tonight / "part-2.parquet", row_group_size=5)  # three files of 60 rows: one per task
    before = pq.read_table(tonight / "part-0.parquet").column("department").to_pylist()[:10]

    logs = tmp_path / "night-2"
    logs.mkdir()
    job = sbatch({**env, "NIGHTLY_LOGS": str(logs), "NIGHTLY_ARRAY": "0-2"}, f"--output={logs}/nightly-%j.out",
                 "slurm/nightly.sh", str(tonight), str(out), "--rows-per-batch", "5", "--batch-size", "5")
    assert wait(env, job) == {job: "COMPLETED"}
    second = next(logs.glob("nightly-*.out")).read_text().strip().splitlines()[-1]
    deadline = time.time() + 300
    while not list((out / "_partial").glob("*/part-000001.parquet")):  # a task is labeling: requeue it
        assert time.time() < deadline, sacct(env, second)
        time.sleep(0.1)
    running = [t for t, state in sacct(env, second).items() if state == "RUNNING"]
    subprocess.run(["scontrol", "requeue", ",".join(running)], env=env, check=True)
    subprocess.run(["scancel", re.search(r"next nightly run: job (\d+)",
                                         next(logs.glob("nightly-*.out")).read_text()).group(1)], env=env)
    assert wait(env, second) == {f"{second}_{i}": "COMPLETED" for i in range(3)}
    attempts = subprocess.run(["sacct", "-n", "-P", "-X", "--duplicates", "-j", second, "-o", "State"],
                              capture_output=True, text=True, env=env).stdout.split()
    assert "REQUEUED" in attempts, attempts

    night2 = json.loads((out / "_report" / second / "summary.json").read_text())
    assert night2["rows"] == CATALOG_ROWS + 60 and night2["labeled"] == 70  # renamed and new rows only
    assert {t["job"] for t in night2["tasks"]} == {second} and night2["previous_job"] == first
    assert night2["drift"]["against_previous_job"] is not None
    after = pq.read_table(out / "part-0.parquet").column("department").to_pylist()[:10]
    assert night2["changes"]["rows"] == sum(a != b for a, b in zip(after, before))
    ids = sorted(i for p in outputs(out) for i in pq.read_table(p).column("product_id").to_pylist())
    assert ids == list(range(CATALOG_ROWS)) + list(range(1000, 1060))  # every row once, after the requeue
    # One report for night 2, requeue or not; a task that finished, was requeued all the same and
    # reran merged its job again, which appends a line for the same job (readers take the last).
    history = [json.loads(line)["job"] for line in (out / "_report" / "history.jsonl").read_text().splitlines()]
    assert list(dict.fromkeys(history)) == [first, second]
    assert sorted(p.name for p in (out / "_report").iterdir() if p.is_dir() and not p.is_symlink()) == sorted(
        [first, second])
    assert (out / "_report" / "latest").resolve() == (out / "_report" / second).resolve()


def test_the_scrontab_entry_is_a_job_this_cluster_accepts(cluster, tmp_path):
    """Debian's Slurm ships no scrontab binary, so do what scrontab does with the file: its #SCRON
    lines are sbatch options of the cron job, and its command runs in $HOME. Both go to this
    cluster's sbatch with --test-only, which checks the options, the array and the script's own
    #SBATCH lines without queueing anything."""
    lines = (REPO / "slurm" / "nightly.scrontab").read_text().splitlines()
    options = [line.removeprefix("#SCRON").strip() for line in lines if line.startswith("#SCRON")]
    (entry,) = [line for line in lines if line.strip() and not line.startswith("#")]
    minute, hour, day, month, weekday, command = entry.split(maxsplit=5)
    for field, top in ((minute, 59), (hour, 23), (day, 31), (month, 12), (weekday, 7)):
        assert field == "*" or 0 <= int(field) <= top, entry
    cron_job = subprocess.run(["sbatch", "--test-only", *options, "--wrap", "true"], env=cluster,
                              capture_output=True, text=True, cwd=tmp_path)
    assert cron_job.returncode == 0, cron_job.stderr
    (tmp_path / "catalog-tuner").symlink_to(REPO)  # the checkout where the entry's cd expects it
    labeling = subprocess.run(["bash", "-c", command.replace("sbatch ", "sbatch --test-only ", 1)], capture_output=True,
                              text=True, env={**cluster, "HOME": str(tmp_path)})
    assert labeling.returncode == 0, labeling.stderr
    assert "to start at" in labeling.stderr  # sbatch --test-only's answer for a job it would queue


def leftover_processes(state: Path, *marks: str) -> list[str]:
    """Live processes of the cluster at state: its slurmstepd and srun (found by SLURM_CONF in their
    environment), or any whose command line mentions one of marks."""
    conf = f"SLURM_CONF={state}/slurm.conf".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or ") Z " in (proc / "stat").read_text():  # zombies are dead
                continue
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            comm = (proc / "comm").read_text().strip()
            ours = conf in (proc / "environ").read_bytes().split(b"\0") and comm in ("slurmstepd", "srun")
        except OSError:  # gone meanwhile
            continue
        if ours or any(mark in args for mark in marks):
            found.append(f"{proc.name} {args}")
    return found


def test_stop_mid_sweep_leaves_no_process_and_start_comes_up_clean(cluster, tmp_path, data_dir, short_model):
    sweep_dir = tmp_path / "sweep"
    steps = 2000  # still training when the cluster stops
    driver = sbatch(cluster, f"--output={tmp_path}/driver-%j.out", "slurm/train_sweep.sh",
                    str(tiny_sweep(tmp_path, data_dir, short_model, steps=steps, ranks=[4], save_steps=1000)),
                    "--output", str(sweep_dir))
    training_under_way(sweep_dir, steps)
    assert leftover_processes(STATE, str(tmp_path))  # the check below sees the sweep while it runs
    ports = {"CATALOG_TUNER_SLURM_PORT": "6917", "CATALOG_TUNER_SLURM_DB_PORT": "3317"}  # as the fixture's

    started = time.time()
    stop = subprocess.run([str(REPO / "slurm" / "dev-cluster.sh"), "stop", str(STATE)], capture_output=True,
                          text=True, env={**cluster, **ports}, timeout=300)
    assert stop.returncode == 0, stop.stderr
    assert time.time() - started < 120, stop.stderr
    assert leftover_processes(STATE, str(tmp_path)) == [], stop.stderr

    start = subprocess.run([str(REPO / "slurm" / "dev-cluster.sh"), "start", str(STATE)], capture_output=True,
                           text=True, env={**cluster, **ports}, timeout=300)
    assert start.returncode == 0, start.stderr
    queue = subprocess.run(["squeue", "-h"], capture_output=True, text=True, env=cluster, check=True).stdout
    assert queue.strip() == ""
    node = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, env=cluster,
                          check=True).stdout
    assert node.split() == ["idle"]
    assert wait(cluster, driver, timeout=60)[driver].startswith("CANCELLED")  # accounting kept across the stop
    job = sbatch(cluster, "--output=/dev/null", "--wrap", "sleep 1")
    assert int(job) > int(driver)  # and the job id counter
    assert wait(cluster, job, timeout=120) == {job: "COMPLETED"}
