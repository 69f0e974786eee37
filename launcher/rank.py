"""One training rank, under any launcher (tierzero's supervisor, torchrun, srun, mpirun):
join, agree on the run's files, train with the launcher's hooks, report."""

from __future__ import annotations

import logging
import signal
import sys
from typing import Mapping, Optional

from tierzero.launcher import tierzero_version
from tierzero.launcher.config import ConfigError, RunConfig, to_yaml
from tierzero.launcher.discover import memory_budget_bytes
from tierzero.launcher.envvars import read_faults
from tierzero.launcher.exitcodes import Exit
from tierzero.launcher.modes import Launch
from tierzero.launcher.rundir import Heartbeat, RunPaths, find_hang, read_heartbeats
from tierzero.launcher.signals import StopSignals, Watchdog, signal_number, stop_with_parent
from tierzero.launcher.world import Joined, broadcast_object, host_name, join, leave, run_files
from tierzero.recipes.trainer import Hooks

log = logging.getLogger(__name__)


class RankHooks(Hooks):
    """The training loop's hooks on a launched rank: heartbeats, stop signals, and fault
    injection (launcher/faults.py) when a drill asks for it."""

    def __init__(self, heartbeat: Heartbeat, stops: StopSignals, faults: Hooks):
        self.beat, self.stops, self.faults = heartbeat, stops, faults

    def heartbeat(self, step: int, phase: str) -> None:
        self.beat(step, phase)

    def stop_requested(self) -> Optional[str]:
        return self.stops.requested()

    def before_step(self, step: int) -> None:
        self.faults.before_step(step)

    def loss_scale(self, step: int, micro: int, scale: float) -> float:
        return self.faults.loss_scale(step, micro, scale)

    def checkpoint_written(self, step: int) -> None:
        self.faults.checkpoint_written(step)


def _fault_hooks(env: Mapping[str, str], rank: int) -> Hooks:
    spec = read_faults(env)
    if not spec.any:
        return Hooks()
    from tierzero.launcher.faults import FaultHooks

    return FaultHooks(spec, rank)


def _measured(cfg: RunConfig, joined: Joined):
    """The topology with measured bandwidths when topology.measure is set (all ranks take part)."""
    if not cfg.topology.measure or joined.launch.world_size < 2 or joined.backend == "none":
        return joined.topology
    from tierzero.collectives_bench.backends import TorchBackend
    from tierzero.collectives_bench.probe import measure_topology

    return measure_topology(TorchBackend(joined.device), joined.topology)


def _start_watchdog(cfg: RunConfig, paths: RunPaths, launch: Launch, heartbeat: Heartbeat, tel) -> None:
    """Under a scheduler every rank watches for a hang itself (no supervisor does)."""
    def on_hang(hang, silent_s: float) -> None:
        text = hang.describe() if hang is not None else \
            f"hang: this rank made no progress for {silent_s:.0f} s (launcher.hang_timeout_s)"
        if launch.rank == 0 or hang is None or hang.names(launch.rank):  # not one line per rank at scale
            print(f"tierzero: rank {launch.rank}: {text}; exiting", file=sys.stderr, flush=True)
        tel.event("hang", detail=text, flush=True)

    timeout_s = cfg.launcher.hang_timeout_s
    Watchdog(heartbeat, timeout_s=timeout_s, on_hang=on_hang,
             find=lambda now: find_hang(read_heartbeats(paths.heartbeats, launch.world_size), timeout_s, now)).start()


def _join(cfg: RunConfig, launch: Launch):
    """Join the job, refuse a plan the engine cannot run on its topology (a scheduler's job was
    not checked before it started), measure the links when asked, and agree on the run's files."""
    from tierzero.parallel.engines import expert_errors, plan_errors

    joined = join(cfg, launch)
    problems = plan_errors(cfg.parallel, joined.topology) + expert_errors(cfg.parallel, cfg.moe, joined.topology)
    if problems:
        raise ConfigError(problems)
    topology = _measured(cfg, joined)
    paths, attempt, claim = run_files(cfg, joined.launch, program="run", config_path=lambda p: p.config,
                                      broadcast=lambda value: broadcast_object(joined, value))
    return joined, topology, paths, attempt, claim


