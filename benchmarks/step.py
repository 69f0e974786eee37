"""One optimizer step on CPU: the native engine against torch's AdamW, FSDP2 and the
data-parallel reference (issue 25, items 1, 2 and 8). Runs anywhere, no GPU.

(a) update  AdamW alone over one model's parameters, in this process (world size 1):
            native     the engine's update over its flat optimizer shards (NativeEngine.update_:
                       torch's fused AdamW kernel, weight decay by layout: two tensor lists)
            before     the update before issue 25, kept below (`adamw_update_before`: nine
                       passes and an fp32 temporary from a bool decay mask) over the same shards
            torch      torch.optim.AdamW(fused=True) -- the reference of the ratios -- and
                       (foreach=True) over the model's own parameters
            and the whole optimizer side of a step at world size 1 (norm, clipping, update,
            gradients released, parameters down): NativeEngine.step against `step_before`.
            --repeats rounds after a warm-up, every variant once a round (interleaved, so a
            shared or throttling machine slows all alike); the ratio is the median over rounds.
(b) step    forward + backward + optimizer step of the same model on --ranks gloo ranks, one
            spawn per engine: native zero3, FSDP2 zero3 (fully_shard per block and the root),
            the reference (ddp, torch.optim.AdamW foreach). Median over steps 2..N of the
            slowest rank; peak RSS above the rank's RSS before the engine was built (after a
            warm-up of a tiny model on the same path, so the runtime's own memory is not
            counted), high-water mark reset after building (/proc/self/clear_refs), so it
            is what the step holds, not what the build did (FSDP2 builds a full replica).
            --compile both (default) runs every engine eager and then compiled (train.compile's
            way: each block in place, native's head with its loss; the first step compiles and
            is not timed); kernels go to ~/.cache/tierzero/inductor.

Ratios are measured in the same run; nothing here fails on machine speed.

    python benchmarks/step.py                              # both parts, ~51M params, 2 ranks
    python benchmarks/step.py --part update --d-model 768 --n-layers 12
    python benchmarks/step.py --part step --ranks 4 --json step.json
    python benchmarks/step.py --part step --compile off       # eager only (no inductor compile)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tierzero.parallel.engines import EngineSetup, Optim
from tierzero.parallel.engines.base import param_groups
from tierzero.parallel.plans import named_plan
from tierzero.parallel.topology import emulated_topology
from tierzero.recipes.config import ModelConfig
from tierzero.recipes.model import build_model, count_params, loss_fn

LR, BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP = 1e-3, (0.9, 0.95), 1e-8, 0.1, 1.0
ENGINES = (  # name, parallel.plan, module, class
    ("reference", "ddp", "tierzero.parallel.engines.reference", "ReferenceEngine"),
    ("fsdp2", "zero3", "tierzero.parallel.engines.fsdp2", "FSDP2Engine"),
    ("native", "zero3", "tierzero.parallel.engines.native", "NativeEngine"),
)


# ---- the update before issue 25 (parallel/engines/native.py at 165bb3c) -----------------------

def adamw_update_before(master, exp_avg, exp_avg_sq, grad, decay, *, lr, betas, eps, weight_decay, step) -> None:
    b1, b2 = betas
    bc1 = 1 - b1 ** step
    bc2_sqrt = math.sqrt(1 - b2 ** step)
    master.mul_(torch.where(decay, 1 - lr * weight_decay, 1.0))
    exp_avg.lerp_(grad, 1 - b1)
    exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    master.addcdiv_(exp_avg, denom, value=-lr / bc1)


def decay_mask(unit) -> torch.Tensor:
    """The bool mask the engine kept per unit before (FlatUnit._decay_mask), from its decay runs."""
    mask = torch.zeros(unit.master.numel(), dtype=torch.bool)
    for a, b, decayed in unit.decay_runs:
        mask[a:b] = decayed
    return mask


def step_before(engine, grads, masks, p_shards, step: int) -> None:
    """NativeEngine.step at world size 1 as it was: the squared norm in float64, read, clipping,
    div_(world), the update, the accumulator zeroed, the masters cast (into a temporary in
    bfloat16) and copied into the parameter shard, a buffer of its own then (`p_shards`)."""
    total = torch.stack([g.double().pow(2).sum() for g in grads]).sum().float().reshape(1)
    norm = math.sqrt(total.tolist()[0])
    if GRAD_CLIP > 0 and norm > GRAD_CLIP:
        for g in grads:
            g.mul_(GRAD_CLIP / (norm + 1e-6))
    for u, g, mask, p_shard in zip(engine.units, grads, masks, p_shards):
        g.div_(1)
        adamw_update_before(u.master, u.exp_avg, u.exp_avg_sq, g, mask, lr=LR, betas=BETAS, eps=EPS,
                            weight_decay=WEIGHT_DECAY, step=step)
        g.zero_()
        p_shard.copy_(u.master.to(engine.dtype))


# ---- (a) the update alone ----------------------------------------------------------------------

def interleaved(variants, repeats: int) -> list:
    """Each variant (name, fn, untimed set-up or None) once per round, rounds one after another,
    the first a warm-up: a machine that slows down or is shared hits every variant alike.
    Returns (name, median ms, min ms, median over rounds of ms / the first variant's ms)."""
    times = {name: [] for name, _, _ in variants}
    for i in range(repeats + 1):
        for name, fn, before in variants:
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            if i:
                times[name].append(time.perf_counter() - t0)
    ref = times[variants[0][0]]
    return [(name, 1e3 * statistics.median(ts), 1e3 * min(ts), statistics.median(t / r for t, r in zip(ts, ref)))
            for name, ts in times.items()]


def part_update(cfg: ModelConfig, vocab: int, seq: int, repeats: int) -> list:
    from tierzero.parallel.engines.native import NativeEngine

    topo = emulated_topology([1])
    setup = EngineSetup(plan=named_plan("zero3", topo), topology=topo, rank=0, loss_fn=loss_fn,
                        optim=Optim(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP))
    gen = torch.Generator().manual_seed(0)

    def torch_adamw(**kind):
        model = build_model(cfg, vocab_size=vocab, seq_len=seq)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        return torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS, eps=EPS, **kind)

    fused, foreach = torch_adamw(fused=True), torch_adamw(foreach=True)
    # two engines over the same values: the update alone, and the whole optimizer side of step()
    engines = [NativeEngine(build_model(cfg, vocab_size=vocab, seq_len=seq), setup) for _ in range(2)]
    grads = [torch.randn(u.master.numel(), generator=gen) * 1e-3 for u in engines[0].units]
    masks = [decay_mask(u) for u in engines[0].units]
    copies = [g.clone() for g in grads]
    p_shards = [torch.empty_like(u.master) for u in engines[1].units]
    count = {"native": 0, "before": 0, "before step": 0}

    def native_update():
        count["native"] += 1
        engines[0].step_count = count["native"]
        engines[0].update_(list(grads), lr=LR)

    def before_update():  # on the same engine's shards as native_update, the same work
        count["before"] += 1
        for u, g, mask in zip(engines[0].units, grads, masks):
            adamw_update_before(u.master, u.exp_avg, u.exp_avg_sq, g, mask, lr=LR, betas=BETAS, eps=EPS,
                                weight_decay=WEIGHT_DECAY, step=count["before"])

    def fill_acc():  # a step's gradients, as the backward's reduce leaves them
        for u, g in zip(engines[1].units, grads):
            u.grad_acc = g.clone()

    def before_step():
        count["before step"] += 1
        step_before(engines[1], copies, masks, p_shards, count["before step"])

    def refill():
        for c, g in zip(copies, grads):
            c.copy_(g)

    return interleaved([
        ("torch AdamW(fused=True)", fused.step, None),
        ("torch AdamW(foreach=True)", foreach.step, None),
        ("native update (fused, 2 lists)", native_update, None),
        ("before: update (9 passes, mask)", before_update, None),
        ("native step() at world 1", lambda: engines[1].step(LR), fill_acc),
        ("before: step() at world 1", before_step, refill),
    ], repeats)


