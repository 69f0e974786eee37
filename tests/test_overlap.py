"""Communication the native engine hides behind compute (issue 25, item 6).

- the last block stays gathered from its forward into its backward: the byte ledger shows one
  block's backward gather fewer per micro-step than the schedule that re-gathers it (what the
  cost model predicts for units that all gather for their backward), and the losses stay the
  single-process reference's;
- the outer unit's gather for the next micro-step is prefetched beside block 0's backward
  (bytes as before), none across the optimizer step;
- on NCCL the gradient reduce-scatters get process groups of their own; gloo builds the
  groups it always built (pure keys, and the groups of a real gloo world);
- parallel.grad_sync=step: gradients reduce-scattered once per optimizer step from each rank's
  full-size sums -- the reduce-scatter bytes / accumulation, the memory of one unsharded gradient
  more, auto's pick by predicted time among what fits; ledger == prediction, losses the
  reference's.

Ranks are real processes on gloo (2x2 emulated nodes), as tests/test_engine.py.
"""

from __future__ import annotations

import dataclasses
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
from tierzero.parallel.cost import Unit, predict
from tierzero.parallel.groups import REDUCE_SCATTER_ROLES, ROLES, group_keys
from tierzero.parallel.layout import padded_numel, plan_groups, span
from tierzero.parallel.plans import named_plan
from tierzero.parallel.topology import emulated_topology
from tierzero.recipes.trainer import train

SIZES, STEPS, MICRO, ACCUM = [2, 2], 8, 2, 2
WORLD = math.prod(SIZES)
OVERRIDES = ["moe.num_experts=0", "parallel.ep=1", "train.warmup_steps=3", "model.d_model=32", "model.n_heads=2",
             "model.n_layers=3", "data.seq_len=16", f"train.steps={STEPS}", f"train.micro_batch_size={MICRO}",
             f"train.global_batch_size={ACCUM * MICRO * WORLD}"]
PLANS = [  # (label, parallel.plan, other parallel.* keys, losses compared with the reference's)
    ("zero3", "zero3", {}, True), ("hpz", "hpz", {}, True),
    ("zero3 step", "zero3", {"grad_sync": "step"}, True), ("hsdp step", "hsdp", {"grad_sync": "step"}, True),
    ("zeropp step", "zeropp", {"grad_sync": "step"}, False),  # quantized: the ledger only
]


# ---- pure: the groups each backend builds -------------------------------------------------------

@pytest.mark.parametrize("name", ["zero3", "hpz", "hsdp", "tiered", "zero2", "ddp"])
def test_gloo_shares_one_group_per_partition_and_nccl_gives_reduce_scatters_their_own(name):
    topo = emulated_topology([2, 2, 2])
    plan = named_plan(name, topo)
    lists = plan_groups(plan, topo)
    partition = {role: tuple(tuple(g) for g in getattr(lists, role)) for role in ROLES}
    gloo = group_keys(plan, topo, own_reduce_scatter=False)
    assert gloo == {role: (partition[role], "") for role in ROLES}  # as before: one group per partition
    nccl = group_keys(plan, topo, own_reduce_scatter=True)
    gathers = {nccl[role] for role in ("param", "bwd", "param_down")}
    for role in ROLES:
        if role in REDUCE_SCATTER_ROLES:
            assert nccl[role] not in gathers, (role, nccl[role])
            assert nccl[role][0] == partition[role]  # the same ranks, so the same levels in the ledger
        else:
            assert nccl[role] == gloo[role]
    if name == "zero3":  # gathers and reduce-scatters over the same ranks: a second group on NCCL only
        assert gloo["grad"] == gloo["param"] and nccl["grad"] != nccl["param"]


