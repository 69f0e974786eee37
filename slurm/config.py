"""Config section owned by Slurm: `slurm.*` (docs/slurm.md). Plain values, no torch."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional

COMMANDS = ("run", "bench")
# ASCII digits only (\d would take any Unicode digit, which Slurm does not), \Z not $ (which
# also matches before a trailing newline).
_MEM = re.compile(r"^[0-9]+[KMGT]?\Z")
# Slurm's --time forms (sbatch(1)): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME = re.compile(r"^(?:([0-9]+)-)?([0-9]+)(?::([0-9]+))?(?::([0-9]+))?\Z")


@dataclass
class SlurmConfig:
    nodes: int = 1
    """Nodes to allocate (#SBATCH --nodes); resubmitting a run with another value resumes it resharded."""
    ntasks_per_node: Optional[int] = None
    """Ranks per node, one Slurm task each; null = slurm.gpus_per_node when set, else 1."""
    gpus_per_node: int = 0
    """GPUs per node (#SBATCH --gpus-per-node); 0 = do not ask for GPUs."""
    cpus_per_task: Optional[int] = None
    """CPU cores per rank (#SBATCH --cpus-per-task, passed to srun too); null = Slurm's default."""
    mem: Optional[str] = None
    """Memory per node (#SBATCH --mem), e.g. 64G; 0 = all of it; null = Slurm's default."""
    time: str = "01:00:00"
    """Time limit of one attempt (#SBATCH --time): M, M:S, H:M:S, D-H, D-H:M or D-H:M:S."""
    partition: Optional[str] = None
    """#SBATCH --partition; null = the cluster's default partition."""
    account: Optional[str] = None
    """#SBATCH --account to charge; null = your default account."""
    qos: Optional[str] = None
    """#SBATCH --qos; null = the default quality of service."""
    constraint: Optional[str] = None
    """#SBATCH --constraint: node features the nodes must have, e.g. a100."""
    exclusive: bool = False
    """#SBATCH --exclusive: do not share the nodes with other jobs."""
    job_name: Optional[str] = None
    """#SBATCH --job-name; null = run.name."""
    output: Optional[str] = None
    """Slurm's stdout+stderr file, appended across requeues; relative = inside run.dir; null = slurm-%j.out (%A_%a for sweeps)."""
    extra_sbatch: List[str] = field(default_factory=list)
    """More #SBATCH options, one per item, e.g. [--mail-type=END, --reservation=big]."""
    setup: List[str] = field(default_factory=list)
    """Shell lines run before the ranks start (module load, source venv/bin/activate); used verbatim."""
    program: str = "tierzero"
    """How the nodes start tierzero, e.g. /opt/venv/bin/tierzero or 'python -m tierzero.launcher.cli'."""
    signal_margin_s: int = 120
    """Seconds before the time limit at which Slurm sends launcher.requeue_signal (#SBATCH --signal=B:USR2@N)."""
    requeue: bool = True
    """When the ranks checkpoint on a signal and exit 75, requeue the job (scontrol requeue); it resumes."""
    max_requeues: int = 20
    """Stop requeueing after this many restarts (SLURM_RESTART_COUNT)."""
    command: str = "run"
    """What the job runs: run (train) or bench (the collective sweep)."""
    sweep_nodes: List[int] = field(default_factory=list)
    """With slurm.command=bench: node counts to sweep, one job-array task each, e.g. [1,2,4,8]."""

    def ranks_per_node(self) -> int:
        if self.ntasks_per_node is not None:
            return self.ntasks_per_node
        return self.gpus_per_node or 1

    def errors(self) -> List[str]:
        errs = []
        if self.nodes < 1:
            errs.append(f"slurm.nodes={self.nodes} must be >= 1, e.g. slurm.nodes=2")
        if self.ntasks_per_node is not None and self.ntasks_per_node < 1:
            errs.append(f"slurm.ntasks_per_node={self.ntasks_per_node} must be >= 1 (one rank per task), "
                        "or null for slurm.gpus_per_node")
        if self.gpus_per_node < 0:
            errs.append(f"slurm.gpus_per_node={self.gpus_per_node} must be >= 0 (0 = no GPUs)")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            errs.append(f"slurm.cpus_per_task={self.cpus_per_task} must be >= 1, or null for Slurm's default")
        if self.mem is not None and not _MEM.match(str(self.mem)):
            errs.append(f"slurm.mem={self.mem!r} is not a Slurm memory size; write a number with an optional "
                        "K/M/G/T suffix, e.g. slurm.mem=64G (0 = all of the node's memory)")
        limit_s = time_limit_s(self.time)
        if limit_s is None:
            errs.append(f"slurm.time={self.time!r} is not a Slurm time limit; write M, M:S, H:M:S, D-H, D-H:M or "
                        "D-H:M:S, e.g. slurm.time=02:00:00")
        if self.signal_margin_s < 0:
            errs.append(f"slurm.signal_margin_s={self.signal_margin_s} must be >= 0, e.g. 120")
        elif limit_s is not None and self.signal_margin_s >= limit_s:
            errs.append(f"slurm.signal_margin_s={self.signal_margin_s} is not shorter than slurm.time={self.time} "
                        f"({limit_s} s): the checkpoint signal would come before the job starts; pick a margin "
                        f"below {limit_s} s, e.g. slurm.signal_margin_s={max(1, limit_s // 4)}")
        if self.max_requeues < 0:
            errs.append(f"slurm.max_requeues={self.max_requeues} must be >= 0 (0 = never requeue)")
        if self.command not in COMMANDS:
            errs.append(f"slurm.command={self.command!r} is not one of {list(COMMANDS)}")
        if self.sweep_nodes:
            bad = [n for n in self.sweep_nodes if not isinstance(n, int) or n < 1]
            if bad:
                errs.append(f"slurm.sweep_nodes={list(self.sweep_nodes)}: {bad} are not node counts >= 1")
            if self.command != "bench":
                errs.append(f"slurm.sweep_nodes={list(self.sweep_nodes)} sweeps the collective benchmark over node "
                            f"counts, but slurm.command={self.command}; add slurm.command=bench or drop "
                            "slurm.sweep_nodes")
        if not str(self.program).strip():
            errs.append("slurm.program='' is empty; give the command that starts tierzero on the nodes, "
                        "e.g. slurm.program=tierzero")
        return errs


def time_limit_s(text: str) -> Optional[int]:
    """Seconds of a Slurm time limit string (sbatch(1) --time), None when malformed."""
    m = _TIME.match(str(text))
    if not m or len(str(text)) > 32:  # 32 characters hold any real limit; int() refuses > 4300 digits
        return None
    days, a, b, c = m.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        h, mi, s = int(a), int(b or 0), int(c or 0)
        return int(days) * 86400 + h * 3600 + mi * 60 + s
    if c is not None:  # H:M:S
        return int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:  # M:S
        return int(a) * 60 + int(b)
    return int(a) * 60  # M
