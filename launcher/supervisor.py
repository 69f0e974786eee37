"""Plain `tierzero run` / `tierzero bench`: spawn launcher.nproc local ranks and watch them.

Ranks rendezvous on loopback (a free port picked here) and learn who they are from the
supervised-rank variables (launcher/envvars.py). When one rank fails, the others are stopped at
once, so a crash never leaves ranks blocked in a collective, and a training group is started
again from its newest committed checkpoint (launcher.max_restarts). A stop signal (SIGINT,
SIGTERM, launcher.requeue_signal) is passed on to the ranks, which finish the step, checkpoint
and exit Exit.REQUEUE; a second one makes them exit at once. With launcher.isolate_network each
emulated node's ranks run in their own network namespace (launcher/netns.py, docs/netns.md),
torn down however the run ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from tierzero.launcher.config import ConfigError, RunConfig
from tierzero.launcher.envvars import SupervisedRank
from tierzero.launcher.exitcodes import VERDICT_WORDS, VERDICTS, Exit, killed_by
from tierzero.launcher.rundir import RunPaths, clear_heartbeats, find_hang, next_attempt, read_heartbeats
from tierzero.launcher.signals import signal_number


def _stop(procs: List[subprocess.Popen], grace_s: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Interrupted(Exception):
    """SIGINT/SIGTERM reached the supervisor of an isolated run (see _interrupts_raise)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _InterruptGuard:
    def __init__(self):
        self.armed = True

    def handler(self, signum, frame):
        # Raise once: a second Ctrl-C must not cut short the teardown the first one started.
        if self.armed:
            self.armed = False
            raise Interrupted(signum)

    def disarm(self) -> None:
        self.armed = False


@contextlib.contextmanager
def _interrupts_raise():
    """SIGINT and SIGTERM raise Interrupted (once), so `finally` and `with` blocks run."""
    guard = _InterruptGuard()
    if threading.current_thread() is not threading.main_thread():
        yield guard
        return
    previous = {s: signal.signal(s, guard.handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield guard
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _stopped_on_error(procs: List[subprocess.Popen]):
    """The ranks run in their own sessions, so nothing else stops them if the supervisor fails."""
    try:
        yield
    except BaseException:
        _stop(procs)
        raise


class _Received:
    """Record the given signals (main thread only) instead of their default action."""

    def __init__(self, signums: Sequence[int]):
        self.signums = tuple(dict.fromkeys(signums))
        self._got: List[int] = []
        self._previous = {}

    def __enter__(self) -> "_Received":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, lambda signum, frame: self._got.append(signum))
                              for s in self.signums}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def take(self) -> List[int]:
        got, self._got = self._got, []
        return got


def isolation_errors(cfg: RunConfig) -> List[str]:
    """Checks for launcher.isolate_network that need the topology and this host."""
    from tierzero.launcher import netns

    emulate = cfg.topology.emulate
    if not emulate or emulate[-1] < 2:
        return [
            f"launcher.isolate_network=true puts each emulated node in its own network namespace, but "
            f"topology.emulate={list(emulate) if emulate else None} describes "
            f"{emulate[-1] if emulate else 'no'} emulated node(s); give at least 2 nodes (the last "
            "fan-out), e.g. topology.emulate=[2,2] launcher.nproc=4, or drop launcher.isolate_network"
        ]
    return netns.isolation_problems(cfg.launcher.inter_node_gbit)


def run_local(cfg: RunConfig, paths: RunPaths, config_path: Path, argv: Sequence[str], *, restart: bool) -> int:
    """Spawn launcher.nproc ranks running `tierzero <argv...> <config_path>` and watch them;
    `restart`: start a failed group again from its newest checkpoint (training)."""
    if not cfg.launcher.isolate_network:
        return _supervise(cfg, paths, config_path, argv, restart=restart, network=None)
    from tierzero.launcher import netns

    # isolation_errors(cfg) was asked before anything was written (launcher/program.py)
    with _interrupts_raise() as guard:
        try:
            try:
                netns.cleanup_stale(paths.netns_state)
            except netns.NetworkError as e:
                raise ConfigError([
                    f"{paths.netns_state} records an emulated network of an earlier run that is still there and "
                    f"could not be removed: {e}. Remove it with `ip netns delete <name>` (see `ip netns list`)."
                ]) from e
            try:
                with netns.EmulatedNetwork(cfg.topology.emulate[-1], cfg.launcher.inter_node_gbit,
                                           tag=f"tz{os.getpid()}", state_path=paths.netns_state) as net:
                    try:
                        return _supervise(cfg, paths, config_path, argv, restart=restart, network=net)
                    finally:
                        guard.disarm()
            except netns.NetworkSetupError as e:
                raise ConfigError([
                    f"launcher.isolate_network=true could not build the emulated network: {e}. It needs root "
                    "with CAP_NET_ADMIN and CAP_SYS_ADMIN and a kernel with veth, bridge and tbf; everything "
                    "created so far was removed. Drop launcher.isolate_network (and launcher.inter_node_gbit) "
                    "to run every rank on loopback."
                ]) from e
        except Interrupted as e:  # before the ranks were watched
            print(f"tierzero: interrupted by {signal.Signals(e.signum).name}; emulated network removed",
                  file=sys.stderr)
            return killed_by(e.signum)


