"""The GPU path, checked on one lent GPU in one prepared run (benchmarks/gpu_validate.sh).

Sections, each timed and each recorded in the JSON summary even when it fails (the next
section still runs):

  a  inventory: versions, the device, its datasheet peak, a timed bf16 matmul
  b  multi-rank correctness on CUDA tensors: 4 processes share the GPU over gloo (NCCL refuses
     two ranks on one GPU; gloo on CUDA has no reduce-scatter or all-to-all, so this harness
     alone routes those through all-reduce / all-gather), every plan against the reference
     engine within 1e-5 in fp32, MoE with parallel.ep=2, and a checkpoint written by 4 ranks
     resumed on 2
  c  NCCL at world size 1: a list all-gather / reduce-scatter against the single-tensor ones
     (peak memory, CUDA-event time), and the host's issue-to-wait time against the event time
  d  MFU of a ~1B dense model (bf16, sequence 4096, micro-batch 2 and 4) against the datasheet
     peak, through `tierzero run` on one rank, beside FSDP2 on the same GPU with the fair
     settings (float32 masters, fused AdamW, one gradient sync per optimizer step)
  e  checkpoint stall of that model: an async save against a synchronous one

    bash benchmarks/gpu_validate.sh                 # on a machine with a CUDA (or ROCm) GPU
    python benchmarks/gpu_validate.py --dry-run     # on CPU: every section that can run there, tiny sizes

Figures go to docs/benchmarks.md ("GPU validation") with the date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent


def section(summary: dict, key: str, fn, *args) -> None:
    t0 = time.perf_counter()
    try:
        summary[key] = fn(*args)
        summary[key]["ok"] = summary[key].get("ok", True)
    except Exception as e:  # a failed section is a result too: record it, run the next
        summary[key] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    summary[key]["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"== {key}: {'ok' if summary[key]['ok'] else 'FAILED'} in {summary[key]['seconds']} s", flush=True)
    if not summary[key]["ok"]:
        print(summary[key].get("error"), flush=True)


# ---- a: inventory ------------------------------------------------------------------------------

def inventory(dry: bool) -> dict:
    from tierzero.telemetry.peak import datasheet_peak_tflops

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "hip": getattr(torch.version, "hip", None), "host": platform.node()}
    if dry:
        out["device"] = "cpu (dry run)"
        n = 512
        a = torch.randn(n, n)
        t0 = time.perf_counter()
        for _ in range(10):
            a @ a
        out["matmul_fp32_tflops"] = 2 * n**3 * 10 / (time.perf_counter() - t0) / 1e12
        return out
    props = torch.cuda.get_device_properties(0)
    out.update(device=torch.cuda.get_device_name(0), devices=torch.cuda.device_count(),
               memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
               nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
               datasheet_bf16_tflops=datasheet_peak_tflops(torch.cuda.get_device_name(0), "bfloat16"))
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    iters = 50
    for _ in range(iters):
        a @ b
    end.record()
    end.synchronize()
    out["matmul_bf16_tflops"] = 2 * n**3 * iters / (start.elapsed_time(end) / 1e3) / 1e12
    if out["datasheet_bf16_tflops"]:
        out["matmul_fraction_of_datasheet"] = out["matmul_bf16_tflops"] / out["datasheet_bf16_tflops"]
    return out


# ---- b: multi-rank correctness on CUDA tensors over gloo ----------------------------------------

class _Rows:
    """Telemetry stand-in: keeps the rows the loop records."""

    def __init__(self):
        self.rows = {}

    def record(self, table: str, /, **row) -> None:
        self.rows.setdefault(table, []).append(row)

    def event(self, kind, detail="", step=None, **_):
        self.record("events", kind=kind, detail=detail, step=step)

    def flush(self) -> None:
        pass


class _Done:
    def wait(self, *args, **kwargs):
        return True

    def is_completed(self):
        return True


def _route_missing_gloo_cuda_collectives() -> None:
    """gloo on CUDA tensors has all_gather, all_reduce and broadcast but no reduce_scatter or
    all_to_all: in this harness only, build them from those (same results, more bytes)."""
    real_all_gather, real_all_reduce = dist.all_gather, dist.all_reduce

    def reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        stacked = torch.stack([t.reshape(-1) for t in input_list])
        real_all_reduce(stacked, group=group)
        output.copy_(stacked[dist.get_rank(group)].view_as(output))
        return _Done() if async_op else None

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                          async_op=False):
        n = dist.get_world_size(group)
        me = dist.get_rank(group)
        if input_split_sizes is None:
            input_split_sizes = [input.shape[0] // n] * n
        if output_split_sizes is None:
            output_split_sizes = [output.shape[0] // n] * n
        splits = torch.tensor(list(input_split_sizes), device=input.device, dtype=torch.long)
        all_splits = [torch.empty_like(splits) for _ in range(n)]
        real_all_gather(all_splits, splits, group=group)
        rows = max(int(s.sum()) for s in all_splits)
        padded = input.new_zeros((max(rows, 1),) + tuple(input.shape[1:]))
        padded[:input.shape[0]] = input
        gathered = [torch.empty_like(padded) for _ in range(n)]
        real_all_gather(gathered, padded, group=group)
        pieces = []
        for s in range(n):
            off = int(all_splits[s][:me].sum())
            pieces.append(gathered[s][off:off + output_split_sizes[s]])
        output.copy_(torch.cat(pieces).view_as(output))
        return _Done() if async_op else None

    dist.reduce_scatter = reduce_scatter
    dist.all_to_all_single = all_to_all_single


DENSE = ["moe.num_experts=0", "parallel.ep=1", "model.d_model=64", "model.n_heads=4", "model.n_layers=3",
         "data.seq_len=32", "train.steps=6", "train.warmup_steps=2", "train.micro_batch_size=2",
         "train.global_batch_size=16"]
MOE = ["model.d_model=64", "model.n_heads=4", "model.n_layers=2", "data.seq_len=32", "train.steps=6",
       "train.warmup_steps=2", "train.micro_batch_size=2", "train.global_batch_size=16", "moe.num_experts=4",
       "moe.top_k=2", "moe.expert_hidden=64", "parallel.ep=2"]
PLANS = ["ddp", "zero1", "zero2", "zero3", "hpz", "hsdp", "tiered"]


def _trainer_run(overrides, ctx, plan: str, checkpoint=None):
    from tierzero.checkpoint.config import CheckpointConfig
    from tierzero.launcher.config import load_config
    from tierzero.parallel.config import ParallelConfig
    from tierzero.recipes.trainer import Recipe, Trainer

    cfg = load_config([], overrides)
    pcfg = ParallelConfig(plan=plan, engine=cfg.parallel.engine, ep=cfg.parallel.ep)
    ck = checkpoint or {}
    recipe = Recipe(cfg.train, cfg.model, cfg.data, cfg.moe, pcfg,
                    CheckpointConfig(every_steps=ck.get("every", 0), resume=ck.get("resume", "auto")))
    trainer = Trainer(recipe, ctx, _Rows(), checkpoint_root=ck.get("root"), peak_tflops=1.0, show_progress=False)
    return trainer.fit().losses


def _cuda_worker(rank: int, world: int, rdzv: str, out: str, device: str, jobs):
    from tierzero.parallel.context import DistContext
    from tierzero.parallel.topology import emulated_topology

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    if device.startswith("cuda"):
        _route_missing_gloo_cuda_collectives()
    sizes = [2, world // 2] if world >= 4 else [world]
    ctx = DistContext(rank=rank, world_size=world, local_rank=rank, local_world_size=world, device=device,
                      backend="gloo", topology=emulated_topology(sizes), host="validate")
    results = {}
    for name, overrides, plan, checkpoint in jobs:
        try:
            results[name] = {"losses": _trainer_run(overrides, ctx, plan, checkpoint)}
        except Exception as e:
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    Path(f"{out}.{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _spawn(world: int, device: str, jobs, tmp: Path) -> list:
    out, rdzv = str(tmp / f"w{world}"), str(tmp / f"rdzv{world}")
    mp.spawn(_cuda_worker, args=(world, rdzv, out, device, jobs), nprocs=world, join=True)
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(world)]


def _reference(overrides, device: str) -> list:
    from tierzero.parallel.context import DistContext
    from tierzero.parallel.topology import emulated_topology

    ctx = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=device, backend="none",
                      topology=emulated_topology([1]), host="validate")
    return _trainer_run([*overrides, "parallel.engine=reference"], ctx, "ddp")


def _rel(a, b) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b)) if a and b and len(a) == len(b) else float("inf")


def correctness(dry: bool) -> dict:
    device = "cpu" if dry else "cuda:0"
    tmp = Path(tempfile.mkdtemp(prefix="tz-validate-"))
    ck_root = str(tmp / "ckpt")
    jobs = [(p, DENSE, p, None) for p in PLANS]
    jobs.append(("moe ep2 zero3", MOE, "zero3", None))
    jobs.append(("checkpointed first half", [*DENSE, "train.steps=6"], "zero3", {"every": 3, "root": ck_root}))
    four = _spawn(4, device, jobs, tmp)
    # the second half of the checkpointed run, resumed on 2 ranks (steps 4..6 from step 3's checkpoint)
    two = _spawn(2, device, [("resumed on 2 ranks", [*DENSE, "train.steps=6"], "zero3",
                              {"every": 0, "root": ck_root, "resume": str(Path(ck_root) / "step-00000003")})], tmp)
    ref_dense, ref_moe = _reference(DENSE, device), _reference([*MOE, "parallel.ep=1"], device)
    out = {"device": device, "reference_losses": ref_dense, "plans": {}}
    worst = 0.0
    for name, *_ in jobs:
        r = four[0][name]
        if "error" in r:
            out["plans"][name] = r
            worst = float("inf")
            continue
        ref = ref_moe if name.startswith("moe") else ref_dense
        rel = _rel(r["losses"], ref)
        out["plans"][name] = {"max_rel_loss_diff": rel}
        worst = max(worst, rel)
    resumed = two[0]["resumed on 2 ranks"]
    if "error" in resumed:
        out["resume"] = resumed
        worst = float("inf")
    else:
        rel = _rel(resumed["losses"], ref_dense[3:])
        out["resume"] = {"steps": len(resumed["losses"]), "max_rel_loss_diff": rel}
        worst = max(worst, rel)
    out["worst_rel"] = worst
    out["ok"] = worst <= 1e-5
    return out


# ---- c: NCCL at world size 1: list vs single-tensor collectives, host vs event time -------------

def nccl_collectives(dry: bool) -> dict:
    if dry:
        return {"ok": True, "skipped": "no GPU in a dry run"}
    store = dist.FileStore(str(Path(tempfile.mkdtemp(prefix="tz-nccl-")) / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda:0"))
    try:
        numel = 128 * 2**20  # 256 MiB of bf16
        shard = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
        full = torch.empty(numel, device="cuda", dtype=torch.bfloat16)

        def timed(fn, reps=10):
            fn()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            events, host = [], []
            for _ in range(reps):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                s.record()
                work = fn()
                if work is not None:
                    work.wait()
                host.append(time.perf_counter() - t0)
                e.record()
                events.append((s, e))
            torch.cuda.synchronize()
            return {"event_ms": statistics.median(s.elapsed_time(e) for s, e in events),
                    "host_issue_to_wait_ms": statistics.median(host) * 1e3,
                    "peak_extra_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}

        out = {
            "all_gather_list": timed(lambda: dist.all_gather([full], shard, async_op=True)),
            "all_gather_into_tensor": timed(lambda: dist.all_gather_into_tensor(full, shard, async_op=True)),
            "reduce_scatter_list": timed(lambda: dist.reduce_scatter(full, [shard], async_op=True)),
            "reduce_scatter_tensor": timed(lambda: dist.reduce_scatter_tensor(full, shard, async_op=True)),
        }
        out["note"] = ("host_issue_to_wait_ms is what a ledger timing issue-to-wait() sees: on NCCL wait() only "
                       "makes the stream wait, so it is not the collective's time; event_ms is")
        return out
    finally:
        dist.destroy_process_group()


# ---- d, e: MFU of a ~1B dense model, beside FSDP2; checkpoint stall ------------------------------

def _steps_table(run_dir: Path) -> list:
    import pyarrow.dataset as ds

    t = ds.dataset(str(run_dir / "telemetry" / "steps"), format="parquet", partitioning="hive").to_table()
    return sorted(t.to_pylist(), key=lambda r: r["step"])


def _run_cli(args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", "run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _model_args(dry: bool, micro: int):
    if dry:
        return ["dense_tiny_cpu", "launcher.nproc=1", "train.steps=4", f"train.micro_batch_size={micro}",
                f"train.global_batch_size={micro}"]
    # ~1.0B parameters: 18 blocks of 12 x 2048^2 plus two 50,304 x 2048 embeddings
    return ["dense_tiny_cpu", "launcher.nproc=1", "launcher.backend=nccl", "train.dtype=bfloat16",
            "model.d_model=2048", "model.n_heads=16", "model.n_layers=18", "data.vocab_size=50304",
            "data.seq_len=4096", "data.successors=8", f"train.micro_batch_size={micro}",
            f"train.global_batch_size={micro}", "train.steps=10", "train.warmup_steps=2",
            "telemetry.flush_every_s=5"]


def mfu(dry: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix="tz-mfu-"))
    out = {}
    for micro in (2, 4):
        for engine, extra in (("native", ["parallel.plan=ddp"]), ("fsdp2", ["parallel.engine=fsdp2", "parallel.plan=zero3"])):
            name = f"{engine} micro {micro}"
            run = f"mfu-{engine}-{micro}"
            r = _run_cli([*_model_args(dry, micro), *extra, f"run.name={run}", f"run.dir={work / run}"])
            if r.returncode != 0:
                out[name] = {"error": r.stderr[-2000:]}
                continue
            rows = _steps_table(work / run)[2:] or _steps_table(work / run)
            out[name] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
                         "mfu": statistics.median(r["mfu"] for r in rows),
                         "peak_gpu_mem_gib": max((r["gpu_mem_bytes"] or 0) for r in rows) / 2**30}
        a, b = out.get(f"native micro {micro}", {}), out.get(f"fsdp2 micro {micro}", {})
        if "tokens_per_s" in a and "tokens_per_s" in b:
            out[f"native / fsdp2 tokens/s, micro {micro}"] = a["tokens_per_s"] / b["tokens_per_s"]
    out["ok"] = not any("error" in v for v in out.values() if isinstance(v, dict))
    return out


def checkpoint_stall(dry: bool) -> dict:
    """The loop's time between a step's row and the next one's is that next step plus whatever
    ran in between: after a checkpointed step, the save. Stall = that gap minus the median gap
    between steps without a save, for an async save and a synchronous one. On the GPU one save
    every 30 steps: writing the ~12 GB of a 1B model's masters and moments takes 5-10 s, and an
    async save only hides what fits before the next one (saves every 3 steps measured the disk)."""
    work = Path(tempfile.mkdtemp(prefix="tz-ckpt-"))
    out = {}
    every, steps = (3, 7) if dry else (30, 33)
    for mode in ("true", "false"):
        run = f"stall-async-{mode}"
        args = [*_model_args(dry, 2), f"train.steps={steps}", "parallel.plan=ddp", f"checkpoint.every_steps={every}",
                f"checkpoint.async_save={mode}", "checkpoint.fsync=false", f"run.name={run}", f"run.dir={work / run}"]
        r = _run_cli(args)
        if r.returncode != 0:
            out[f"async_save={mode}"] = {"error": r.stderr[-2000:]}
            continue
        rows = _steps_table(work / run)
        at = {row["step"]: row["time"].timestamp() for row in rows}
        gaps = {s: at[s] - at[s - 1] for s in at if s - 1 in at and s > 2}
        plain = statistics.median(g for s, g in gaps.items() if (s - 1) % every)
        out[f"async_save={mode}"] = {"plain_gap_s": plain, "every_steps": every,
                                     "stall_s": [gaps[s] - plain for s in gaps if (s - 1) % every == 0]}
    a, s = out.get("async_save=true", {}), out.get("async_save=false", {})
    if a.get("stall_s") and s.get("stall_s"):
        out["async_stall / sync_stall"] = statistics.median(a["stall_s"]) / max(statistics.median(s["stall_s"]), 1e-9)
    out["ok"] = not any("error" in v for v in out.values() if isinstance(v, dict))
    return out


TOOL = "tierzero gpu_validate"


def _write_summary(path: Path, summary: dict) -> None:
    """Atomically, and never over a file this script did not write."""
    if path.exists() or path.is_symlink():
        try:
            ours = path.is_file() and not path.is_symlink() and json.loads(path.read_text()).get("tool") == TOOL
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            print(f"gpu_validate: --out {path} exists and is not a summary this script wrote; give another "
                  "--out (nothing was overwritten)", file=sys.stderr)
            raise SystemExit(2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(summary, f, indent=1, default=str)
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "gpu-validate" / "summary.json"))
    ap.add_argument("--dry-run", action="store_true", help="on CPU: every section that can run there, tiny sizes")
    ap.add_argument("--only", nargs="*", default=None, help="sections to run (a b c d e)")
    args = ap.parse_args()
    dry = args.dry_run or not torch.cuda.is_available()
    summary = {"tool": TOOL, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "dry_run": dry}
    out = Path(args.out)
    _write_summary(out, summary)  # refuses a foreign file before anything runs
    for key, fn in (("a inventory", inventory), ("b correctness", correctness), ("c nccl", nccl_collectives),
                    ("d mfu", mfu), ("e checkpoint stall", checkpoint_stall)):
        if args.only is None or key[0] in args.only:
            section(summary, key, fn, dry)
            _write_summary(out, summary)
    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "traceback"} if isinstance(v, dict) else v)
                      for k, v in summary.items()}, indent=1, default=str))
    print(f"summary: {args.out}")
    return 0 if all(v.get("ok") for v in summary.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
