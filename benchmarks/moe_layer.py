"""tierzero's MoE layer against DeepSpeed's MoE under ZeRO-2, same shapes, one run.

4 gloo ranks on this host (torch.multiprocessing spawn, rendezvous through a file in a
temp dir, 1 torch thread per rank), for each expert-parallel size in --ep:

    tierzero   parallel.moe.MoEFeedForward bound to an EP group, + an explicit gradient
               all-reduce (router over all ranks, experts over the ranks holding the same
               experts) and torch AdamW on every rank
    DeepSpeed  deepspeed.moe.layer.MoE (SwiGLU expert module of the same shapes) run by
               deepspeed.initialize with ZeRO stage 2 (the repo's zero2 mapping,
               parallel/engines/deepspeed.py) and the same torch AdamW

Both do a full training step per iteration: forward, loss (MSE to a fixed random target
+ 0.01 x the load-balance loss), backward, gradient reduction, AdamW step. Shapes: 8
experts, top-2, d_model 256, expert hidden 512, capacity factor 1.25, 4 x 256 tokens per
rank per step. --warmup steps, then --steps timed steps; tokens/s per rank = tokens per
step / mean step time of the slowest rank. Peak memory per rank = the kernel's RSS
high-water mark (VmHWM, reset just before the timed loop through /proc/self/clear_refs)
minus the RSS before the measured model was built. Each rank first builds, steps once and
frees a throwaway instance of its contender, so that the modules both frameworks import
lazily while building and on the first step (825 for tierzero's path -- torch._dynamo,
sympy via torch.optim and torch.distributed -- 1535 for DeepSpeed's, + torch._inductor,
networkx, its op builders: 70-150 MB of RSS) are not counted as the layer's memory. The
RSS and its anonymous part (RssAnon, the heap) sampled after every step are kept in the
Parquet copy too. A second table splits rank 0's step into forward+loss,
backward (DeepSpeed's ZeRO-2 gradient reduce-scatter runs inside it) and gradient
reduction + AdamW (DeepSpeed: engine.step, which also all-gathers the updated shards).

The contenders alternate (A B A B ...) --repeats times per configuration, each run in its
own spawn of 4 fresh processes; the table shows medians. Speed never fails the script:
it exits non-zero only if a run crashed or produced a non-finite loss.

    python benchmarks/moe_layer.py [--ep 2 4] [--repeats 3] [--steps 10] [--warmup 3]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from tierzero.parallel.moe import SwiGLU  # noqa: E402  (one expert for DeepSpeed: the math of a slice of tierzero's)

WORLD = 4
NUM_EXPERTS, TOP_K = 8, 2
D_MODEL, HIDDEN = 256, 512
BATCH, SEQ = 4, 256
CAPACITY_FACTOR = 1.25
AUX_COEF = 0.01
INIT_STD = 0.02
LR = 1e-3
CONTENDERS = ("tierzero", "deepspeed")


# ---- memory --------------------------------------------------------------------------------

def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss_bytes() -> int:
    return _status_kb("VmRSS")


def trim_heap() -> None:
    """Give freed heap pages back to the kernel (glibc malloc_trim), so they leave RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---- the two contenders ------------------------------------------------------------------

class DSModel(nn.Module):
    """The DeepSpeed engine needs a module that holds the MoE layer."""

    def __init__(self, ep: int):
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.moe = MoE(D_MODEL, expert=SwiGLU(D_MODEL, HIDDEN), num_experts=NUM_EXPERTS, ep_size=ep, k=TOP_K,
                       capacity_factor=CAPACITY_FACTOR, eval_capacity_factor=CAPACITY_FACTOR, min_capacity=4,
                       drop_tokens=True, use_residual=False,
                       # plain top-2 as tierzero routes (the default samples the 2nd expert with Gumbel noise)
                       top2_2nd_expert_sampling=False)
        with torch.no_grad():  # same init as MoEFeedForward.init_weights(0.02, 0.02)
            for p in self.moe.parameters():
                nn.init.normal_(p, mean=0.0, std=INIT_STD)

    def forward(self, x):
        out, l_aux, _ = self.moe(x)
        return out, l_aux


_GROUPS: dict = {}
"""ep -> (EP groups, expert-data-parallel groups), made once per process like DeepSpeed's."""


