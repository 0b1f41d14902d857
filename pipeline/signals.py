"""The one stop-on-signal helper of training and labeling.

Slurm asks a job to stop with SIGTERM (preemption, ``scancel``, ``scontrol requeue``) and, where
asked for, SIGUSR1 or SIGUSR2 some time before the time limit. Neither stage may die mid-step:
training saves a checkpoint at the end of its step, labeling commits the record batch in hand.
So a signal only sets :attr:`StopOnSignal.requested`, which the stage reads at its safe point,
and the stage then exits with code 75 for the job to be requeued. The handlers are the stage's
only while it runs: restored after, a signal ends the process as it would have.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopOnSignal:
    """Turn :data:`SIGNALS` into a request the running stage reads at its next safe point."""

    def __init__(self, what: str) -> None:
        """``what`` says in the log what the stage does before stopping."""
        self.what = what
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopOnSignal:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        """Give the signals back to the handlers they had before :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> StopOnSignal:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.requested = signal.Signals(signum).name
        log.warning("received %s: %s, then stopping", self.requested, self.what)
