"""Plain `tierzero run`: spawn launcher.nproc local ranks and watch them.

Ranks rendezvous on loopback (a free port picked here). When one rank fails, the others
are stopped at once, so a crash never leaves ranks blocked in a collective, and the group is
started again from its newest committed checkpoint (launcher.max_restarts). A stop signal
(SIGINT, SIGTERM, launcher.requeue_signal) is passed on to the ranks, which finish the step,
checkpoint and exit EXIT_REQUEUE; a second one makes them exit at once.
With launcher.isolate_network each emulated node's ranks run in their own network
namespace (launcher/netns.py, docs/netns.md), torn down however the run ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional, Sequence

from tierzero.launcher.config import ConfigError, RunConfig
from tierzero.launcher.rank import free_port

log = logging.getLogger(__name__)
_ATTEMPT_RE = re.compile(r"^attempt=(\d+)$")


def next_attempt(telemetry_root: str, run_name: str) -> int:
    """Each launch of the same run dir is a new attempt: one past the highest recorded."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(telemetry_root)
    seen = [-1]
    for table in ("events", "steps"):
        base = f"{path}/{table}/run={run_name}"
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)]
        except (FileNotFoundError, NotADirectoryError):
            continue
        seen += [int(m.group(1)) for m in map(_ATTEMPT_RE.match, names) if m]
    return max(seen) + 1


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


from tierzero.launcher.signals import EXIT_REQUEUE, signal_number  # noqa: E402  (next to the other exit codes)

EXIT_RESULTS_WRONG = 3
"""A rank's verdict, not a crash: `tierzero bench` found wrong results (every rank exits with it)."""
EXIT_USAGE = 2
"""Every rank found the same user error (a checkpoint.resume or init_from that cannot load) and said why."""
VERDICTS = (EXIT_USAGE, EXIT_RESULTS_WRONG, EXIT_REQUEUE)


def run_local(cfg: RunConfig, config_path: Path, command: Sequence[str] = ("run",)) -> int:
    """Spawn launcher.nproc ranks running `tierzero <command...> <config_path>` and watch them."""
    if not cfg.launcher.isolate_network:
        return _supervise(cfg, config_path, network=None, command=command)
    from tierzero.launcher import netns

    problems = isolation_errors(cfg)
    if problems:
        raise ConfigError(problems)
    state_path = cfg.run_dir / ".netns.json"
    num_nodes = cfg.topology.emulate[-1]
    with _interrupts_raise() as guard:
        try:
            try:
                netns.cleanup_stale(state_path)
            except netns.NetworkError as e:
                raise ConfigError([
                    f"{state_path} records an emulated network of an earlier run that is still there and "
                    f"could not be removed: {e}. Remove it with `ip netns delete <name>` (see `ip netns list`)."
                ]) from e
            try:
                with netns.EmulatedNetwork(num_nodes, cfg.launcher.inter_node_gbit, tag=f"tz{os.getpid()}",
                                           state_path=state_path) as net:
                    try:
                        return _supervise(cfg, config_path, network=net, command=command)
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
            return 128 + e.signum


def _supervise(cfg: RunConfig, config_path: Path, network=None, command: Sequence[str] = ("run",)) -> int:
    """Run attempts until one ends: a rank that fails stops the group, and a training run is
    started again (from its newest committed checkpoint: checkpoint.resume=auto) up to
    launcher.max_restarts times within launcher.restart_window_s."""
    restarts: List[float] = []
    cause = None
    while True:
        code, failure = _attempt(cfg, config_path, network, command, after=cause)
        if failure is None or command[0] != "run" or code == EXIT_REQUEUE:
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


def last_progress(run_dir: Path, nproc: int) -> dict:
    """rank -> (step, phase) from the ranks' heartbeat files (recipes.train writes them)."""
    out = {}
    for r in range(nproc):
        try:
            data = json.loads((run_dir / ".heartbeat" / f"rank-{r}.json").read_text())
            out[r] = (int(data["step"]), str(data["phase"]), float(data["time"]))
        except (OSError, ValueError, KeyError):
            continue
    return out


