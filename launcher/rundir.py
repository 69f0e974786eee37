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

import contextlib
import dataclasses
import json
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from tierzero.launcher.config import ConfigError


_ATTEMPT_RE = re.compile(r"^attempt=(\d+)$")
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once, at import (umask has no read-only call)


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
    """Write `text` to `path` through a fresh temp file in the same folder (mkstemp: no name
    another user can plant a symlink at) and a rename: a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600, widened to what a plain open would give
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
        self.path = folder / f"rank-{rank}.json"  # the folder is made by the first beat, not before
        self.last_time: Optional[float] = None
        """Wall time of the last beat (None before the first): the watchdog's clock."""

    def __call__(self, step: int, phase: str) -> None:
        now = time.time()
        # pid: chaos drills (tests/test_supervision.py, benchmarks/chaos.py) kill -9 the rank by it
        write_atomic(self.path, json.dumps({"step": step, "phase": phase, "time": now, "pid": os.getpid()}))
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


# ---- ownership: the identity file and the lock -----------------------------------------------

IDENTITY = "tierzero-run.json"
"""Written when tierzero creates (or adopts) a run folder: whose run it is and of which model."""
IDENTITY_FORMAT = "tierzero-run/1"
LOCK = ".tierzero-{run_name}.lock"
"""flock'ed by the one process that writes the run's files (the local supervisor, or rank 0 under
a scheduler) for as long as it runs; the kernel releases it when that process dies. One per
run.name: a benchmark sweep's job-array tasks (run names <name>-nodes<N>) share one folder."""
_MAX_IDENTITY_BYTES = 64 * 1024


def fingerprint(cfg) -> dict:
    """What a run folder's checkpoints and telemetry belong to: the model's shape and the token
    stream it reads. Anything else (steps, learning rate, batch, ranks, plan, expert
    parallelism) may change between launches of one run -- resuming resharded is the point."""
    m, e, d = cfg.model, cfg.moe, cfg.data
    return {
        "model": {k: getattr(m, k) for k in ("d_model", "n_layers", "n_heads", "ffn_hidden", "tie_embeddings")},
        "moe": ({k: getattr(e, k) for k in ("num_experts", "top_k", "shared_experts", "expert_hidden")}
                if e.num_experts else None),
        "data": {k: getattr(d, k) for k in ("kind", "seq_len", "seed", "vocab_size", "successors", "concentration",
                                            "path", "token_dtype")},
    }


def _differences(there: dict, here: dict, prefix: str = "") -> list:
    out = []
    for key in sorted(set(there) | set(here)):
        a, b = there.get(key), here.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} there, {b!r} here")
    return out


class RunDirError(ConfigError):
    """The run folder cannot be this run's: a config error (exit 2) naming run.dir and the fix."""

    def __init__(self, message: str):
        super().__init__([message])


class Claim:
    """This process's hold on a run folder: it checked the folder is this run's (or created it)
    and, with `lock`, holds the folder's lock until release()."""

    def __init__(self, paths: RunPaths, created: Optional[Path], lock_fd: Optional[int]):
        self.paths, self._fd = paths, lock_fd
        self.created = created
        """The outermost folder this claim created (the run folder or a parent of it); None if it existed."""

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def undo(self) -> None:
        """The launch ended in a user error before any step: a run folder this launch created
        (so nothing in it is anyone else's) goes again; an existing one keeps what it had."""
        self.release()
        if self.created is not None:
            import shutil

            shutil.rmtree(self.created, ignore_errors=True)

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_run_dir(cfg, paths: RunPaths, *, program: str, hold_lock: bool = True) -> Claim:
    """Make sure `paths.run_dir` is this run's before anything is written into it, and lock it.

    A missing folder is created; an existing one must belong to this user and be a tierzero run
    folder of this run (its identity file: same run.name, and for training the same model and
    data); an empty folder is adopted. The lock makes a second run into the folder fail at once
    naming the holder. `hold_lock=False` only checks that nobody holds it (`tierzero sbatch`
    writes the script a later job runs). Raises RunDirError with the message for the user."""
    run_dir = paths.run_dir
    created = None
    if not _check_existing(run_dir, cfg, program):
        try:
            created = _create_folders(run_dir)
        except OSError as e:
            raise RunDirError(f"run.dir={run_dir} cannot be created: {e.strerror or e}; give a folder you can "
                              "write (run.dir=...), with a shorter path if the name is too long") from e
        if created is None:
            _check_existing(run_dir, cfg, program)  # another process made it just now
    claim = Claim(paths, created=created, lock_fd=None)
    try:
        claim._fd = _lock(run_dir, cfg.run.name, program)
        identity = _read_identity(run_dir)  # again, under the lock
        if identity is not None:
            _check_identity(identity, run_dir, cfg, program)
        if identity is None or (program == "run" and identity.get("fingerprint") is None):
            _write_identity(run_dir, cfg, program, identity)
    except BaseException:
        claim.undo()  # removes only a folder this claim created
        raise
    if not hold_lock:
        claim.release()
    return claim


