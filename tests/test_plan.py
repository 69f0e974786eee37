"""Plans and the cost model, without processes."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tierzero.parallel.choose import choose_plan, resolve_plan
from tierzero.parallel.config import ParallelConfig
from tierzero.parallel.cost import DEFAULT_BANDWIDTH_GBPS, PlanInputs, Unit, predict, uniform_units
from tierzero.parallel.layout import chunk_index, level_of_group, padded_numel, plan_groups, span
from tierzero.parallel.plans import REPLICATED, PlanError, candidate_plans, named_plan
from tierzero.parallel.quant import NO_QUANT
from tierzero.parallel.topology import emulated_topology, preset_topology, with_bandwidths

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGIES = [[2, 2], [2, 2, 2], [4, 3], [2, 3, 2], [1, 4], [8, 1], [2, 2, 2, 2]]


def test_zero3_to_hpz_cross_node_volume_is_3_to_2():
    """ZeRO++ paper: ZeRO-3 moves 3M across nodes per iteration, hpZ 2M."""
    topo = preset_topology("frontier", 48)
    units = uniform_units(20e9, 44)
    m = sum(padded_numel(u.numel, topo.world_size) for u in units) * 2  # bf16 bytes of the padded buffers

    def cross_node_per_micro_step(name):
        c = predict(named_plan(name, topo), topo, units, dtype_bytes=2, grad_accum=1)
        return sum(b for (phase, level, _), b in c.bytes.items() if level == "cluster" and phase != "step")

    z3, hpz = cross_node_per_micro_step("zero3"), cross_node_per_micro_step("hpz")
    ring = (topo.world_size - 1) / topo.world_size
    assert z3 == pytest.approx(3 * m * ring, rel=1e-12)
    assert hpz == pytest.approx(2 * m * ring, rel=1e-12)
    assert z3 / hpz == pytest.approx(1.5, rel=1e-12)


def test_ring_volumes_match_the_formulas():
    topo = emulated_topology([4, 2])  # 8 ranks
    u = [Unit("b", 8000)]
    ddp = predict(named_plan("ddp", topo), topo, u, dtype_bytes=4, grad_accum=3)
    # one fp32 all-reduce of the whole gradient per optimizer step: 2 S (n-1)/n
    assert ddp.bytes == {("step", "cluster", "all_reduce"): 2 * 8000 * 4 * 7 / 8}
    z3 = predict(named_plan("zero3", topo), topo, u, dtype_bytes=2, grad_accum=3)
    assert z3.bytes[("fwd", "cluster", "all_gather")] == 3 * 8000 * 2 * 7 / 8
    assert z3.bytes[("bwd", "cluster", "reduce_scatter")] == 3 * 8000 * 2 * 7 / 8
    hsdp = predict(named_plan("hsdp", topo), topo, u, dtype_bytes=4, grad_accum=1)
    # across the 2 replicas: an all-reduce of each rank's 1/4 shard
    assert hsdp.bytes[("step", "cluster", "all_reduce")] == 2 * (8000 / 4) * 4 * 1 / 2
    assert hsdp.memory["optimizer"] == 8000 * 12 / 4


def test_named_plans_have_the_design_table_shape():
    topo = emulated_topology([2, 4, 3])
    c = 2
    assert named_plan("ddp", topo) .__dict__ == dict(name="ddp", param_level=-1, grad_level=-1, optim_level=-1, secondary_level=None,
                                                   quant=NO_QUANT, grad_sync="micro")
    assert (named_plan("zero1", topo).param_level, named_plan("zero1", topo).optim_level) == (REPLICATED, c)
    assert named_plan("zero2", topo).grad_level == c
    hpz = named_plan("hpz", topo)
    assert (hpz.param_level, hpz.secondary_level) == (c, 1)
    assert named_plan("hpz", topo, ParallelConfig(secondary_level="package")).secondary_level == 0
    tiered = named_plan("tiered", topo)
    assert (tiered.param_level, tiered.grad_level, tiered.optim_level) == (0, 1, 2)


def test_bad_assignments_are_clear_errors():
    topo = emulated_topology([2, 2, 2])
    with pytest.raises(PlanError, match=r"param <= grad <= optimizer"):
        named_plan("tiered", topo, ParallelConfig(plan="tiered", levels=["cluster", "node", "package"]))
    with pytest.raises(PlanError, match="not a level"):
        named_plan("tiered", topo, ParallelConfig(plan="tiered", levels=["rack", "node", "cluster"]))
    with pytest.raises(PlanError, match="secondary_level"):
        named_plan("hpz", topo, ParallelConfig(secondary_level="cluster"))
    errs = ParallelConfig(plan="zero3", levels=["node", "node", "node"]).errors()
    assert any("parallel.plan=tiered" in e for e in errs)
    assert any("parallel.plan" in e for e in ParallelConfig(plan="zero4").errors())


def test_a_plan_that_does_not_fit_lists_the_ones_that_do():
    topo = preset_topology("dgx-h100", 4)
    units = uniform_units(7e9, 32)
    with pytest.raises(PlanError) as info:
        resolve_plan(ParallelConfig(plan="ddp"), topo, PlanInputs(tuple(units), dtype_bytes=2, grad_accum=1),
                     memory_budget_bytes=80e9)
    msg = str(info.value)
    assert "parallel.plan=ddp" in msg and "zero3" in msg and "memory_budget_gb" in msg
    with pytest.raises(PlanError, match="no plan fits"):
        choose_plan(topo, units, dtype_bytes=2, grad_accum=1, memory_budget_bytes=1e9)


def test_auto_on_frontier_fits_and_beats_hpz():
    topo = preset_topology("frontier", 48)
    units = uniform_units(20e9, 44)
    choice = choose_plan(topo, units, dtype_bytes=2, grad_accum=1, memory_budget_bytes=64e9)
    hpz = predict(named_plan("hpz", topo), topo, units, dtype_bytes=2, grad_accum=1)
    assert choice.cost.fits and choice.cost.comm_time_s < hpz.comm_time_s
    assert "fit" in choice.reason and choice.plan.describe(topo) not in ("", None)
    # every candidate respects the ordering
    for p in candidate_plans(topo):
        assert p.param_level <= p.grad_level <= p.optim_level
        if p.secondary_level is not None:
            assert p.secondary_level < p.param_level


def test_auto_keeps_the_slow_link_out_of_the_micro_steps():
    """The hierarchy benchmark's shape (2 nodes x 2 ranks, 1 Gbit/s node link, ~50M fp32
    parameters, accumulation 2): auto crosses nodes only at the optimizer step."""
    topo = emulated_topology([2, 2], bandwidths_gbps=[10, 1 / 8 / 2])
    units = uniform_units(50e6, 4)
    choice = choose_plan(topo, units, dtype_bytes=4, grad_accum=2, memory_budget_bytes=None)
    assert not [k for k in choice.cost.bytes if k[1] == "cluster" and k[0] != "step"]
    for name in ("zero3", "hpz", "hsdp", "tiered"):
        other = predict(named_plan(name, topo), topo, units, dtype_bytes=4, grad_accum=2)
        assert choice.cost.comm_time_s <= other.comm_time_s


# ---- link contention (hand-derived from the ring: a flow a->b loads the uplink of a's unit at
# the outermost level where a and b differ; the uplink carries the level's per-rank figure x
# the ranks of the unit, split evenly between the flows on it) -----------------------------------

B = 1 / 8 / 2
"""GB/s per rank of a 1 Gbit/s node link shared by 2 ranks."""


def test_a_global_ring_gets_the_whole_node_link_and_cross_groups_share_it():
    topo = emulated_topology([2, 2], bandwidths_gbps=[10, B])
    u = [Unit("b", 8000)]
    z3 = predict(named_plan("zero3", topo), topo, u, dtype_bytes=4, grad_accum=1)
    ring = 8000 * 4 * 3 / 4
    # ring 0->1->2->3->0: only 1->2 and 3->0 leave a node, one flow per node link: 2B each
    assert z3.time_s[("fwd", "cluster", "all_gather")] == pytest.approx(ring / (2 * B * 1e9), rel=1e-12)
    assert z3.time_s[("bwd", "cluster", "reduce_scatter")] == pytest.approx(ring / (2 * B * 1e9), rel=1e-12)
    # hsdp's replicas (0,2) and (1,3) leave node 0 together: two flows share 2B, B each
    hsdp = predict(named_plan("hsdp", topo), topo, u, dtype_bytes=4, grad_accum=1)
    allreduce = 2 * (8000 / 2) * 4 * 1 / 2
    assert hsdp.time_s[("step", "cluster", "all_reduce")] == pytest.approx(allreduce / (B * 1e9), rel=1e-12)
    # the old charge (link / ranks per node for every cross-node collective) is this case only
    assert hsdp.bytes[("step", "cluster", "all_reduce")] == allreduce


def test_contention_scales_with_the_flows_per_node():
    """4 ranks per node, 3 nodes: a 12-rank ring has one flow leaving each node (4B), the
    4 replica groups of hsdp one flow each (B), tiered's 4 step groups likewise."""
    topo = emulated_topology([4, 3], bandwidths_gbps=[10, B])
    n = 12 * 1000
    u = [Unit("b", n)]
    z3 = predict(named_plan("zero3", topo), topo, u, dtype_bytes=2, grad_accum=1)
    assert z3.time_s[("fwd", "cluster", "all_gather")] == pytest.approx(n * 2 * 11 / 12 / (4 * B * 1e9), rel=1e-12)
    hsdp = predict(named_plan("hsdp", topo), topo, u, dtype_bytes=2, grad_accum=1)
    assert hsdp.time_s[("step", "cluster", "all_reduce")] == pytest.approx(
        2 * n / 4 * 4 * 2 / 3 / (B * 1e9), rel=1e-12)
    # in-node rings: each rank's link to its successor carries one flow, 10 GB/s
    assert hsdp.time_s[("fwd", "node", "all_gather")] == pytest.approx(n * 2 * 3 / 4 / 10e9, rel=1e-12)


