"""Joining the job, for every program's ranks (training, benchmark, probe): rendezvous, backend
and device, the process group, then the run's files (config, attempt) agreed by all ranks."""

from __future__ import annotations

import atexit
import datetime
import os
import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Tuple

from tierzero.launcher.config import ConfigError, RunConfig, check_world, shared_storage_errors, to_yaml
from tierzero.launcher.devices import Visible, choose
from tierzero.launcher.discover import TopologyMismatch, build_topology
from tierzero.launcher.modes import Launch
from tierzero.launcher.rundir import (Claim, RunPaths, claim_run_dir, next_attempt, resolved, storage_problems,
                                      write_atomic)
from tierzero.parallel.host import return_large_frees
from tierzero.parallel.topology import Topology


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_name(env: Mapping[str, str]) -> str:
    """This rank's node: Slurm's name for it (emulated nodes share one hostname), else the host's."""
    return env.get("SLURMD_NODENAME") or socket.gethostname()


def mpi_rendezvous(launch: Launch) -> Launch:
    """Under mpirun without MASTER_ADDR: rank 0 picks its address and a free port and
    broadcasts them with mpi4py (imported here only: it initialises MPI on import)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    host = socket.gethostname()
    hosts = comm.gather(host, root=0)
    info = None
    if comm.Get_rank() == 0:
        try:
            addr = socket.gethostbyname(host)
        except OSError:
            addr = "127.0.0.1"
        if len(set(hosts)) == 1:  # all ranks on this host (mpirun -n N, one node): loopback always works
            addr = "127.0.0.1"
        info = (launch.master_addr or addr, launch.master_port or free_port())
    addr, port = comm.bcast(info, root=0)
    # nodes: ranks sharing a host form a node (mpich's MPI_LOCALNRANKS may be missing)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_world, local_rank = local.Get_size(), local.Get_rank()
    local.Free()
    return replace(launch, master_addr=addr, master_port=port, local_rank=local_rank,
                   local_world_size=local_world, num_nodes=max(1, launch.world_size // local_world),
                   node_rank=launch.rank // local_world)


def pick_backend(requested: str, launch: Launch, env: Mapping[str, str]) -> Tuple[str, str, Optional[str]]:
    """(backend, device, note) for this rank: launcher/devices.py decides from what it sees."""
    try:
        return choose(requested, local_rank=launch.local_rank, local_world_size=launch.local_world_size,
                      visible=Visible.here(env), mode=launch.mode)
    except ValueError as e:
        raise ConfigError(str(e).splitlines()) from None


@dataclass(frozen=True)
class Joined:
    """What a rank knows once it has joined the job."""
    launch: Launch
    topology: Topology
    backend: str
    """torch.distributed backend in use (gloo / nccl), or 'none' without a process group."""
    device: str


def join(cfg: RunConfig, launch: Launch, *, init_torch: bool = True, training: bool = True) -> Joined:
    """Rendezvous (mpi4py under mpirun), check the config against the world (`training`: the
    batch split and parallel.ep too), build the topology, pick the backend and device, share
    the host's cores, and init the process group."""
    import torch
    import torch.distributed as dist

    if launch.mode == "mpi" and not (launch.master_addr and launch.master_port):
        launch = mpi_rendezvous(launch)
    problems = (check_world(cfg, launch.world_size) if training
                else shared_storage_errors(cfg, launch.world_size, "this launch"))
    try:
        topology = build_topology(cfg.topology, world_size=launch.world_size, ranks_per_node=launch.local_world_size,
                                  num_nodes=launch.num_nodes, inter_node_gbit=cfg.launcher.inter_node_gbit)
    except TopologyMismatch as e:
        problems.append(str(e))
    if problems:
        raise ConfigError(problems)

    return_large_frees()
    backend, device, note = pick_backend(cfg.launcher.backend, launch, os.environ)
    if note and launch.rank == 0:
        print(f"tierzero: {note}", file=sys.stderr, flush=True)
    # Ranks share the host's cores: give each its share so 4 ranks on 2 cores do not thrash.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cpus // max(1, launch.local_world_size)))
    if backend == "nccl":
        torch.cuda.set_device(device)
    if launch.world_size > 1 and init_torch:
        if launch.store:  # tierzero's own local ranks: a file in the run folder, no network listener
            init_method = f"file://{launch.store}"
        else:
            os.environ["MASTER_ADDR"] = launch.master_addr or "127.0.0.1"
            os.environ["MASTER_PORT"] = str(launch.master_port)
            init_method = "env://"
        # device_id binds the group to this rank's GPU: NCCL connects eagerly, and the first
        # collective does not guess the device
        dist.init_process_group(backend, init_method=init_method, rank=launch.rank, world_size=launch.world_size,
                                timeout=datetime.timedelta(seconds=cfg.launcher.timeout_s),
                                device_id=torch.device(device) if backend == "nccl" else None)
        # however the rank ends (an error, a user error's exit 2), tear the group down before the
        # interpreter does: a process group destroyed during interpreter shutdown can abort the rank
        atexit.register(_destroy_group)
    return Joined(launch, topology, backend if (launch.world_size > 1 and init_torch) else "none", device)


def broadcast_object(joined: Joined, obj: Any) -> Any:
    """Rank 0's `obj` on every rank, through the torch process group (as is without one)."""
    if joined.backend == "none":
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_files(cfg: RunConfig, launch: Launch, *, program: str, config_path: Callable[[RunPaths], Path],
              broadcast: Callable[[Any], Any]) -> Tuple[RunPaths, int, Optional[Claim]]:
    """The run's paths and this launch's attempt, the same on every rank. Under a scheduler (no
    local supervisor did it) rank 0 claims the run folder (checks it is this run's, locks it for
    as long as it lives: keep the returned Claim), writes the resolved config and numbers the
    attempt from the telemetry before anyone writes any; the others wait for its broadcast and
    share its verdict on the folder."""
    paths = RunPaths.of(cfg)
    if launch.supervised:  # the supervisor claimed the folder, wrote the config, numbered the attempt
        return paths, launch.restart_count, None
    claim, verdict = None, None
    if launch.rank == 0:
        try:
            problems = storage_problems(cfg)
            if problems:
                raise ConfigError(problems)
            claim = claim_run_dir(cfg, paths, program=program)
            write_atomic(config_path(paths), to_yaml(resolved(cfg, paths)))
            verdict = next_attempt(paths.telemetry, cfg.run.name)
        except ConfigError as e:
            verdict = e.problems
    verdict = broadcast(verdict)
    if not isinstance(verdict, int):
        raise ConfigError(verdict)
    return paths, verdict, claim


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # the process is ending: nothing is left to tell
            pass


def leave(joined: Joined) -> None:
    """Every rank together: wait for the others, then tear the process group down."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
