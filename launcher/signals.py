"""Stop signals inside a rank, and the hang watchdog of a rank no supervisor watches.

SIGTERM, SIGINT and launcher.requeue_signal (SIGUSR2 by default; Slurm's pre-timeout
signal, and not SIGUSR1, which NCCL takes) ask the rank to stop cleanly: it finishes the
step it is in, the ranks agree (recipes/trainer.py folds the request into the step's loss
all-reduce), a checkpoint is committed, and every rank exits with Exit.REQUEUE (75).

A second stop signal exits at once. Python runs signal handlers only between bytecodes, so
a rank blocked inside a collective would not see it; the C-level handler writes each signal
number to a wakeup pipe (signal.set_wakeup_fd) and a thread reading that pipe acts on it
whatever the main thread is doing. Exiting mid-write is safe for checkpoints: a step is
committed by a rename, and a torn one is never read (checkpoint/store.py).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable, Optional, Sequence

from tierzero.launcher.exitcodes import Exit, killed_by

NEVER_CATCH = ("SIGKILL", "SIGSTOP")

NOT_A_STOP_SIGNAL = {
    # The kernel sends these for a fault in the process itself: a handler that returns makes the
    # faulting instruction run again (a crash becomes a hang), and a real crash would look like a stop.
    **dict.fromkeys(("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGTRAP", "SIGSYS", "SIGABRT"),
                    "the kernel sends it when the process itself crashes"),
    "SIGCHLD": "every child process (a data-loader worker, a compiler) that exits sends it",
}
"""Signals a process may catch but that cannot mean "checkpoint and requeue", with why."""

PARENT_DIED = signal.SIGRTMIN + 1
"""What Linux sends a rank when its supervisor dies (stop_with_parent). Not SIGTERM: the
parent-death signal fires as each thread of the dying parent exits, and a second SIGTERM
would mean "exit at once"; StopSignals counts this one as a first request only."""


def signal_number(name: str) -> int:
    """`SIGUSR2`, `USR2` or `12` -> 12: a signal that exists here and a rank can catch as a stop
    request. ValueError otherwise; its message says why (the caller names the key)."""
    text = str(name).strip().upper()
    if text.isascii() and text.isdigit():  # a number: the same rules as its name
        try:
            text = signal.Signals(int(text)).name
        except ValueError:
            raise ValueError(f"{name!r} is not a signal number on this system") from None
    if not text.startswith("SIG"):
        text = "SIG" + text
    if text not in signal.Signals.__members__:
        raise ValueError(f"{name!r} is not a signal name on this system")
    if text in NEVER_CATCH:
        raise ValueError(f"{name!r} is {text}, which no process can catch")
    if text in NOT_A_STOP_SIGNAL:
        raise ValueError(f"{name!r} is {text}: {NOT_A_STOP_SIGNAL[text]}, so it cannot mean stop")
    return signal.Signals[text].value


class StopSignals:
    """Catch the stop signals for the life of the rank; `requested()` -> the first one's name."""

    def __init__(self, signums: Sequence[int], *, rank: int = 0, quiet: bool = False):
        self.signums = tuple(dict.fromkeys([*signums, PARENT_DIED]))
        self.rank, self.quiet = rank, quiet
        self.first: Optional[str] = None
        self._previous = {}
        self._read_fd = self._write_fd = None
        self._old_wakeup = -1

    def install(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread (e.g. inside pytest-xdist workers)
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._old_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for s in self.signums:
            # The Python-level handler does nothing: the wakeup byte is what counts, and it
            # arrives even while the main thread sits in C++ (a collective, a file write).
            self._previous[s] = signal.signal(s, lambda signum, frame: None)
        threading.Thread(target=self._watch, name="tierzero-signals", daemon=True).start()
        return self

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum not in self.signums:
                    continue
                if signum == PARENT_DIED:
                    # May come once per thread of the dying supervisor: a first request, never a second
                    if self.first is None:
                        self.first = "SIGTERM (the local supervisor died)"
                    continue
                name = signal.Signals(signum).name
                if self.first is None:
                    self.first = name
                    if self.rank == 0 and not self.quiet:
                        print(f"tierzero: {name}: finishing the current step, then a checkpoint and exit "
                              f"{Exit.REQUEUE:d}; send it again to exit at once", file=sys.stderr, flush=True)
                else:
                    print(f"tierzero: rank {self.rank}: second stop signal ({name}): exiting at once",
                          file=sys.stderr, flush=True)
                    os._exit(killed_by(signum))

    def requested(self) -> Optional[str]:
        return self.first

    def ignore_from_now(self) -> None:
        """Training is over: a stop signal that comes now (a scheduler's, racing the end) is
        ignored for the rest of the process -- SIG_IGN, which, unlike a Python handler, the
        interpreter keeps while it shuts down (it puts SIG_DFL back for those, and SIGUSR2's
        default action would end a rank that finished its run as if it had failed)."""
        if self._read_fd is None:
            return
        for s in self.signums:
            signal.signal(s, signal.SIG_IGN)

    def uninstall(self) -> None:
        if self._read_fd is None:
            return
        for s, h in self._previous.items():
            signal.signal(s, h)
        signal.set_wakeup_fd(self._old_wakeup)
        os.close(self._write_fd)  # the watcher's read sees EOF and ends
        self._read_fd = self._write_fd = None


def stop_with_parent(parent_pid: int, signum: int = PARENT_DIED) -> bool:
    """Ask Linux to send `signum` to this process when its parent (the local supervisor) dies,
    so a supervisor killed with SIGKILL leaves no rank training on its own: the rank takes it
    as a stop request (checkpoint, exit 75). Returns False where prctl is not available."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent_pid:  # it died before the request took effect
        os.kill(os.getpid(), signum)
    return True


class Watchdog:
    """For a rank that no local supervisor watches (torchrun, srun, mpirun): when this rank
    has not beaten for timeout_s, find the stalled rank(s) from every rank's heartbeat file
    (the run dir is shared between nodes on a cluster) and exit 1, so the scheduler tears the
    job down instead of waiting out the collective timeout."""

    def __init__(self, heartbeat, *, timeout_s: float, find: Callable[[float], Optional[object]],
                 on_hang: Callable[[Optional[object], float], None], poll_s: float = 1.0):
        """`find(now)` -> a launcher.rundir.Hang or None; `on_hang(hang or None, silent_s)` says why."""
        self.heartbeat, self.timeout_s, self.find = heartbeat, timeout_s, find
        self.on_hang, self.poll_s = on_hang, poll_s

    def start(self) -> "Watchdog":
        threading.Thread(target=self._watch, name="tierzero-watchdog", daemon=True).start()
        return self

    def _watch(self) -> None:
        while True:
            time.sleep(self.poll_s)
            last = self.heartbeat.last_time
            if last is None:  # not started training yet (imports, rendezvous, resume)
                continue
            now = time.time()
            if now - last <= self.timeout_s:
                continue
            hang = self.find(now)
            if hang is None and now - last <= 2 * self.timeout_s:
                continue  # another rank beat recently: it may yet reach this one's collective
            self.on_hang(hang, now - last)
            os._exit(Exit.FAILURE)