def test_backward_gather_shares_the_link_with_the_reduce_scatter_beside_it():
    """The engine gathers block i-1 while it reduce-scatters block i (parallel/engines/native.py). zero3 on
    2x2, three equal blocks, r = 2B (one global ring alone): gather b2 alone (a/r), then two pairs
    that share r evenly (each of the four collectives 2a/r), then reduce-scatter b0 alone (a/r)."""
    topo = emulated_topology([2, 2], bandwidths_gbps=[10, B])
    units = [Unit(f"b{i}", 4000) for i in range(3)]
    c = predict(named_plan("zero3", topo), topo, units, dtype_bytes=4, grad_accum=1)
    a, r = 4000 * 4 * 3 / 4, 2 * B * 1e9
    assert c.time_s[("fwd", "cluster", "all_gather")] == pytest.approx(3 * a / r, rel=1e-12)
    assert c.time_s[("bwd", "cluster", "all_gather")] == pytest.approx(a / r + 2 * (2 * a / r), rel=1e-12)
    assert c.time_s[("bwd", "cluster", "reduce_scatter")] == pytest.approx(2 * (2 * a / r) + a / r, rel=1e-12)
    norm = 2 * 4 * 3 / 4 / r
    assert c.time_s[("step", "cluster", "all_reduce")] == pytest.approx(norm, rel=1e-12)
    # the ledger counts both collectives of a pair in full; the rank waits for each pair once
    assert sum(c.time_s.values()) == pytest.approx(13 * a / r + norm, rel=1e-12)
    assert c.comm_time_s == pytest.approx(3 * a / r + (a / r + 2 * (2 * a / r) + a / r) + norm, rel=1e-12)


