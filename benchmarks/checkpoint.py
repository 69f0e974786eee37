"""Reshardable checkpoints: how fast tierzero saves and loads, against references in one run.

4 gloo ranks on this host (torch.multiprocessing spawn, rendezvous through a file in a
temp dir, 1 torch thread per rank), a dense transformer (recipes.model.build_model, d_model
512, 8 layers, 8 heads, vocab 50304: 51M parameters) in parallel.engines.native.NativeEngine under a
zero3 plan over emulated_topology([2, 2]), --train-steps AdamW steps on random tokens first
(so the moments are not zeros). What a rank saves is its optimizer shard: fp32 master
weights + exp_avg + exp_avg_sq, 12 bytes per parameter over the 4 ranks (~613 MB in all).
Everything goes to the local filesystem under one temp dir (--dir; its `df -T` line is
printed). Each timed region is barrier .. barrier on every rank; the figure is the slowest
rank's (MAX all-reduce). Contenders alternate --repeats times (order rotated), medians shown.
Between trials every rank touches and frees 1.25x its bytes, so no contender writes into free
pages the VM's balloon has handed back to the host (refault_free_memory).

1. save vs a plain write: `Checkpointer.save(step, engine, state)` (checkpoint.async_save=
   false: engine.checkpoint_slices() host copy, piece checksums (xxh3_64, each chunk just
   before it is written), shard + rank json, rank 0 waits for every rank, merges and writes
   manifest + COMMITTED) against each rank writing the same
   bytes (its slices concatenated beforehand, untimed) with open(path, 'wb').write().
   Ratio = plain / tierzero (throughput ratio). Twice: into the page cache (no fsync in
   either; tierzero with checkpoint.fsync=false), and with fsync in both (the plain file
   fsync'd before close; tierzero with checkpoint.fsync=true, its default: every file it
   writes -- stamp, shard, rank json, and on rank 0 manifest, COMMITTED, LATEST -- fsync'd
   before its rename, and the step folder and the folder holding it fsync'd before and
   after COMMITTED). The fsync cost of tierzero alone is the ratio of its two medians.
2. vs torch.distributed.checkpoint.save of the same tensors (each rank's slices as plain
   tensors under rank-unique keys, FileSystemWriter, one file per rank), page cache
   (sync_files=False) and fsync (sync_files=True, DCP's default: data files + metadata).
   Ratio = dcp / tierzero.
   Everything below runs with checkpoint.fsync=false (page cache).
3. async stall: Checkpointer.last_save_s with async_save=true (host copy + thread start:
   what the training loop waits for) against the synchronous page-cache save time of 1;
   each background save is waited for at once and must be committed (store.committed(),
   no `error` event); the last one is read back in full (store.verify). Then the same
   with one training step run while the background save is in flight, against a step
   without one (on 2 cores the writer thread competes with the ranks for the CPU).
   Also printed: the synchronous save split into engine.checkpoint_slices(),
   store.write_rank and rank 0's commit.
4. reshard load: the checkpoint saved by the 4-rank run loaded with Checkpointer.resume
   (manifest, engine.load_checkpoint, the all-ranks-ok check, engine.after_load) into a
   fresh 4-rank zero3 engine (same layout) and into a fresh 2-rank one (emulated_topology
   ([2, 1]), zero3); each in its own spawn, alternating, first with the step folder's pages
   evicted from the page cache (fsync + posix_fadvise DONTNEED, "cold") then again
   ("warm"). Bytes read per rank are counted; the loaded state is checked against the
   saved one (float64 sums over all ranks).

Speed never fails the script: it exits non-zero only if something crashed, a save was not
committed (or raised an `error` event), or a load did not restore the saved state.

--fsync-only runs part 1 alone, tierzero and the plain write (no DCP, async or loads), so
many repeats of checkpoint.fsync=true against false fit in a few minutes.

    python benchmarks/checkpoint.py [--repeats 3] [--train-steps 1] [--dir /tmp] [--fsync-only]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from tierzero.checkpoint.config import CheckpointConfig  # noqa: E402
from tierzero.checkpoint.saver import Checkpointer  # noqa: E402
from tierzero.checkpoint import store as store_module  # noqa: E402
from tierzero.checkpoint.store import CheckpointStore, Slice, _raw  # noqa: E402
from tierzero.parallel.plans import named_plan  # noqa: E402
from tierzero.parallel.topology import emulated_topology  # noqa: E402
from tierzero.parallel.engines import EngineSetup, Optim  # noqa: E402
from tierzero.parallel.engines.native import NativeEngine  # noqa: E402
from tierzero.recipes.config import ModelConfig  # noqa: E402
from tierzero.recipes.model import build_model, count_params, loss_fn  # noqa: E402

SAVE_WORLD, SAVE_SIZES = 4, [2, 2]
RESHARD_WORLD, RESHARD_SIZES = 2, [2, 1]
D_MODEL, N_LAYERS, N_HEADS, VOCAB, SEQ, BATCH = 512, 8, 8, 50304, 64, 2
LR = 1e-3
SEED = 0


def noop(*_, **__):
    return None


class TimedCheckpointer(Checkpointer):
    """Notes when the background write (and on rank 0 the commit) finished."""
    done_at = float("nan")

    def _write(self, *args):
        super()._write(*args)
        self.done_at = time.perf_counter()


# ---- helpers inside a rank -------------------------------------------------------------------

def build_engine(rank: int, sizes) -> NativeEngine:
    topo = emulated_topology(sizes)
    torch.manual_seed(SEED)
    model = build_model(ModelConfig(d_model=D_MODEL, n_layers=N_LAYERS, n_heads=N_HEADS), vocab_size=VOCAB,
                        seq_len=SEQ, moe=None)
    return NativeEngine(model, EngineSetup(plan=named_plan("zero3", topo), topology=topo, rank=rank, loss_fn=loss_fn,
                                           optim=Optim(lr=LR, weight_decay=0.1)))


def train_step(engine: NativeEngine, rank: int, step: int) -> float:
    g = torch.Generator().manual_seed(1000 * step + rank)
    batch = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    loss = float(engine.micro_step(batch[:, :-1], batch[:, 1:], scale=1.0))
    engine.step(LR)
    engine.take_comm()
    return loss


def slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def timed(fn) -> float:
    """barrier, fn(), barrier; the slowest rank's seconds."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return slowest(time.perf_counter() - t0)