def _phase_order(phase: str) -> int:
    if phase.startswith("micro "):
        return 1 + int(phase.split()[1])
    return {"step": 0, "optimizer": 10_000, "checkpoint": 10_001}.get(phase, 0)


def find_hang(progress: dict, timeout_s: float, now: float) -> Optional[str]:
    """None while some rank moved within timeout_s; else a sentence naming the stalled
    rank(s) -- the ones furthest behind (step, then phase, then the oldest beat) -- with
    their last step and phase, and where the others wait."""
    if not progress or now - max(t for _, _, t in progress.values()) <= timeout_s:
        return None
    key = {r: (step, _phase_order(phase)) for r, (step, phase, _) in progress.items()}
    behind = min(key.values())
    stalled = [r for r in progress if key[r] == behind]
    if len(stalled) == len(progress):  # all at the same point: the one that stopped beating first
        oldest = min(t for _, _, t in progress.values())
        stalled = [r for r, (_, _, t) in progress.items() if t - oldest < 0.5]
    def where(r):
        step, phase, t = progress[r]
        return f"rank {r} at step {step} ({phase}), silent for {now - t:.0f} s"
    others = [r for r in sorted(progress) if r not in stalled]
    text = f"hang: no rank progressed for {timeout_s:g} s (launcher.hang_timeout_s); stalled: " + \
        "; ".join(where(r) for r in sorted(stalled))
    if others:
        text += "; waiting for them: " + "; ".join(where(r) for r in others)
    return text