def test_hpz_backward_gather_does_not_slow_the_cross_node_reduce_scatter():
    """hpz gathers inside the node (10 GB/s per rank) beside the global reduce-scatter: they share
    only the in-node hop 0->1 (5 GB/s each while both run), so the reduce-scatter keeps 2B."""
    topo = emulated_topology([2, 2], bandwidths_gbps=[10, B])
    units = [Unit(f"b{i}", 4000) for i in range(3)]
    c = predict(named_plan("hpz", topo), topo, units, dtype_bytes=4, grad_accum=1)
    a, r = 4000 * 4 * 3 / 4, 2 * B * 1e9
    assert c.time_s[("bwd", "cluster", "reduce_scatter")] == pytest.approx(3 * a / r, rel=1e-12)
    g = 4000 * 4 * 1 / 2  # the 2-rank in-node gather; it ends long before the reduce-scatter
    assert c.time_s[("bwd", "node", "all_gather")] == pytest.approx(g / 10e9 + 2 * g / 5e9, rel=1e-12)


def test_expert_groups_are_timed_on_the_world_ranks():
    """Expert units with ep=2 on 2x2: the expert-data ranks are (0,2) and (1,3); zero3 over them
    is two 2-rank groups crossing node 0 at once, B each, not one ring at 2B."""
    topo = emulated_topology([2, 2], bandwidths_gbps=[10, B])
    units = [Unit("e", 4000, expert=True)]
    c = predict(named_plan("zero3", topo), topo, units, dtype_bytes=4, grad_accum=1, ep=2)
    gather = 4000 / 2 * 4 * 1 / 2
    assert c.bytes[("fwd", "cluster", "all_gather")] == gather
    assert c.time_s[("fwd", "cluster", "all_gather")] == pytest.approx(gather / (B * 1e9), rel=1e-12)


