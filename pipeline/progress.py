"""Progress that reads well both on a terminal and in a Slurm log file.

On a terminal, tqdm's bar. Elsewhere (stderr is a file, as in every batch job) a bar redrawn
with carriage returns turns into one enormous line, so :class:`LogLines` prints a whole line
instead, every ``LOG_INTERVAL_S`` seconds and at the end: done/total, rate and time left. The
libraries' own bars (weight loading, dataset maps, the trainer's) are turned off there
(``pipeline.cli.quiet_library_bars``; the trainer's in ``pipeline.train``, which logs steps as lines).
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

LOG_INTERVAL_S = float(os.environ.get("CATALOG_TUNER_LOG_INTERVAL_S", 30))
"""Seconds between two progress lines in a log file (``CATALOG_TUNER_LOG_INTERVAL_S``)."""


class LogLines(tqdm):
    """tqdm that writes one full line per update instead of redrawing a bar, and a last one at
    the end."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "leave": False})

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clearing its bar: a log has nothing to clear
            return False
        print(self.format_meter(**{**self.format_dict, "ncols": None}), file=self.fp, flush=True)
        return True

    def close(self) -> None:
        if not self.disable and self.last_print_n != self.n:
            self.display()
        super().close()


def progress_bar(total: int, desc: str, unit: str, disable: bool = False) -> tqdm:
    """A progress bar on a terminal, log lines elsewhere."""
    if on_terminal():
        return tqdm(total=total, desc=desc, unit=unit, disable=disable)
    return LogLines(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr,
                    mininterval=LOG_INTERVAL_S, bar_format="{desc}: {n_fmt}/{total_fmt} {unit}s "
                    "({percentage:.0f}%), {rate_fmt}, {elapsed} elapsed, {remaining} left")


def on_terminal() -> bool:
    return sys.stderr.isatty()
