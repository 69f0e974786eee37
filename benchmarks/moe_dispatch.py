"""MoE dispatch on a shaped inter-node link: flat vs hierarchical vs hierarchical + node limit.

Two emulated nodes x 2 ranks, each node in its own network namespace, the link between them
limited with `tc tbf` (root needed; docs/netns.md). An MoE model whose expert all-to-all is
most of the cross-node traffic (8 experts, top-2, parallel.ep=4 over both nodes, hsdp for the
dense part so its weights never cross) is trained for a few steps with each dispatch:

    flat              one all-to-all over the EP group (moe.dispatch=flat)
    hierarchical      each token sent once per destination node, forwarded inside it
    flat + limit      moe.max_nodes_per_token=1 with flat dispatch (routing only)
    hier + limit      moe.max_nodes_per_token=1 with hierarchical dispatch

For each: tokens/s (tokens per step / median step time of the slowest rank, steps 2..N), the
byte ledger's all-to-all MB per step at the cluster level (what crossed the shaped link, rank
0) and at the node level, and the last step's loss. DeepSpeed's MoE cannot run inside
tierzero's engines (benchmarks/moe_layer.py compares the layers on one host, unshaped).

    sudo python benchmarks/moe_dispatch.py                # 1 Gbit/s, 6 steps
    sudo python benchmarks/moe_dispatch.py --gbit 0.1 --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import pyarrow.dataset as ds

ROOT = Path(__file__).resolve().parent.parent

MODEL = ["model.d_model=256", "model.n_heads=4", "model.n_layers=2", "moe.num_experts=8", "moe.top_k=2",
         "moe.shared_experts=0", "parallel.ep=4", "parallel.plan=hsdp", "data.seq_len=128",
         "train.micro_batch_size=4", "train.global_batch_size=32", "train.warmup_steps=1", "train.log_every=1",
         "telemetry.flush_every_s=2", "telemetry.node_sample_every_s=60"]
CONFIGS = [  # name, overrides
    ("flat", ("moe.dispatch=flat",)),
    ("hierarchical", ("moe.dispatch=hierarchical",)),
    ("flat + limit", ("moe.dispatch=flat", "moe.max_nodes_per_token=1")),
    ("hier + limit", ("moe.dispatch=hierarchical", "moe.max_nodes_per_token=1")),
]


def run_one(workdir: Path, name: str, extra, gbit: float, steps: int) -> dict:
    run_name = re.sub(r"[^a-z0-9]+", "-", f"moe-{name}-{gbit}".lower().replace(".", "p"))
    args = [sys.executable, "-m", "tierzero.launcher.cli", "run", "moe_tiny_cpu", *MODEL, f"train.steps={steps}",
            "topology.emulate=[2,2]", "launcher.nproc=4", "launcher.isolate_network=true",
            f"launcher.inter_node_gbit={gbit}", f"run.name={run_name}", *extra]
    t0 = time.perf_counter()
    r = subprocess.run(args, cwd=workdir, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        return {"name": name, "error": (r.stderr or r.stdout)[-800:], "wall_s": wall}
    tel = workdir / "runs" / run_name / "telemetry"
    rows = ds.dataset(tel / "steps", format="parquet", partitioning="hive").to_table().to_pylist()
    by_step = {}
    for row in rows:
        by_step.setdefault(row["step"], []).append(row)
    warm = sorted(by_step)[1:]
    step_s = statistics.median(max(x["step_time_s"] for x in by_step[s]) for s in warm)
    tokens = statistics.median(by_step[s][0]["tokens"] for s in warm)
    a2a = {}
    for row in ds.dataset(tel / "comm", format="parquet", partitioning="hive").to_table().to_pylist():
        if row["rank"] == 0 and row["step"] in warm and row["op"] == "all_to_all":
            a2a[row["level"]] = a2a.get(row["level"], 0.0) + row["bytes"] / len(warm)
    last = max(by_step)
    return {"name": name, "extra": list(extra), "step_s": step_s, "tokens_per_s": tokens / step_s,
            "a2a_bytes": a2a, "final_loss": statistics.fmean(x["loss"] for x in by_step[last]), "wall_s": wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gbit", type=float, nargs="+", default=[1.0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--only", nargs="*", help="names of configs to run (default all)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root: network namespaces and tc (see docs/netns.md)", file=sys.stderr)
        return 2
    configs = [c for c in CONFIGS if not args.only or c[0] in args.only]
    load = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="tz-moe-dispatch-") as tmp:
        for gbit in args.gbit:
            for name, extra in configs:
                row = run_one(Path(tmp), name, extra, gbit, args.steps)
                row["gbit"] = gbit
                results.append(row)
                print(f"[{gbit} gbit] {name}: {row.get('tokens_per_s', row.get('error'))}", flush=True)
    print(f"\n# tierzero MoE dispatch benchmark | {platform.machine()} {os.cpu_count()} CPUs | {date.today()}")
    print(f"# {' '.join(sys.argv)}")
    print(f"# emulated 2 nodes x 2 ranks, {' '.join(MODEL)}; median of steps 2..{args.steps}; load before "
          f"{load[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    failed = False
    for gbit in args.gbit:
        rows = [r for r in results if r["gbit"] == gbit]
        base = next((r for r in rows if r["name"] == "flat" and "error" not in r), None)
        print(f"\n## inter-node link {gbit} Gbit/s")
        print(f"{'config':16}{'tokens/s':>10}{'vs flat':>9}{'cluster a2a MB/step':>21}{'vs flat':>9}"
              f"{'node a2a MB/step':>18}{'loss':>9}")
        for r in rows:
            if "error" in r:
                failed = True
                print(f"{r['name']:16} FAILED: {r['error'][-300:]}")
                continue
            cross, inner = r["a2a_bytes"].get("cluster", 0.0), r["a2a_bytes"].get("node", 0.0)
            speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
            saved = f"{cross / base['a2a_bytes'].get('cluster', 1.0):.2f}x" if base else "-"
            print(f"{r['name']:16}{r['tokens_per_s']:10.0f}{speed:>9}{cross / 1e6:21.2f}{saved:>9}{inner / 1e6:18.2f}"
                  f"{r['final_loss']:9.4f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
