"""`tierzero bench`: the collective sweep in any launch mode, and the bandwidth probe.

Plain `tierzero bench` checks the config, writes <run.dir>/bench/config.yaml and spawns
launcher.nproc local ranks (in network namespaces with launcher.isolate_network); under
torchrun / srun / mpirun each process joins as one rank. Rank 0 prints the nccl-tests-style
table, writes the rows to <run.dir>/telemetry/collectives/ and the plot to <run.dir>/bench/.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import List, Mapping

from tierzero.launcher.config import ConfigError, RunConfig, resolve_paths, write_resolved
from tierzero.launcher.modes import Launch

log = logging.getLogger(__name__)
EXIT_OK = 0


def tierzero_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tierzero")
    except PackageNotFoundError:
        return "(not installed)"


def bench_dir(cfg: RunConfig) -> Path:
    return cfg.run_dir / "bench"


def write_bench_config(cfg: RunConfig) -> Path:
    """<run.dir>/bench/config.yaml (atomically); the run's own config.yaml is left alone."""
    return write_resolved(cfg, bench_dir(cfg))


def local_problems(cfg: RunConfig) -> List[str]:
    """What can be checked before spawning: the scopes against the local topology, and the backend."""
    from tierzero.collectives_bench.scopes import ScopeError, resolve_scopes
    from tierzero.launcher.discover import TopologyMismatch, build_topology

    problems = []
    if cfg.bench.backend == "mpi":
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


def run_probe_locally(cfg: RunConfig):
    """Spawn the local ranks to measure the topology (for `tierzero plan topology.measure=true`)."""
    from tierzero.launcher.supervisor import run_local
    from tierzero.parallel.topology import Level, Topology

    resolve_paths(cfg)
    config_path = write_bench_config(cfg)
    result = bench_dir(cfg) / "topology.json"
    if result.exists():
        result.unlink()
    print(f"tierzero: measuring link bandwidths with {cfg.launcher.nproc} local ranks ...", file=sys.stderr,
          flush=True)
    code = run_local(cfg, config_path, command=("bench", "--probe"))
    if code != 0 or not result.exists():
        raise RuntimeError(f"the bandwidth probe failed (exit {code}); its output is above")
    data = json.loads(result.read_text())
    return Topology(tuple(Level(**lv) for lv in data["levels"]), source="measured",
                    memory_per_rank_gb=data.get("memory_per_rank_gb"),
                    update_gelems_per_s=data.get("update_gelems_per_s"))


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def bench_rank(cfg: RunConfig, launch: Launch, env: Mapping[str, str], *, probe_only: bool = False) -> int:
    """One rank of the sweep (or of the probe alone) under any launcher."""
    from dataclasses import asdict

    from tierzero.collectives_bench.backends import MpiBackend, TorchBackend
    from tierzero.collectives_bench.probe import measure_topology
    from tierzero.collectives_bench.scopes import ScopeError, resolve_scopes
    from tierzero.collectives_bench.sizes import default_sizes, parse_sizes
    from tierzero.launcher.rank import join
    from tierzero.launcher.supervisor import EXIT_RESULTS_WRONG

    use_mpi = cfg.bench.backend == "mpi"
    if use_mpi and launch.mode != "mpi":
        raise ConfigError([local_problems(cfg)[0]])
    joined = join(cfg, launch, init_torch=not use_mpi)
    launch, topology = joined.launch, joined.topology
    if launch.world_size < 2:
        raise ConfigError(["tierzero bench needs at least 2 ranks; e.g. launcher.nproc=4"])
    backend = MpiBackend() if use_mpi else TorchBackend(joined.device)
    if not launch.supervised:
        resolve_paths(cfg)
    out_dir = bench_dir(cfg)
    if cfg.topology.measure or probe_only:
        topology = measure_topology(backend, topology)
    if probe_only:
        if launch.rank == 0:
            _write_json(out_dir / "topology.json", {"levels": [asdict(lv) for lv in topology.levels],
                                                     "memory_per_rank_gb": topology.memory_per_rank_gb,
                                                     "update_gelems_per_s": topology.update_gelems_per_s})
            print(f"measured topology: {topology.describe()}", flush=True)
        backend.barrier()
        return EXIT_OK
    try:
        scopes = resolve_scopes(cfg.bench.scopes, topology)
    except ScopeError as e:
        raise ConfigError([str(e)]) from e
    device_bytes = None
    if joined.device.startswith("cuda") and not use_mpi:
        import torch

        device_bytes = torch.cuda.get_device_properties(joined.device).total_memory
    sizes = default_sizes(device_bytes) if cfg.bench.sizes == "auto" else parse_sizes(cfg.bench.sizes)
    host = env.get("SLURMD_NODENAME") or socket.gethostname()
    hosts = backend.gather(host)
    labels = backend.broadcast(_labels(hosts, topology) if launch.rank == 0 else None)

    if launch.rank == 0 and not launch.supervised:
        write_bench_config(cfg)
    return _sweep(cfg, launch, backend, topology, scopes, sizes, labels, env, EXIT_RESULTS_WRONG)


