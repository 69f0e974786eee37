"""The run folder: where every file of a run lives, who is on which step (heartbeats), when the
run is hung, and which attempt a launch is.

    <run.dir>/config.yaml            the resolved config of `tierzero run` (absolute paths)
    <run.dir>/telemetry/             Parquet tables (or telemetry.dir)
    <run.dir>/checkpoints/           step-NNNNNNNN folders (or checkpoint.dir)
    <run.dir>/.heartbeat/rank-R.json each rank's step and phase, rewritten atomically
    <run.dir>/bench/                 `tierzero bench`: its config.yaml, bench.txt, busbw.png, topology.json
    <run.dir>/sbatch.sh              `tierzero sbatch` (sbatch-bench.sh for slurm.command=bench)
    <run.dir>/.netns.json            the emulated network of launcher.isolate_network, while it exists
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple


_ATTEMPT_RE = re.compile(r"^attempt=(\d+)$")


def _absolute(location: Optional[str]) -> Optional[str]:
    """A local path made absolute; a URL (s3://, memory://, file://) as given."""
    if location is None or "://" in location:
        return location
    return str(Path(location).resolve())


@dataclass(frozen=True)
class RunPaths:
    """Every location of one run, absolute, built once from the config (RunPaths.of)."""
    run_dir: Path
    telemetry: str
    """telemetry.dir, or <run.dir>/telemetry: a path or an fsspec URL."""
    checkpoints: str
    """checkpoint.dir, or <run.dir>/checkpoints: a path or an fsspec URL."""

    @classmethod
    def of(cls, cfg) -> "RunPaths":
        run_dir = Path(cfg.run.dir).resolve() if cfg.run.dir else (Path("runs") / cfg.run.name).resolve()
        return cls(run_dir=run_dir,
                   telemetry=_absolute(cfg.telemetry.dir) or str(run_dir / "telemetry"),
                   checkpoints=_absolute(cfg.checkpoint.dir) or str(run_dir / "checkpoints"))

    @property
    def config(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def heartbeats(self) -> Path:
        return self.run_dir / ".heartbeat"

    @property
    def bench(self) -> Path:
        return self.run_dir / "bench"

    @property
    def bench_config(self) -> Path:
        return self.bench / "config.yaml"

    @property
    def topology_json(self) -> Path:
        """The probe's measured topology (`tierzero bench --probe`)."""
        return self.bench / "topology.json"

    def sbatch(self, command: str) -> Path:
        return self.run_dir / ("sbatch.sh" if command == "run" else f"sbatch-{command}.sh")

    @property
    def netns_state(self) -> Path:
        return self.run_dir / ".netns.json"


def resolved(cfg, paths: RunPaths):
    """A copy of `cfg` whose locations are absolute, so the config.yaml written into the run
    folder means the same from any working directory and on every node."""
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none"):
        resume = _absolute(resume)
    return dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, dir=str(paths.run_dir)),
        telemetry=dataclasses.replace(cfg.telemetry, dir=_absolute(cfg.telemetry.dir)),
        checkpoint=dataclasses.replace(cfg.checkpoint, dir=_absolute(cfg.checkpoint.dir), resume=resume))


def write_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` through a temp file and a rename: a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


# ---- attempts -------------------------------------------------------------------------------

def next_attempt(telemetry_root: str, run_name: str) -> int:
    """Every launch of a run is a new attempt, whatever started it (the local supervisor, a
    Slurm requeue, torchrun, a resubmission): one past the highest attempt any telemetry
    table of the run holds."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(telemetry_root)

    def names(folder: str):
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    seen = [-1]
    for table in names(path):  # every table: a benchmark writes collectives only, a run steps and events
        seen += [int(m.group(1)) for m in map(_ATTEMPT_RE.match, names(f"{path}/{table}/run={run_name}")) if m]
    return max(seen) + 1


# ---- heartbeats -----------------------------------------------------------------------------

PHASES = ("step", "micro <k>", "optimizer", "checkpoint")
"""A rank's phases within one step, in the order it passes them."""


def phase_order(phase: str) -> int:
    if phase.startswith("micro "):
        return 1 + int(phase.split()[1])
    return {"step": 0, "optimizer": 10_000, "checkpoint": 10_001}.get(phase, 0)


@dataclass(frozen=True)
class Beat:
    rank: int
    step: int
    phase: str
    time: float
    """Wall-clock time of the beat (time.time())."""
    pid: Optional[int] = None


class Heartbeat:
    """`<run.dir>/.heartbeat/rank-<r>.json`: this rank's step and phase, rewritten atomically at
    every phase; the supervisor (or every rank's watchdog) reads them to find a hang."""

    def __init__(self, folder: Path, rank: int):
        self.path = folder / f"rank-{rank}.json"
        self.tmp = folder / f".rank-{rank}.{os.getpid()}.tmp"
        self.last_time: Optional[float] = None
        """Wall time of the last beat (None before the first): the watchdog's clock."""
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, step: int, phase: str) -> None:
        now = time.time()
        # pid: chaos drills (tests/test_supervision.py, benchmarks/chaos.py) kill -9 the rank by it
        self.tmp.write_text(json.dumps({"step": step, "phase": phase, "time": now, "pid": os.getpid()}))
        os.replace(self.tmp, self.path)
        self.last_time = now


def read_heartbeats(folder: Path, nproc: int) -> Dict[int, Beat]:
    """rank -> its last beat, for the ranks that have beaten (unreadable files are skipped)."""
    out = {}
    for r in range(nproc):
        try:
            data = json.loads((folder / f"rank-{r}.json").read_text())
            out[r] = Beat(r, int(data["step"]), str(data["phase"]), float(data["time"]), data.get("pid"))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def clear_heartbeats(folder: Path) -> None:
    """A new attempt starts with no beats (the previous attempt's would look like progress)."""
    for old in folder.glob("rank-*.json"):
        old.unlink(missing_ok=True)


@dataclass(frozen=True)
class Hang:
    """No rank progressed for timeout_s: the ranks furthest behind, and the ones waiting for them."""
    timeout_s: float
    now: float
    stalled: Tuple[Beat, ...]
    waiting: Tuple[Beat, ...]

    def _where(self, b: Beat) -> str:
        return f"rank {b.rank} at step {b.step} ({b.phase}), silent for {self.now - b.time:.0f} s"

    def describe(self) -> str:
        text = (f"hang: no rank progressed for {self.timeout_s:g} s (launcher.hang_timeout_s); stalled: "
                + "; ".join(map(self._where, self.stalled)))
        if self.waiting:
            text += "; waiting for them: " + "; ".join(map(self._where, self.waiting))
        return text

    def names(self, rank: int) -> bool:
        return any(b.rank == rank for b in self.stalled)


def find_hang(beats: Dict[int, Beat], timeout_s: float, now: float) -> Optional[Hang]:
    """None while some rank moved within timeout_s; else the stalled rank(s) -- the ones furthest
    behind (step, then phase; among equals, the ones that stopped beating first)."""
    if not beats or now - max(b.time for b in beats.values()) <= timeout_s:
        return None
    key = {r: (b.step, phase_order(b.phase)) for r, b in beats.items()}
    behind = min(key.values())
    stalled = [r for r in beats if key[r] == behind]
    if len(stalled) == len(beats):  # all at the same point: the one that stopped beating first
        oldest = min(b.time for b in beats.values())
        stalled = [r for r, b in beats.items() if b.time - oldest < 0.5]
    return Hang(timeout_s, now, tuple(beats[r] for r in sorted(stalled)),
                tuple(beats[r] for r in sorted(beats) if r not in stalled))
