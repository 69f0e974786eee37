"""`tierzero bench` against references, all measured in one run of this script.

1. Harness overhead: the busbw `tierzero bench` reports vs a bare torch.distributed timing
   loop of the same call on the same ranks and process group, the two interleaved round by
   round (target: within 5%).
2. gloo vs MPI on this host: `tierzero bench` (torch/gloo) and `mpirun tierzero bench
   bench.backend=mpi` (mpich from PyPI) at the same sizes.
3. Shaped links: emulated 2 nodes x 2 ranks in network namespaces with `tc tbf` at
   --gbit; the cross:node rows against the shaped per-rank rate (target: within 20%), and
   every scope against the link-load model (needs root).

    python benchmarks/collectives.py                       # all three parts
    python benchmarks/collectives.py --only overhead --rounds 7
    python benchmarks/collectives.py --only shaped --gbit 0.5 1 2

Prints markdown tables (pasted into docs/benchmarks.md) and, with --json, the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OVERHEAD_OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all", "sendrecv")
OVERHEAD_SIZES = (1 << 20, 4 << 20, 16 << 20)


# ---- 1. harness overhead ------------------------------------------------------------------

def _bare_call(dist, op, count, n, rank):
    """The plainest torch.distributed call for `op` on the whole world: what a user would time."""
    import torch

    c = count // n
    if op == "all_reduce":
        x = torch.zeros(count)
        return lambda: dist.all_reduce(x)
    if op == "broadcast":
        x = torch.zeros(count)
        return lambda: dist.broadcast(x, src=0)
    if op == "all_gather":
        out, inp = torch.zeros(count), torch.zeros(c)
        f = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return lambda: f(out, inp)
    if op == "reduce_scatter":
        out, inp = torch.zeros(c), torch.zeros(count)
        f = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return lambda: f(out, inp)
    if op == "all_to_all":
        out, inp = torch.zeros(count), torch.zeros(count)
        return lambda: dist.all_to_all_single(out, inp)
    if op == "sendrecv":
        s, r = torch.zeros(count), torch.zeros(count)

        def call():
            ops = [dist.P2POp(dist.isend, s, (rank + 1) % n), dist.P2POp(dist.irecv, r, (rank - 1) % n)]
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        return call
    raise ValueError(op)


def _overhead_rank(rank, n, store, rounds, iters, result_path):
    import torch
    import torch.distributed as dist

    from tierzero.collectives_bench.backends import TorchBackend
    from tierzero.collectives_bench.config import BenchConfig
    from tierzero.collectives_bench.formulas import busbw_gbps, element_count
    from tierzero.collectives_bench.runner import run_sweep
    from tierzero.collectives_bench.scopes import resolve_scopes
    from tierzero.parallel.topology import flat_topology

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=n)
    topo = flat_topology(n, 1)
    backend = TorchBackend("cpu")
    scopes = resolve_scopes(["global"], topo)
    out = {}
    for op in OVERHEAD_OPS:
        for size in OVERHEAD_SIZES:
            count = element_count(op, size, 4, n)
            bare = _bare_call(dist, op, count, n, rank)
            for _ in range(3):
                bare()
            tool_bus, bare_bus = [], []
            for _ in range(rounds):
                # the tool: the whole harness (warm-up, barrier, timed block, check, gather)
                cfg = BenchConfig(ops=[op], sizes=str(size), iters=iters, warmup=1, scopes=["global"])
                sweep = run_sweep(backend, topo, cfg, scopes, [size], ["h"] * n)
                if rank == 0:
                    placement = "out" if op in ("all_gather", "reduce_scatter") else sweep.rows[0].placement
                    tool_bus.append(next(r.busbw_gbps for r in sweep.rows if r.placement == placement))
                # the bare loop, averaged over ranks the same way
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(iters):
                    bare()
                t = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64)
                dist.all_reduce(t)
                bare_bus.append(busbw_gbps(op, n, count * 4, t.item() / n))
            if rank == 0:
                out[f"{op}/{size}"] = {"tool": tool_bus, "bare": bare_bus}
    if rank == 0:
        Path(result_path).write_text(json.dumps(out))
    dist.destroy_process_group()


def overhead(nproc: int, rounds: int, iters: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        store, result = f"{tmp}/store", f"{tmp}/result.json"
        mp.spawn(_overhead_rank, args=(nproc, store, rounds, iters, result), nprocs=nproc)
        raw = json.loads(Path(result).read_text())
    print(f"\n### Harness overhead: `tierzero bench` vs a bare torch.distributed loop ({nproc} gloo ranks, "
          f"{rounds} interleaved rounds x {iters} iters, median busbw)\n")
    print("| op | size | tool busbw GB/s | bare busbw GB/s | tool / bare |")
    print("|---|---|---|---|---|")
    ratios = []
    for key, v in raw.items():
        op, size = key.split("/")
        tool, bare = statistics.median(v["tool"]), statistics.median(v["bare"])
        ratios.append(tool / bare)
        print(f"| {op} | {int(size) >> 20} MiB | {tool:.3f} | {bare:.3f} | {tool / bare:.3f} |")
    print(f"\nmedian ratio {statistics.median(ratios):.3f}, geometric mean "
          f"{statistics.geometric_mean(ratios):.3f}, range {min(ratios):.3f}..{max(ratios):.3f}")
    return raw


# ---- 2 and 3: through the CLI -------------------------------------------------------------

def _cli_bench(args, run_dir: Path, mpirun: int = 0, timeout_s: float = 1800):
    cmd = [sys.executable, "-m", "tierzero.launcher.cli", "bench", *args, f"run.dir={run_dir}"]
    if mpirun:
        cmd = ["mpirun", "-n", str(mpirun), *cmd]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    from tierzero.telemetry.report import load_table

    return load_table(str(run_dir / "telemetry"), "collectives").to_pylist()


def gloo_vs_mpi(nproc: int, sizes: str, iters: int) -> dict:
    if shutil.which("mpirun") is None:
        print("\n(no mpirun: pip install mpich mpi4py; gloo vs MPI skipped)")
        return {}
    common = [f"bench.sizes={sizes}", f"bench.iters={iters}", "bench.scopes=[global]"]
    with tempfile.TemporaryDirectory() as tmp:
        gloo = _cli_bench(common + [f"launcher.nproc={nproc}"], Path(tmp) / "gloo")
        mpi = _cli_bench(common + ["bench.backend=mpi"], Path(tmp) / "mpi", mpirun=nproc)

    def table(rows):
        out = {}
        for r in rows:
            out.setdefault((r["op"], r["size_bytes"]), {})[r["placement"]] = r["busbw_gbps"]
        return out

    g, m = table(gloo), table(mpi)
    print(f"\n### gloo vs MPI (mpich) on this host, {nproc} ranks, scope global, busbw GB/s "
          "(placement: out-of-place where the op has it)\n")
    print("| op | size | gloo | MPI | MPI / gloo |")
    print("|---|---|---|---|---|")
    result = {}
    for (op, size), cells in sorted(g.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        placement = "out" if "out" in cells else "in"
        gb, mb = cells[placement], m.get((op, size), {}).get(placement)
        if mb is None or size < (1 << 20):
            continue
        result[f"{op}/{size}"] = (gb, mb)
        print(f"| {op} | {size >> 20} MiB | {gb:.3f} | {mb:.3f} | {mb / gb:.2f} |")
    return result


def shaped(gbits, sizes: str, iters: int) -> dict:
    if os.geteuid() != 0:
        print("\n(not root: network namespaces need it; shaped-link part skipped)")
        return {}
    result = {}
    print(f"\n### Shaped links: emulated 2 nodes x 2 ranks, tc tbf on each node's link, sizes {sizes}\n")
    print("| link Gbit/s | scope | op | size | busbw GB/s | model peak GB/s | measured / peak |")
    print("|---|---|---|---|---|---|---|")
    for gbit in gbits:
        with tempfile.TemporaryDirectory() as tmp:
            rows = _cli_bench([f"bench.sizes={sizes}", f"bench.iters={iters}", "bench.warmup=2",
                               "bench.ops=[all_reduce,all_gather,reduce_scatter,all_to_all]",
                               "topology.emulate=[2,2]", "launcher.isolate_network=true",
                               f"launcher.inter_node_gbit={gbit}"], Path(tmp) / "shaped")
        top = max(r["size_bytes"] for r in rows)
        for scope in ("cross:node", "global"):
            for op in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all"):
                sel = [r for r in rows if r["scope"] == scope and r["op"] == op and r["size_bytes"] == top
                       and r["placement"] == ("in" if op == "all_reduce" else "out")]
                if not sel:
                    continue
                bus = statistics.fmean(r["busbw_gbps"] for r in sel)
                peak = sel[0]["peak_gbps"]
                if peak is None and scope == "global":
                    # the intra-node level is unshaped (unknown): its links never bind, so the
                    # model's peak is the inter-node term alone
                    from tierzero.parallel.topology import emulated_topology, peak_busbw_gbps

                    topo = emulated_topology([2, 2], bandwidths_gbps=[1e9, gbit / 8 / 2])
                    peak = peak_busbw_gbps(topo, [[0, 1, 2, 3]], "all_to_all" if op == "all_to_all" else "ring")
                result[f"{gbit}/{scope}/{op}"] = (bus, peak)
                print(f"| {gbit:g} | {scope} | {op} | {top >> 20} MiB | {bus:.4f} | {peak:.4f} | {bus / peak:.2f} |")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("overhead", "mpi", "shaped"))
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--gbit", type=float, nargs="+", default=[1.0])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import platform

    import torch

    print(f"# benchmarks/collectives.py | {platform.node()} | {os.cpu_count()} CPUs | torch {torch.__version__} | "
          f"{date.today()}")
    out = {}
    if args.only in (None, "overhead"):
        out["overhead"] = overhead(args.nproc, args.rounds, args.iters)
    if args.only in (None, "mpi"):
        out["mpi"] = {k: list(v) for k, v in gloo_vs_mpi(args.nproc, "1M:16M", args.iters).items()}
    if args.only in (None, "shaped"):
        out["shaped"] = {k: list(v) for k, v in shaped(args.gbit, "4M:8M", args.iters).items()}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
