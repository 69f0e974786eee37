"""Hierarchical partitioning on emulated nodes with a shaped inter-node link, in one run.

Two emulated nodes x 2 ranks, each node in its own network namespace, the link between them
limited with `tc tbf` (root needed; see docs/netns.md). A transformer big enough that
communication matters (~50M parameters, few tokens per step) is trained for a few steps with:

    native  zero3, hpz, hsdp, tiered, auto; and quantized: zeropp (hpZ + qwZ int8 + qgZ int4,
            as the ZeRO++ paper), tiered and auto with int8 weights + int4 gradients on the
            inter-node level, auto allowed to quantize either (parallel.quant_*=auto)
    refs    DeepSpeed ZeRO-3, DeepSpeed ZeRO++ hpZ, PyTorch FSDP2 HSDP

and for each: steps/s, peak RSS per rank, bytes per level from the byte ledger (native), the
cost model's predicted inter-node communication time against the measured one (the byte
ledger's time on the cluster level: issue to completion of each collective, so a prefetched
gather that waited behind compute counts its wait too, and two collectives in flight at
once each count their whole duration), all as ratios. The native runs plan with measured
link bandwidths (`topology.measure=true`: the probe of collectives_bench/probe.py runs at
start-up: each level per operation, plus the optimizer-update rate); the prediction plans
again on the figures that run measured and warns when that is not the plan the run used.

    sudo python benchmarks/hierarchy.py                 # 1 Gbit/s
    sudo python benchmarks/hierarchy.py --gbit 0.1 1 10  # the sweep
    sudo python benchmarks/hierarchy.py --gbit 0.1 --d-model 512 --steps 4   # a smaller model for the slow link
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
sys.path.insert(0, str(ROOT))  # the package `checkpoint`, not benchmarks/checkpoint.py beside this script

MODEL = ["model.n_layers=4", "model.n_heads=8", "moe.num_experts=0", "parallel.ep=1", "data.seq_len=32",
         "train.micro_batch_size=1", "train.warmup_steps=1", "telemetry.flush_every_s=2",
         "telemetry.node_sample_every_s=60", "train.log_every=1"]
QUANT = ("parallel.quant_weights=int8", "parallel.quant_grads=int4")
"""Block-quantized collectives on the slowest level (parallel.quant_levels' default)."""
CONFIGS = [  # name, engine, parallel.plan, extra overrides
    ("zero3", "native", "zero3", ()),
    ("hpz", "native", "hpz", ()),
    ("hsdp", "native", "hsdp", ()),
    ("tiered", "native", "tiered", ()),
    # the only assignment with param < grad < optimizer on two levels (a `tiered` that searched
    # p < g < o would have nothing else to choose from here)
    ("tiered [rep,node,cluster]", "native", "tiered", ("parallel.levels=[none,node,cluster]",)),
    ("auto", "native", "auto", ()),
    ("zeropp", "native", "zeropp", ()),
    ("tiered qW8 qG4", "native", "tiered", QUANT),
    ("auto, quantization allowed", "native", "auto", ("parallel.quant_weights=auto", "parallel.quant_grads=auto")),
    ("DeepSpeed ZeRO-3", "deepspeed", "zero3", ()),
    ("DeepSpeed ZeRO++ hpZ", "deepspeed", "hpz", ()),
    ("FSDP2 HSDP", "fsdp2", "hsdp", ()),
]
OP_SHORT = {"all_gather": "ag", "reduce_scatter": "rs", "all_reduce": "ar"}
MEASURED = re.compile(r"measured per-rank GB/s: (.*)$", re.M)
UPDATE_RATE = re.compile(r"measured optimizer update: ([0-9.eE+-]+) e9 params/s", re.M)
CODEC_RATE = re.compile(r"measured block quantization: ([0-9.eE+-]+) e9 elements/s", re.M)
LATENCY = re.compile(r"measured per-step latency us: (.*)$", re.M)
FLOW = re.compile(r"measured per-flow limit GB/s: (.*)$", re.M)


def model_args(d_model: int) -> list:
    return [f"model.d_model={d_model}", *MODEL]


def run_one(workdir: Path, name: str, engine: str, plan: str, gbit, steps: int, accum: int, d_model: int,
            extra=(), comm_timing: str = "issue") -> dict:
    run_name = re.sub(r"[^a-z0-9]+", "-", f"{engine}-{name}-{gbit or 'free'}".lower().replace(".", "p"))
    measure = ["topology.measure=true", f"parallel.comm_timing={comm_timing}"] if engine == "native" else []
    args = [sys.executable, "-m", "tierzero.launcher.cli", "run", *model_args(d_model), f"train.steps={steps}",
            f"train.global_batch_size={4 * accum}", "topology.emulate=[2,2]", "launcher.nproc=4",
            "launcher.isolate_network=true", f"parallel.plan={plan}", f"parallel.engine={engine}",
            f"run.name={run_name}", *measure, *extra]
    if gbit:
        args.append(f"launcher.inter_node_gbit={gbit}")
    t0 = time.perf_counter()
    r = subprocess.run(args, cwd=workdir, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        return {"name": name, "error": (r.stderr or r.stdout)[-600:], "wall_s": wall}
    tel = workdir / "runs" / run_name / "telemetry"
    steps_rows = ds.dataset(tel / "steps", format="parquet", partitioning="hive").to_table().to_pylist()
    by_step = {}
    for row in steps_rows:
        by_step.setdefault(row["step"], []).append(row)
    warm = sorted(by_step)[1:]  # the first step pays for allocation and JIT work
    step_s = statistics.median(max(r["step_time_s"] for r in by_step[s]) for s in warm)
    peak_rss = max(r["mem_rss_bytes"] for r in steps_rows)
    level_bytes, cluster_s, cluster_wait_s = {}, 0.0, 0.0
    comm_dir = tel / "comm"
    if comm_dir.exists():
        for row in ds.dataset(comm_dir, format="parquet", partitioning="hive").to_table().to_pylist():
            if row["rank"] == 0 and row["step"] in warm:
                level_bytes[row["level"]] = level_bytes.get(row["level"], 0.0) + row["bytes"] / len(warm)
                if row["level"] == "cluster":
                    cluster_s += row["time_s"] / len(warm)
                    cluster_wait_s += (row.get("wait_s") or 0.0) / len(warm)
    last = max(by_step)
    losses = [r["loss"] for r in by_step[last] if r.get("loss") is not None]
    final_loss = statistics.fmean(losses) if losses else None
    plan_line = next((ln for ln in r.stderr.splitlines() if "recipes.trainer: plan " in ln), "")
    found = MEASURED.search(r.stderr)
    rate = UPDATE_RATE.search(r.stderr)
    codec = CODEC_RATE.search(r.stderr)
    latency = LATENCY.search(r.stderr)
    flow = FLOW.search(r.stderr)
    return {"name": name, "engine": engine, "plan": plan, "extra": list(extra), "step_s": step_s,
            "steps_per_s": 1 / step_s, "peak_rss_bytes": peak_rss, "final_loss": final_loss, "level_bytes": level_bytes, "wall_s": wall,
            "measured_comm_s": cluster_s if comm_dir.exists() else None,
            "measured_wait_s": cluster_wait_s if comm_dir.exists() else None,
            "measured_gbps": parse_measured(found.group(1)) if found else None,
            "update_gelems_per_s": float(rate.group(1)) if rate else None,
            "codec_gelems_per_s": float(codec.group(1)) if codec else None,
            "latency_us": dict((k, float(v)) for k, v in (item.split("=") for item in latency.group(1).split()))
            if latency else {},
            "flow_gbps": dict((k, float(v)) for k, v in (item.split("=") for item in flow.group(1).split()))
            if flow else {},
            "plan_line": plan_line.split("plan ", 1)[-1][:160]}


def parse_measured(text: str) -> dict:
    """collectives_bench.probe's log line -> {level: {op: GB/s}}."""
    from tierzero.collectives_bench.probe import parse_measured as parse

    return parse(text)


def predicted(plan: str, extra, measured_gbps: dict, accum: int, d_model: int, update_rate=None, codec_rate=None,
              latency_us=None, flow_gbps=None, serial: bool = False):
    """The cost model's plan and cluster-level collective time (issue to completion, summed as the
    ledger sums it) on the bandwidths (and optimizer-update rate, which auto weighs) this run
    measured. serial: each collective alone on the wire (what aligned timing measures)."""
    import dataclasses

    from tierzero.launcher.config import load_config
    from tierzero.launcher.discover import memory_budget_bytes
    from tierzero.parallel.choose import resolve_plan
    from tierzero.parallel.topology import emulated_topology, with_bandwidths, with_flow_limits, with_latencies
    from tierzero.recipes.planning import planning_inputs

    cfg = load_config([], model_args(d_model) + [f"train.global_batch_size={4 * accum}", f"parallel.plan={plan}",
                                                 "topology.emulate=[2,2]", *extra])
    # the run's topology as its probe measured it: the level's (all_gather) figure and every op's own
    figures = [measured_gbps.get("node"), measured_gbps.get("cluster")]
    topo = with_bandwidths(emulated_topology([2, 2]), [f.get("all_gather") if f else None for f in figures],
                           op_bandwidths_gbps=figures)
    topo = with_latencies(topo, [(latency_us or {}).get(name) for name in topo.names])
    topo = with_flow_limits(topo, [(flow_gbps or {}).get(name) for name in topo.names])
    topo = dataclasses.replace(topo, update_gelems_per_s=update_rate, codec_gelems_per_s=codec_rate)
    inputs = planning_inputs(train_cfg=cfg.train, model_cfg=cfg.model, data_cfg=cfg.data, moe_cfg=cfg.moe,
                             ep=cfg.parallel.ep, world_size=topo.world_size, reduce_dtype=cfg.parallel.reduce_dtype)
    assert inputs.grad_accum == accum, (inputs.grad_accum, accum)
    budget = memory_budget_bytes(cfg.parallel, topo, device="cpu", local_world_size=2)
    choice = resolve_plan(cfg.parallel, topo, inputs, memory_budget_bytes=budget)
    cost = choice.cost
    if serial:
        from tierzero.parallel.cost import predict

        cost = predict(choice.plan, topo, inputs.units, dtype_bytes=inputs.dtype_bytes, grad_accum=inputs.grad_accum,
                       reduce_bytes=inputs.reduce_bytes, ep=cfg.parallel.ep, moe=inputs.moe, serial=True)
    return choice.plan.describe(topo), cost.time_by_level().get("cluster", 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gbit", type=float, nargs="+", default=[1.0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=1024, help="model width (1024: 50.6M params; 512: 12.8M)")
    ap.add_argument("--only", nargs="*", help="names of configs to run (default all)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--comm-timing", choices=("issue", "aligned"), default="issue",
                    help="parallel.comm_timing of the native runs: aligned times each collective's transfer "
                         "alone (a barrier first, its wait shown as 'wait s'), to compare with the cost model")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks/hierarchy.py needs root (network namespaces and tc); run it with sudo")

    configs = [c for c in CONFIGS if not args.only or c[0] in args.only]
    results = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs", "date": str(date.today()),
               "command": " ".join(sys.argv), "rows": [], "load_before": load_average()}
    with tempfile.TemporaryDirectory(prefix="tz-hier-") as tmp:
        work = Path(tmp)
        for gbit in args.gbit:
            for name, engine, plan, extra in configs:
                row = run_one(work, name, engine, plan, gbit, args.steps, args.accum, args.d_model, extra,
                              args.comm_timing)
                row["gbit"] = gbit
                if engine == "native" and "step_s" in row and row["measured_gbps"]:
                    row["predicted_plan"], row["predicted_comm_s"] = predicted(
                        plan, extra, row["measured_gbps"], args.accum, args.d_model, row["update_gelems_per_s"],
                        row["codec_gelems_per_s"], row["latency_us"], row["flow_gbps"],
                        serial=args.comm_timing == "aligned")
                    if not row["plan_line"].startswith(row["predicted_plan"]):
                        print(f"warning: {name} ran {row['plan_line']!r}, the prediction is for "
                              f"{row['predicted_plan']}", flush=True)
                    # the same plan on the nominal link (launcher.inter_node_gbit's per-rank share)
                    nominal_plan, nominal_s = predicted(plan, extra, {"cluster": {"all_gather": gbit / 8 / 2}}, args.accum,
                                                        args.d_model)
                    row["predicted_nominal_comm_s"] = nominal_s if nominal_plan == row["predicted_plan"] else None
                results["rows"].append(row)
                print(f"[{gbit} gbit] {name}: {row.get('steps_per_s', row.get('error'))}", flush=True)

    print(f"\n# tierzero hierarchy benchmark | {results['machine']} | {results['date']}")
    print(f"# {results['command']}")
    print(f"# emulated 2 nodes x 2 ranks, d_model {args.d_model} x 4 layers fp32, grad accum {args.accum}, "
          f"{args.steps} steps (median of steps 2..N, slowest rank); load before: {results['load_before']}")
    print(f"# comm timing: {args.comm_timing}" + (" (comm s meas = the transfers alone; wait s = rank 0 at the barrier "
                                                   "before each cluster-level collective)" if args.comm_timing == "aligned" else ""))
    for gbit in args.gbit:
        rows = [r for r in results["rows"] if r["gbit"] == gbit]
        ok = [r for r in rows if "steps_per_s" in r]
        base = next((r for r in ok if r["name"] == "DeepSpeed ZeRO++ hpZ"), None)
        zpp = next((r for r in ok if r["name"] == "zeropp"), None)
        best_ref = max((r for r in ok if r["engine"] != "native"), key=lambda r: r["steps_per_s"], default=None)
        print(f"\n## inter-node link {gbit:g} Gbit/s")
        measured = [r["measured_gbps"] for r in ok if r.get("measured_gbps")]
        if measured:
            print("# measured per-rank GB/s (topology.measure, per native run; ag/rs/ar = all_gather, "
                  "reduce_scatter, all_reduce):")
            for m in measured:
                print("#   " + "; ".join(f"{lv} " + " ".join(f"{OP_SHORT.get(op, op)} {v:.3g}" for op, v in f.items())
                                       for lv, f in m.items() if f))
        print(f"{'config':<27}{'steps/s':>9}{'vs DS hpZ':>11}{'vs best ref':>12}{'vs zeropp':>10}{'loss':>8}"
              f"{'peak RSS MB':>13}"
              f"{'node MB/step':>14}{'cluster MB/step':>16}{'comm s pred':>12}{'comm s meas':>12}{'meas/pred':>10}"
              f"{'nominal pred':>13}{'wait s':>8}")
        for r in rows:
            if "steps_per_s" not in r:
                print(f"{r['name']:<27}  failed: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}")
                continue
            vs = f"{r['steps_per_s'] / base['steps_per_s']:.2f}x" if base else "-"
            vb = f"{r['steps_per_s'] / best_ref['steps_per_s']:.2f}x" if best_ref else "-"
            lb = r["level_bytes"]
            node = f"{lb.get('node', 0) / 1e6:.1f}" if r["engine"] == "native" else "-"
            clus = f"{lb.get('cluster', 0) / 1e6:.1f}" if r["engine"] == "native" else "-"
            pred = f"{r['predicted_comm_s']:.2f}" if "predicted_comm_s" in r else "-"
            meas = f"{r['measured_comm_s']:.2f}" if r.get("measured_comm_s") is not None else "-"
            ratio = (f"{r['measured_comm_s'] / r['predicted_comm_s']:.2f}"
                     if r.get("predicted_comm_s") and r.get("measured_comm_s") is not None else "-")
            vz = f"{r['steps_per_s'] / zpp['steps_per_s']:.2f}x" if zpp else "-"
            loss = f"{r['final_loss']:.4f}" if r.get("final_loss") is not None else "-"
            print(f"{r['name']:<27}{r['steps_per_s']:>9.3f}{vs:>11}{vb:>12}{vz:>10}{loss:>8}{r['peak_rss_bytes'] / 1e6:>13.0f}"
                  f"{node:>14}{clus:>16}{pred:>12}{meas:>12}{ratio:>10}"
                  f"{(format(r['predicted_nominal_comm_s'], '.2f') if r.get('predicted_nominal_comm_s') else '-'):>13}"
                  f"{(format(r['measured_wait_s'], '.2f') if args.comm_timing == 'aligned' and r.get('measured_wait_s') is not None else '-'):>8}")
        for auto in (r for r in ok if r["name"].startswith("auto")):
            print(f"{auto['name']} chose: {auto['plan_line']}")
    print(f"# load after: {load_average()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def load_average() -> str:
    """The 1/5/15-minute load averages: the machine may be shared (write them down with the table)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