def test_each_collective_uses_its_own_ops_measured_figure():
    """The probe measures each op per level (gloo's all_reduce moves its bytes faster than its
    all_gather on the same link). hsdp's cross-node traffic is the replicas' all_reduce: it
    must take the all_reduce figure, while zero3's gathers and reduce-scatters take theirs."""
    base = emulated_topology([2, 2], bandwidths_gbps=[10, B])
    topo = with_bandwidths(base, [None, B], op_bandwidths_gbps=[
        None, {"all_gather": B, "all_reduce": 1.5 * B, "reduce_scatter": 0.8 * B}])
    u = [Unit("b", 8000)]
    plain = predict(named_plan("hsdp", base), base, u, dtype_bytes=4, grad_accum=1)
    per_op = predict(named_plan("hsdp", topo), topo, u, dtype_bytes=4, grad_accum=1)
    key = ("step", "cluster", "all_reduce")
    assert per_op.time_s[key] == pytest.approx(plain.time_s[key] / 1.5, rel=1e-12)
    assert per_op.time_s[("fwd", "node", "all_gather")] == plain.time_s[("fwd", "node", "all_gather")]
    z_plain = predict(named_plan("zero3", base), base, u, dtype_bytes=4, grad_accum=1)
    z_op = predict(named_plan("zero3", topo), topo, u, dtype_bytes=4, grad_accum=1)
    assert z_op.time_s[("fwd", "cluster", "all_gather")] == z_plain.time_s[("fwd", "cluster", "all_gather")]
    rs = 8000 * 4 * 3 / 4
    assert z_op.time_s[("bwd", "cluster", "reduce_scatter")] == pytest.approx(rs / (2 * 0.8 * B * 1e9), rel=1e-12)
    assert z_op.bytes == z_plain.bytes  # figures move time, never bytes


def test_the_all_reduce_figure_moves_autos_pick():
    """The same bytes, a different op rate: with the cluster's all_reduce at 0.3x its
    all_gather figure auto leaves the replica all-reduce off the slow link (it reduce-scatters
    and gathers across nodes); at 3x it crosses nodes with all_reduce only."""
    base = emulated_topology([2, 2], bandwidths_gbps=[1.0, B])
    units = uniform_units(50e6, 4)

    def pick(factor):
        topo = with_bandwidths(base, [None, None], op_bandwidths_gbps=[None, {"all_reduce": factor * B}])
        c = choose_plan(topo, units, dtype_bytes=4, grad_accum=2, memory_budget_bytes=None).cost
        return c.comm_time_s, {op for (_, lv, op) in c.bytes if lv == "cluster" and op != "all_reduce"}

    (slow_s, slow_ops), (fast_s, fast_ops) = pick(0.3), pick(3.0)
    assert slow_ops == {"reduce_scatter", "all_gather"}
    assert fast_ops == set() and fast_s < slow_s


def test_the_measured_update_rate_charges_each_plans_optimizer_shard():
    """With Topology.update_gelems_per_s (the probe's optimizer-update rate) a plan's update
    costs its optimizer shard's parameters at that rate: ddp updates every parameter on every
    rank, zero1 a quarter of them on 2x2. Without a rate nothing is charged."""
    import dataclasses

    base = emulated_topology([2, 2], bandwidths_gbps=[1.0, B])
    units = uniform_units(40e6, 4)
    rated = dataclasses.replace(base, update_gelems_per_s=0.02)
    total = sum(padded_numel(u.numel, 4) for u in units)
    for name, shards in (("ddp", 1), ("zero1", 4), ("hsdp", 2)):
        c = predict(named_plan(name, rated), rated, units, dtype_bytes=4, grad_accum=2)
        assert c.update_s == pytest.approx(total / shards / 0.02e9, rel=1e-12)
        assert c.predicted_s == pytest.approx(c.comm_time_s + c.update_s, rel=1e-12)
        assert predict(named_plan(name, base), base, units, dtype_bytes=4, grad_accum=2).update_s == 0.0