# ---- (b) one step on gloo ranks ----------------------------------------------------------------

def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (proc(5), Linux >= 4.0)
        return True
    except OSError:
        return False


def build_engine(name: str, cfg: ModelConfig, vocab: int, seq: int, world: int, rank: int, compiled: bool = False):
    import importlib

    _, plan, module, cls = next(e for e in ENGINES if e[0] == name)
    topo = emulated_topology([world])
    if name == "native":  # as the trainer builds it: on the meta device, each rank its shards
        with torch.device("meta"):
            model = build_model(cfg, vocab_size=vocab, seq_len=seq)
        model.materialize_buffers("cpu")
        init = model.init_slice
    else:
        model, init = build_model(cfg, vocab_size=vocab, seq_len=seq), None
    loss = loss_fn
    if compiled:  # as train.compile=true does it: each block in place, the head with the loss (native)
        from tierzero.recipes.compiling import compile_model

        loss = compile_model(model)
    setup = EngineSetup(plan=named_plan(plan, topo), topology=topo, rank=rank, loss_fn=loss, init=init,
                        optim=Optim(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP))
    return getattr(importlib.import_module(module), cls)(model, setup)


def _rank(rank: int, world: int, rdzv: str, name: str, shape: dict, steps: int, out: str, compiled: bool) -> None:
    from tierzero.parallel.host import return_large_frees

    if compiled:  # inductor's kernels in the user's cache (~/.cache/tierzero/inductor), never /tmp
        from tierzero.recipes.compiling import use_compile_cache

        use_compile_cache(None)

    return_large_frees()  # as every rank does (launcher.world.join)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    vocab, seq, batch = shape["vocab"], shape["seq"], shape["batch"]
    gen = torch.Generator().manual_seed(rank)

    def one_step(engine) -> float:
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
        loss = engine.micro_step(tokens[:, :-1], tokens[:, 1:], scale=1.0)
        engine.step(LR)
        engine.take_comm()
        return float(loss)

    tiny = ModelConfig(d_model=32, n_layers=2, n_heads=2)
    one_step(build_engine(name, tiny, vocab, seq, world, rank))  # the runtime's own memory, not counted
    dist.barrier()
    base = _status_kib("VmRSS")
    engine = build_engine(name, ModelConfig(**shape["model"]), vocab, seq, world, rank, compiled)
    built = _status_kib("VmHWM")
    reset = _reset_peak()
    times, losses = [], []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        losses.append(one_step(engine))
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(float(t))
    peak = _status_kib("VmHWM")
    Path(f"{out}.{rank}.json").write_text(json.dumps({
        "times_s": times, "losses": losses, "build_mib": (built - base) / 1024,
        "peak_mib": (peak - base) / 1024 if reset else float("nan")}))
    dist.destroy_process_group()


