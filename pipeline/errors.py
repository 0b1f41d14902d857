"""Exceptions, exit codes and the stop-file name: everything the command line and the cluster
launcher need to know about failures, importable without the ML stack.

The sweep driver is a 1-CPU job and ``catalog-tuner --help`` should answer at once, so neither
may pay for importing torch just to name an exception. Every error a user can fix derives from
:class:`UserError`: the command line prints its one-line message and exits with
:data:`EXIT_USER_ERROR`. Anything else (a bug) keeps its traceback.
"""

EXIT_OK = 0
EXIT_SOME_FAILED = 1
"""Some inputs failed (labeling: other files were still done); a summary is on stderr."""
EXIT_USER_ERROR = 2

STOP_FILE = "STOP"
"""Created in RUN_DIR by a job launcher to ask a running training to checkpoint and exit."""


class UserError(ValueError):
    """Bad input the user can fix; the message names the file, key, column or rows."""


class ConfigError(UserError):
    """A recipe, cluster profile or sweep file (or an override) is invalid."""


class DataError(UserError):
    """Bad input data; the message names the file and the column or rows."""


class ModelError(UserError):
    """The configured model or run directory cannot be resolved or loaded."""


class LabelError(UserError):
    """A whole labeling job cannot start (bad adapter, bad arguments)."""


class Interrupted(RuntimeError):
    """A job stopped early on request (preemption, requeue, time limit) after saving its progress."""

    exit_code = 75  # EX_TEMPFAIL: run the same command again to resume


class TrainingInterrupted(Interrupted):
    """Training stopped after a checkpoint."""


class LabelingInterrupted(Interrupted):
    """Labeling stopped after committing the record batch in hand."""


class ReportError(UserError):
    """A labeling job's report cannot be built: partials missing or damaged (named in the message)."""


class FileFailed(Exception):
    """One input file of a labeling job cannot be labeled (bad input, a full disk, another process
    labeling it); the message names the file and the reason. The job goes on with the others."""

    def __init__(self, message: str, committed_rows: int = 0) -> None:
        super().__init__(message)
        self.committed_rows = committed_rows
        """Rows committed before the failure: kept, and not labeled again by the rerun."""