def evict(folder: str) -> None:
    """Write back and drop this folder's pages from the page cache (no privileges needed)."""
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def refault_free_memory(nbytes: int) -> None:
    """Touch and free `nbytes` of memory, so the next trial's page-cache writes land in pages the
    host backs. A VM whose balloon reports free pages (virtio-balloon free page reporting, on the
    dev VM) has the host unmap them ~2 s after they are freed -- the page cache a trial's cleanup
    dropped included -- and a write into them then faults every page on the host: 153 MB took
    0.51 s instead of 0.035 s after 30 s idle, whichever contender came first after a pause."""
    np.ones(nbytes // 8)


def state_sums(engine: NativeEngine) -> list:
    """float64 sums of the optimizer state over every rank (padding is zero in every layout)."""
    v = torch.zeros(4, dtype=torch.float64)
    for u in engine.units:
        v[0] += u.master.double().sum()
        v[1] += u.master.double().abs().sum()
        v[2] += u.exp_avg.double().sum()
        v[3] += u.exp_avg_sq.double().sum()
    dist.all_reduce(v)
    return v.tolist()


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# ---- the 4-rank run: saves ------------------------------------------------------------------

def save_rank(rank: int, world: int, rdzv: str, work: str, out: str, repeats: int, train_steps: int,
              fsync_only: bool = False) -> None:
    import torch.distributed.checkpoint as dcp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    rows, info, errors = [], {}, []

    def event(kind, detail, step):  # the run's telemetry in train(); here: keep the failures
        if kind == "error":
            errors.append(f"rank {rank}: {detail}")

    def record(**row):
        rows.append(row)

    t0 = time.perf_counter()
    engine = build_engine(rank, SAVE_SIZES)
    info["build_s"] = slowest(time.perf_counter() - t0)
    step_s = []
    for s in range(1, train_steps + 1):
        step_s.append(timed(lambda: train_step(engine, rank, s)))
    info["train_step_s"] = step_s
    step = engine.step_count
    state = {"step": step, "optimizer_steps": engine.step_count, "next_sample": step * BATCH * world,
             "world_size": world, "plan": "zero3 over emulated [2, 2]"}

    # the same bytes, prepared untimed, for the references
    slices = engine.checkpoint_slices()
    blob = b"".join(_raw(s[4]) for s in slices)
    sd = {f"rank{rank}/{name}": torch.from_numpy(data) for name, _, _, _, data in slices}
    nbytes = torch.tensor([len(blob), len(slices)], dtype=torch.int64)
    per_rank = [torch.zeros(2, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(per_rank, nbytes)
    info["bytes_per_rank"] = [int(t[0]) for t in per_rank]
    info["slices_per_rank"] = [int(t[1]) for t in per_rank]
    del slices

    n = [0]

    def fresh(tag: str) -> str:
        n[0] += 1
        return f"{work}/{tag}-{n[0]:03d}"

    def cleanup(path: str) -> None:
        dist.barrier()
        if rank == 0:
            if variant_files.get("dcp_bytes") is None and os.path.basename(path).startswith("dcp"):
                variant_files["dcp_bytes"] = dir_bytes(path)
            if variant_files.get("tz_bytes") is None and os.path.basename(path).startswith("tz"):
                variant_files["tz_bytes"] = dir_bytes(path)
            shutil.rmtree(path, ignore_errors=True)
            os.sync()
        refault_free_memory(int(1.25 * len(blob)))
        dist.barrier()

    variant_files: dict = {}

    def run_tz(fsync: bool) -> float:
        root = fresh("tz")
        ck = Checkpointer(CheckpointConfig(async_save=False, keep=1, fsync=fsync), root, rank=rank, world_size=world,
                          event=event)
        dt = timed(lambda: ck.save(step, engine, state))
        cleanup(root)
        return dt

    def run_plain(fsync: bool) -> float:
        folder = fresh("plain")
        if rank == 0:
            os.makedirs(folder)
        dist.barrier()

        def go():
            with open(f"{folder}/plain-{rank:05d}.bin", "wb") as f:
                f.write(blob)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
        dt = timed(go)
        cleanup(folder)
        return dt

    def run_dcp(fsync: bool) -> float:
        folder = fresh("dcp")
        dt = timed(lambda: dcp.save(sd, storage_writer=dcp.FileSystemWriter(folder, sync_files=fsync)))
        cleanup(folder)
        return dt

    contenders = {"tierzero": run_tz, "plain": run_plain, **({} if fsync_only else {"dcp": run_dcp})}
    names = list(contenders)
    for name in names:  # warm-up: imports, first-touch of the code paths
        contenders[name](False)

    # engine.checkpoint_slices() alone (the host copy every tierzero save starts with)
    for rep in range(repeats):
        record(metric="checkpoint_slices", contender="tierzero", variant="copy", rep=rep,
               seconds=timed(engine.checkpoint_slices))

    if fsync_only:  # fsync off and on side by side in every repeat: their ratio is the figure
        trials = [(v, rep) for rep in range(repeats) for v in (("cache", "fsync"), ("fsync", "cache"))[rep % 2]]
    else:
        trials = [(v, rep) for v in ("cache", "fsync") for rep in range(repeats)]
    for variant, rep in trials:
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            dt = contenders[name](variant == "fsync")
            record(metric="save", contender=name, variant=variant, rep=rep, seconds=dt)
            if rank == 0:
                print(f"#   save {variant:<5} rep {rep} {name:<8} {dt:8.3f} s", flush=True)
    if fsync_only:
        gathered = [None] * world
        dist.all_gather_object(gathered, errors)
        info["errors"] = [e for part in gathered for e in part]
        if rank == 0:
            Path(out, "save.json").write_text(json.dumps({"rows": rows, "info": info}))
        dist.barrier()
        dist.destroy_process_group()
        return

    # the synchronous save split up: host copy (above), write_rank on every rank, commit on rank 0
    for rep in range(repeats):
        root = fresh("parts")
        store = CheckpointStore(root, fsync=False)
        parts = [Slice(nm, tuple(shape), dt, start, data) for nm, shape, dt, start, data in engine.checkpoint_slices()]
        record(metric="write_rank", contender="tierzero", variant="cache", rep=rep,
               seconds=timed(lambda: store.write_rank(step, rank, parts)))
        record(metric="commit", contender="tierzero", variant="cache", rep=rep,
               seconds=timed(lambda: rank == 0 and store.commit(step, world, state)))
        parts = None
        cleanup(root)

    # async: the loop's stall and the background write (waited for at once), then a
    # training step run while a background save is in flight against one without
    async_ok = []

    def check_committed(ck, step, verify):
        ok = True
        if rank == 0:
            ok = step in ck.store.committed()
            if verify:
                _, problems = ck.store.verify(ck.store.step_path(step))
                ok = ok and not problems
                info["verify_problems"] = problems[:3]
        async_ok.append(ok)
        return ok

    for rep in range(repeats):
        root = fresh("async")
        ck = TimedCheckpointer(CheckpointConfig(async_save=True, keep=1, fsync=False), root, rank=rank,
                               world_size=world, event=event)
        dist.barrier()
        t0 = time.perf_counter()
        ck.save(step, engine, state)
        if ck.snapshot is not None:  # worst case: the next optimizer step comes at once
            ck.snapshot.wait()
        stall = slowest(ck.last_stall_s)
        ck.wait()
        background = slowest(ck.done_at - t0)
        dist.barrier()
        ok = check_committed(ck, step, verify=rep == repeats - 1)
        cleanup(root)

        free_step = timed(lambda: train_step(engine, rank, 100 + rep))
        step = engine.step_count
        state = {**state, "step": step, "optimizer_steps": step}
        root = fresh("async")
        ck = TimedCheckpointer(CheckpointConfig(async_save=True, keep=1, fsync=False), root, rank=rank,
                               world_size=world, event=event)
        dist.barrier()
        t0 = time.perf_counter()
        ck.save(step, engine, state)
        t1 = time.perf_counter()
        train_step(engine, rank, 200 + rep)  # its optimizer step waits for the background copy
        overlapped = time.perf_counter() - t1
        stall2 = slowest(ck.last_stall_s)
        ck.wait()
        overlapped, background2 = slowest(overlapped), slowest(ck.done_at - t0)
        dist.barrier()
        ok2 = check_committed(ck, step, verify=False)
        cleanup(root)
        step = engine.step_count
        state = {**state, "step": step, "optimizer_steps": step}
        if rank == 0:
            print(f"#   async rep {rep}: stall {stall:.3f} s, background save {background:.3f} s (committed={ok}); "
                  f"with a training step: stall {stall2:.3f} s, background {background2:.3f} s, step {overlapped:.3f}"
                  f" s vs {free_step:.3f} s without (committed={ok2})", flush=True)
        for metric, v in (("async_stall", stall), ("async_background", background), ("async_stall_overlap", stall2),
                          ("async_background_overlap", background2), ("step_during_async_save", overlapped),
                          ("step_without_save", free_step)):
            record(metric=metric, contender="tierzero", variant="cache", rep=rep, seconds=v)
    info["async_committed"] = async_ok

    # the checkpoint the load runs read, and what it holds
    step = engine.step_count
    state = {**state, "step": step, "optimizer_steps": step}
    src = f"{work}/source"
    ck = Checkpointer(CheckpointConfig(async_save=False, keep=1, fsync=False), src, rank=rank, world_size=world,
                      event=event)
    ck.save(step, engine, state)
    dist.barrier()
    gathered = [None] * world
    dist.all_gather_object(gathered, errors)
    info["errors"] = [e for part in gathered for e in part]
    info["source"] = ck.store.step_path(step)
    info["source_step_count"] = engine.step_count
    info["source_sums"] = state_sums(engine)
    if rank == 0:
        os.sync()
        info["source_bytes"] = dir_bytes(info["source"])
        info.update(variant_files)
        Path(out, "save.json").write_text(json.dumps({"rows": rows, "info": info}))
    dist.barrier()
    dist.destroy_process_group()


# ---- the load runs: one spawn per layout and repeat -------------------------------------------

def load_rank(rank: int, world: int, sizes, rdzv: str, source: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    engine = build_engine(rank, sizes)
    counted = [0, 0]  # bytes, pieces
    real_read = CheckpointStore.read_piece

    def counting(self, step_path, entry, piece):
        a = real_read(self, step_path, entry, piece)
        counted[0] += a.nbytes
        counted[1] += 1
        return a

    CheckpointStore.read_piece = counting
    result = {}
    for mode in ("cold", "warm"):
        if mode == "cold" and rank == 0:
            evict(source)
        dist.barrier()
        counted[0] = counted[1] = 0
        ck = Checkpointer(CheckpointConfig(resume=source), str(Path(source).parent), rank=rank, world_size=world,
                          event=noop)
        resumed = []
        dt = timed(lambda: resumed.append(ck.resume(engine)))
        got = torch.tensor(counted, dtype=torch.int64)
        per_rank = [torch.zeros(2, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(per_rank, got)
        result[mode] = {"seconds": dt, "bytes_per_rank": [int(t[0]) for t in per_rank],
                        "pieces_per_rank": [int(t[1]) for t in per_rank],
                        "step": resumed[0].step if resumed[0] else None}
    result["sums"] = state_sums(engine)
    result["step_count"] = engine.step_count
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# ---- the driver ------------------------------------------------------------------------------

def med(rows, metric, contender, variant):
    vals = [r["seconds"] for r in rows if r["metric"] == metric and r["contender"] == contender
            and r["variant"] == variant]
    return statistics.median(vals) if vals else float("nan")


def context_line() -> str:
    """What else shaped the figures: the checksum saves use, and how busy the machine was."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    checksum = getattr(store_module, "WRITE_CHECKSUM", "crc32")  # an older tree (bisecting): crc32 in a thread
    chunk = getattr(store_module, "CHUNK_BYTES", None)
    how = f"in {chunk >> 10} KiB chunks" if chunk else "whole pieces"
    return (f"# piece checksum {checksum}, {how}; free memory refaulted before each trial; load average "
            f"(1, 5, 15 min) at the end: {load} on {os.cpu_count()} CPUs")


def fsync_report(rows, info, fs_line: str, args, elapsed: float) -> int:
    """--fsync-only: what checkpoint.fsync costs a synchronous save, beside the plain write's own fsync cost."""
    def reps(contender, variant):
        return [r["seconds"] for r in sorted(rows, key=lambda r: r["rep"]) if r["metric"] == "save"
                and r["contender"] == contender and r["variant"] == variant]
    print(f"\n# checkpoint.fsync=true vs false | {platform.node()} | {os.cpu_count()} CPUs | torch {torch.__version__} "
          f"| {date.today()}")
    print(f"# filesystem: {fs_line}")
    print(f"# saved per rank: {', '.join(f'{b / 1e6:.1f}' for b in info['bytes_per_rank'])} MB; "
          f"{SAVE_WORLD} gloo ranks x 1 thread; synchronous Checkpointer.save, barrier to barrier, slowest rank")
    print(f"# seconds = median of {args.repeats} alternating repeats; runtime {elapsed:.0f} s")
    print(context_line())
    print(f"{'contender':<12}{'fsync off':>11}{'fsync on':>10}{'on/off':>8}  per-repeat on/off")
    for name in ("tierzero", "plain"):
        off, on = reps(name, "cache"), reps(name, "fsync")
        ratios = " ".join(f"{a / b:.2f}" for a, b in zip(on, off))
        print(f"{name:<12}{statistics.median(off):>11.3f}{statistics.median(on):>10.3f}"
              f"{statistics.median(on) / statistics.median(off):>8.2f}  {ratios}")
    print(f"# {'FAILED: ' + '; '.join(info['errors']) if info.get('errors') else 'OK'}")
    return 1 if info.get("errors") else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=1)
    ap.add_argument("--dir", default=None, help="where the temp dir goes (default: the system's temp dir)")
    ap.add_argument("--parquet", type=Path, default=ROOT / "runs" / "bench" / "checkpoint.parquet")
    ap.add_argument("--fsync-only", action="store_true",
                    help="only tierzero with checkpoint.fsync=true/false and the plain write, e.g. with --repeats 9")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    failed = []
    tmp = tempfile.mkdtemp(prefix="tz-ckpt-", dir=args.dir)
    try:
        df = subprocess.run(["df", "-T", tmp], capture_output=True, text=True).stdout.strip().splitlines()[-1].split()
        fs_line = f"{df[1]} on {df[0]} mounted at {df[-1]}"
        work = f"{tmp}/work"
        os.makedirs(work)
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"# working dir {tmp}: {fs_line}; load average (1, 5, 15 min) at the start: {load}", flush=True)
        t0 = time.perf_counter()
        mp.spawn(save_rank, args=(SAVE_WORLD, f"{tmp}/rdzv-save", work, tmp, args.repeats, args.train_steps,
                                  args.fsync_only), nprocs=SAVE_WORLD, join=True)
        save_wall = time.perf_counter() - t0
        saved = json.loads(Path(tmp, "save.json").read_text())
        rows, info = saved["rows"], saved["info"]
        print(f"# save run: {save_wall:.0f} s", flush=True)
        if args.fsync_only:
            return fsync_report(rows, info, fs_line, args, time.perf_counter() - t_start)

        loads = []
        layouts = {"same": (SAVE_WORLD, SAVE_SIZES), "reshard": (RESHARD_WORLD, RESHARD_SIZES)}
        for rep in range(args.repeats):
            for kind in (("same", "reshard") if rep % 2 == 0 else ("reshard", "same")):
                world, sizes = layouts[kind]
                out = f"{tmp}/load-{kind}-{rep}.json"
                t0 = time.perf_counter()
                mp.spawn(load_rank, args=(world, sizes, f"{tmp}/rdzv-load-{kind}-{rep}", info["source"], out),
                         nprocs=world, join=True)
                res = json.loads(Path(out).read_text())
                res.update(kind=kind, rep=rep, world=world, spawn_s=time.perf_counter() - t0)
                loads.append(res)
                for mode in ("cold", "warm"):
                    rows.append(dict(metric="load", contender=kind, variant=mode, rep=rep,
                                     seconds=res[mode]["seconds"], bytes_per_rank=max(res[mode]["bytes_per_rank"])))
                print(f"#   load {kind:<7} rep {rep}: cold {res['cold']['seconds']:.3f} s, warm "
                      f"{res['warm']['seconds']:.3f} s, {max(res['warm']['bytes_per_rank']) / 1e6:.1f} MB/rank "
                      f"({res['spawn_s']:.0f} s)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - t_start

    # correctness: committed saves, loads that restore the saved state
    if not all(info["async_committed"]):
        failed.append(f"async saves committed: {info['async_committed']}")
    if info.get("errors"):
        failed.append(f"checkpoint error events: {info['errors']}")
    if info.get("verify_problems"):
        failed.append(f"verify: {info['verify_problems']}")
    want = info["source_sums"]
    for res in loads:
        close = all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6) for a, b in zip(res["sums"], want))
        if not close or res["step_count"] != info["source_step_count"]:
            failed.append(f"load {res['kind']} rep {res['rep']}: state sums {res['sums']} vs saved {want}, "
                          f"step_count {res['step_count']} vs {info['source_step_count']}")

    per_rank = info["bytes_per_rank"]
    total = sum(per_rank)
    n_params = count_params(ModelConfig(d_model=D_MODEL, n_layers=N_LAYERS, n_heads=N_HEADS), VOCAB)
    bytes_same = statistics.median(max(r["warm"]["bytes_per_rank"]) for r in loads if r["kind"] == "same")
    bytes_reshard = statistics.median(max(r["warm"]["bytes_per_rank"]) for r in loads if r["kind"] == "reshard")
    read_same = statistics.median(sum(r["warm"]["bytes_per_rank"]) for r in loads if r["kind"] == "same")
    read_reshard = statistics.median(sum(r["warm"]["bytes_per_rank"]) for r in loads if r["kind"] == "reshard")

    table = []  # (metric, tierzero s, reference s, ratio, target text, met, reference name)

    def add(metric, tz, ref, ratio, target, met, note=""):
        table.append(dict(metric=metric, tierzero=tz, reference=ref, ratio=ratio, target=target, met=met, note=note))

    for variant, label in (("cache", "page cache, no fsync"), ("fsync", "fsync in both")):
        tz, plain = med(rows, "save", "tierzero", variant), med(rows, "save", "plain", variant)
        add(f"save vs plain write ({label})", tz, plain, plain / tz, ">= 0.8 (plain/tz)", plain / tz >= 0.8)
    for variant, label in (("cache", "sync_files=False, no fsync"), ("fsync", "sync_files=True, fsync in both")):
        tz, ref = med(rows, "save", "tierzero", variant), med(rows, "save", "dcp", variant)
        add(f"save vs DCP save ({label})", tz, ref, ref / tz, ">= 1.0 (dcp/tz)", ref / tz >= 1.0)
    on, off = med(rows, "save", "tierzero", "fsync"), med(rows, "save", "tierzero", "cache")
    add("checkpoint.fsync=true vs false (tierzero's own fsync cost)", on, off, on / off, "- (on/off)", True)
    stall, sync = med(rows, "async_stall_overlap", "tierzero", "cache"), med(rows, "save", "tierzero", "cache")
    add("async stall vs sync save (page cache; next step's fwd+bwd overlaps the copy)", stall, sync, stall / sync,
        "<= 0.10 (stall/sync)", stall / sync <= 0.10)
    worst = med(rows, "async_stall", "tierzero", "cache")
    add("async stall, worst case (optimizer step right after the save)", worst, sync, worst / sync, "-", True)
    for mode in ("cold", "warm"):
        rs, same = med(rows, "load", "reshard", mode), med(rows, "load", "same", mode)
        raw = rs / same
        per_byte = (rs / bytes_reshard) / (same / bytes_same)
        add(f"load 4->2 reshard vs 4->4 ({mode}), raw", rs, same, raw, "<= 1.5 (reshard/same)", raw <= 1.5)
        add(f"load 4->2 reshard vs 4->4 ({mode}), per byte per rank", rs / bytes_reshard * 1e9,
            same / bytes_same * 1e9, per_byte, "<= 1.5", per_byte <= 1.5, "s/GB")

    print(f"\n# tierzero checkpoints vs plain writes, torch.distributed.checkpoint and same-layout loads | "
          f"{platform.node()} | {os.cpu_count()} CPUs | torch {torch.__version__} | {date.today()}")
    print(f"# filesystem: {fs_line}")
    print(f"# model d_model {D_MODEL} x {N_LAYERS} layers, {N_HEADS} heads, vocab {VOCAB}: {n_params / 1e6:.1f}M "
          f"params; zero3 over emulated [2, 2], {SAVE_WORLD} gloo ranks x 1 thread; {args.train_steps} AdamW "
          f"step(s) on random tokens before the first save")
    print(f"# saved per rank: {', '.join(f'{b / 1e6:.1f}' for b in per_rank)} MB in "
          f"{info['slices_per_rank']} slices; total {total / 1e6:.1f} MB of fp32 master + exp_avg + exp_avg_sq "
          f"(tierzero folder {info.get('tz_bytes', 0) / 1e6:.1f} MB, DCP folder {info.get('dcp_bytes', 0) / 1e6:.1f} MB)")
    print(f"# load: bytes read per rank (max) {bytes_same / 1e6:.1f} MB at 4 ranks, {bytes_reshard / 1e6:.1f} MB "
          f"at 2 ranks; read in all {read_same / 1e6:.1f} / {read_reshard / 1e6:.1f} MB")
    m = lambda metric: med(rows, metric, "tierzero", "cache" if metric != "checkpoint_slices" else "copy")  # noqa: E731
    print(f"# sync save split: engine.checkpoint_slices() {m('checkpoint_slices'):.3f} s + store.write_rank "
          f"{m('write_rank'):.3f} s + rank 0's commit {m('commit'):.3f} s (each barrier to barrier, page cache)")
    print(f"# async: stall {m('async_stall'):.3f} s, background write+commit {m('async_background'):.3f} s; with a "
          f"training step in flight: stall {m('async_stall_overlap'):.3f} s, background "
          f"{m('async_background_overlap'):.3f} s, the step {m('step_during_async_save'):.3f} s vs "
          f"{m('step_without_save'):.3f} s without a save")
    def per_variant(metric, contender, variant):
        return [[r["seconds"] for r in rows if r["metric"] == metric and r["contender"] == contender
                 and r["variant"] == variant and r["rep"] == rep][0] for rep in range(args.repeats)]

    def per_rep(metric, num, den, variant):
        def at(contender, rep):
            return [r["seconds"] for r in rows if r["metric"] == metric and r["contender"] == contender
                    and r["variant"] == variant and r["rep"] == rep][0]
        return " ".join(f"{at(num, i) / at(den, i):.2f}" for i in range(args.repeats))

    on_off = " ".join(f"{a / b:.2f}" for a, b in zip(per_variant("save", "tierzero", "fsync"),
                                                   per_variant("save", "tierzero", "cache")))
    print(f"# per-repeat ratios: plain/tz {per_rep('save', 'plain', 'tierzero', 'cache')} (cache), "
          f"{per_rep('save', 'plain', 'tierzero', 'fsync')} (fsync); tz fsync on/off {on_off}; "
          f"dcp/tz {per_rep('save', 'dcp', 'tierzero', 'cache')} (cache), {per_rep('save', 'dcp', 'tierzero', 'fsync')} "
          "(fsync); reshard/same "
          f"{per_rep('load', 'reshard', 'same', 'cold')} (cold), {per_rep('load', 'reshard', 'same', 'warm')} (warm)")
    print(f"# seconds = slowest rank, barrier to barrier; median of {args.repeats} alternating repeats")
    print(context_line())
    print(f"{'metric':<58}{'tierzero':>10}{'reference':>11}{'ratio':>8}  {'target':<22}{'met':>4}")
    for r in table:
        print(f"{r['metric']:<58}{r['tierzero']:>10.3f}{r['reference']:>11.3f}{r['ratio']:>8.3f}  {r['target']:<22}"
              f"{'yes' if r['met'] else 'no':>4}")
    print(f"# targets met: {sum(r['met'] for r in table)} of {len(table)}; runtime {elapsed:.0f} s")
    print(f"# {'FAILED: ' + '; '.join(failed) if failed else 'OK'}")

    print("\n| metric | tierzero | reference | ratio | target | met? |")
    print("|---|---|---|---|---|---|")
    for r in table:
        unit = r["note"] or "s"
        print(f"| {r['metric']} | {r['tierzero']:.3f} {unit} | {r['reference']:.3f} {unit} | **{r['ratio']:.2f}** "
              f"| {r['target']} | {'yes' if r['met'] else 'no'} |")

    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        args.parquet.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist([{**r, "bytes_per_rank": r.get("bytes_per_rank")} for r in rows]),
                       args.parquet)
        print(f"# rows: {args.parquet}")
    except ImportError:
        pass
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
