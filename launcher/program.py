"""The programs tierzero launches (training, the collective sweep, the bandwidth probe), and the
one launch path they share.

Started by a scheduler (torchrun, srun, mpirun) or by tierzero's own supervisor, a process runs
the program's rank body. Started by nothing (plain `tierzero run`), it checks what can be
checked before any rank exists -- the world, the topology, what the engine can run, the
emulated network -- writes the resolved config into the run folder, and spawns
launcher.nproc supervised ranks (launcher/supervisor.py).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Mapping, Tuple

from tierzero.launcher.config import ConfigError, RunConfig, check_world, to_yaml
from tierzero.launcher.discover import TopologyMismatch, build_topology
from tierzero.launcher.modes import Launch
from tierzero.launcher.exitcodes import Exit
from tierzero.launcher.rundir import RunPaths, claim_run_dir, resolved, storage_problems, write_atomic
from tierzero.launcher.supervisor import isolation_errors, run_local


@dataclass(frozen=True)
class Program:
    name: str
    argv: Tuple[str, ...]
    """What a rank runs: `tierzero <argv...> <config.yaml>`."""
    rank_main: str
    """`module:function` of the rank body, (cfg, launch, env) -> exit code; imported when run."""
    config_path: Callable[[RunPaths], Path]
    """Where the resolved config is written (the ranks read it)."""
    local_checks: Callable[[RunConfig], List[str]]
    """Problems found before spawning local ranks (each a config error: exit 2, nothing written)."""
    restart: bool
    """A crashed group is started again from its newest checkpoint."""
    announce: Callable[[RunConfig, RunPaths], str]

    def rank_body(self) -> Callable[[RunConfig, Launch, Mapping[str, str]], int]:
        module, _, function = self.rank_main.partition(":")
        return getattr(importlib.import_module(module), function)


def _local_topology(cfg: RunConfig, problems: List[str]):
    try:
        return build_topology(cfg.topology, world_size=cfg.launcher.nproc, ranks_per_node=cfg.launcher.nproc,
                              num_nodes=1, inter_node_gbit=cfg.launcher.inter_node_gbit)
    except TopologyMismatch as e:
        problems.append(str(e))
        return None


def _network_checks(cfg: RunConfig) -> List[str]:
    return isolation_errors(cfg) if cfg.launcher.isolate_network else []


def _device_checks(cfg: RunConfig) -> List[str]:
    """launcher.backend=nccl with fewer GPUs than launcher.nproc: said now, not as an "invalid
    device ordinal" from every rank after the spawn."""
    if cfg.launcher.backend != "nccl":
        return []
    from tierzero.launcher.devices import Visible, backend_errors

    return backend_errors(cfg.launcher.backend, local_world_size=cfg.launcher.nproc, visible=Visible.here(os.environ),
                          mode="local")


def training_checks(cfg: RunConfig) -> List[str]:
    """The world and the topology of launcher.nproc local ranks, a named plan the engine
    cannot run on it (what the engine cannot do regardless of the topology is already a config
    error: parallel.engines.engine_errors), and the local files the run would read first."""
    from tierzero.parallel.engines import expert_errors, plan_errors

    problems = check_world(cfg, cfg.launcher.nproc)
    topo = _local_topology(cfg, problems)
    if topo is not None:
        problems += plan_errors(cfg.parallel, topo) + expert_errors(cfg.parallel, cfg.moe, topo)
    return problems + _input_checks(cfg) + storage_problems(cfg) + _network_checks(cfg) + _device_checks(cfg)


def _input_checks(cfg: RunConfig) -> List[str]:
    """A local checkpoint.resume or checkpoint.init_from that is not there: found now, not by
    every rank after the run folder, its config and telemetry were written."""
    problems = []
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and "://" not in resume and not Path(resume).is_dir():
        hint = (f"; to start from a weights file use checkpoint.init_from={resume}"
                if resume.endswith(".safetensors") and Path(resume).is_file() else "")
        problems.append(f"checkpoint.resume={resume} is not a folder; give a committed checkpoint folder "
                        f"(`tierzero ckpt list DIR` lists them), or checkpoint.resume=auto{hint}")
    elif resume not in ("auto", "none") and "://" not in resume:
        from tierzero.checkpoint.store import CheckpointError, locate_step

        try:  # another format, or a checkpoints folder with nothing committed: said before anything is written
            locate_step(resume, key="checkpoint.resume")
        except CheckpointError as e:
            problems.append(str(e))
    init = cfg.checkpoint.init_from
    if init and "://" not in init:
        folder = Path(init)
        if folder.is_dir() and not any((folder / n).is_file() for n in ("model.safetensors",
                                                                          "model.safetensors.index.json")):
            problems.append(f"checkpoint.init_from={init} is a folder without model.safetensors or "
                            "model.safetensors.index.json; give a folder `tierzero ckpt export` or transformers' "
                            "save_pretrained wrote, or a .safetensors file")
        elif not folder.is_dir() and not folder.is_file():
            problems.append(f"checkpoint.init_from={init} is neither a file nor a folder; give a .safetensors file "
                            "or a Hugging Face folder (`tierzero ckpt export STEP_DIR OUT_DIR` writes one)")
    return problems


