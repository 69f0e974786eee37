"""Rank 0's live progress line: step/total, loss, tokens/s, ETA.

On a terminal it is a rich progress bar; otherwise (CI logs, files) a plain line every
`log_every` steps, so logs stay readable.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, *, enabled: bool = True, log_every: int = 10):
        self.total, self.enabled, self.log_every = total, enabled, log_every
        self._bar = None
        self._t0 = time.perf_counter()

    def __enter__(self):
        if self.enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self._bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                TextColumn("ETA"), TimeRemainingColumn(), transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=self.total, loss=float("nan"), tps=0.0)
        return self

    def update(self, step: int, *, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=loss, tps=tokens_per_s)
        elif step % self.log_every == 0 or step == self.total or step == 1:
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / step * (self.total - step)
            print(f"step {step:>6}/{self.total}  loss {loss:.4f}  {tokens_per_s:>10,.0f} tok/s  "
                  f"ETA {eta:5.0f}s", flush=True)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()
        return False
