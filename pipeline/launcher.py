"""Run one training as a cluster task: ``accelerate launch`` (inside Apptainer when the cluster
profile names an image), checkpointable on preemption, requeue and time limits.

The task object is what submitit pickles into each Slurm array element. On the ``--signal``
that precedes a time limit or preemption, submitit calls :meth:`TrainTask.checkpoint`: it asks
the training (through RUN_DIR/STOP) to save and exit, then hands submitit the same task to
requeue; the requeued task resumes from that checkpoint to the same final step.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from pipeline.config import ClusterProfile, shipped_file
from pipeline.errors import STOP_FILE, ConfigError, TrainingInterrupted

# The training checkpointed and stopped (75), or its launcher was killed by SIGTERM.
INTERRUPTED_CODES = {TrainingInterrupted.exit_code, -signal.SIGTERM, 128 + signal.SIGTERM}


def accelerate_config_path(name: str) -> Path:
    """A path as given, else ``jobs/accelerate/<name>.yaml`` of the checkout."""
    return shipped_file(name, "jobs/accelerate", what="accelerate config")


def distributed_args(profile: ClusterProfile, env: dict[str, str]) -> list[str]:
    """Process count, and for several nodes the rendezvous, derived from the Slurm environment."""
    nodes = int(env.get("SLURM_NNODES", profile.nodes))
    processes = max(1, profile.gpus_per_node) * nodes
    args = ["--num_processes", str(processes)] if processes > 1 else []
    if nodes > 1:
        hosts = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True,
                               text=True, check=True).stdout.split()
        args += ["--num_machines", str(nodes), "--machine_rank", env.get("SLURM_NODEID", "0"),
                 "--main_process_ip", hosts[0], "--main_process_port", str(29500 + int(env["SLURM_JOB_ID"]) % 1000)]
    return args


def container_prefix(profile: ClusterProfile) -> list[str]:
    if not profile.container_image:
        return []
    binds = ["--bind", ",".join(profile.container_binds)] if profile.container_binds else []
    return [profile.apptainer, "exec", "--nv", *binds, profile.container_image]


def train_command(recipe: str | Path, overrides: list[str], run_dir: str | Path, accelerate_config: str,
                  profile: ClusterProfile, env: dict[str, str] | None = None) -> list[str]:
    """The command one task runs: [apptainer exec ...] python -m accelerate.commands.launch ... train."""
    env = dict(os.environ) if env is None else env
    python = "python" if profile.container_image else sys.executable
    return [
        *container_prefix(profile),
        python, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config_path(accelerate_config)),
        *distributed_args(profile, env),
        "-m", "pipeline", "train", "--config", str(recipe), "--output", str(run_dir), *overrides,
    ]


def evaluate_command(run_dir: str | Path, data: str | Path, profile: ClusterProfile) -> list[str]:
    """The command that scores a finished run on one split: [apptainer exec ...] python -m pipeline evaluate."""
    python = "python" if profile.container_image else sys.executable
    return [*container_prefix(profile), python, "-m", "pipeline", "evaluate", "--run", str(run_dir), "--data",
            str(data)]


def task_environment(profile: ClusterProfile, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a task's subprocess, with its CPU share as its thread count.

    Without cgroups nothing stops each process from starting one thread per core of the node;
    several tasks on one node then spin against each other (40x slower steps seen here).
    """
    env = {**os.environ, **(extra or {})}
    env.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", str(profile.cpus_per_task)))
    return env


class EvaluateTask:
    """Score a finished run on one split as a job of its own: the sweep driver loads no model."""

    def __init__(self, profile: ClusterProfile) -> None:
        self.profile = profile

    def __call__(self, run_dir: str, data: str) -> dict[str, Any]:
        code = subprocess.run(evaluate_command(run_dir, data, self.profile), env=task_environment(self.profile))
        if code.returncode != 0:
            raise RuntimeError(f"evaluating {run_dir} on {data} exited with code {code.returncode}")
        return json.loads((Path(run_dir) / "metrics.json").read_text())[Path(data).stem]


class TrainTask(submitit.helpers.Checkpointable):
    """One sweep configuration, as a submitit task."""

    def __init__(self, recipe: str, accelerate_config: str, profile: ClusterProfile,
                 env: dict[str, str] | None = None) -> None:
        self.recipe = recipe
        self.accelerate_config = accelerate_config
        self.profile = profile
        self.env = env or {}

    def __call__(self, name: str, overrides: list[str], run_dir: str) -> dict[str, Any]:
        run = Path(run_dir)
        run.mkdir(parents=True, exist_ok=True)
        command = train_command(self.recipe, overrides, run, self.accelerate_config, self.profile)
        (run / "command.txt").write_text(shlex.join(command) + "\n")
        code = subprocess.run(command, env=task_environment(self.profile, {**self.env, "WANDB_NAME": name})).returncode
        if code in INTERRUPTED_CODES:
            # Slurm is requeuing (or cancelling) this job. Returning or raising would have submitit
            # write a result, and the driver would give up on a run that is about to resume; so end
            # this process now, without one. (Waiting for Slurm's SIGKILL held the node KillWait
            # longer, 30 s a requeue on the dev cluster.)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(TrainingInterrupted.exit_code)
        if code != 0:
            raise RuntimeError(f"training of {name} exited with code {code}; see this task's log")
        return json.loads((run / "metrics.json").read_text())

    def checkpoint(self, name: str, overrides: list[str], run_dir: str) -> submitit.helpers.DelayedSubmission:
        """Ask the training to checkpoint (it removes RUN_DIR/STOP when saved), then requeue."""
        stop = Path(run_dir) / STOP_FILE
        stop.touch()
        deadline = time.monotonic() + max(10, self.profile.signal_delay_s - 20)
        while stop.exists() and time.monotonic() < deadline:  # not the launcher's exit: it may be gone already
            time.sleep(0.5)
        stop.unlink(missing_ok=True)  # saved, or out of time: the run resumes from its last checkpoint
        return submitit.helpers.DelayedSubmission(self, name, overrides, run_dir)


def make_executor(kind: str, folder: Path, profile: ClusterProfile, job_name: str) -> submitit.Executor:
    """A submitit executor for ``slurm``, ``local`` (subprocesses) or ``debug`` (in this process)."""
    if kind not in ("slurm", "local", "debug"):
        raise ConfigError(f"--executor must be slurm, local or debug, got {kind!r}")
    executor = submitit.AutoExecutor(folder=folder, cluster=kind, slurm_max_num_timeout=profile.max_timeouts)
    params: dict[str, Any] = {
        "name": job_name, "timeout_min": profile.time_min, "cpus_per_task": profile.cpus_per_task,
        "mem_gb": profile.mem_gb, "nodes": profile.nodes, "tasks_per_node": 1,
    }
    if kind == "slurm":
        optional = {"slurm_partition": profile.partition, "slurm_account": profile.account,
                    "slurm_qos": profile.qos, "slurm_gres": profile.gres,
                    "slurm_setup": profile.setup or None}
        params.update({k: v for k, v in optional.items() if v is not None})
        params.update(slurm_signal_delay_s=profile.signal_delay_s,
                      slurm_array_parallelism=profile.array_parallelism,
                      slurm_additional_parameters={"requeue": True})
    executor.update_parameters(**params)
    return executor
