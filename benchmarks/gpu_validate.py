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
  d  an A/B of the native engine against FSDP2 with per-block compile (the fair reference) at a
     ~1B dense model, bf16, sequence 4096, one GPU (benchmarks/gpu_ab.py: each engine in a worker
     process of its own): both compiled at micro-batch 2 and 4, each run twice, interleaved, with
     per-phase CUDA-event times; a profiled step of each (top 20 kernels, the SDPA backend that
     ran); one step at accumulation 8; the native toggles (fused step, chunked loss, compile) in
     the native process. Tokens/s, MFU (PaLM's 6N + 12 L d T, and the FLOPs executed), peak memory.
  e  checkpoint stall of the native process's model: async saves 1, 2 and 3, and a synchronous one

One run answers all of it inside --budget-s (440 s; the shell's timeout is 470): every section
has a deadline, and what would pass it is recorded as "skipped: time" instead of run. Besides
the JSON (--out), a markdown table goes to the same path with .md (and is printed); neither is
written over a file this script did not write.

    bash benchmarks/gpu_validate.sh                 # on a machine with a CUDA (or ROCm) GPU
    python benchmarks/gpu_validate.py --dry-run     # on CPU: every path, tiny sizes, < 3 minutes

Figures go to docs/benchmarks.md ("GPU validation") with the date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpu_ab import Rows, Session  # benchmarks/ is sys.path[0]: this file runs as a script
from gpu_report import MARK, markdown

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = {"gpu": 440.0, "dry": 170.0}
"""The whole run's seconds (gpu_validate.sh stops it with SIGINT at 470)."""
SHARES = {"gpu": dict(b=60.0, b_before_end=300.0, e=75.0), "dry": dict(b=90.0, b_before_end=60.0, e=25.0)}
"""Section b's most seconds (and at least this many left after it), and what d leaves for e."""


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

    import tierzero.launcher

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "hip": getattr(torch.version, "hip", None), "host": platform.node(),
           "tierzero_from": str(Path(tierzero.launcher.__file__).resolve().parent.parent)}
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
    del a, b
    torch.cuda.empty_cache()  # section d's worker processes share this GPU
    if out["datasheet_bf16_tflops"]:
        out["matmul_fraction_of_datasheet"] = out["matmul_bf16_tflops"] / out["datasheet_bf16_tflops"]
    return out


# ---- b: multi-rank correctness on CUDA tensors over gloo ----------------------------------------

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
PLANS = ["zero3", "hpz", "hsdp", "tiered", "zero2", "zero1", "ddp"]


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
    trainer = Trainer(recipe, ctx, Rows(), checkpoint_root=ck.get("root"), peak_tflops=1.0, show_progress=False)
    return trainer.fit().losses


def _cuda_worker(rank: int, world: int, rdzv: str, out: str, device: str, jobs, deadline: float):
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
        late = torch.tensor([float(time.time() > deadline)])
        dist.all_reduce(late, op=dist.ReduceOp.MAX)  # every rank skips the same jobs
        if late.item():
            results[name] = {"skipped": "time"}
            continue
        try:
            results[name] = {"losses": _trainer_run(overrides, ctx, plan, checkpoint)}
        except Exception as e:
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    Path(f"{out}.{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _spawn(world: int, device: str, jobs, tmp: Path, deadline: float) -> list:
    out, rdzv = str(tmp / f"w{world}"), str(tmp / f"rdzv{world}")
    mp.spawn(_cuda_worker, args=(world, rdzv, out, device, jobs, deadline), nprocs=world, join=True)
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(world)]


def _reference(overrides, device: str) -> list:
    from tierzero.parallel.context import DistContext
    from tierzero.parallel.topology import emulated_topology

    ctx = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=device, backend="none",
                      topology=emulated_topology([1]), host="validate")
    return _trainer_run([*overrides, "parallel.engine=reference"], ctx, "ddp")


def _rel(a, b) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b)) if a and b and len(a) == len(b) else float("inf")