def test_the_last_blocks_reduce_scatter_runs_beside_the_gather_before_it():
    """zero3 on 2x2, three equal blocks, the last one not gathered for its backward: block 1's
    gather is in flight beside block 2's reduce-scatter, block 0's beside block 1's, block 0's
    reduce-scatter alone -- two pairs, where the schedule that re-gathers the last block had
    the same two pairs and the last block's gather alone."""
    topo = emulated_topology([2, 2], bandwidths_gbps=[10, 1])
    kept = [Unit(f"b{i}", 4000, bwd_gathers=0 if i == 2 else 1) for i in range(3)]
    regathered = [dataclasses.replace(u, bwd_gathers=1) for u in kept]
    new, old = (predict(named_plan("zero3", topo), topo, u, dtype_bytes=4, grad_accum=1) for u in (kept, regathered))
    a, r = 4000 * 4 * 3 / 4, 2e9
    key = ("bwd", "cluster", "all_gather")
    assert old.bytes[key] - new.bytes[key] == a
    assert new.time_s[key] == pytest.approx(2 * (2 * a / r), rel=1e-12)
    assert old.comm_time_s - new.comm_time_s == pytest.approx(a / r, rel=1e-12)


# ---- pure: grad_sync=step in the cost model and the planner ---------------------------------------

def _engine_like_units():
    """The native engine's shape: the outer unit and three blocks, the last one kept gathered."""
    return [Unit("outer", 4000, bwd_gathers=0)] + [Unit(f"blocks.{i}", 8000, bwd_gathers=0 if i == 2 else 1)
                                                   for i in range(3)]


def test_grad_sync_step_sends_the_reduce_scatter_once_and_holds_the_full_gradient():
    topo = emulated_topology([2, 2])
    units, accum = _engine_like_units(), 4
    micro = predict(named_plan("zero3", topo), topo, units, dtype_bytes=4, grad_accum=accum)
    step = predict(named_plan("zero3", topo, ParallelConfig(grad_sync="step")), topo, units, dtype_bytes=4,
                   grad_accum=accum)
    rs = ("bwd", "cluster", "reduce_scatter")
    assert micro.bytes[rs] == pytest.approx(accum * step.bytes[rs], rel=1e-12)
    assert {k: v for k, v in step.bytes.items() if k != rs} == {k: v for k, v in micro.bytes.items() if k != rs}
    full = sum(padded_numel(u.numel, 4) for u in units) * 4  # every unit's gradient, unsharded, in float32
    assert step.memory["unreduced_grads"] == full and micro.memory["unreduced_grads"] == 0
    assert step.memory_total == pytest.approx(micro.memory_total + full, rel=1e-12)
    assert step.comm_time_s < micro.comm_time_s
    bf16 = predict(step.plan, topo, units, dtype_bytes=2, grad_accum=accum, reduce_bytes=2)
    assert bf16.memory["unreduced_grads"] == full / 2  # kept in the reduce dtype


def test_grad_sync_auto_picks_step_where_it_fits_and_micro_where_it_does_not():
    from tierzero.parallel.choose import resolve_plan
    from tierzero.parallel.cost import PlanInputs

    topo = emulated_topology([2, 2])
    inputs = PlanInputs(tuple(_engine_like_units()), dtype_bytes=4, grad_accum=4)
    cfg = ParallelConfig(plan="zero3", grad_sync="auto")
    roomy = resolve_plan(cfg, topo, inputs, memory_budget_bytes=None)
    assert roomy.plan.grad_sync == "step" and roomy.plan.describe(topo).endswith(",sync=step)")
    assert "parallel.grad_sync=auto" in roomy.reason and len(roomy.costs) == 2
    micro = next(c for c in roomy.costs if c.plan.grad_sync == "micro")
    tight = resolve_plan(cfg, topo, inputs, memory_budget_bytes=micro.memory_total)
    assert tight.plan.grad_sync == "micro"
    # auto over every plan tries both where they differ: the fastest that fits
    every = resolve_plan(ParallelConfig(grad_sync="auto"), topo, inputs, memory_budget_bytes=None)
    best = min(c.predicted_s for c in every.costs if c.fits)
    assert every.cost.predicted_s == pytest.approx(best, rel=1e-3)
    assert {c.plan.grad_sync for c in every.costs} == {"micro", "step"}
    # nothing to choose without accumulation, or with replicated gradients; step only on native
    one = PlanInputs(inputs.units, dtype_bytes=4, grad_accum=1)
    assert resolve_plan(cfg, topo, one, memory_budget_bytes=None).plan.grad_sync == "micro"
    assert named_plan("ddp", topo, ParallelConfig(grad_sync="step")).grad_sync == "micro"
    fsdp2 = ParallelConfig(plan="zero3", grad_sync="auto", engine="fsdp2")
    assert resolve_plan(fsdp2, topo, inputs, memory_budget_bytes=None).plan.grad_sync == "micro"


