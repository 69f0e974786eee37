"""Plain `tierzero run`: spawn launcher.nproc local ranks and watch them.

Ranks rendezvous on loopback (a free port picked here). When one rank fails, the others
are stopped at once, so a crash never leaves ranks blocked in a collective.
Restarts from checkpoints come with the supervision issue; today a failure ends the run.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from launcher.config import RunConfig
from launcher.rank import free_port

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


def run_local(cfg: RunConfig, config_path: Path) -> int:
    from telemetry.sink import Telemetry

    nproc = cfg.launcher.nproc
    telemetry_root = cfg.telemetry.dir or str(cfg.run_dir / "telemetry")
    attempt = next_attempt(telemetry_root, cfg.run.name)
    port = free_port()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    base_env = dict(os.environ)
    base_env.update(
        WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), TIERZERO_SUPERVISED="1", TIERZERO_ATTEMPT=str(attempt),
        OMP_NUM_THREADS=str(max(1, cpus // nproc)), GROUP_RANK="0",
    )
    events = Telemetry(cfg.telemetry, root=telemetry_root, run=cfg.run.name, attempt=attempt,
                       rank=-1, host=os.uname().nodename)
    events.event("start", detail=f"supervisor: spawning {nproc} local ranks (attempt {attempt})")
    cmd = [sys.executable, "-m", "launcher.cli", "run", str(config_path)]
    t0 = time.monotonic()
    procs = []
    for rank in range(nproc):
        env = dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen(cmd, env=env))
    failed: Optional[tuple] = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = bad[0]
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(procs)
        events.event("signal", detail="SIGINT: stopped all ranks")
        events.close()
        print("tierzero: interrupted; all ranks stopped", file=sys.stderr)
        return 130
    if failed:
        _stop(procs)
        rank, code = failed
        detail = f"rank {rank} failed ({describe_exit(code)}); stopped the other {nproc - 1} ranks"
        events.event("error", detail=detail)
        events.close()
        print(f"tierzero: {detail}. Its output above says why; telemetry is in {telemetry_root}.",
              file=sys.stderr)
        return 1
    events.event("end", detail=f"all {nproc} ranks finished in {time.monotonic() - t0:.1f} s")
    events.close()
    print(f"tierzero: {nproc} ranks finished in {time.monotonic() - t0:.1f} s", flush=True)
    return 0