def train_rank(cfg: RunConfig, launch: Launch, env: Mapping[str, str]) -> int:
    """Body of one training rank; returns its exit code."""
    from tierzero.checkpoint.export import InitFromError
    from tierzero.checkpoint.store import CheckpointError, ResumeError
    from tierzero.parallel.context import DistContext
    from tierzero.parallel.plans import PlanError
    from tierzero.recipes.trainer import NonFiniteError, Recipe, StopRequested, Trainer
    from tierzero.telemetry.sink import Telemetry

    # First thing: a stop signal during the rendezvous or the resume must not kill the rank
    # before it can checkpoint; it is acted on at the end of the first step.
    stops = StopSignals([signal.SIGTERM, signal.SIGINT, signal_number(cfg.launcher.requeue_signal)],
                        rank=launch.rank, quiet=launch.supervised).install()
    if launch.supervisor_pid:
        stop_with_parent(launch.supervisor_pid)
    joined, topology, paths, attempt, claim = _join(cfg, launch)  # claim: rank 0's lock, held to the end
    launch = joined.launch
    ctx = DistContext(rank=launch.rank, world_size=launch.world_size, local_rank=launch.local_rank,
                      local_world_size=launch.local_world_size, device=joined.device, backend=joined.backend,
                      topology=topology, host=host_name(env), attempt=attempt)
    tel = Telemetry(cfg.telemetry, root=paths.telemetry, run=cfg.run.name, attempt=attempt, rank=launch.rank,
                    host=ctx.host)
    if launch.local_rank == 0:
        tel.start_node_sampler()
    if launch.rank == 0:
        log.info("%s launch: %d ranks on %d node(s), backend %s, topology %s", "local" if launch.supervised
                 else launch.mode, launch.world_size, launch.num_nodes, ctx.backend, topology.describe())
    heartbeat = Heartbeat(paths.heartbeats, launch.rank)
    if not launch.supervised and cfg.launcher.hang_timeout_s:
        _start_watchdog(cfg, paths, launch, heartbeat, tel)
    try:
        trainer = Trainer(
            Recipe.of(cfg), ctx, tel, hooks=RankHooks(heartbeat, stops, _fault_hooks(env, launch.rank)),
            checkpoint_root=paths.checkpoints, peak_tflops=cfg.telemetry.peak_tflops,
            compile_cache_dir=str(paths.run_dir / "compile-cache"),
            memory_budget_bytes=memory_budget_bytes(cfg.parallel, topology, device=joined.device,
                                                    local_world_size=launch.local_world_size),
            run_state={"config": to_yaml(_without_secrets(cfg)), "tierzero_version": tierzero_version()})
        result = trainer.fit()
    except StopRequested as e:
        tel.event("signal", detail=str(e), step=e.step)
        if launch.rank == 0 and not launch.supervised:  # else the supervisor says it
            print(f"tierzero: {e}; exit {Exit.REQUEUE:d}: run again with the same run.dir to resume",
                  file=sys.stderr, flush=True)
        return Exit.REQUEUE
    except (CheckpointError, InitFromError, NonFiniteError, PlanError) as e:  # a message to act on: no traceback
        tel.event("error", detail=str(e))
        user_error = isinstance(e, (ResumeError, InitFromError, PlanError))
        if launch.rank == 0 or not user_error:
            print(f"tierzero: rank {launch.rank}: {e}", file=sys.stderr, flush=True)
        return Exit.USAGE if user_error else Exit.FAILURE
    except BaseException as e:
        tel.event("error", detail=f"{type(e).__name__}: {e}")
        raise
    finally:
        tel.close()
    stops.ignore_from_now()  # a signal after the last step is ignored, not fatal (nor a reason to requeue)
    code = _conclude(result, paths) if launch.rank == 0 else _verdict(result)
    leave(joined)
    return code


def _without_secrets(cfg: RunConfig) -> RunConfig:
    """The config a checkpoint records, without slurm.setup: its shell lines may export tokens,
    and checkpoints are copied and shared far more than the run folder's config.yaml."""
    import dataclasses

    setup = cfg.slurm.setup
    redacted = [f"<{len(setup)} line(s) of slurm.setup, not stored in checkpoints>"] if setup else setup
    return dataclasses.replace(cfg, slurm=dataclasses.replace(cfg.slurm, setup=redacted))


def _verdict(result) -> Exit:
    """Exit.CHECKPOINT_LOST when the run's newest usable checkpoint is older than its last save
    asked for (every rank knows the same SaveOutcome), else OK."""
    return Exit.CHECKPOINT_LOST if result.saves is not None and result.saves.lost else Exit.OK


def _conclude(result, paths: RunPaths) -> Exit:
    """Rank 0's last words: the summary, then which saves failed and what a rerun resumes from."""
    code, saves = _verdict(result), result.saves
    _say_done(result, paths, verb="trained" if code == Exit.CHECKPOINT_LOST else "done")
    if saves is not None and saves.failed:
        # the last line a person (or a Slurm output file) sees: what was lost, what a rerun resumes
        rerun = (f"; fix the storage (checkpoint.dir) and run again with the same run.dir to resume from step "
                 f"{saves.newest_step}" if saves.newest_step is not None else
                 "; fix the storage (checkpoint.dir): a rerun would start over")
        lost = f"{rerun}; exit {Exit.CHECKPOINT_LOST:d}" if code == Exit.CHECKPOINT_LOST else ""
        print(f"tierzero: {saves.words()}{lost}", file=sys.stderr, flush=True)
    return code


def _say_done(result, paths: RunPaths, verb: str = "done") -> None:
    floor = result.entropy_floor_nats
    gap = f" | gap {result.final_loss - floor:+.4f} nats" if floor is not None else ""
    floor_s = f"{floor:.4f} nats" if floor is not None else "unknown (real data)"
    print(f"{verb}: {len(result.losses)} steps in {result.wall_s:.1f} s | final loss {result.final_loss:.4f} "
          f"(mean of last {min(10, len(result.losses))} steps) | entropy floor {floor_s}{gap}", flush=True)
    print(f"run dir: {paths.run_dir}  (tierzero report {paths.run_dir})", flush=True)
