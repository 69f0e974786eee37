"""A real Slurm on this host for development and CI: munged + slurmctld + N slurmd daemons
(Debian's slurmctld/slurmd/munge packages, built with MULTIPLE_SLURMD), each slurmd one
emulated node, all on 127.0.0.1, everything (config, key, state, spool, logs, pid files)
under one base folder.

`render_slurm_conf` is pure; `create_cluster` / `destroy_cluster` start and stop the daemons.
Only daemons this module started are ever stopped: a pid file under the base folder whose
process runs the expected binary (/proc/PID/exe) and names this base folder on its command
line. Notes on what the config needs and why: ../shared/notes/local-slurm.md, docs/slurm.md.

The base folder's slurm.conf and munge key decide what the daemons (started as root) run and
whom they trust, and its default lives in /tmp: a base folder, config or key that another user
owns or may write is refused (`check_base`). A new base folder is made 0700 with a MARKER file
in it; `destroy_cluster(purge=True)` deletes only a folder holding that marker.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

DEFAULT_BASE = "/tmp/tierzero-slurm"
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "munged", "mungekey", "sbatch", "srun", "scontrol", "sinfo")
INSTALL_HINT = "apt-get install -y --no-install-recommends " + " ".join(PACKAGES)
# What /proc/PID/exe of each daemon resolves to (Debian installs slurm*-wlm behind alternatives).
_EXE = {"munged": ("munged",), "slurmctld": ("slurmctld", "slurmctld-wlm"), "slurmd": ("slurmd", "slurmd-wlm")}
# Written by `up` into a base folder it created: `down --purge` deletes no folder without it.
MARKER = ".tierzero-slurm"


class ClusterError(RuntimeError):
    """The local cluster cannot be started or stopped; the message says why and what to do."""


class BaseFolderError(ClusterError):
    """The base folder (--dir) is not one tierzero may trust or delete: a user error."""


@dataclass(frozen=True)
class ClusterSpec:
    base: str
    num_nodes: int = 2
    cpus_per_node: int = 2
    hostname: str = "localhost"
    ctld_port: int = 16817
    first_node_port: int = 16818
    memory_mb_per_node: int = 1024

    def node_names(self) -> List[str]:
        return [f"n{i}" for i in range(1, self.num_nodes + 1)]

    @property
    def conf_path(self) -> str:
        return f"{self.base}/slurm.conf"

    @property
    def munge_socket(self) -> str:
        return f"{self.base}/munge/munge.socket.2"


def render_slurm_conf(spec: ClusterSpec) -> str:
    """slurm.conf for N emulated nodes on this host (pure)."""
    b = spec.base
    lines = [
        "# Written by `tierzero slurm up`: a real Slurm with emulated nodes on one host (docs/slurm.md).",
        "ClusterName=tierzero",
        f"SlurmctldHost={spec.hostname}(127.0.0.1)",
        f"SlurmctldPort={spec.ctld_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire=10: without it a requeued job waits ~2 min in PENDING (BeginTime).
        f"AuthInfo=socket={spec.munge_socket},cred_expire=10",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={b}/log/jobcomp.txt",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerParameters=bf_interval=5,sched_interval=5",
        "SlurmdParameters=config_overrides",
        "MpiDefault=none",
        "ReturnToService=2",
        "KillWait=5",
        "InactiveLimit=0",
        "MinJobAge=600",
        "MailProg=/bin/true",
        f"StateSaveLocation={b}/state",
        f"SlurmdSpoolDir={b}/spool/%n",
        f"SlurmctldPidFile={b}/run/slurmctld.pid",
        f"SlurmdPidFile={b}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={b}/log/slurmctld.log",
        f"SlurmdLogFile={b}/log/slurmd-%n.log",
    ]
    for i, name in enumerate(spec.node_names()):
        lines.append(
            f"NodeName={name} NodeHostname={spec.hostname} NodeAddr=127.0.0.1 Port={spec.first_node_port + i} "
            f"CPUs={spec.cpus_per_node} Sockets=1 CoresPerSocket={spec.cpus_per_node} ThreadsPerCore=1 "
            f"RealMemory={spec.memory_mb_per_node} State=UNKNOWN"
        )
    lines.append("PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def missing_binaries() -> List[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def install_packages() -> None:
    """apt-get install the Debian packages (root and apt-get only); raises ClusterError otherwise."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ClusterError(f"Slurm is not installed ({', '.join(missing_binaries())} missing). Install it as root: "
                           f"{INSTALL_HINT}")
    r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise ClusterError(f"`{INSTALL_HINT}` failed (exit {r.returncode}):\n{r.stderr[-2000:]}")


