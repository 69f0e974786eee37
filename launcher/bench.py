"""`tierzero bench` ranks: the collective sweep, and the bandwidth probe alone (`--probe`).

Rank 0 prints the nccl-tests-style table, writes the rows to <run.dir>/telemetry/collectives/,
the text and the plot to <run.dir>/bench/, and the probe's measured levels to
<run.dir>/bench/topology.json. Launching (local spawn or joining a scheduler's job) is
launcher/program.py's.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from dataclasses import asdict
from typing import List, Mapping

from tierzero.launcher import tierzero_version
from tierzero.launcher.config import ConfigError, RunConfig
from tierzero.launcher.envvars import read_faults
from tierzero.launcher.exitcodes import Exit
from tierzero.launcher.modes import Launch
from tierzero.launcher.rundir import RunPaths, write_atomic
from tierzero.launcher.world import host_name, join, leave, run_files

log = logging.getLogger(__name__)


def bench_checks(cfg: RunConfig, *, spawning: bool = True) -> List[str]:
    """What can be checked before ranks start: the scopes against the local topology, and
    (when tierzero spawns the ranks) that the MPI backend was not asked for."""
    from tierzero.collectives_bench.scopes import ScopeError, resolve_scopes
    from tierzero.launcher.discover import TopologyMismatch, build_topology

    problems = []
    if spawning and cfg.bench.backend == "mpi":
        problems.append(
            "bench.backend=mpi times mpi4py collectives, so the ranks must be started by mpirun; run "
            f"`mpirun -n {cfg.launcher.nproc} tierzero bench bench.backend=mpi` (pip install '.[mpi]' brings "
            "mpich and mpi4py), or use bench.backend=torch"
        )
    try:
        topo = build_topology(cfg.topology, world_size=cfg.launcher.nproc, ranks_per_node=cfg.launcher.nproc,
                              num_nodes=1, inter_node_gbit=cfg.launcher.inter_node_gbit)
        resolve_scopes(cfg.bench.scopes, topo)
    except (TopologyMismatch, ScopeError) as e:
        problems.append(str(e))
    return problems


def _joined_backend(cfg: RunConfig, launch: Launch):
    """Join the job; the backend that times the collectives (torch's process group or MPI)."""
    from tierzero.collectives_bench.backends import MpiBackend, TorchBackend

    use_mpi = cfg.bench.backend == "mpi"
    if use_mpi and launch.mode != "mpi":
        raise ConfigError(bench_checks(cfg)[:1])
    joined = join(cfg, launch, init_torch=not use_mpi, training=False)  # nothing is trained
    if joined.launch.world_size < 2:
        raise ConfigError(["tierzero bench needs at least 2 ranks; e.g. launcher.nproc=4"])
    return joined, (MpiBackend() if use_mpi else TorchBackend(joined.device))


def probe_rank(cfg: RunConfig, launch: Launch, env: Mapping[str, str]) -> int:
    """Measure each topology level's bandwidth (what topology.measure=true does); rank 0 writes
    <run.dir>/bench/topology.json."""
    from tierzero.collectives_bench.probe import measure_topology

    joined, backend = _joined_backend(cfg, launch)
    paths, _, claim = run_files(cfg, joined.launch, program="probe", config_path=lambda p: p.bench_config,
                                broadcast=backend.broadcast)
    topology = measure_topology(backend, joined.topology)
    if joined.launch.rank == 0:
        write_atomic(paths.topology_json, json.dumps(
            {"levels": [asdict(lv) for lv in topology.levels], "memory_per_rank_gb": topology.memory_per_rank_gb,
             "update_gelems_per_s": topology.update_gelems_per_s,
             "codec_gelems_per_s": topology.codec_gelems_per_s}, indent=2) + "\n")
        print(f"measured topology: {topology.describe()}", flush=True)
    backend.barrier()
    if backend.name != "mpi":
        leave(joined)
    return Exit.OK


def bench_rank(cfg: RunConfig, launch: Launch, env: Mapping[str, str]) -> int:
    """One rank of the collective sweep; Exit.WRONG_RESULTS on every rank when any result is wrong."""
    from tierzero.collectives_bench.probe import measure_topology
    from tierzero.collectives_bench.runner import host_labels
    from tierzero.collectives_bench.scopes import ScopeError, resolve_scopes
    from tierzero.collectives_bench.sizes import default_sizes, parse_sizes

    joined, backend = _joined_backend(cfg, launch)
    paths, attempt, claim = run_files(cfg, joined.launch, program="bench", config_path=lambda p: p.bench_config,
                                      broadcast=backend.broadcast)  # claim: rank 0's lock, held to the end
    topology = measure_topology(backend, joined.topology) if cfg.topology.measure else joined.topology
    try:
        scopes = resolve_scopes(cfg.bench.scopes, topology)
    except ScopeError as e:
        raise ConfigError([str(e)]) from e
    device_bytes = None
    if joined.device.startswith("cuda") and backend.name != "mpi":
        import torch

        device_bytes = torch.cuda.get_device_properties(joined.device).total_memory
    sizes = default_sizes(device_bytes) if cfg.bench.sizes == "auto" else parse_sizes(cfg.bench.sizes)
    hosts = backend.gather(host_name(env))
    labels = backend.broadcast(host_labels(hosts, topology) if joined.launch.rank == 0 else None)
    sweep = _Sweep(cfg, joined.launch, backend, topology, paths, attempt, labels)
    wrong = sweep.run(scopes, sizes, corrupt_op=read_faults(env).bench_corrupt_op)
    wrong = backend.broadcast(wrong)
    backend.barrier()
    if backend.name != "mpi":
        import torch.distributed as dist

        dist.destroy_process_group()
    return Exit.WRONG_RESULTS if wrong else Exit.OK


class _Sweep:
    """The sweep and what rank 0 makes of it: the table as it goes, the footer and the
    comparison with the links' peak, the text, the plot and the Parquet rows."""

    def __init__(self, cfg: RunConfig, launch: Launch, backend, topology, paths: RunPaths, attempt: int, labels):
        self.cfg, self.launch, self.backend, self.topology = cfg, launch, backend, topology
        self.paths, self.attempt, self.labels = paths, attempt, labels
        self.root = launch.rank == 0
        self.text: List[str] = []

    def say(self, line: str) -> None:
        self.text.append(line)
        print(line, flush=True)

    def run(self, scopes, sizes, *, corrupt_op=None) -> int:
        """Every rank; returns the number of wrong elements (rank 0's count, 0 elsewhere)."""
        from tierzero.collectives_bench.report import format_line
        from tierzero.collectives_bench.runner import run_sweep
        from tierzero.telemetry.sink import Telemetry

        tel = None
        if self.root:
            tel = Telemetry(self.cfg.telemetry, root=self.paths.telemetry, run=self.cfg.run.name, attempt=self.attempt,
                            rank=0, host=self.labels[0])
            self.header(scopes, sizes)
        try:
            sweep = run_sweep(self.backend, self.topology, self.cfg.bench, scopes, sizes, self.labels,
                              emit=lambda line: self.say(format_line(line)),
                              on_rows=(lambda rows: [tel.record("collectives", **row.__dict__) for row in rows])
                              if self.root else (lambda rows: None),
                              progress=_progress, corrupt_op=corrupt_op)
        finally:
            if tel is not None:
                tel.close()
        if self.root:
            self.footer(sweep)
        return sweep.wrong if self.root else 0

    def header(self, scopes, sizes) -> None:
        from tierzero.collectives_bench.report import header_lines
        from tierzero.collectives_bench.sizes import format_size

        by_host = {}
        for r, h in enumerate(self.labels):
            by_host.setdefault(h, []).append(r)
        b, backend, topo = self.cfg.bench, self.backend, self.topology
        self.say(f"# tierzero bench {tierzero_version()} | {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
        self.say(f"# backend {backend.name}" + (f" ({backend.version})" if hasattr(backend, "version") else "")
                 + f" | {self.launch.world_size} ranks | launch {'local' if self.launch.supervised else self.launch.mode}")
        self.say(f"# topology {topo.describe()} ({topo.source})")
        self.say("# hosts " + "; ".join(f"{h}: ranks {_ranges(rs)}" for h, rs in by_host.items()))
        self.say(f"# sizes {format_size(sizes[0])}..{format_size(sizes[-1])} ({len(sizes)}) | dtypes "
                 f"{','.join(b.dtypes)} | iters {b.iters} | warmup {b.warmup} | check {'on' if b.check else 'off'}")
        self.say("# scopes " + "; ".join(f"{s.name} = {len(s.groups)} x {s.nranks} ranks (link: {s.level})"
                                         for s in scopes))
        self.say("#")
        for line in header_lines():
            self.say(line)

    def footer(self, sweep) -> None:
        from tierzero.collectives_bench.report import compare_lines, footer_lines

        for line in footer_lines(sweep.lines):
            self.say(line)
        lines, _ = compare_lines(sweep.rows, self.cfg.bench.slow_fraction,
                                 f"topology {self.topology.describe()} ({self.topology.source})")
        self.say("#")
        for line in lines:
            self.say(line)
        out_dir = self.paths.bench
        write_atomic(out_dir / "bench.txt", "\n".join(self.text) + "\n")
        try:
            from tierzero.collectives_bench.plot import write_plot

            png = write_plot(sweep.rows, out_dir / "busbw.png", f"tierzero bench | {self.backend.name} | "
                             f"{self.launch.world_size} ranks | {self.topology.describe()}")
            self.say(f"# plot: {png}")
        except Exception as e:  # a missing font or backend must not cost the measurements
            log.warning("could not draw the plot: %s", e)
        self.say(f"# rows: {self.paths.telemetry}/collectives (Parquet) | text: {out_dir / 'bench.txt'}")
        if sweep.wrong:
            self.say(f"# FAILED: {sweep.wrong} wrong element(s); the #wrong columns above show where")


def _progress(what: str, i: int, total: int) -> None:
    if sys.stderr.isatty():
        print(f"\r[{i}/{total}] {what:<40}", end="" if i < total else "\n", file=sys.stderr, flush=True)


def _ranges(ranks: List[int]) -> str:
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ",".join(parts)