def _supervise(cfg: RunConfig, paths: RunPaths, config_path: Path, argv: Sequence[str], *, restart: bool,
               network) -> int:
    """Run attempts until one ends: a rank that fails stops the group, and (with `restart`) the
    group is started again, from its newest committed checkpoint (checkpoint.resume=auto), up to
    launcher.max_restarts times within launcher.restart_window_s."""
    restarts: List[float] = []
    cause = None
    while True:
        code, failure = _Attempt(cfg, paths, config_path, argv, network).run(after=cause)
        if failure is None or not restart:
            return code
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < cfg.launcher.restart_window_s]
        if len(restarts) >= cfg.launcher.max_restarts:
            if cfg.launcher.max_restarts:
                print(f"tierzero: giving up: {len(restarts)} restart(s) within launcher.restart_window_s="
                      f"{cfg.launcher.restart_window_s:g} (launcher.max_restarts={cfg.launcher.max_restarts})",
                      file=sys.stderr)
            return code
        restarts.append(now)
        cause = f"{failure}; restart {len(restarts)} of {cfg.launcher.max_restarts}"
        print(f"tierzero: restarting the group ({len(restarts)} of {cfg.launcher.max_restarts}) from the newest "
              "committed checkpoint", file=sys.stderr, flush=True)


class _Attempt:
    """Spawn and watch the ranks once. With `network` (an EmulatedNetwork that is up), rank r
    runs inside the namespace of emulated node r // ranks_per_node."""

    def __init__(self, cfg: RunConfig, paths: RunPaths, config_path: Path, argv: Sequence[str], network):
        from tierzero.telemetry.sink import Telemetry

        self.cfg, self.paths, self.network = cfg, paths, network
        self.nproc = cfg.launcher.nproc
        self.cmd = [sys.executable, "-m", "tierzero.launcher.cli", *argv, str(config_path)]
        self.attempt = next_attempt(paths.telemetry, cfg.run.name)
        self.events = Telemetry(cfg.telemetry, root=paths.telemetry, run=cfg.run.name, attempt=self.attempt,
                                rank=-1, host=os.uname().nodename)
        self.procs: List[subprocess.Popen] = []
        self.forwarded: List[int] = []
        self.store: Optional[str] = None
        self.t0 = time.monotonic()

    def run(self, after: Optional[str] = None) -> Tuple[int, Optional[str]]:
        """-> (exit code, what failed -- None when nothing did, or when it was asked to stop)."""
        detail = f"supervisor: spawning {self.nproc} local ranks (attempt {self.attempt})"
        if self.network is not None:
            detail += f"; isolated: {self.network.describe()}"
        self.events.event("start", detail=detail)
        if after:
            self.events.event("restart", detail=f"attempt {self.attempt} after {after}")
        clear_heartbeats(self.paths.heartbeats)  # the previous attempt's
        stop_signals = (signal.SIGINT, signal.SIGTERM, signal_number(self.cfg.launcher.requeue_signal))
        try:
            with _Received(stop_signals) as received, _stopped_on_error(self.procs):
                self.spawn()
                outcome = self.watch(received)
            return self.conclude(*outcome)
        finally:
            self.events.close()
            if self.store:
                Path(self.store).unlink(missing_ok=True)

    def spawn(self) -> None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        ranks_per_node = self.nproc // len(self.network.namespaces) if self.network is not None else self.nproc
        # the ranks meet in a fresh file of the run folder (no TCP store another user could reach)
        fd, self.store = tempfile.mkstemp(dir=self.paths.run_dir, prefix=f".rendezvous-{self.attempt}-")
        os.close(fd)
        for rank in range(self.nproc):
            node = rank // ranks_per_node
            # local_world_size stays nproc with isolated nodes too: all ranks share this host's cores
            who = SupervisedRank(rank=rank, world_size=self.nproc, local_rank=rank, local_world_size=self.nproc,
                                 node_rank=node, store=self.store, attempt=self.attempt, supervisor_pid=os.getpid())
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cpus // self.nproc)), **who.to_env())
            argv = self.cmd
            if self.network is not None:
                ifname = self.network.ifname(node)
                env.update(GLOO_SOCKET_IFNAME=ifname, NCCL_SOCKET_IFNAME=ifname)
                argv = self.network.wrap(node, self.cmd)
            else:  # the ranks' own connections on loopback only, unless the user chose an interface
                env.setdefault("GLOO_SOCKET_IFNAME", "lo")
                env.setdefault("NCCL_SOCKET_IFNAME", "lo")
            # Own session: a Ctrl-C in the terminal reaches the supervisor only, which passes it
            # on once; the ranks counting it twice would make them exit without a checkpoint.
            self.procs.append(subprocess.Popen(argv, env=env, start_new_session=True))

    def watch(self, received: _Received):
        """Until every rank ended, one failed, or a hang: ("done", codes), ("failed", (rank, code)),
        ("hang", Hang)."""
        next_hang_check = time.monotonic() + 1.0
        kill_at = None
        hang_timeout_s = self.cfg.launcher.hang_timeout_s
        while True:
            for signum in received.take():
                kill_at = self.forward(signum) or kill_at
            codes = [p.poll() for p in self.procs]
            if kill_at is not None and time.monotonic() > kill_at:
                _stop(self.procs, grace_s=0.0)
                codes = [p.poll() for p in self.procs]
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0, *VERDICTS)]
            if bad and not self.forwarded:
                return "failed", bad[0]
            if all(c is not None for c in codes):
                return "done", codes
            if hang_timeout_s and time.monotonic() >= next_hang_check:
                next_hang_check = time.monotonic() + 1.0
                hang = find_hang(read_heartbeats(self.paths.heartbeats, self.nproc), hang_timeout_s, time.time())
                if hang is not None:
                    return "hang", hang
            time.sleep(0.1)

    def forward(self, signum: int) -> Optional[float]:
        """Pass a stop signal on to the ranks; the second one gives them 10 s to exit."""
        self.forwarded.append(signum)
        name = signal.Signals(signum).name
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)
        if len(self.forwarded) == 1:
            self.events.event("signal", detail=f"{name}: asked the ranks to finish the step, checkpoint and "
                              f"exit {Exit.REQUEUE:d}", flush=True)
            print(f"tierzero: {name}: the ranks finish the current step, checkpoint and stop; send it again to "
                  "stop at once", file=sys.stderr, flush=True)
            return None
        self.events.event("signal", detail=f"second stop signal ({name}): ranks exit at once", flush=True)
        return time.monotonic() + 10.0

    def conclude(self, how: str, what) -> Tuple[int, Optional[str]]:
        if how == "hang":
            _stop(self.procs)
            self.events.event("hang", detail=what.describe(), step=None, flush=True)
            print(f"tierzero: {what.describe()}; stopped every rank", file=sys.stderr, flush=True)
            return Exit.FAILURE, (None if self.forwarded else f"{what.describe()} in attempt {self.attempt}")
        if how == "failed":
            return self.failed(*what)
        codes = what
        if self.forwarded and any(c != 0 for c in codes):
            return self.stopped(codes), None
        verdict = next((c for c in VERDICTS if c in codes), None)
        if verdict is not None:
            self.events.event("error", detail=f"ranks exited with {verdict:d}: {VERDICT_WORDS[verdict]}")
            return verdict, None
        self.events.event("end", detail=f"all {self.nproc} ranks finished in {time.monotonic() - self.t0:.1f} s")
        print(f"tierzero: {self.nproc} ranks finished in {time.monotonic() - self.t0:.1f} s", flush=True)
        return Exit.OK, None

    def failed(self, rank: int, code: int) -> Tuple[int, str]:
        _stop(self.procs)
        beat = read_heartbeats(self.paths.heartbeats, self.nproc).get(rank)
        where = f" at step {beat.step} ({beat.phase})" if beat else ""
        detail = f"rank {rank} failed ({describe_exit(code)}){where}; stopped the other {self.nproc - 1} ranks"
        self.events.event("error", detail=detail, step=beat.step if beat else None)
        print(f"tierzero: {detail}. Its output above says why; telemetry is in {self.paths.telemetry}.",
              file=sys.stderr)
        return Exit.FAILURE, f"rank {rank} failed ({describe_exit(code)}){where} in attempt {self.attempt}"

    def stopped(self, codes: List[int]) -> int:
        """Stopped on request: never restarted, whatever the ranks' codes."""
        code = Exit.REQUEUE if all(c == Exit.REQUEUE for c in codes) else killed_by(self.forwarded[-1])
        step = min((b.step for b in read_heartbeats(self.paths.heartbeats, self.nproc).values()), default=None)
        if code == Exit.REQUEUE:
            detail = (f"all {self.nproc} ranks stopped after step {step} with a committed checkpoint; exit "
                      f"{Exit.REQUEUE:d}: run again with the same run.dir to resume")
        else:
            # a second signal, or one that came before the ranks could handle it (still starting)
            detail = f"all ranks stopped, without a new checkpoint ({', '.join(describe_exit(c) for c in codes)})"
        self.events.event("end", detail=detail, step=step)
        print(f"tierzero: {detail}", file=sys.stderr, flush=True)
        return code