# ---- which daemons are ours ------------------------------------------------------------

def _pid_files(base: Path) -> Dict[str, Path]:
    """daemon label -> pid file (munged, slurmctld, slurmd-n1, ...)."""
    run = base / "run"
    out = {"munged": run / "munged.pid", "slurmctld": run / "slurmctld.pid"}
    for p in sorted(run.glob("slurmd-*.pid")):
        out[p.stem] = p
    return out


def _kind(label: str) -> str:
    return "slurmd" if label.startswith("slurmd-") else label


def our_pid(base: Path, label: str) -> Optional[int]:
    """The pid in `label`'s pid file when that process is alive, runs the expected binary and was
    started on this base folder's files; None otherwise (stale pid file, reused pid, someone else's)."""
    path = _pid_files(base).get(label, base / "run" / f"{label}.pid")
    try:
        pid = int(path.read_text().split()[0])
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return None
    if exe.removesuffix(" (deleted)") not in _EXE[_kind(label)] or not _names_base(cmdline, str(base)):
        return None
    return pid


def _names_base(cmdline: str, base: str) -> bool:
    """Whether an argument is `base` or a path under it (`-f B/slurm.conf`, `--socket=B/munge/...`):
    a plain substring test would take /tmp/a-2's daemons for /tmp/a's."""
    return any(arg == base or arg.startswith(base + "/") or f"={base}/" in arg for arg in cmdline.split("\0"))


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _stop(pid: int, timeout_s: float = 10.0) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


# ---- the base folder -------------------------------------------------------------------

def _user(uid: int) -> str:
    import pwd

    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _base_problems(root: Path) -> List[str]:
    """Why the base folder, its slurm.conf, munge/ or munge key cannot be trusted (empty: they can)."""
    me = os.geteuid()
    problems = []
    for path, kind in ((root, "dir"), (root / "slurm.conf", "file"), (root / "munge", "dir"),
                       (root / "munge" / "munge.key", "key"), (root / MARKER, "file")):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            problems.append(f"{path} is a symbolic link")
        elif not (stat.S_ISDIR if kind == "dir" else stat.S_ISREG)(st.st_mode):
            problems.append(f"{path} is not a {'folder' if kind == 'dir' else 'regular file'}")
        elif st.st_uid != me:
            problems.append(f"{path} is owned by {_user(st.st_uid)}, not by you, {_user(me)}")
        elif st.st_mode & 0o022:
            problems.append(f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")
        elif kind == "key" and st.st_mode & 0o077:
            problems.append(f"{path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):o})")
        if problems and path == root:
            break  # what lies inside a folder we do not trust is beside the point
    return problems


def check_base(base: str) -> Path:
    """The resolved base folder, or BaseFolderError when it (a symbolic link to it, its slurm.conf,
    munge/ or munge key) belongs to another user or is writable by anyone else: the config and the
    key decide what daemons started as this user run and whom they trust."""
    path = Path(base).absolute()
    me = os.geteuid()
    problems = []
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) and st.st_uid != me:
            problems.append(f"{path} is a symbolic link owned by {_user(st.st_uid)}, not by you, {_user(me)}")
    except FileNotFoundError:
        pass
    root = path.resolve()
    problems += _base_problems(root)
    if problems:
        raise BaseFolderError(
            f"refusing the base folder {root}: {'; '.join(problems)}. Its slurm.conf and munge key would decide what "
            f"the Slurm daemons run and whom they trust. Use a folder of your own (e.g. --dir ~/tierzero-slurm; "
            f"`tierzero slurm up` creates it, mode 0700) or, after checking what is in it, remove {root}")
    return root