def _attempt(cfg: RunConfig, config_path: Path, network, command: Sequence[str], after: Optional[str] = None):
    """Spawn and watch the ranks once -> (exit code, failure description or None); with
    `network` (an EmulatedNetwork that is up), rank r runs inside the namespace of emulated
    node r // ranks_per_node."""
    from tierzero.telemetry.sink import Telemetry

    nproc = cfg.launcher.nproc
    telemetry_root = cfg.telemetry.dir or str(cfg.run_dir / "telemetry")
    attempt = next_attempt(telemetry_root, cfg.run.name)
    port = free_port()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    base_env = dict(os.environ)
    base_env.update(
        WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), TIERZERO_SUPERVISED="1", TIERZERO_ATTEMPT=str(attempt),
        TIERZERO_SUPERVISOR_PID=str(os.getpid()),
        OMP_NUM_THREADS=str(max(1, cpus // nproc)), GROUP_RANK="0",
    )
    events = Telemetry(cfg.telemetry, root=telemetry_root, run=cfg.run.name, attempt=attempt,
                       rank=-1, host=os.uname().nodename)
    detail = f"supervisor: spawning {nproc} local ranks (attempt {attempt})"
    if network is not None:
        detail += f"; isolated: {network.describe()}"
    events.event("start", detail=detail)
    if after:
        events.event("restart", detail=f"attempt {attempt} after {after}")
    for old in (cfg.run_dir / ".heartbeat").glob("rank-*.json"):  # the previous attempt's
        old.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "tierzero.launcher.cli", *command, str(config_path)]
    ranks_per_node = nproc // len(network.namespaces) if network is not None else nproc
    t0 = time.monotonic()
    procs: List[subprocess.Popen] = []
    failed: Optional[tuple] = None
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal_number(cfg.launcher.requeue_signal))
    with _Received(stop_signals) as received, _stopped_on_error(procs):
        for rank in range(nproc):
            env = dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank))
            argv = cmd
            if network is not None:
                # LOCAL_WORLD_SIZE stays nproc: all ranks still share this host's cores.
                node = rank // ranks_per_node
                ifname = network.ifname(node)
                env.update(MASTER_ADDR=network.node_addr(0), GROUP_RANK=str(node),
                           GLOO_SOCKET_IFNAME=ifname, NCCL_SOCKET_IFNAME=ifname)
                argv = network.wrap(node, cmd)
            # Own session: a Ctrl-C in the terminal reaches the supervisor only, which passes it
            # on once; the ranks counting it twice would make them exit without a checkpoint.
            procs.append(subprocess.Popen(argv, env=env, start_new_session=True))
        next_hang_check = time.monotonic() + 1.0
        forwarded: List[int] = []
        kill_at = None
        while True:
            for signum in received.take():
                forwarded.append(signum)
                name = signal.Signals(signum).name
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signum)
                if len(forwarded) == 1:
                    events.event("signal", detail=f"{name}: asked the ranks to finish the step, checkpoint and "
                                 f"exit {EXIT_REQUEUE}", flush=True)
                    print(f"tierzero: {name}: the ranks finish the current step, checkpoint and stop; send it "
                          "again to stop at once", file=sys.stderr, flush=True)
                else:
                    events.event("signal", detail=f"second stop signal ({name}): ranks exit at once", flush=True)
                    kill_at = time.monotonic() + 10.0
            codes = [p.poll() for p in procs]
            if kill_at is not None and time.monotonic() > kill_at:
                _stop(procs, grace_s=0.0)
                codes = [p.poll() for p in procs]
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0, *VERDICTS)]
            if bad and not forwarded:
                failed = bad[0]
                break
            if all(c is not None for c in codes):
                break
            if cfg.launcher.hang_timeout_s and time.monotonic() >= next_hang_check:
                next_hang_check = time.monotonic() + 1.0
                hang = find_hang(last_progress(cfg.run_dir, nproc), cfg.launcher.hang_timeout_s, time.time())
                if hang:
                    _stop(procs)
                    events.event("hang", detail=hang, step=None, flush=True)
                    events.close()
                    print(f"tierzero: {hang}; stopped every rank", file=sys.stderr, flush=True)
                    return 1, (None if forwarded else f"{hang} in attempt {attempt}")
            time.sleep(0.1)
    if forwarded and any(c != 0 for c in codes):
        # Stopped on request: never restarted, whatever the ranks' codes.
        code = EXIT_REQUEUE if all(c == EXIT_REQUEUE for c in codes) else 128 + forwarded[-1]
        progress = last_progress(cfg.run_dir, nproc)
        step = min((s for s, _, _ in progress.values()), default=None)
        if code == EXIT_REQUEUE:
            detail = (f"all {nproc} ranks stopped after step {step} with a committed checkpoint; exit "
                      f"{EXIT_REQUEUE}: run again with the same run.dir to resume")
        else:
            # a second signal, or one that came before the ranks could handle it (still starting)
            detail = f"all ranks stopped, without a new checkpoint ({', '.join(describe_exit(c) for c in codes)})"
        events.event("end", detail=detail, step=step)
        events.close()
        print(f"tierzero: {detail}", file=sys.stderr, flush=True)
        return code, None
    if failed:
        _stop(procs)
        rank, code = failed
        progress = last_progress(cfg.run_dir, nproc).get(rank)
        where = f" at step {progress[0]} ({progress[1]})" if progress else ""
        detail = f"rank {rank} failed ({describe_exit(code)}){where}; stopped the other {nproc - 1} ranks"
        events.event("error", detail=detail, step=progress[0] if progress else None)
        events.close()
        print(f"tierzero: {detail}. Its output above says why; telemetry is in {telemetry_root}.",
              file=sys.stderr)
        return 1, f"rank {rank} failed ({describe_exit(code)}){where} in attempt {attempt}"
    verdict = next((c for c in VERDICTS if c in codes), None)
    if verdict is not None:
        events.event("error", detail=f"ranks exited with {verdict}: " +
                     ("wrong results" if verdict == EXIT_RESULTS_WRONG else "a user error (see the message above)"))
        events.close()
        return verdict, None
    events.event("end", detail=f"all {nproc} ranks finished in {time.monotonic() - t0:.1f} s")
    events.close()
    print(f"tierzero: {nproc} ranks finished in {time.monotonic() - t0:.1f} s", flush=True)
    return 0, None