def test_a_slow_update_keeps_auto_off_the_replicated_optimizer():
    """Where the links are fast and the update slow (4 CPU ranks on 2 cores), replicating the
    optimizer (ddp) saves little communication and costs a whole model's update per rank:
    auto must shard the optimizer. With a fast update (a GPU) the same links pick by
    communication alone, as without a rate."""
    import dataclasses

    # gloo-like links: all_reduce moves its bytes faster than the gather/scatter pair that a
    # sharded optimizer needs instead, so by communication alone ddp wins
    base = with_bandwidths(emulated_topology([2, 2], bandwidths_gbps=[0.7, 0.7]), [None, None],
                           op_bandwidths_gbps=[{"all_reduce": 1.0}] * 2)
    units = uniform_units(50e6, 4)

    def pick(rate):
        topo = dataclasses.replace(base, update_gelems_per_s=rate)
        return choose_plan(topo, units, dtype_bytes=4, grad_accum=2, memory_budget_bytes=None)

    slow, fast, unrated = pick(0.02), pick(1000.0), pick(None)
    assert unrated.plan.name == fast.plan.name == "ddp"
    assert slow.plan.optim_level != REPLICATED
    assert "optimizer update" in slow.reason and "optimizer update" not in unrated.reason
    best = min(c.predicted_s for c in slow.costs if c.fits)
    assert slow.cost.predicted_s == pytest.approx(best, rel=1e-3)


def test_unknown_bandwidths_default_and_time_follows_bytes_on_one_level():
    topo = emulated_topology([4, 1])
    c = predict(named_plan("zero3", topo), topo, [Unit("b", 4000)], dtype_bytes=4, grad_accum=1)
    assert set(lv for _, lv, _ in c.bytes) == {"node"}
    for key, nbytes in c.bytes.items():
        assert c.time_s[key] == pytest.approx(nbytes / (DEFAULT_BANDWIDTH_GBPS * 1e9), rel=1e-12)