def create_base(base: str) -> Path:
    """The resolved base folder, checked (check_base); when it does not exist yet, created with mode
    0700 and a MARKER file (O_EXCL|O_NOFOLLOW) that lets `down --purge` delete it later."""
    root = check_base(base)
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:  # ours already (checked above), or made a moment ago by someone else: check again
        return check_base(base)
    fd = os.open(root / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("created by `tierzero slurm up`; `tierzero slurm down --purge` deletes this folder\n")
    return check_base(base)


def _created_by_us(root: Path) -> bool:
    try:
        st = os.lstat(root / MARKER)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


# ---- up / down / status --------------------------------------------------------------

def client_env(base: str, env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """An environment in which sbatch/srun/scontrol talk to the cluster under `base`."""
    return dict(os.environ if env is None else env, SLURM_CONF=f"{base}/slurm.conf")


def _run(cmd: List[str], what: str, env=None) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise ClusterError(f"{what} failed: `{' '.join(cmd)}` exited {r.returncode}: {(r.stderr or r.stdout)[-1500:]}")


def _read_spec(base: Path) -> Optional[ClusterSpec]:
    conf = base / "slurm.conf"
    if not conf.is_file():
        return None
    text = conf.read_text()
    nodes = [ln for ln in text.splitlines() if ln.startswith("NodeName=")]
    cpus = int(nodes[0].split("CPUs=")[1].split()[0]) if nodes else 0
    return ClusterSpec(base=str(base), num_nodes=len(nodes), cpus_per_node=cpus)


def create_cluster(base: str = DEFAULT_BASE, num_nodes: int = 2, cpus_per_node: Optional[int] = None,
                   *, install: bool = False, timeout_s: float = 60.0, port: int = 16817) -> List[str]:
    """Bring the cluster up (idempotent: running daemons are kept, missing ones started) and wait
    until every node is idle. slurmctld listens on `port`, node i's slurmd on port + i.
    Returns what it did, one line each."""
    if num_nodes < 1:
        raise ClusterError(f"--nodes {num_nodes}: a cluster needs at least one node, e.g. --nodes 2")
    if missing_binaries():
        if not install:
            raise ClusterError(f"Slurm is not installed ({', '.join(missing_binaries())} missing); install it with "
                               f"`{INSTALL_HINT}` (root), or run `tierzero slurm up --install`")
        install_packages()
    root = create_base(base)
    cpus = cpus_per_node or os.cpu_count() or 1
    running = _read_spec(root)
    done: List[str] = []
    if running and any(our_pid(root, label) for label in _pid_files(root)):
        if running.num_nodes != num_nodes or running.cpus_per_node != cpus:
            raise ClusterError(
                f"a cluster with {running.num_nodes} node(s) x {running.cpus_per_node} CPUs already runs under "
                f"{root}; stop it first (`tierzero slurm down --dir {root}`) or use another --dir")
    spec = ClusterSpec(base=str(root), num_nodes=num_nodes, cpus_per_node=cpus, hostname=socket.gethostname(),
                       ctld_port=port, first_node_port=port + 1)
    for sub in ("run", "log", "state", "munge", *(f"spool/{n}" for n in spec.node_names())):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o755)  # munged insists: its socket folder must not be group/world writable
    conf = root / "slurm.conf"
    text = render_slurm_conf(spec)
    if not conf.is_file() or conf.read_text() != text:
        conf.write_text(text)
    env = client_env(str(root))

    key = root / "munge" / "munge.key"
    if not key.is_file():
        _run([_binary("mungekey"), "--create", f"--keyfile={key}"], "creating the munge key")
        os.chmod(key, 0o600)
    if our_pid(root, "munged") is None:
        _run([_binary("munged"), "--force", f"--socket={spec.munge_socket}", f"--key-file={key}",
              f"--pid-file={root}/run/munged.pid", f"--log-file={root}/log/munged.log",
              f"--seed-file={root}/munge/munged.seed"], "starting munged")
        done.append("started munged")
    if our_pid(root, "slurmctld") is None:
        # -c: a fresh queue on every start; no job of an earlier cluster comes back to life.
        _run([_binary("slurmctld"), "-c", "-i", "-f", str(conf)], "starting slurmctld", env=env)
        done.append("started slurmctld")
    for name in spec.node_names():
        if our_pid(root, f"slurmd-{name}") is None:
            _run([_binary("slurmd"), "-N", name, "-f", str(conf)], f"starting slurmd for node {name}", env=env)
            done.append(f"started slurmd {name}")
    _wait_idle(spec, env, timeout_s)
    return done or [f"already up: {num_nodes} node(s) under {root}"]


def _wait_idle(spec: ClusterSpec, env, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    states = ""
    while time.monotonic() < deadline:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=env)
        states = r.stdout.strip() or r.stderr.strip()
        seen = dict(line.split()[:2] for line in r.stdout.splitlines() if len(line.split()) >= 2)
        if r.returncode == 0 and all(seen.get(n, "").rstrip("*") in ("idle", "mix", "alloc")
                                     for n in spec.node_names()):
            return
        time.sleep(0.25)
    raise ClusterError(f"the nodes did not become idle within {timeout_s:.0f} s (sinfo: {states!r}); "
                       f"see the logs in {spec.base}/log/")


def destroy_cluster(base: str = DEFAULT_BASE, *, purge: bool = False) -> List[str]:
    """Stop the daemons this module started under `base` (slurmd first, munged last); with `purge`,
    delete `base` too when `up` created it (its MARKER file), else BaseFolderError after stopping."""
    root = check_base(base)
    done = []
    if our_pid(root, "slurmctld") is not None:
        done += _cancel_all_jobs(root)
    files = _pid_files(root)
    for label in sorted(files, key=lambda name: {"munged": 2, "slurmctld": 1}.get(name, 0)):
        pid = our_pid(root, label)
        if pid is not None:
            _stop(pid)
            done.append(f"stopped {label} (pid {pid})")
        files[label].unlink(missing_ok=True)
    if purge and root.is_dir():
        if not _created_by_us(root):
            raise BaseFolderError(
                f"{'; '.join(done) + '; ' if done else ''}not removing {root}: it holds no {MARKER} file, so "
                f"`tierzero slurm up` did not create it and it may hold files that are not tierzero's; "
                f"remove it yourself if it is yours")
        shutil.rmtree(root)
        done.append(f"removed {root}")
    return done or [f"nothing of ours runs under {root}"]


def _cancel_all_jobs(root: Path, timeout_s: float = 30.0) -> List[str]:
    """scancel every job of this cluster and wait until they are gone: stopping slurmd under a
    running job would leave its slurmstepd, batch shell and srun behind."""
    env = client_env(str(root))
    r = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env)
    jobs = r.stdout.split()
    if r.returncode != 0 or not jobs:
        return []
    subprocess.run(["scancel", *jobs], capture_output=True, text=True, env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = subprocess.run(["squeue", "-h", "-o", "%i %t"], capture_output=True, text=True, env=env)
        if r.returncode != 0 or not r.stdout.strip():
            break
        time.sleep(0.5)
    return [f"cancelled job(s) {' '.join(jobs)}"]


def leftover_job_processes(base: str) -> List[int]:
    """Pids of processes still running a job script of the cluster under `base` (its spool folder)."""
    spool = f"{Path(base).resolve()}/spool/"
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if spool in (proc / "cmdline").read_bytes().decode(errors="replace") and _alive(int(proc.name)):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def cluster_status(base: str = DEFAULT_BASE) -> List[str]:
    """One line per daemon (running or not) and, with a controller up, sinfo's view of the nodes."""
    root = check_base(base)  # sinfo loads what the slurm.conf names (PluginDir): only one of ours
    if not (root / "slurm.conf").is_file():
        return [f"no cluster under {root}; start one with `tierzero slurm up --nodes 2`"]
    lines = []
    for label in _pid_files(root):
        pid = our_pid(root, label)
        lines.append(f"{label:<12} {'running, pid ' + str(pid) if pid else 'not running'}")
    if our_pid(root, "slurmctld"):
        r = subprocess.run(["sinfo", "-N", "-o", "%N %P %t %c"], capture_output=True, text=True,
                           env=client_env(str(root)))
        lines += [ln for ln in (r.stdout or r.stderr).splitlines()]
    return lines


def is_up(base: str = DEFAULT_BASE) -> bool:
    root = Path(base).resolve()
    return (root / "slurm.conf").is_file() and our_pid(root, "slurmctld") is not None