def bench_checks(cfg: RunConfig) -> List[str]:
    from tierzero.launcher.bench import bench_checks as checks

    return checks(cfg) + storage_problems(cfg) + _network_checks(cfg) + _device_checks(cfg)


def probe_checks(cfg: RunConfig) -> List[str]:
    from tierzero.launcher.bench import bench_checks as checks

    return checks(cfg, spawning=False) + storage_problems(cfg) + _network_checks(cfg) + _device_checks(cfg)


PROGRAMS = {p.name: p for p in (
    Program("run", ("run",), "tierzero.launcher.rank:train_rank", lambda paths: paths.config, training_checks,
            restart=True, announce=lambda cfg, paths: f"tierzero run: {cfg.run.name} -> {paths.run_dir} "
                                                      f"({cfg.launcher.nproc} local ranks)"),
    Program("bench", ("bench",), "tierzero.launcher.bench:bench_rank", lambda paths: paths.bench_config, bench_checks,
            restart=False, announce=lambda cfg, paths: f"tierzero bench: collective sweep, {cfg.launcher.nproc} "
                                                       f"local ranks -> {paths.bench}"),
    Program("probe", ("bench", "--probe"), "tierzero.launcher.bench:probe_rank", lambda paths: paths.bench_config,
            probe_checks, restart=False,
            announce=lambda cfg, paths: f"tierzero bench: measuring link bandwidths, {cfg.launcher.nproc} local "
                                        f"ranks -> {paths.bench}"),
)}


def launch_program(program: Program, cfg: RunConfig, launch: Launch, env: Mapping[str, str]) -> int:
    """Run `program`: as one rank of a job something else started, or as the supervisor of
    launcher.nproc local ranks."""
    if launch.mode != "local":
        return program.rank_body()(cfg, launch, env)
    problems = program.local_checks(cfg)
    if problems:  # all of them at once, before anything is written
        raise ConfigError(problems)
    paths = RunPaths.of(cfg)
    with claim_run_dir(cfg, paths, program=program.name) as claim:  # this run's folder, locked
        config_path = write_atomic(program.config_path(paths), to_yaml(resolved(cfg, paths)))
        print(program.announce(cfg, paths), flush=True)
        code = run_local(cfg, paths, config_path, program.argv, restart=program.restart)
        if code == Exit.USAGE:  # every rank refused to start (their messages are above): leave no trace
            claim.undo()
        return code


def measure_locally(cfg: RunConfig):
    """topology.measure=true outside a job (`tierzero plan`): spawn the probe's local ranks and
    read back the topology they measured."""
    from tierzero.parallel.topology import Level, Topology

    probe = PROGRAMS["probe"]
    problems = probe.local_checks(cfg)
    if problems:
        raise ConfigError(problems)
    paths = RunPaths.of(cfg)
    with claim_run_dir(cfg, paths, program=probe.name):
        config_path = write_atomic(probe.config_path(paths), to_yaml(resolved(cfg, paths)))
        paths.topology_json.unlink(missing_ok=True)  # the previous probe's: a failed one must not pass for new
        print(f"tierzero: measuring link bandwidths with {cfg.launcher.nproc} local ranks ...", file=sys.stderr,
              flush=True)
        code = run_local(cfg, paths, config_path, probe.argv, restart=False)
    if code != 0 or not paths.topology_json.exists():
        raise ConfigError([f"the bandwidth probe failed (exit {code}); its output is above"])
    data = json.loads(paths.topology_json.read_text())
    return Topology(tuple(Level(**lv) for lv in data["levels"]), source="measured",
                    memory_per_rank_gb=data.get("memory_per_rank_gb"),
                    update_gelems_per_s=data.get("update_gelems_per_s"),
                    codec_gelems_per_s=data.get("codec_gelems_per_s"))