@pytest.mark.parametrize("sizes", TOPOLOGIES)
def test_shards_nest_so_every_hop_is_one_collective(sizes):
    """For every plan: the chunks a group's members hold tile exactly the buffer region the
    collective reads or fills (the layout argument of parallel/layout.py, checked)."""
    topo = emulated_topology(sizes)
    w = topo.world_size
    for plan in candidate_plans(topo):
        g = plan_groups(plan, topo)
        s_p, s_g, s_o = span(topo, plan.param_level), span(topo, plan.grad_level), span(topo, plan.optim_level)
        for role, level in (("param", plan.param_level), ("grad", plan.grad_level), ("optim", plan.optim_level),
                            ("bwd", plan.bwd_level)):
            for group in getattr(g, role):
                assert sorted(chunk_index(topo, r, level) for r in group) == list(range(len(group)))
        for group in g.grad_up:  # O-chunks of the members tile the G-chunk they share
            (gi,) = {chunk_index(topo, r, plan.grad_level) for r in group}
            held = sorted(chunk_index(topo, r, plan.optim_level) for r in group)
            assert held == list(range(gi * (s_o // s_g), (gi + 1) * (s_o // s_g)))
        for group in g.param_down:  # O-chunks of the members tile the P-chunk they share
            (pi,) = {chunk_index(topo, r, plan.param_level) for r in group}
            held = sorted(chunk_index(topo, r, plan.optim_level) for r in group)
            assert held == list(range(pi * (s_o // s_p), (pi + 1) * (s_o // s_p)))
        for group in g.replicas:
            assert len({chunk_index(topo, r, plan.optim_level) for r in group}) == 1
            assert len(group) == w // s_o


def test_level_of_group():
    topo = emulated_topology([2, 2, 2])
    assert topo.names[level_of_group(topo, [0, 1])] == "package"
    assert topo.names[level_of_group(topo, [0, 2])] == "node"
    assert topo.names[level_of_group(topo, [0, 4])] == "cluster"
    flat = emulated_topology([4, 1])
    assert flat.names[level_of_group(flat, range(4))] == "node"  # one node holds the whole world


def test_plan_cli_is_fast_at_1024_ranks_and_prints_every_plan():
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "tierzero.launcher.cli", "plan", "topology.preset=frontier", "topology.nodes=128",
         "model.params=20e9", "model.n_layers=44", "train.dtype=bfloat16", "train.global_batch_size=1024",
         "train.micro_batch_size=1"],
        capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for name in ("ddp", "zero1", "zero2", "zero3", "hpz", "hsdp", "tiered"):
        assert f"\n{name}(" in out
    assert "auto: " in out and "1024 ranks" in out
    line = out.rsplit("# planned in ", 1)[1]
    planned_s, cpu_s = float(line.split()[0]), float(line.split("(")[1].split()[0])
    # CPU time, not wall: other processes on a loaded CI machine must not fail this
    assert cpu_s < 1.0, f"planning took {cpu_s} s of CPU ({planned_s} s wall, process {wall:.2f} s)"


# ---- the planner's inputs (recipes.planning), computed once for `plan` and `run` ---------------

def _recipe(*, dtype="float32", global_batch=32, experts=0, params=None):
    """moe_tiny_cpu's sections (dense_tiny_cpu's with experts=0), as plain dataclasses."""
    from tierzero.parallel.moe_config import MoEConfig
    from tierzero.recipes.config import DataConfig, ModelConfig, TrainConfig

    return dict(
        train_cfg=TrainConfig(global_batch_size=global_batch, micro_batch_size=8, dtype=dtype),
        model_cfg=ModelConfig(d_model=64, n_layers=2, n_heads=4, params=params),
        data_cfg=DataConfig(kind="markov", seq_len=64, vocab_size=64, successors=4),
        moe_cfg=MoEConfig(num_experts=experts, top_k=2, expert_hidden=64),
    )


def _trainers_model(train_cfg, model_cfg, data_cfg, moe_cfg):
    """The model as the Trainer (recipes/trainer.py) builds it: sized by the dataset, seeded, cast to train.dtype."""
    import torch

    from tierzero.recipes.data import build_dataset
    from tierzero.recipes.model import build_model

    dataset = build_dataset(data_cfg)
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg, vocab_size=dataset.vocab_size, seq_len=dataset.seq_len, moe=moe_cfg)
    return model.to(dtype=torch.bfloat16 if train_cfg.dtype == "bfloat16" else torch.float32)


@pytest.mark.parametrize("dtype, nbytes", [("float32", 4), ("bfloat16", 2)])
def test_planning_inputs_of_a_dense_recipe_are_the_trainers(dtype, nbytes):
    import torch

    from tierzero.parallel.engines.units import model_units
    from tierzero.recipes.planning import planning_inputs

    recipe = _recipe(dtype=dtype)
    model = _trainers_model(**recipe)
    planned = planning_inputs(**recipe, world_size=2)  # `plan`: the recipe's model on the meta device
    trained = planning_inputs(**recipe, world_size=2, model=model)  # `run`: the model it trains
    assert planned == trained
    assert planned.units == tuple(model_units(model))
    assert planned.dtype_bytes == nbytes == torch.finfo(next(model.parameters()).dtype).bits // 8
    assert planned.grad_accum == 32 // (8 * 2)
    assert planned.moe is None and planned.notes == ()
    assert planned.model_summary == f"{sum(p.numel() for p in model.parameters()):,} params (the recipe's model)"
    assert not any(u.expert for u in planned.units)


def test_planning_inputs_of_an_moe_recipe_carry_the_experts_all_to_all():
    from tierzero.parallel.cost import MoETraffic
    from tierzero.parallel.engines.units import model_units
    from tierzero.recipes.model import count_params
    from tierzero.recipes.planning import planning_inputs

    recipe = _recipe(experts=8)
    model = _trainers_model(**recipe)
    planned = planning_inputs(**recipe, ep=2, world_size=4)
    assert planned == planning_inputs(**recipe, ep=2, world_size=4, model=model)
    assert planned.units == tuple(model_units(model))
    assert [u.name for u in planned.units if u.expert] == ["blocks.0.experts", "blocks.1.experts"]
    assert planned.moe == MoETraffic(tokens_per_micro_step=8 * 64, d_model=64, top_k=2, num_layers=2, num_experts=8,
                                     max_nodes_per_token=0, dispatch="auto")
    assert planned.grad_accum == 1 and planned.dtype_bytes == 4
    active = count_params(recipe["model_cfg"], 64, recipe["moe_cfg"], active=True)
    assert planned.model_summary.endswith(f"; MoE 8 experts, top-2, {active:,} active, parallel.ep=2")


def test_a_batch_that_does_not_split_plans_one_micro_step_and_says_so():
    from tierzero.recipes.planning import planning_inputs

    splits = planning_inputs(**_recipe(global_batch=48), world_size=3)
    assert (splits.grad_accum, splits.notes) == (2, ())
    odd = planning_inputs(**_recipe(global_batch=32), world_size=3)  # 32 over 8 x 3
    assert odd.grad_accum == 1
    (note,) = odd.notes
    assert note == ("train.global_batch_size=32 does not split into train.micro_batch_size=8 x 3 ranks: planned "
                    "with 1 micro-step per optimizer step (global batch 24); `tierzero run` needs e.g. "
                    "train.global_batch_size=24")


def test_a_model_known_by_its_size_is_equal_blocks_without_torch():
    """model.params (planning a model too big to build here): uniform units, no expert traffic
    (as `tierzero plan` has always planned it), and torch is never imported."""
    from tierzero.recipes.planning import planning_inputs

    recipe = _recipe(dtype="bfloat16", global_batch=1024, experts=8, params=20e9)
    recipe["model_cfg"].n_layers = 44
    inputs = planning_inputs(**recipe, world_size=1024)
    assert inputs.units == tuple(uniform_units(20e9, 44))
    assert (inputs.dtype_bytes, inputs.grad_accum, inputs.moe) == (2, 1, None)
    assert inputs.model_summary == "2e+10 params (model.params, 44 equal blocks)"
    code = ("import sys\n"
            "from tierzero.recipes.config import ModelConfig, TrainConfig, DataConfig\n"
            "from tierzero.recipes.planning import planning_inputs\n"
            "i = planning_inputs(train_cfg=TrainConfig(), model_cfg=ModelConfig(params=1e9), data_cfg=DataConfig(),"
            " world_size=4)\n"
            "assert len(i.units) == 2, i.units\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_engine_names_are_listed_when_one_is_unknown():
    from tierzero.parallel.engines import ENGINES, engine_errors
    from tierzero.recipes.config import TrainConfig

    (msg,) = engine_errors(parallel=ParallelConfig(engine="megatron"), moe=None, checkpoint=None,
                           train=TrainConfig())
    assert "parallel.engine='megatron'" in msg and all(name in msg for name in ENGINES)
    assert engine_errors(parallel=ParallelConfig(engine="reference"), moe=None, checkpoint=None,
                         train=TrainConfig()) == []


@pytest.mark.parametrize("experts", [0, 4])
def test_activation_estimate_is_within_2x_of_what_autograd_saves(experts):
    """The memory column's activations (recipes.planning.activation_bytes) against the bytes
    autograd really keeps for the backward of one micro-batch (saved-tensor hooks, unique
    storages), on the model the recipe builds."""
    import torch

    from tierzero.parallel.moe import MoEConfig
    from tierzero.recipes.config import DataConfig, ModelConfig, TrainConfig
    from tierzero.recipes.model import build_model, loss_fn
    from tierzero.recipes.planning import activation_bytes, planning_inputs

    train = TrainConfig(micro_batch_size=4, global_batch_size=8)
    model_cfg = ModelConfig(d_model=128, n_layers=3, n_heads=4)
    moe = MoEConfig(num_experts=experts, top_k=2, expert_hidden=128) if experts else None
    data = DataConfig(seq_len=128, vocab_size=512)
    model = build_model(model_cfg, vocab_size=512, seq_len=128, moe=moe)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, 512, (4, 129))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(tokens[:, :-1]), tokens[:, 1:])
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(n for ptr, n in seen.items() if ptr not in params)
    loss.backward()
    estimate = activation_bytes(train, model_cfg, moe, 128, 512)
    print(f"activations: estimate {estimate / 2**20:.1f} MiB, autograd keeps {measured / 2**20:.1f} MiB")
    assert 0.5 < estimate / measured < 2, (estimate, measured)
    inputs = planning_inputs(train_cfg=train, model_cfg=model_cfg, data_cfg=data, moe_cfg=moe, world_size=2)
    assert inputs.activation_bytes == estimate
    cost = predict(named_plan("zero3", emulated_topology([2])), emulated_topology([2]), inputs.units,
                   dtype_bytes=4, grad_accum=1, activation_bytes=inputs.activation_bytes)
    assert cost.memory["activations"] == estimate and cost.memory_total > estimate


def test_each_collective_pays_its_ring_steps_latency_at_the_level_each_step_crosses():
    """NCCL's model (src/graph/tuning.cc): a ring of n ranks over nodes has n-1 steps, of which
    nodes-1 cross the network; each step costs that link's latency besides the bytes."""
    from tierzero.parallel.topology import with_latencies

    topo = emulated_topology([2, 2])
    units = [Unit("b", 4000), Unit("c", 4000)]
    fast = with_bandwidths(topo, [1e6, 1e6])  # bytes take ~no time: what is left is latency
    slow = with_latencies(fast, [3.4, 9.6])
    a = predict(named_plan("zero3", topo), fast, units, dtype_bytes=4, grad_accum=3)
    b = predict(named_plan("zero3", topo), slow, units, dtype_bytes=4, grad_accum=3)
    ring4 = (2 * 3.4 + 9.6) * 1e-6  # 3 steps: 2 inside a node, 1 across
    key = ("fwd", "cluster", "all_gather")
    assert b.time_s[key] - a.time_s[key] == pytest.approx(3 * 2 * ring4, rel=1e-9)  # accum x units calls
    # hsdp's replicas all-reduce: a ring of the 2 nodes, 2 x (2-1) steps, all across
    h1 = predict(named_plan("hsdp", topo), fast, units, dtype_bytes=4, grad_accum=3)
    h2 = predict(named_plan("hsdp", topo), slow, units, dtype_bytes=4, grad_accum=3)
    rep = ("step", "cluster", "all_reduce")
    # per unit one replica all-reduce, plus the grad-norm all-reduce inside the node (node level)
    assert h2.time_s[rep] - h1.time_s[rep] == pytest.approx(2 * 2 * 9.6e-6, rel=1e-9)
    # at Frontier scale a global ring of 384 GCDs pays 336 steps inside nodes and 47 across
    frontier = preset_topology("frontier", 48)
    from tierzero.parallel.cost import _step_latency_s

    assert _step_latency_s(frontier, 384, 1) == pytest.approx((336 * 3.4 + 47 * 9.6) * 1e-6, rel=1e-12)
    assert _step_latency_s(frontier, 384, 8) == pytest.approx(47 * 9.6e-6, rel=1e-12)  # one rank per node


@pytest.mark.parametrize("ep, dispatch, max_nodes", [(4, "flat", 0), (4, "hierarchical", 0), (4, "hierarchical", 1),
                                                     (8, "flat", 0), (8, "hierarchical", 0), (8, "hierarchical", 1),
                                                     (8, "hierarchical", 2), (2, "auto", 0)])
def test_all_to_all_bytes_per_level_match_a_simulated_uniform_routing(ep, dispatch, max_nodes):
    """parallel.cost.a2a_bytes_per_level against counting rows for 40,000 tokens routed uniformly
    (node-limited: the nodes drawn first, then the experts among theirs), as the layer sends
    them from EP rank 0 on [node x2, cluster x4] (2 ranks per node)."""
    import numpy as np

    from tierzero.parallel.cost import MoETraffic, a2a_bytes_per_level
    from tierzero.parallel.topology import emulated_topology

    topo = emulated_topology([2, 4])
    E, k, d, T = 16, 2, 64, 40_000
    per_node, num_nodes = 2, ep // 2
    per_rank, per_node_experts = E // ep, E // num_nodes
    rng = np.random.default_rng(0)
    if max_nodes:
        nodes = np.stack([rng.choice(num_nodes, max_nodes, replace=False) for _ in range(T)])
        pool = (nodes[:, :, None] * per_node_experts + np.arange(per_node_experts)).reshape(T, -1)
        experts = np.stack([rng.choice(row, k, replace=False) for row in pool])
    else:
        experts = np.stack([rng.choice(E, k, replace=False) for _ in range(T)])
    level = {j: ("node" if j < 2 else "cluster") for j in range(ep)}  # rank 0's level to EP member j
    want = {}
    hierarchical = dispatch != "flat" and num_nodes > 1
    if not hierarchical:
        dest = experts // per_rank
        for j in range(1, ep):
            want[level[j]] = want.get(level[j], 0) + 2 * (dest == j).sum() * d * 4
    else:
        node = experts // per_node_experts
        for n in range(1, num_nodes):  # one row out (d + 2k) and one back (d) per token and node
            rows = (node == n).any(axis=1).sum()
            want["cluster"] = want.get("cluster", 0) + rows * (2 * d + 2 * k) * 4
        # inside the node, rank 0 forwards what the rank at its position on each of the
        # num_nodes nodes sent it (rank 0 itself included): iid routing, so num_nodes x what one
        # source's tokens bring to node 0 for experts rank 0 does not hold, out and back
        local = (node == 0) & (experts // per_rank % per_node != 0)
        want["node"] = 2 * num_nodes * local.sum() * d * 4
    moe = MoETraffic(tokens_per_micro_step=T, d_model=d, top_k=k, num_layers=1, num_experts=E,
                     max_nodes_per_token=max_nodes, dispatch=dispatch)
    got = a2a_bytes_per_level(topo, ep, moe, 4)
    assert set(got) == set(want)
    for lv in want:
        assert got[lv] == pytest.approx(want[lv], rel=0.02), lv
