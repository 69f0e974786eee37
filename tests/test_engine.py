"""The native engine: every plan reproduces the single-process run, and the byte ledger
equals the cost model's prediction exactly.

Ranks are real processes on gloo (rendezvous through a file in tmp_path). The reference is
the Trainer with `parallel.engine=reference` in one process: plain data parallelism with
torch.optim.AdamW, an implementation that shares nothing with the sharded engine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from reference import Recorder, recipe, single_process_run

from tierzero.launcher.config import load_config
from tierzero.parallel.config import ParallelConfig
from tierzero.parallel.context import DistContext
from tierzero.parallel.cost import predict
from tierzero.parallel.plans import named_plan
from tierzero.parallel.topology import emulated_topology
from tierzero.recipes.trainer import train

pytestmark = pytest.mark.multiprocess

STEPS = 20
# a dense model: the default recipe is an MoE, which only the native engine runs
BASE = ["moe.num_experts=0", "parallel.ep=1", "train.warmup_steps=3", "model.d_model=32", "model.n_heads=2", "model.n_layers=3",
        "data.seq_len=16", f"train.steps={STEPS}"]

# (name, ParallelConfig kwargs) per topology; plain names plus explicit level assignments
PLANS_2x2 = [
    ("ddp", {}), ("zero1", {}), ("zero2", {}), ("zero3", {}), ("hpz", {}), ("hsdp", {}), ("tiered", {}),
    ("tiered[none,node,cluster]", {"levels": ["none", "node", "cluster"]}),
    ("tiered[node,cluster,cluster]", {"levels": ["node", "cluster", "cluster"]}),
]
PLANS_2x2x2 = [
    ("ddp", {}), ("zero1", {}), ("zero2", {}), ("zero3", {}), ("hpz", {}),
    ("hpz@package", {"secondary_level": "package"}), ("hsdp", {}), ("hsdp@package", {"hsdp_level": "package"}),
    ("tiered", {}),
    ("tiered[package,package,node]", {"levels": ["package", "package", "node"]}),
    ("tiered[none,package,cluster]", {"levels": ["none", "package", "cluster"]}),
]


def _overrides(world: int, micro: int):
    # grad accumulation 2 on every layout: global = 2 x micro x world
    return [*BASE, f"train.global_batch_size={2 * micro * world}", f"train.micro_batch_size={micro}"]


def _worker(rank: int, world: int, sizes, rdzv: str, out: str, plans, micro: int, extra=()):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    topo = emulated_topology(sizes)
    cfg = load_config([], [*_overrides(world, micro), *extra])
    ctx = DistContext(rank=rank, world_size=world, local_rank=rank, local_world_size=world, device="cpu",
                      backend="gloo", topology=topo, host="test")
    results = {}
    for name, kwargs in plans:
        rec = Recorder()
        pcfg = ParallelConfig(plan=name.split("[")[0].split("@")[0], **kwargs)
        res = train(recipe(cfg, parallel=pcfg), ctx, rec, peak_tflops=1.0, show_progress=False)
        results[name] = {"losses": res.losses, "measured": rec.ledger_bytes()}
    Path(f"{out}.{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _run(tmp_path, sizes, plans, micro, extra=()):
    world = math.prod(sizes)
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(world, sizes, str(tmp_path / "rdzv"), out, plans, micro, list(extra)), nprocs=world,
             join=True)
    return world, [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(world)]


def _reference(world: int, micro: int):
    return single_process_run(_overrides(world, micro))


def _predicted(name, kwargs, sizes, world, micro, dtype_bytes=4, reduce_bytes=None):
    from tierzero.recipes.data import build_dataset
    from tierzero.recipes.model import build_model
    from tierzero.parallel.engines.units import model_units

    cfg = load_config([], _overrides(world, micro))
    topo = emulated_topology(sizes)
    data = build_dataset(cfg.data)
    with torch.device("meta"):
        model = build_model(cfg.model, vocab_size=data.vocab_size, seq_len=data.seq_len)
    plan = named_plan(name.split("[")[0].split("@")[0], topo, ParallelConfig(**kwargs))
    cost = predict(plan, topo, model_units(model), dtype_bytes=dtype_bytes, grad_accum=2, reduce_bytes=reduce_bytes)
    return {f"{p}|{lv}|{op}": b * STEPS for (p, lv, op), b in cost.bytes.items()}


def _check(tmp_path, sizes, plans, micro):
    world, per_rank = _run(tmp_path, sizes, plans, micro)
    ref = _reference(world, micro).losses
    assert ref[-1] < ref[0] - 0.5, "the reference did not train; the comparison would prove nothing"
    failures = []
    for name, kwargs in plans:
        want_bytes = _predicted(name, kwargs, sizes, world, micro)
        for rank, results in enumerate(per_rank):
            got = results[name]
            for step, (g, w) in enumerate(zip(got["losses"], ref), start=1):
                if abs(g - w) > 1e-5 * abs(w):
                    failures.append(f"{name} rank {rank} step {step}: loss {g!r} vs reference {w!r}")
                    break
            m = got["measured"]
            if set(m) != set(want_bytes) or any(abs(m[k] - want_bytes[k]) > 1e-6 * want_bytes[k] for k in m):
                failures.append(f"{name} rank {rank}: ledger {m} != predicted {want_bytes}")
    assert not failures, "\n".join(failures)
    return per_rank


def test_every_plan_matches_single_process_on_2x2(tmp_path):
    per_rank = _check(tmp_path, [2, 2], PLANS_2x2, micro=2)
    # hpz keeps the backward gathers inside the node: 0 bytes cross nodes in backward
    # except the gradient reduce-scatter; tiered keeps both gathers inside the node
    for name in ("hpz", "tiered"):
        bwd_gathers = {k: v for k, v in per_rank[0][name]["measured"].items() if k.startswith("bwd|")
                       and k.endswith("|all_gather")}
        assert bwd_gathers and all("|cluster|" not in k for k in bwd_gathers), (name, bwd_gathers)
    tiered = per_rank[0]["tiered"]["measured"]
    assert not any(k.startswith(("fwd|cluster", "bwd|cluster")) for k in tiered), tiered


def test_every_plan_matches_single_process_on_2x2x2(tmp_path):
    _check(tmp_path, [2, 2, 2], PLANS_2x2x2, micro=1)


def test_bfloat16_trains_with_fp32_master_weights(tmp_path):
    """bf16 compute, fp32 master weights and moments: every plan still follows the fp32
    trajectory closely (bf16 rounds activations, and with parallel.reduce_dtype=bfloat16 the
    gradients it reduces). The ledger equals the cost model's prediction for both reduce dtypes:
    bf16 gathers move half the bytes of fp32, gradient reduce-scatters what reduce_dtype says."""
    plans = [("ddp", {}), ("zero3", {}), ("tiered", {}), ("zero3@bf16-reduce", {"reduce_dtype": "bfloat16"})]
    world, per_rank = _run(tmp_path, [2, 2], plans, micro=2, extra=["train.dtype=bfloat16"])
    ref = _reference(world, micro=2).losses
    for name, kwargs in plans:
        got = per_rank[0][name]["losses"]
        assert got[-1] < got[0] - 0.5, (name, got)
        worst = max(abs(g - w) / w for g, w in zip(got, ref))
        assert worst < 2e-2, f"{name}: bf16 loss strays {worst:.3%} from the fp32 trajectory"
        reduce_bytes = 2 if kwargs.get("reduce_dtype") == "bfloat16" else 4
        want = _predicted(name, kwargs, [2, 2], world, 2, dtype_bytes=2, reduce_bytes=reduce_bytes)
        measured = per_rank[0][name]["measured"]
        assert set(measured) == set(want), (name, measured, want)
        for key in want:
            assert measured[key] == pytest.approx(want[key], rel=1e-9), (name, key)
    rs = "bwd|cluster|reduce_scatter"
    assert per_rank[0]["zero3"]["measured"][rs] == 2 * per_rank[0]["zero3@bf16-reduce"]["measured"][rs]