def _labels(hosts, topology):
    from tierzero.collectives_bench.runner import host_labels

    return host_labels(hosts, topology)


def _sweep(cfg, launch, backend, topology, scopes, sizes, labels, env, exit_wrong: int) -> int:
    from tierzero.collectives_bench.report import compare_lines, footer_lines, format_line, header_lines
    from tierzero.collectives_bench.runner import run_sweep
    from tierzero.collectives_bench.sizes import format_size
    from tierzero.telemetry.sink import Telemetry

    is_root = launch.rank == 0
    out_dir = bench_dir(cfg)
    text: List[str] = []

    def say(line: str) -> None:
        text.append(line)
        print(line, flush=True)

    tel = None
    if is_root:
        attempt = int(env.get("TIERZERO_ATTEMPT", launch.restart_count))
        tel = Telemetry(cfg.telemetry, root=cfg.telemetry.dir or str(cfg.run_dir / "telemetry"), run=cfg.run.name,
                        attempt=attempt, rank=0, host=labels[0])
        by_host = {}
        for r, h in enumerate(labels):
            by_host.setdefault(h, []).append(r)
        b = cfg.bench
        say(f"# tierzero bench {tierzero_version()} | {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
        say(f"# backend {backend.name}" + (f" ({backend.version})" if hasattr(backend, "version") else "")
            + f" | {launch.world_size} ranks | launch {'local' if launch.supervised else launch.mode}")
        say(f"# topology {topology.describe()} ({topology.source})")
        say("# hosts " + "; ".join(f"{h}: ranks {_ranges(rs)}" for h, rs in by_host.items()))
        say(f"# sizes {format_size(sizes[0])}..{format_size(sizes[-1])} ({len(sizes)}) | dtypes {','.join(b.dtypes)} | "
            f"iters {b.iters} | warmup {b.warmup} | check {'on' if b.check else 'off'}")
        say("# scopes " + "; ".join(f"{s.name} = {len(s.groups)} x {s.nranks} ranks (link: {s.level})" for s in scopes))
        say("#")
        for line in header_lines():
            say(line)

    def progress(what: str, i: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r[{i}/{total}] {what:<40}", end="" if i < total else "\n", file=sys.stderr, flush=True)

    def on_rows(rows) -> None:
        for row in rows:
            tel.collective(**row.__dict__)

    try:
        sweep = run_sweep(backend, topology, cfg.bench, scopes, sizes, labels,
                          emit=lambda line: say(format_line(line)), on_rows=on_rows if is_root else (lambda r: None),
                          progress=progress)
    finally:
        if tel is not None:
            tel.close()
    wrong = 0
    if is_root:
        for line in footer_lines(sweep.lines):
            say(line)
        source = f"topology {topology.describe()} ({topology.source})"
        lines, _ = compare_lines(sweep.rows, cfg.bench.slow_fraction, source)
        say("#")
        for line in lines:
            say(line)
        wrong = sweep.wrong
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench.txt").write_text("\n".join(text) + "\n")
        try:
            from tierzero.collectives_bench.plot import write_plot

            png = write_plot(sweep.rows, out_dir / "busbw.png",
                             f"tierzero bench | {backend.name} | {launch.world_size} ranks | {topology.describe()}")
            say(f"# plot: {png}")
        except Exception as e:  # a missing font or backend must not cost the measurements
            log.warning("could not draw the plot: %s", e)
        say(f"# rows: {cfg.telemetry.dir or cfg.run_dir / 'telemetry'}/collectives (Parquet) | text: {out_dir / 'bench.txt'}")
        if wrong:
            say(f"# FAILED: {wrong} wrong element(s); the #wrong columns above show where")
    wrong = backend.broadcast(wrong)
    backend.barrier()
    if backend.name != "mpi":
        import torch.distributed as dist

        dist.destroy_process_group()
    return exit_wrong if wrong else EXIT_OK


def _ranges(ranks: List[int]) -> str:
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ",".join(parts)
