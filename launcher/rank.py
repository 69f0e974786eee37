"""One rank's life: join the process group, build the topology, train, report."""

from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Mapping

from tierzero.launcher.config import ConfigError, RunConfig, check_world, resolve_paths, to_yaml, write_resolved
from tierzero.launcher.discover import TopologyMismatch, build_topology, memory_budget_bytes
from tierzero.launcher.modes import Launch
from tierzero.parallel.topology import Topology

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mpi_rendezvous(launch: Launch) -> Launch:
    """Under mpirun without MASTER_ADDR: rank 0 picks its address and a free port and
    broadcasts them with mpi4py (imported here only: it initialises MPI on import)."""
    from dataclasses import replace

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    info = None
    if comm.Get_rank() == 0:
        host = socket.gethostname()
        try:
            addr = socket.gethostbyname(host)
        except OSError:
            addr = "127.0.0.1"
        # All ranks on this host (mpirun -n N, one node): loopback always works.
        hosts = comm.gather(host, root=0)
        if len(set(hosts)) == 1:
            addr = "127.0.0.1"
        info = (launch.master_addr or addr, launch.master_port or free_port())
    else:
        comm.gather(socket.gethostname(), root=0)
    addr, port = comm.bcast(info, root=0)
    # nodes: ranks sharing a host form a node (mpich's MPI_LOCALNRANKS may be missing)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_world = local.Get_size()
    local_rank = local.Get_rank()
    local.Free()
    return replace(launch, master_addr=addr, master_port=port, local_rank=local_rank,
                   local_world_size=local_world, num_nodes=max(1, launch.world_size // local_world),
                   node_rank=launch.rank // local_world)


def pick_backend(requested: str) -> str:
    import torch

    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise ConfigError([
            "launcher.backend=nccl needs CUDA GPUs and none is visible here; "
            "use launcher.backend=gloo (or auto) on CPU"
        ])
    return requested


@dataclass(frozen=True)
class Joined:
    """What a rank knows once it has joined the job."""
    launch: Launch
    topology: Topology
    backend: str
    """torch.distributed backend in use (gloo / nccl), or 'none' without a process group."""
    device: str


def join(cfg: RunConfig, launch: Launch, *, init_torch: bool = True) -> Joined:
    """Rendezvous (mpi4py under mpirun), check the config against the world, build the
    topology, pick the backend and device, share the host's cores, and init the process group."""
    import torch
    import torch.distributed as dist

    if launch.mode == "mpi" and not (launch.master_addr and launch.master_port):
        launch = mpi_rendezvous(launch)
    problems = check_world(cfg, launch.world_size)
    try:
        topology = build_topology(cfg.topology, world_size=launch.world_size,
                                  ranks_per_node=launch.local_world_size, num_nodes=launch.num_nodes,
                                  inter_node_gbit=cfg.launcher.inter_node_gbit)
    except TopologyMismatch as e:
        problems.append(str(e))
    if problems:
        raise ConfigError(problems)

    backend = pick_backend(cfg.launcher.backend)
    # Ranks share the host's cores: give each its share so 4 ranks on 2 cores do not thrash.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cpus // max(1, launch.local_world_size)))
    device = "cpu"
    if backend == "nccl":
        device = f"cuda:{launch.local_rank}"
        torch.cuda.set_device(launch.local_rank)
    if launch.world_size > 1 and init_torch:
        os.environ["MASTER_ADDR"] = launch.master_addr or "127.0.0.1"
        os.environ["MASTER_PORT"] = str(launch.master_port)
        dist.init_process_group(
            backend, init_method="env://", rank=launch.rank, world_size=launch.world_size,
            timeout=datetime.timedelta(seconds=cfg.launcher.timeout_s),
        )
    return Joined(launch, topology, backend if (launch.world_size > 1 and init_torch) else "none", device)


def measured(cfg: RunConfig, joined: Joined) -> Topology:
    """The topology with measured bandwidths when topology.measure is set (all ranks take part)."""
    if not cfg.topology.measure or joined.launch.world_size < 2 or joined.backend == "none":
        return joined.topology
    from tierzero.collectives_bench.backends import TorchBackend
    from tierzero.collectives_bench.probe import measure_topology

    return measure_topology(TorchBackend(joined.device), joined.topology)


def agree_attempt(telemetry_root: str, run_name: str, joined: Joined) -> int:
    """One past the highest attempt the run's telemetry holds, as rank 0 sees it before anyone
    writes (the others wait for its broadcast)."""
    from tierzero.launcher.supervisor import next_attempt

    if joined.backend == "none":
        return next_attempt(telemetry_root, run_name)
    import torch
    import torch.distributed as dist

    buf = torch.zeros(1, dtype=torch.int64, device=joined.device)
    if joined.launch.rank == 0:
        buf[0] = next_attempt(telemetry_root, run_name)
    dist.broadcast(buf, src=0)
    return int(buf.item())


class Heartbeat:
    """`<run.dir>/.heartbeat/rank-<r>.json`: this rank's step and phase, rewritten atomically
    at every step; the local supervisor reads it to say where a failed rank was."""

    def __init__(self, folder, rank: int):
        self.path = folder / f"rank-{rank}.json"
        self.tmp = folder / f".rank-{rank}.json.tmp"
        self.last_time = None
        """Wall time of the last beat (None before the first): the watchdog's clock."""
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, step: int, phase: str) -> None:
        import json
        import time

        now = time.time()
        # pid: chaos drills (tests/test_supervision.py, benchmarks/chaos.py) kill -9 the rank by it
        self.tmp.write_text(json.dumps({"step": step, "phase": phase, "time": now, "pid": os.getpid()}))
        os.replace(self.tmp, self.path)
        self.last_time = now


def run_rank(cfg: RunConfig, launch: Launch, env: Mapping[str, str]) -> int:
    """Body of one rank under any launcher (our supervisor, torchrun, srun, mpirun)."""
    import torch.distributed as dist

    from tierzero.parallel.context import DistContext
    from tierzero.recipes.train import train
    from tierzero.telemetry.sink import Telemetry

    from tierzero.launcher.signals import StopSignals, signal_number

    # First thing: a stop signal during the rendezvous or the resume must not kill the rank
    # before it can checkpoint; it is acted on at the end of the first step.
    stops = StopSignals([signal.SIGTERM, signal.SIGINT, signal_number(cfg.launcher.requeue_signal)],
                        rank=launch.rank, quiet=launch.supervised).install()
    if launch.supervised and env.get("TIERZERO_SUPERVISOR_PID"):
        from tierzero.launcher.signals import stop_with_parent

        stop_with_parent(int(env["TIERZERO_SUPERVISOR_PID"]))
    joined = join(cfg, launch)
    launch, backend, device = joined.launch, joined.backend, joined.device
    topology = measured(cfg, joined)
    if not launch.supervised:
        resolve_paths(cfg)  # every rank, so all agree on the absolute run dir
    run_dir = cfg.run_dir
    if launch.rank == 0 and not launch.supervised:
        write_resolved(cfg, run_dir)
    telemetry_root = cfg.telemetry.dir or str(run_dir / "telemetry")
    if launch.supervised:
        attempt = int(env.get("TIERZERO_ATTEMPT", 0))
    else:  # a requeue, a torchrun restart or a resubmission of the same run dir: a new attempt each
        attempt = agree_attempt(telemetry_root, cfg.run.name, joined)
    ctx = DistContext(rank=launch.rank, world_size=launch.world_size, local_rank=launch.local_rank,
                      local_world_size=launch.local_world_size, device=device,
                      backend=backend,
                      topology=topology, host=env.get("SLURMD_NODENAME") or socket.gethostname(),
                      attempt=attempt)
    tel = Telemetry(cfg.telemetry, root=telemetry_root, run=cfg.run.name, attempt=attempt,
                    rank=launch.rank, host=ctx.host)
    if launch.local_rank == 0:
        tel.start_node_sampler()
    if launch.rank == 0:
        log.info("%s launch: %d ranks on %d node(s), backend %s, topology %s",
                 "local" if launch.supervised else launch.mode, launch.world_size, launch.num_nodes, ctx.backend, topology.describe())
    from tierzero.checkpoint.export import InitFromError
    from tierzero.recipes.train import NonFiniteError, StopRequested
    from tierzero.parallel.plan import PlanError
    from tierzero.checkpoint.store import CheckpointError, ResumeError
    from tierzero.launcher.bench import tierzero_version
    from tierzero.launcher.signals import EXIT_REQUEUE, Watchdog

    heartbeat = Heartbeat(run_dir / ".heartbeat", launch.rank)
    if not launch.supervised and cfg.launcher.hang_timeout_s:
        from tierzero.launcher.supervisor import find_hang, last_progress

        def on_hang(text: str) -> None:
            stalled = text.split("; waiting for them")[0]
            if launch.rank == 0 or f"rank {launch.rank} at" in stalled:  # not one line per rank at scale
                print(f"tierzero: rank {launch.rank}: {text}; exiting", file=sys.stderr, flush=True)
            tel.event("hang", detail=text, flush=True)

        Watchdog(heartbeat, timeout_s=cfg.launcher.hang_timeout_s, on_hang=on_hang,
                 describe=lambda now: find_hang(last_progress(run_dir, launch.world_size),
                                                cfg.launcher.hang_timeout_s, now)).start()
    try:
        budget = memory_budget_bytes(cfg.parallel, topology, device=device,
                                     local_world_size=launch.local_world_size)
        result = train(train_cfg=cfg.train, model_cfg=cfg.model, data_cfg=cfg.data, ctx=ctx,
                       telemetry=tel, parallel_cfg=cfg.parallel, memory_budget_bytes=budget,
                       peak_tflops=cfg.telemetry.peak_tflops, moe_cfg=cfg.moe, checkpoint_cfg=cfg.checkpoint,
                       checkpoint_root=cfg.checkpoint.dir or str(run_dir / "checkpoints"),
                       run_state={"config": to_yaml(cfg), "tierzero_version": tierzero_version()},
                       heartbeat=heartbeat, stop_requested=stops.requested)
    except StopRequested as e:
        tel.event("signal", detail=str(e), step=e.step)
        if launch.rank == 0 and not launch.supervised:  # else the supervisor says it
            print(f"tierzero: {e}; exit {EXIT_REQUEUE}: run again with the same run.dir to resume",
                  file=sys.stderr, flush=True)
        return EXIT_REQUEUE
    except (CheckpointError, InitFromError, NonFiniteError, PlanError) as e:  # a message to act on: no traceback
        tel.event("error", detail=str(e))
        tel.close()
        user_error = isinstance(e, (ResumeError, InitFromError, PlanError))
        if launch.rank == 0 or not user_error:
            print(f"tierzero: rank {launch.rank}: {e}", file=sys.stderr, flush=True)
        return 2 if user_error else 1
    except BaseException as e:
        tel.event("error", detail=f"{type(e).__name__}: {e}")
        raise
    finally:
        tel.close()  # the stop handlers stay: a signal after the last step is ignored, not fatal
    if launch.rank == 0:
        floor = result.entropy_floor_nats
        gap = f" | gap {result.final_loss - floor:+.4f} nats" if floor is not None else ""
        floor_s = f"{floor:.4f} nats" if floor is not None else "unknown (real data)"
        print(
            f"done: {len(result.losses)} steps in {result.wall_s:.1f} s | final loss {result.final_loss:.4f} "
            f"(mean of last {min(10, len(result.losses))} steps) | entropy floor {floor_s}{gap}",
            flush=True,
        )
        print(f"run dir: {run_dir}  (tierzero report {run_dir})", flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0
