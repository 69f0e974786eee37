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
    CHECKPOINT_LOST = 4
    """Training finished, but the newest usable checkpoint is older than the last step that asked for
    one: its saves failed (disk full, permissions) under checkpoint.on_error=continue. Training again
    would not help; fix the storage and run again to resume from the newest usable one."""
    REQUEUE = 75
    """Every rank stopped on a signal after committing a checkpoint: run again (requeue) to resume.
    75 is EX_TEMPFAIL in sysexits.h, "a temporary failure; the user is invited to retry"."""


VERDICTS = (Exit.USAGE, Exit.WRONG_RESULTS, Exit.CHECKPOINT_LOST, Exit.REQUEUE)
"""Codes a rank exits with on purpose, after saying why: never a reason to restart the group."""

VERDICT_WORDS = {
    Exit.USAGE: "a user error (see the message above)",
    Exit.WRONG_RESULTS: "wrong results",
    Exit.CHECKPOINT_LOST: "training finished, but its last checkpoint saves failed (see the message above)",
    Exit.REQUEUE: "stopped on a signal after its checkpoint",
}
"""What the supervisor records for each verdict."""


def killed_by(signum: int) -> int:
    """The shell's code for a process ended by signal `signum` (128 + n)."""
    return 128 + int(signum)