def setup_tierzero(rank: int, ep: int):
    from tierzero.parallel.moe import ExpertParallel, MoEConfig, MoEFeedForward

    if ep not in _GROUPS:  # every rank creates every group, in the same order (torch.distributed's rule)
        _GROUPS[ep] = ([dist.new_group(list(range(s, s + ep))) for s in range(0, WORLD, ep)],
                       [dist.new_group(list(range(j, WORLD, ep))) for j in range(ep)])
    ep_groups, edp_groups = _GROUPS[ep]
    # z-loss off: DeepSpeed's gate has none; the load-balance loss is on in both
    cfg = MoEConfig(num_experts=NUM_EXPERTS, top_k=TOP_K, capacity_factor=CAPACITY_FACTOR,
                    aux_loss_coef=AUX_COEF, z_loss_coef=0.0)
    torch.manual_seed(0)
    layer = MoEFeedForward(D_MODEL, HIDDEN, cfg)
    layer.init_weights(INIT_STD, INIT_STD)
    ep_ranks = tuple(range(rank // ep * ep, rank // ep * ep + ep))
    pg = None if ep == WORLD else ep_groups[rank // ep]
    layer.bind_expert_parallel(ExpertParallel(pg, ep_ranks, rank % ep, "node", (0,) * ep, ledger=None))
    layer.train()
    edp = edp_groups[rank % ep]
    edp_size = WORLD // ep
    dense = [p for n, p in layer.named_parameters() if not n.startswith("experts.")]
    experts = [p for n, p in layer.named_parameters() if n.startswith("experts.")]
    opt = torch.optim.AdamW(layer.parameters(), lr=LR, weight_decay=0.0, foreach=False)
    rows = []

    def hook(_mod, args):  # rows the local experts' batched matmuls run on (padding included)
        rows.append(int(args[2].max()) * args[2].numel())

    layer.experts.register_forward_pre_hook(hook)

    def allreduce_mean(params, group, size):
        """One flat bucket per group, summed, / world: the gradient of the mean loss over all ranks."""
        if size == 1:  # ep == world: no other rank holds these experts
            for p in params:
                p.grad.div_(WORLD)
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, group=group)
        flat.div_(WORLD)
        off = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[off:off + n].view_as(p.grad))
            off += n

    def step(x, target):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = layer(x)  # the aux loss is attached to out's backward inside the layer
        loss = F.mse_loss(out, target)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        allreduce_mean(dense, None, WORLD)
        allreduce_mean(experts, edp, edp_size)
        opt.step()
        return loss.item(), (t1 - t0, t2 - t1, time.perf_counter() - t2)

    return step, rows


def setup_deepspeed(rank: int, ep: int):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from tierzero.parallel.engines.deepspeed import _skip_shm_comm_build, deepspeed_config
    from tierzero.parallel.plans import named_plan
    from tierzero.parallel.topology import emulated_topology

    deepspeed.utils.logger.setLevel(logging.WARNING)
    os.environ.setdefault("LOCAL_RANK", "0")  # deepspeed.initialize asserts it is set
    _skip_shm_comm_build()
    topo = emulated_topology([WORLD])
    config = deepspeed_config(named_plan("zero2", topo), topo, micro_batch_size=BATCH, grad_accum=1,
                              world_size=WORLD, dtype="float32", grad_clip=0.0)
    torch.manual_seed(0)
    model = DSModel(ep)
    # ZeRO-1/2 refuses MoE parameters outside a param group marked 'moe' (reduced over the
    # expert-data-parallel group instead of all ranks)
    groups = split_params_into_different_moe_groups_for_optimizer(
        [{"name": "params", "params": list(model.parameters())}])
    opt = torch.optim.AdamW(groups, lr=LR, weight_decay=0.0, foreach=False)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    rows = []
    gate = model.moe.deepspeed_moe

    def step(x, target):
        t0 = time.perf_counter()
        out, l_aux = engine(x)
        loss = F.mse_loss(out, target)
        t1 = time.perf_counter()
        engine.backward(loss + AUX_COEF * l_aux)  # ZeRO-2 reduce-scatters the gradients in here
        t2 = time.perf_counter()
        engine.step()  # AdamW on this rank's shard, then all-gather of the updated parameters
        phases = (t1 - t0, t2 - t1, time.perf_counter() - t2)
        # [E, C] expert buffer: every slot is computed, filled or not
        rows.append(gate.num_local_experts * gate.ep_size * int(math.ceil(
            BATCH * SEQ * TOP_K * CAPACITY_FACTOR / NUM_EXPERTS)))
        return loss.item(), phases

    return step, rows


# ---- one rank -------------------------------------------------------------------------------

def rank_main(rank: int, contender: str, ep: int, rdzv: str, out_dir: str, warmup: int, steps: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    if contender == "deepspeed":
        import deepspeed  # noqa: F401  (imported before the baseline, as tierzero's imports are)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=WORLD)
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=g)
    target = torch.randn(BATCH, SEQ, D_MODEL, generator=g)
    setup = setup_tierzero if contender == "tierzero" else setup_deepspeed
    # A throwaway instance first: both frameworks import hundreds of modules lazily while the
    # model, groups and optimizer are built and on the first step (torch._dynamo, sympy; for
    # DeepSpeed also torch._inductor, networkx, its op builders), 70-150 MB per rank that
    # would otherwise count as the layer's memory. Built, stepped once, freed, heap trimmed.
    mods = len(sys.modules)
    throwaway, _ = setup(rank, ep)
    throwaway(x, target)
    del throwaway, _
    gc.collect()
    trim_heap()
    lazy_modules = len(sys.modules) - mods
    dist.barrier()
    rss0, anon0 = rss_bytes(), _status_kb("RssAnon")  # before the measured model exists

    step, rows = setup(rank, ep)
    setup_anon = _status_kb("RssAnon") - anon0
    losses = [step(x, target)[0] for _ in range(warmup)]
    hwm_ok = reset_peak_rss()
    sampled, anon, times, phases = [], [], [], []
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        s = time.perf_counter()
        loss, ph = step(x, target)
        times.append(time.perf_counter() - s)
        losses.append(loss)
        phases.append(ph)
        sampled.append(rss_bytes())
        anon.append(_status_kb("RssAnon"))
    dist.barrier()
    total = time.perf_counter() - t0
    peak = _status_kb("VmHWM") if hwm_ok else max(sampled)
    result = {
        "rank": rank, "step_s": times, "loop_s": total, "rss_before_model": rss0,
        "peak_rss_growth": peak - rss0, "sampled_rss_growth": max(sampled) - rss0, "peak_rss": peak,
        "anon_growth": max(anon) - anon0, "setup_anon": setup_anon, "lazy_modules": lazy_modules,
        "phase_s": [statistics.mean(p[i] for p in phases) for i in range(3)],
        "hwm": hwm_ok, "losses": losses, "expert_rows": statistics.mean(rows[warmup:]) if rows[warmup:] else None,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run_once(tmp: Path, tag: str, contender: str, ep: int, warmup: int, steps: int) -> dict:
    out = tmp / tag
    out.mkdir()
    t0 = time.perf_counter()
    mp.spawn(rank_main, args=(contender, ep, str(tmp / f"rdzv-{tag}"), str(out), warmup, steps),
             nprocs=WORLD, join=True)
    wall = time.perf_counter() - t0
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    # the slowest rank's mean step time (the ranks wait on each other in every all-to-all)
    step_s = max(statistics.mean(r["step_s"]) for r in ranks)
    return {
        "contender": contender, "ep": ep, "tag": tag,
        "step_s": step_s, "tokens_per_s_per_rank": BATCH * SEQ / step_s,
        "peak_rss_growth_mb": max(r["peak_rss_growth"] for r in ranks) / 2**20,
        "sampled_rss_growth_mb": max(r["sampled_rss_growth"] for r in ranks) / 2**20,
        "peak_rss_mb": max(r["peak_rss"] for r in ranks) / 2**20,
        "anon_rss_growth_mb": max(r["anon_growth"] for r in ranks) / 2**20,
        "setup_anon_growth_mb": max(r["setup_anon"] for r in ranks) / 2**20,
        "lazy_modules": max(r["lazy_modules"] for r in ranks),
        # rank 0's mean time in forward+loss / backward / reduction+optimizer
        "fwd_s": ranks[0]["phase_s"][0], "bwd_s": ranks[0]["phase_s"][1], "opt_s": ranks[0]["phase_s"][2],
        "peak_is_hwm": all(r["hwm"] for r in ranks),
        "expert_rows_per_rank": statistics.mean(r["expert_rows"] for r in ranks),
        "final_loss": statistics.mean(r["losses"][-1] for r in ranks),
        "finite": all(math.isfinite(v) for r in ranks for v in r["losses"]),
        "spawn_wall_s": wall,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--parquet", type=Path, default=ROOT / "runs" / "bench" / "moe_layer.parquet")
    args = ap.parse_args(argv)

    import deepspeed

    t_start = time.perf_counter()
    runs, failed = [], []
    with tempfile.TemporaryDirectory(prefix="tz-moe-") as tmp:
        for ep in args.ep:
            for rep in range(args.repeats):
                order = CONTENDERS if rep % 2 == 0 else CONTENDERS[::-1]
                for contender in order:
                    tag = f"{contender}-ep{ep}-r{rep}"
                    try:
                        row = run_once(Path(tmp), tag, contender, ep, args.warmup, args.steps)
                    except Exception as e:  # a crashed contender is reported, not raised
                        failed.append(f"{tag}: {type(e).__name__}: {str(e).strip().splitlines()[-1:]}")
                        print(f"# {tag} FAILED: {e}", flush=True)
                        continue
                    row["repeat"] = rep
                    runs.append(row)
                    print(f"# {tag}: {row['tokens_per_s_per_rank']:.0f} tokens/s/rank, "
                          f"peak +{row['peak_rss_growth_mb']:.0f} MB ({row['spawn_wall_s']:.0f} s)", flush=True)
    elapsed = time.perf_counter() - t_start

    def med(ep, contender, key):
        vals = [r[key] for r in runs if r["ep"] == ep and r["contender"] == contender]
        return statistics.median(vals) if vals else None

    print(f"\n# tierzero MoE layer vs DeepSpeed MoE (ZeRO-2) | {platform.node()} | {os.cpu_count()} CPUs | "
          f"torch {torch.__version__} | deepspeed {deepspeed.__version__} | {date.today()}")
    print(f"# {WORLD} gloo ranks x 1 thread, {NUM_EXPERTS} experts, top-{TOP_K}, d_model {D_MODEL}, expert hidden "
          f"{HIDDEN}, capacity factor {CAPACITY_FACTOR}, {BATCH}x{SEQ} tokens/rank/step, fp32, AdamW")
    print(f"# {args.warmup} warm-up + {args.steps} timed steps, median of {args.repeats} alternating runs each; "
          "peak MB = RSS high-water mark in the timed loop - RSS before the model (max over ranks)")
    print("# tokens/s per rank = tokens per step / slowest rank's mean step time; rows = expert-matmul rows per rank")
    hdr = (f"{'ep':>4}{'tierzero':>14}{'DeepSpeed':>14}{'ratio':>9}{'tz peak':>10}{'DS peak':>10}"
           f"{'tz rows':>10}{'DS rows':>10}")
    units = (f"{'':>4}{'(tokens/s)':>14}{'(tokens/s)':>14}{'(tz/DS)':>9}{'(MB)':>10}{'(MB)':>10}"
             f"{'(/step)':>10}{'(/step)':>10}")
    print(hdr)
    print(units)
    table, ratios = [], []
    for ep in args.ep:
        tz, dsp = med(ep, "tierzero", "tokens_per_s_per_rank"), med(ep, "deepspeed", "tokens_per_s_per_rank")
        if tz is None or dsp is None:
            print(f"{ep:>4}  missing: " + ", ".join(c for c, v in (("tierzero", tz), ("deepspeed", dsp)) if v is None))
            continue
        ratio = tz / dsp
        ratios.append(ratio)
        row = {"ep": ep, "tz": tz, "ds": dsp, "ratio": ratio,
               "tz_mb": med(ep, "tierzero", "peak_rss_growth_mb"), "ds_mb": med(ep, "deepspeed", "peak_rss_growth_mb"),
               "tz_rows": med(ep, "tierzero", "expert_rows_per_rank"),
               "ds_rows": med(ep, "deepspeed", "expert_rows_per_rank")}
        table.append(row)
        print(f"{ep:>4}{tz:>14.0f}{dsp:>14.0f}{ratio:>9.3f}{row['tz_mb']:>10.1f}{row['ds_mb']:>10.1f}"
              f"{row['tz_rows']:>10.0f}{row['ds_rows']:>10.0f}")
    bad = [r["tag"] for r in runs if not r["finite"]]
    if ratios:
        gm = math.exp(sum(map(math.log, ratios)) / len(ratios))
        print(f"# Avg ratio tierzero/DeepSpeed (geometric mean): {gm:.3f}  (target >= 1.0: "
              f"{'met' if gm >= 1.0 and min(ratios) >= 1.0 else 'not met'})")
    print(f"# runtime {elapsed:.0f} s")
    print(f"# {'FAILED: ' + '; '.join(failed + [f'{b}: non-finite loss' for b in bad]) if failed or bad else 'OK'}")

    print("\n# where the time goes (rank 0, ms per step, medians): forward+loss / backward / grad reduction+AdamW")
    print(f"{'ep':>4}{'contender':>11}{'fwd':>9}{'bwd':>9}{'opt':>9}{'total':>9}{'anon MB':>9}")
    for ep in args.ep:
        for c in CONTENDERS:
            if med(ep, c, "fwd_s") is None:
                continue
            f, b, o = (med(ep, c, k) * 1e3 for k in ("fwd_s", "bwd_s", "opt_s"))
            print(f"{ep:>4}{c:>11}{f:>9.1f}{b:>9.1f}{o:>9.1f}{med(ep, c, 'step_s') * 1e3:>9.1f}"
                  f"{med(ep, c, 'anon_rss_growth_mb'):>9.1f}")

    print("\n| EP | tierzero tokens/s/rank | DeepSpeed tokens/s/rank | tierzero / DeepSpeed | "
          "tierzero peak RSS MB | DeepSpeed peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['ep']} | {r['tz']:.0f} | {r['ds']:.0f} | **{r['ratio']:.2f}x** | {r['tz_mb']:.0f} "
              f"| {r['ds_mb']:.0f} |")

    if runs:
        import pyarrow as pa
        import pyarrow.parquet as pq

        args.parquet.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(runs), args.parquet)
        print(f"# rows: {args.parquet}")
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