def part_step(shape: dict, world: int, steps: int, compiled: bool = False) -> list:
    """One spawn per engine; compiled: train.compile's way (the first, untimed step compiles)."""
    rows = []
    for name, plan, _, _ in ENGINES:
        with tempfile.TemporaryDirectory(prefix="tz-step-") as tmp:
            out = f"{tmp}/result"
            mp.spawn(_rank, args=(world, f"{tmp}/rdzv", name, shape, steps, out, compiled), nprocs=world, join=True)
            ranks = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(world)]
        rows.append({"engine": name + (" +c" if compiled else ""), "plan": plan,
                     "step_ms": 1e3 * statistics.median(ranks[0]["times_s"][1:]),
                     "peak_mib": max(r["peak_mib"] for r in ranks), "build_mib": max(r["build_mib"] for r in ranks),
                     "loss": ranks[0]["losses"][-1]})
        print(f"# ... {name} done", flush=True)
    return rows


# ---- output ------------------------------------------------------------------------------------

def metadata(args, params: int) -> list:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return [f"# tierzero benchmarks/step.py",
            f"# machine: {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
            f"# torch: {torch.__version__}; threads: {args.threads} (update part), cpus / ranks (step part)",
            f"# date: {datetime.now().isoformat(timespec='seconds')}",
            f"# command: {' '.join(sys.argv)}",
            f"# model: d_model={args.d_model} n_layers={args.n_layers} n_heads={args.n_heads} vocab={args.vocab} "
            f"({params / 1e6:.1f}M params), AdamW lr={LR} wd={WEIGHT_DECAY} clip={GRAD_CLIP}; load: {load}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("update", "step", "both"), default="both")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--n-layers", type=int, default=8)
    ap.add_argument("--n-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2, help="micro-batch per rank (part step)")
    ap.add_argument("--repeats", type=int, default=9, help="timed rounds of the update variants")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the update part (1: one rank's core, and steady on a shared machine)")
    ap.add_argument("--ranks", type=int, default=2, help="gloo ranks (part step)")
    ap.add_argument("--steps", type=int, default=4, help="steps per engine; the first is not timed (part step)")
    ap.add_argument("--compile", choices=("off", "on", "both"), default="both",
                    help="part step: eager, compiled (train.compile's way: per block, head with loss), or both")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    cfg = ModelConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads)
    params = count_params(cfg, args.vocab)
    lines = metadata(args, params)
    result = {"meta": lines, "update": [], "step": []}
    if args.part in ("update", "both"):
        torch.set_num_threads(args.threads)
        rows = part_update(cfg, args.vocab, args.seq, args.repeats)
        lines += ["#", f"# (a) AdamW update alone, {params / 1e6:.1f}M params, world size 1, {args.repeats} rounds "
                       "(every variant once a round, interleaved); ratio: median over rounds of time / fused's",
                  f"# {'variant':<34}{'median_ms':>10}{'min_ms':>9}{'gparams_s':>11}{'vs_fused':>10}{'min_vs_min':>12}"]
        low_ref = rows[0][2]
        for name, ms, low, ratio in rows:
            lines.append(f"  {name:<34}{ms:>10.1f}{low:>9.1f}{params / ms / 1e6:>11.3f}{ratio:>10.2f}"
                         f"{low / low_ref:>12.2f}")
            result["update"].append({"variant": name, "median_ms": ms, "min_ms": low, "vs_fused": ratio,
                                     "min_vs_min": low / low_ref})
        native = next(ratio for name, _, _, ratio in rows if name.startswith("native update"))
        lines.append(f"# native update / torch fused: {native:.2f} (issue 25 asks <= 1.10): "
                     f"{'OK' if native <= 1.10 else 'ABOVE'}")
    if args.part in ("step", "both"):
        shape = {"model": dict(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads),
                 "vocab": args.vocab, "seq": args.seq, "batch": args.batch}
        rows = []
        for compiled in {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]:
            rows += part_step(shape, args.ranks, args.steps, compiled)
        ref = next(r for r in rows if r["engine"].startswith("reference"))  # the first run's: eager if there is one
        fsdp2 = next(r for r in rows if r["engine"].startswith("fsdp2"))
        lines += ["#", f"# (b) one optimizer step (1 micro-step of {args.batch}x{args.seq} tokens per rank), "
                       f"{args.ranks} gloo ranks, median of steps 2..{args.steps}, slowest rank; RSS per rank, max "
                       "over ranks, above the RSS before the build; +c: compiled (train.compile); ratios against "
                       "the first reference and FSDP2 rows",
                  f"# {'engine':<14}{'plan':<7}{'step_ms':>10}{'vs_ref':>8}{'peak_mib':>10}{'vs_ref':>8}"
                  f"{'vs_fsdp2':>10}{'build_mib':>11}{'loss':>9}"]
        for r in rows:
            lines.append(f"  {r['engine']:<14}{r['plan']:<7}{r['step_ms']:>10.1f}{r['step_ms'] / ref['step_ms']:>8.2f}"
                         f"{r['peak_mib']:>10.0f}{r['peak_mib'] / ref['peak_mib']:>8.2f}"
                         f"{r['peak_mib'] / fsdp2['peak_mib']:>10.2f}{r['build_mib']:>11.0f}{r['loss']:>9.4f}")
        result["step"] = rows
    lines.append("# OK")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
