"""Exceptions the command line maps to exit codes, importable without the ML stack."""


class TrainingInterrupted(RuntimeError):
    """Training stopped early on request (preemption, requeue, time limit) after a checkpoint."""

    exit_code = 75  # EX_TEMPFAIL: run the same command again to resume