def correctness(dry: bool, deadline: float) -> dict:
    device = "cpu" if dry else "cuda:0"
    tmp = Path(tempfile.mkdtemp(prefix="tz-validate-"))
    ck_root = str(tmp / "ckpt")
    # in the order they matter, should the deadline leave some out: the fully sharded plans, MoE and
    # the resharded resume first
    jobs = [("zero3", DENSE, "zero3", None), ("moe ep2 zero3", MOE, "zero3", None),
            ("checkpointed first half", [*DENSE, "train.steps=6"], "zero3", {"every": 3, "root": ck_root}),
            *[(p, DENSE, p, None) for p in PLANS if p != "zero3"]]
    four = _spawn(4, device, jobs, tmp, deadline)
    # the second half of the checkpointed run, resumed on 2 ranks (steps 4..6 from step 3's checkpoint)
    first_half = four[0]["checkpointed first half"]
    if "losses" not in first_half or time.time() > deadline:
        two = [{"resumed on 2 ranks": {"skipped": "time" if "losses" in first_half else "its first half did not run"}}]
    else:
        two = _spawn(2, device, [("resumed on 2 ranks", [*DENSE, "train.steps=6"], "zero3",
                                  {"every": 0, "root": ck_root, "resume": str(Path(ck_root) / "step-00000003")})],
                     tmp, deadline)
    ref_dense, ref_moe = _reference(DENSE, device), _reference([*MOE, "parallel.ep=1"], device)
    out = {"device": device, "reference_losses": ref_dense, "plans": {}}
    worst = 0.0
    for name, *_ in jobs:
        r = four[0][name]
        if "skipped" in r:
            out["plans"][name] = r
            continue
        if "error" in r:
            out["plans"][name] = r
            worst = float("inf")
            continue
        ref = ref_moe if name.startswith("moe") else ref_dense
        rel = _rel(r["losses"], ref)
        out["plans"][name] = {"max_rel_loss_diff": rel}
        worst = max(worst, rel)
    resumed = two[0]["resumed on 2 ranks"]
    if "skipped" in resumed:
        out["resume"] = resumed
    elif "error" in resumed:
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
        shard = full = None  # freed before the empty_cache below (section d shares the GPU)
        out["note"] = ("host_issue_to_wait_ms is what a ledger timing issue-to-wait() sees: on NCCL wait() only "
                       "makes the stream wait, so it is not the collective's time; event_ms is")
        return out
    finally:
        dist.destroy_process_group()
        torch.cuda.empty_cache()


TOOL = "tierzero gpu_validate"


def _ours(path: Path, is_ours) -> bool:
    """`path` is absent, or a plain file this script wrote (`is_ours(its text)`)."""
    if not (path.exists() or path.is_symlink()):
        return True
    try:
        return path.is_file() and not path.is_symlink() and bool(is_ours(path.read_text()))
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return False


def _summary_is_ours(text: str) -> bool:
    return json.loads(text).get("tool") == TOOL


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_summary(path: Path, summary: dict) -> None:
    """The JSON and its markdown table (.md beside it), each atomically and never over a file this
    script did not write (checked for both before anything runs)."""
    table = path.with_suffix(".md")
    for p, is_ours in ((path, _summary_is_ours), (table, lambda text: text.startswith(MARK))):
        if not _ours(p, is_ours):
            print(f"gpu_validate: {p} exists and is not a file this script wrote; give another --out (nothing was "
                  "overwritten)", file=sys.stderr)
            raise SystemExit(2)
    _write_atomic(path, json.dumps(summary, indent=1, default=str))
    try:
        text = markdown(summary)
    except Exception as e:  # a table that cannot be made is reported, the JSON still stands
        text = f"{MARK}\n\nthe table could not be made: {type(e).__name__}: {e}\n\n{traceback.format_exc()[-2000:]}"
    _write_atomic(table, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "gpu-validate" / "summary.json"))
    ap.add_argument("--dry-run", action="store_true", help="on CPU: every section, tiny sizes")
    ap.add_argument("--only", nargs="*", default=None, help="sections to run (a b c d e)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"seconds for the whole run (default {BUDGET_S['gpu']:.0f} on a GPU, {BUDGET_S['dry']:.0f} dry)")
    ap.add_argument("--dry-backend", default="aot_eager", choices=("aot_eager", "eager", "inductor"),
                    help="the dry run's torch.compile backend (inductor builds C++ kernels: minutes on two cores)")
    args = ap.parse_args()
    dry = args.dry_run or not torch.cuda.is_available()
    kind = "dry" if dry else "gpu"
    budget = args.budget_s or BUDGET_S[kind]
    end, share = time.time() + budget, SHARES[kind]
    summary = {"tool": TOOL, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "dry_run": dry,
               "budget_s": budget, **({"dry_backend": args.dry_backend} if dry else {})}
    out = Path(args.out)
    _write_summary(out, summary)  # refuses a foreign file before anything runs
    session = Session(dry=dry, work_dir=str(out.parent), dry_backend=args.dry_backend)
    sections = (("a inventory", lambda: inventory(dry)),
                ("b correctness", lambda: correctness(dry, min(time.time() + share["b"], end - share["b_before_end"]))),
                ("c nccl", lambda: nccl_collectives(dry)),
                ("d a/b", lambda: session.ab(end - share["e"])),
                ("e checkpoint stall", lambda: session.stall(end - 5)))
    try:
        for key, fn in sections:
            if args.only is None or key[0] in args.only:
                section(summary, key, fn)
                _write_summary(out, summary)
    except KeyboardInterrupt:  # gpu_validate.sh's timeout: keep what was measured
        summary["interrupted"] = f"SIGINT after {budget - (end - time.time()):.0f} s"
    finally:
        session.close()
    _write_summary(out, summary)
    print(out.with_suffix(".md").read_text())
    print(f"summary: {out} (table: {out.with_suffix('.md')})")
    return 0 if all(v.get("ok") for v in summary.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