def test_grad_sync_errors_name_the_key_and_the_choices():
    (bad,) = ParallelConfig(grad_sync="often").errors()
    assert "parallel.grad_sync='often'" in bad and "['micro', 'step', 'auto']" in bad
    (engine,) = ParallelConfig(grad_sync="step", engine="fsdp2").errors()
    assert "parallel.grad_sync=step" in engine and "parallel.engine=native" in engine
    assert ParallelConfig(grad_sync="auto", engine="fsdp2").errors() == []


# ---- on gloo ranks ------------------------------------------------------------------------------

def _probe_engine(rank: int) -> dict:
    """One optimizer step of two micro-steps driven by hand: what is gathered between them."""
    from tierzero.parallel.engines import EngineSetup, Optim
    from tierzero.parallel.engines.native import NativeEngine
    from tierzero.recipes.config import ModelConfig
    from tierzero.recipes.model import build_model, loss_fn

    topo = emulated_topology(SIZES)
    torch.manual_seed(0)
    model = build_model(ModelConfig(d_model=32, n_layers=3, n_heads=2), vocab_size=64, seq_len=8)
    engine = NativeEngine(model, EngineSetup(plan=named_plan("zero3", topo), topology=topo, rank=rank,
                                             loss_fn=loss_fn, optim=Optim(lr=1e-3), grad_accum=ACCUM))
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(rank))

    def gathered():
        return [u.name for u in engine.units if u.gathered and u.full.untyped_storage().size()]

    seen = {"groups_shared": engine.groups["grad"] is engine.groups["param"]}
    engine.micro_step(tokens[:, :-1], tokens[:, 1:], scale=0.5)
    seen["after_first"] = gathered()  # the outer unit, prefetched for the next micro-step
    engine.micro_step(tokens[:, :-1], tokens[:, 1:], scale=0.5)
    seen["after_last"] = gathered()  # nothing: the step changes the parameters
    engine.step(1e-3)
    seen["after_step"] = gathered()
    return seen


