"""Every exit code tierzero gives, in one place: the CLI, the ranks and the supervisor use these."""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    FAILURE = 1
    """A crash or a hang: the supervisor restarts a training group from its newest checkpoint."""
    USAGE = 2
    """A user error: the message names the key and the fix, nothing was written."""
    WRONG_RESULTS = 3
    """`tierzero bench` found wrong results (every rank exits with it)."""
    REQUEUE = 75
    """Every rank stopped on a signal after committing a checkpoint: run again (requeue) to resume.
    75 is EX_TEMPFAIL in sysexits.h, "a temporary failure; the user is invited to retry"."""


VERDICTS = (Exit.USAGE, Exit.WRONG_RESULTS, Exit.REQUEUE)
"""Codes a rank exits with on purpose, after saying why: never a reason to restart the group."""


def killed_by(signum: int) -> int:
    """The shell's code for a process ended by signal `signum` (128 + n)."""
    return 128 + int(signum)