def _create_folders(run_dir: Path) -> Optional[Path]:
    """Create `run_dir` and its missing parents, one at a time so that it is known which ones this
    call made; the outermost of them, or None when another process made `run_dir` first (then
    nothing here is this call's to remove). When one cannot be made (a name too long, no
    permission, a full disk), the folders made here go again -- empty, so rmdir -- and the error
    is raised: a refused launch leaves nothing on disk, not even runs/."""
    missing = []
    for folder in [run_dir, *run_dir.parents]:
        if os.path.lexists(folder):
            break
        missing.append(folder)
    made = []
    try:
        for folder in reversed(missing):  # outermost first
            try:
                os.mkdir(folder)
            except FileExistsError:  # made by another process between the look and here: not ours
                continue
            made.append(folder)
    except OSError:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise
    return made[0] if made and made[-1] == run_dir else None


def _check_existing(run_dir: Path, cfg, program: str) -> bool:
    """Checks on an existing folder (read-only); False when there is none."""
    try:
        st = os.lstat(run_dir)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise RunDirError(f"run.dir={run_dir} cannot be used: {e.strerror or e}; give a folder you can write "
                          "(run.dir=...), with a shorter path if the name is too long") from e
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"run.dir={run_dir} exists and is not a folder; give a folder path (tierzero creates "
                          "it), or another run.name")
    if st.st_uid != os.getuid():
        raise RunDirError(f"run.dir={run_dir} belongs to another user (uid {st.st_uid}); tierzero writes only into "
                          "run folders of yours: give another run.dir or run.name")
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise RunDirError(f"run.dir={run_dir} is not writable; give a folder you can write (run.dir=...)")
    identity = _read_identity(run_dir)
    if identity is not None:
        _check_identity(identity, run_dir, cfg, program)
        return True
    entries = sorted(p.name for p in run_dir.iterdir())
    if entries and not _legacy_run_dir(run_dir, cfg, program):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise RunDirError(f"run.dir={run_dir} is an existing folder that is not a tierzero run folder (no {IDENTITY}; "
                          f"it holds {shown}); tierzero writes only into folders it created, so nothing of yours is "
                          "overwritten: give a new run.dir or run.name, or empty that folder")
    return True


def _legacy_run_dir(run_dir: Path, cfg, program: str) -> bool:
    """A run folder of a tierzero from before identity files: its config.yaml is a tierzero
    config (for training, of this run and model: _check_identity)."""
    from tierzero.launcher.config import ConfigError, load_config

    path = run_dir / "config.yaml"
    if not path.is_file() or path.stat().st_size > _MAX_IDENTITY_BYTES:
        return False
    try:
        old = load_config([str(path)], [], use_default_recipe=False)
    except (ConfigError, OSError, ValueError):
        return False
    _check_identity({"run_name": old.run.name, "fingerprint": fingerprint(old)}, run_dir, cfg, program)
    return True


def _read_identity(run_dir: Path) -> Optional[dict]:
    path = run_dir / IDENTITY
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RunDirError(f"run.dir={run_dir}: {IDENTITY} cannot be read ({e.strerror or e}); tierzero wrote it as a "
                          "plain file: give another run.dir or run.name") from e
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise RunDirError(f"run.dir={run_dir}: {IDENTITY} is not a plain file; give another run.dir or run.name")
        raw = f.read(_MAX_IDENTITY_BYTES + 1)
    try:
        data = json.loads(raw) if len(raw) <= _MAX_IDENTITY_BYTES else None
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict) or data.get("format") != IDENTITY_FORMAT:
        raise RunDirError(f"run.dir={run_dir}: {IDENTITY} is not a tierzero run identity; give another run.dir or "
                          "run.name")
    return data