def _worker(rank: int, rdzv: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=WORLD)
    ctx = DistContext(rank=rank, world_size=WORLD, local_rank=rank, local_world_size=WORLD, device="cpu",
                      backend="gloo", topology=emulated_topology(SIZES), host="test")
    cfg = load_config([], OVERRIDES)
    results = {"probe": _probe_engine(rank)}
    for label, name, kwargs, _ in PLANS:
        rec = Recorder()
        res = train(recipe(cfg, parallel=ParallelConfig(plan=name, **kwargs)), ctx, rec, peak_tflops=1.0,
                    show_progress=False)
        calls = {}
        for row in rec.comm_rows:
            key = f"{row['phase']}|{row['level']}|{row['op']}"
            calls[key] = calls.get(key, 0) + row["calls"]
        results[label] = {"losses": res.losses, "bytes": rec.ledger_bytes(), "calls": calls}
    Path(f"{out}.{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _units():
    from tierzero.parallel.engines.units import model_units
    from tierzero.recipes.data import build_dataset
    from tierzero.recipes.model import build_model

    cfg = load_config([], OVERRIDES)
    data = build_dataset(cfg.data)
    with torch.device("meta"):
        return model_units(build_model(cfg.model, vocab_size=data.vocab_size, seq_len=data.seq_len))


def _predicted(plan, units) -> dict:
    topo = emulated_topology(SIZES)
    cost = predict(plan, topo, units, dtype_bytes=4, grad_accum=ACCUM)
    return {f"{p}|{lv}|{op}": b * STEPS for (p, lv, op), b in cost.bytes.items()}


def _ledger_failures(label: str, got: dict, want: dict, ref) -> list:
    out = []
    if ref is not None and any(abs(g - w) > 1e-5 * abs(w) for g, w in zip(got["losses"], ref)):
        out.append(f"{label}: losses {got['losses']} vs reference {ref}")
    if set(got["bytes"]) != set(want) or got["bytes"] != pytest.approx(want, rel=1e-9):
        out.append(f"{label}: ledger {got['bytes']} != predicted {want}")
    return out


def _kept_block_failures(label: str, plan, got: dict, units, regathered) -> list:
    """One block's backward gather fewer per micro-step than the schedule that re-gathers it."""
    topo = emulated_topology(SIZES)
    blocks = [u for u in units if u.name.startswith("blocks.")]
    last = [u for u in blocks if u.bwd_gathers == 0]
    s_b = span(topo, plan.bwd_level)
    key = f"bwd|{topo.levels[plan.bwd_level].name}|all_gather"
    # one block's backward gather as the ledger counts it: its padded buffer over the backward group
    one_block = sum(padded_numel(u.numel, WORLD, plan.quant.pad_block) for u in last) * 4 * (s_b - 1) / s_b
    before, micro_steps = _predicted(plan, regathered), STEPS * ACCUM
    out = []
    if got["bytes"][key] != pytest.approx(before[key] - micro_steps * one_block, rel=1e-12):
        out.append(f"{label}: {key} {got['bytes'][key]}, not one block a micro-step fewer than {before[key]}")
    if got["calls"][key] != micro_steps * (len(blocks) - len(last)):
        out.append(f"{label}: {got['calls'][key]} backward gathers, want {micro_steps} x {len(blocks) - len(last)}")
    return out


def _grad_sync_failures(label: str, plan, got: dict, units, micro: dict) -> list:
    """grad_sync=step: each unit's gradient reduced once per optimizer step, not every micro-step
    (full precision: one reduce-scatter call per unit; qgZ: one call per hop and unit)."""
    topo = emulated_topology(SIZES)
    rs = {k: v for k, v in got["bytes"].items() if k.startswith("bwd|") and k.endswith("|reduce_scatter")}
    out = []
    if not rs or any(micro[k] != pytest.approx(ACCUM * v, rel=1e-12) for k, v in rs.items()):
        out.append(f"{label}: backward reduce-scatters {rs}, not 1/{ACCUM} of grad_sync=micro's {micro}")
    if not plan.quant.grad_bits:
        key = f"bwd|{topo.levels[plan.grad_level].name}|reduce_scatter"
        if got["calls"][key] != STEPS * len(units):
            out.append(f"{label}: {got['calls'][key]} reduce-scatters, want one per unit and step")
    return out


@pytest.mark.multiprocess
def test_the_last_block_is_gathered_once_and_the_outer_unit_ahead(tmp_path):
    """Every plan: losses as the single-process reference's (full precision), ledger == prediction,
    one block's backward gather fewer per micro-step; grad_sync=step reduces once per step."""
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(str(tmp_path / "rdzv"), out), nprocs=WORLD, join=True)
    per_rank = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(WORLD)]
    ref = single_process_run(OVERRIDES).losses
    assert ref[-1] < ref[0] - 0.3, "the reference did not train; the comparison would prove nothing"
    topo = emulated_topology(SIZES)
    units = _units()
    blocks = [u for u in units if u.name.startswith("blocks.")]
    last = [u for u in blocks if u.name.split(".")[1] == str(len(blocks) - 1)]
    assert last and all(u.bwd_gathers == 0 for u in last) and all(u.bwd_gathers == 1 for u in blocks if u not in last)
    regathered = [dataclasses.replace(u, bwd_gathers=1) if u in last else u for u in units]
    failures = []
    for label, name, kwargs, exact in PLANS:
        plan = named_plan(name, topo, ParallelConfig(**kwargs))
        assert plan.grad_sync == kwargs.get("grad_sync", "micro"), plan
        want = _predicted(plan, units)
        micro = _predicted(dataclasses.replace(plan, grad_sync="micro"), units)
        for rank, results in enumerate(per_rank):
            got, where = results[label], f"{label} rank {rank}"
            failures += _ledger_failures(where, got, want, ref if exact else None)
            failures += _kept_block_failures(where, plan, got, units, regathered)
            if plan.grad_sync == "step":
                failures += _grad_sync_failures(where, plan, got, units, micro)
    assert not failures, "\n".join(failures)
    for rank, got in enumerate(per_rank):
        probe = got["probe"]
        assert probe["groups_shared"], "gloo: zero3's gathers and reduce-scatters share one group, as before"
        assert probe["after_first"] == ["outer"], probe
        assert probe["after_last"] == [] and probe["after_step"] == [], probe
