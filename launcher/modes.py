"""Who started this process? Detect the launch mode from the environment (pure).

Order matters: a rank tierzero's own supervisor spawned says so (launcher/envvars.py); then
torchrun's variables win (torchrun may run inside an srun step), then a Slurm task (srun), then
an MPI rank, else nothing started us and we spawn local ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from tierzero.launcher.envvars import read_supervised
from tierzero.slurm.nodelist import expand_nodelist, expand_tasks_per_node

MODES = ("local", "supervised", "torchrun", "slurm", "mpi")


@dataclass(frozen=True)
class Launch:
    mode: str
    """local (nothing started us: spawn ranks), supervised (a rank tierzero's supervisor spawned),
    torchrun, slurm or mpi."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    restart_count: int = 0
    """Times the scheduler restarted this job (Slurm requeue, torchrun restart); for a supervised
    rank, the attempt its supervisor numbered."""
    supervisor_pid: Optional[int] = None
    store: Optional[str] = None
    """A supervised rank's rendezvous file (instead of master_addr:master_port)."""

    @property
    def supervised(self) -> bool:
        """A rank of tierzero's own local supervisor (it writes the config and numbers attempts)."""
        return self.mode == "supervised"


def _int(env: Mapping[str, str], *names: str, default: Optional[int] = None) -> Optional[int]:
    for n in names:
        v = env.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                raise ValueError(f"environment variable {n}={v!r} is not an integer") from None
    return default


def slurm_port(job_id: int) -> int:
    """A rendezvous port derived from the job id, the same on every task of the job."""
    return 20000 + job_id % 20000


def detect_launch(env: Mapping[str, str]) -> Launch:
    for detect in (_supervised, _torchrun, _slurm_task, _mpi_rank):
        launch = detect(env)
        if launch is not None:
            return launch
    return Launch(mode="local")


def _supervised(env: Mapping[str, str]) -> Optional[Launch]:
    sup = read_supervised(env)
    if sup is None:
        return None
    return Launch(mode="supervised", rank=sup.rank, world_size=sup.world_size, local_rank=sup.local_rank,
                  local_world_size=sup.local_world_size, node_rank=sup.node_rank,
                  num_nodes=max(1, sup.world_size // sup.local_world_size), store=sup.store,
                  restart_count=sup.attempt, supervisor_pid=sup.supervisor_pid)


def _torchrun(env: Mapping[str, str]) -> Optional[Launch]:
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    world = _int(env, "WORLD_SIZE")
    local_world = _int(env, "LOCAL_WORLD_SIZE", default=world)
    return Launch(
        mode="torchrun",
        rank=_int(env, "RANK"),
        world_size=world,
        local_rank=_int(env, "LOCAL_RANK", default=0),
        local_world_size=local_world,
        node_rank=_int(env, "GROUP_RANK", "NODE_RANK", default=_int(env, "RANK") // local_world),
        num_nodes=max(1, world // local_world),
        master_addr=env.get("MASTER_ADDR"),
        master_port=_int(env, "MASTER_PORT"),
        restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT", default=0),
    )


def _slurm_task(env: Mapping[str, str]) -> Optional[Launch]:
    # srun sets SLURM_STEP_ID for each task; the batch script alone has SLURM_PROCID too
    # but is not a rank of the step, so it must not claim to be one.
    if "SLURM_PROCID" not in env or not ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    hosts = expand_nodelist(nodelist) if nodelist else []
    num_nodes = _int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", default=len(hosts) or 1)
    world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=1)
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    node_id = _int(env, "SLURM_NODEID", default=0)
    local_world = expand_tasks_per_node(per_node)[node_id] if per_node else max(1, world // num_nodes)
    job_id = _int(env, "SLURM_JOB_ID", "SLURM_JOBID", default=0)
    return Launch(
        mode="slurm",
        rank=_int(env, "SLURM_PROCID"),
        world_size=world,
        local_rank=_int(env, "SLURM_LOCALID", default=0),
        local_world_size=local_world,
        node_rank=node_id,
        num_nodes=num_nodes,
        master_addr=env.get("MASTER_ADDR") or (hosts[0] if hosts else None),
        master_port=_int(env, "MASTER_PORT", default=slurm_port(job_id)),
        restart_count=_int(env, "SLURM_RESTART_COUNT", default=0),
    )


def _mpi_rank(env: Mapping[str, str]) -> Optional[Launch]:
    rank = _int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
    world = _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    if rank is None or world is None:
        return None
    local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", default=0)
    local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", default=world)
    return Launch(
        mode="mpi",
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        node_rank=rank // max(1, local_world),
        num_nodes=max(1, world // max(1, local_world)),
        master_addr=env.get("MASTER_ADDR"),
        master_port=_int(env, "MASTER_PORT"),
    )