def _check_identity(identity: dict, run_dir: Path, cfg, program: str) -> None:
    """Training continues only its own run of the same model; a benchmark (no checkpoints, its
    rows under its own run.name) may share any run folder of this user's."""
    name = identity.get("run_name")
    if program != "run":
        return
    if name != cfg.run.name:
        raise RunDirError(f"run.dir={run_dir} belongs to run {name!r}, not run.name={cfg.run.name}; give this run its "
                          f"own folder (run.dir=...), or run.name={name} to continue that run")
    there = identity.get("fingerprint")
    if there is None:
        return
    differences = _differences(there, fingerprint(cfg))
    if differences:
        raise RunDirError(
            f"run.dir={run_dir} holds run {name!r} of another model or data ({'; '.join(differences[:4])}"
            f"{'; ...' if len(differences) > 4 else ''}): its checkpoints cannot continue this run, and this run "
            f"would mix its steps into that run's telemetry. Give this one its own name (e.g. run.name={name}-2), "
            "or run.dir; or remove that folder if it is no longer needed")


def _write_identity(run_dir: Path, cfg, program: str, old: Optional[dict]) -> None:
    import getpass
    import socket

    from tierzero.launcher import tierzero_version

    identity = dict(old) if old else {
        "format": IDENTITY_FORMAT, "run_name": cfg.run.name, "fingerprint": None,
        "created": {"user": getpass.getuser(), "uid": os.getuid(), "host": socket.gethostname(), "pid": os.getpid(),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "program": program,
                    "tierzero_version": tierzero_version()}}
    if program == "run":
        identity["fingerprint"] = fingerprint(cfg)
    write_atomic(run_dir / IDENTITY, json.dumps(identity, indent=1, sort_keys=True) + "\n")


def _lock(run_dir: Path, run_name: str, program: str) -> Optional[int]:
    """flock the folder's lock file; RunDirError naming the holder when another process has it.
    None where the filesystem has no locks (some network filesystems): a warning, no lock."""
    import fcntl
    import socket

    fd = os.open(run_dir / LOCK.format(run_name=run_name), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.close(fd)
        raise RunDirError(f"run.dir={run_dir} is in use by another tierzero process ({holder or 'unknown'}): two "
                          "runs in one folder would overwrite each other's files. Wait for it to end, or give this "
                          "one another run.name or run.dir") from None
    except OSError as e:  # ENOLCK / EOPNOTSUPP: a filesystem without flock
        os.close(fd)
        import logging

        logging.getLogger(__name__).warning("run.dir=%s: no lock on this filesystem (%s); nothing stops a second "
                                            "run into the same folder", run_dir, e.strerror or e)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"tierzero {program}, pid {os.getpid()} on host {socket.gethostname()}, since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    return fd


_OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def storage_problems(cfg) -> list:
    """A checkpoint.dir / telemetry.dir on an object store whose bucket cannot be reached (no
    credentials, no network, no such bucket): found before the run starts, not as a traceback
    from every rank at its first save. Local paths and memory:// need no check here."""
    import fsspec

    problems = []
    for key, url in (("checkpoint.dir", cfg.checkpoint.dir), ("telemetry.dir", cfg.telemetry.dir)):
        if not url or url.split("://", 1)[0] not in _OBJECT_STORES:
            continue
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        try:
            fs, _ = fsspec.core.url_to_fs(url)
            reachable = fs.exists(bucket)
            why = "it does not exist, or cannot be reached with these credentials"
        except Exception as e:  # credentials, network, a missing s3fs: all say the same to the user
            reachable, why = False, f"{type(e).__name__}: {e}"
        if not reachable:
            problems.append(f"{key}={url}: the bucket {bucket!r} is not usable ({why}); check the credentials "
                            "(AWS_ACCESS_KEY_ID / AWS_PROFILE, AWS_ENDPOINT_URL for another S3 server) and the "
                            f"bucket name, or use a local {key}")
    return problems
