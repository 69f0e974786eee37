"""Fault injection for tests and drills, as trainer hooks (docs/fault-tolerance.md).

The environment says what to break (launcher/envvars.py, TIERZERO_FAULT_*); this module is the
only code that breaks it, from outside the library: the training loop calls its hooks at fixed
points and never looks at the environment. With no fault asked for, the ranks use the plain
hooks and none of this runs.
"""

from __future__ import annotations

import errno
import os
import time

from tierzero.launcher.envvars import FaultSpec
from tierzero.recipes.trainer import Hooks


class FaultHooks(Hooks):
    def __init__(self, spec: FaultSpec, rank: int):
        self.spec, self.rank = spec, rank
        self._nan_steps = set(spec.nan_steps)

    def before_step(self, step: int) -> None:
        if self.spec.hang == (self.rank, step):
            time.sleep(10**9)  # this rank stops making progress
        if self.spec.slow_step_s:
            time.sleep(self.spec.slow_step_s)

    def loss_scale(self, step: int, micro: int, scale: float) -> float:
        """NaN gradients from rank 0's first micro-step of each listed step, once: a rollback
        replays the step cleanly."""
        if self.rank == 0 and micro == 0 and step in self._nan_steps:
            self._nan_steps.discard(step)
            return float("nan")
        return scale

    def checkpoint_written(self, step: int) -> None:
        if self.spec.slow_save is not None and self.spec.slow_save[0] == step:
            time.sleep(self.spec.slow_save[1])
        if (self.rank, step) in self.spec.save_enospc:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
