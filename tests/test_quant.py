"""Block-quantized collectives (parallel.quant, parallel.codec): the codec against its error
bound, the hop-by-hop reduce-scatter against the layout it must land in, the ZeRO++ volumes
in the cost model, the config errors, and -- on 4 gloo ranks -- quantized plans against the
full-precision run: the ledger equals the prediction (scales included) and the final loss
stays within the spread of full-precision runs that differ only in their seed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from reference import Recorder

from tierzero.launcher.config import load_config
from tierzero.parallel.codec import Codec
from tierzero.parallel.config import ParallelConfig
from tierzero.parallel.context import DistContext
from tierzero.parallel.cost import predict, uniform_units
from tierzero.parallel.layout import chunk_index, padded_numel, reduce_hops
from tierzero.parallel.plans import PlanError, candidate_plans, named_plan
from tierzero.parallel.topology import emulated_topology, preset_topology
from tierzero.recipes.trainer import Recipe, train

# ---- the codec ------------------------------------------------------------------------------


def _blocks(seed: int, num_blocks: int, block: int) -> torch.Tensor:
    """Blocks of very different magnitudes, one all zero, one with a single large value."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_blocks, block, generator=g) * torch.logspace(-6, 3, num_blocks).unsqueeze(1)
    x[1] = 0.0
    x[2, block // 2] = 1e4
    return x.reshape(-1)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("scale_bytes", [4, 2])
@pytest.mark.parametrize("block", [256, 32, 2])
def test_each_element_is_within_half_a_scale_and_the_payload_has_the_predicted_size(bits, scale_bytes, block):
    codec = Codec(bits, block, scale_bytes)
    x = _blocks(bits + block, 12, block)
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8 and payload.numel() == codec.payload_bytes(x.numel())
    assert payload.numel() == x.numel() * bits // 8 + x.numel() // block * scale_bytes
    scales = payload[:x.numel() // block * scale_bytes].clone().view(codec.scale_dtype).float()
    qmax = {8: 127, 4: 7}[bits]
    amax = x.reshape(-1, block).abs().amax(1)
    assert torch.all(scales * qmax >= amax), "a scale rounded down would clip the block's largest value"
    err = (x - codec.decode(payload, x.numel())).abs().reshape(-1, block)
    bound = scales.unsqueeze(1) / 2
    assert torch.all(err <= bound * (1 + 1e-5) + 1e-30), (err / bound.clamp(min=1e-30)).max()
    assert torch.all(codec.decode(payload, x.numel()).reshape(-1, block)[1] == 0), "a zero block decodes to zeros"


def test_values_on_the_grid_survive_exactly_and_int4_uses_every_code():
    codec = Codec(4, 16)
    q = torch.arange(-7, 8, dtype=torch.float32)
    x = torch.cat([q, torch.tensor([7.0])]) * 0.5  # one block: amax 3.5, scale 0.5
    assert torch.equal(codec.decode(codec.encode(x), 16), x)


def test_stochastic_rounding_is_unbiased_and_within_one_scale():
    codec = Codec(4, 64)
    x = torch.linspace(-1, 1, 64)
    x[0] = -7 / 7  # scale = 1/7
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([codec.decode(codec.encode(x, noise=torch.rand(64, generator=g)), 64) for _ in range(4000)])
    scale = 1 / 7
    assert (draws - x).abs().max() < scale * (1 + 1e-5)
    # E[q(x)] = x: the mean of 4000 draws is within 5 standard errors (at most scale/2 each)
    assert (draws.mean(0) - x).abs().max() < 5 * (scale / 2) / math.sqrt(4000)
    nearest = codec.decode(codec.encode(x), 64)
    assert (draws.mean(0) - x).abs().mean() < (nearest - x).abs().mean() / 3, "no better than rounding to nearest"


def test_non_finite_values_stay_non_finite():
    codec = Codec(4, 8)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.ones(16)
        x[9] = bad
        y = codec.decode(codec.encode(x), 16)
        assert torch.all(torch.isfinite(y[:8])) and not torch.all(torch.isfinite(y[8:])), (bad, y)


# ---- layout: the hops of a hierarchical reduce-scatter --------------------------------------

@pytest.mark.parametrize("sizes", [[2, 2], [2, 2, 2], [4, 3], [2, 3, 2], [1, 4], [3, 1, 2]])
def test_reduce_hops_leave_each_rank_its_chunk_summed_over_its_unit(sizes):
    """Simulated on lists: every rank's buffer holds (rank, element) tags; after the hops each
    rank must hold, for exactly the elements of its chunk at the level, the tags of every rank
    of its unit."""
    topo = emulated_topology(sizes)
    w = topo.world_size
    for level in range(len(sizes)):
        span = math.prod(sizes[:level + 1])
        n = padded_numel(7, w) * 3
        held = {r: [(0, n, frozenset([r]))] for r in range(w)}  # (start, stop, contributing ranks)
        for hop in reduce_hops(topo, level):
            new = {}
            for group in hop.groups:
                (start, stop, _), = {tuple(held[r][0][:2]) + (None,) for r in group}
                piece = (stop - start) // len(group)
                for i, r in enumerate(group):
                    contributors = frozenset().union(*(held[m][0][2] for m in group))
                    new[r] = [(start + i * piece, start + (i + 1) * piece, contributors)]
            held.update(new)
        c = n // span
        for r in range(w):
            start, stop, contributors = held[r][0]
            assert (start, stop) == (chunk_index(topo, r, level) * c, (chunk_index(topo, r, level) + 1) * c), (r, level)
            assert contributors == frozenset(range(r // span * span, (r // span + 1) * span)), (r, level)


def test_a_quantized_plan_pads_units_to_whole_blocks_in_every_chunk():
    assert padded_numel(1000, 4, 256) == 1024
    assert padded_numel(1025, 4, 256) == 2048
    assert padded_numel(1000, 4) == 1000


# ---- the cost model: ZeRO++'s volumes ----------------------------------------------------------

def test_zeropp_moves_a_quarter_of_zero3s_volume_plus_its_scales():
    """ZeRO++ (arXiv 2306.10209): per micro-step ZeRO-3 moves 3M over collectives that cross
    nodes, ZeRO++ 0.75M (qwZ 0.5M, hpZ 0, qgZ 0.25M), here plus one fp32 scale per 256
    elements. The paper counts every hop of a collective that crosses nodes; tierzero books
    each hop of qgZ at its own level, so the part on the cluster level is smaller still."""
    topo = preset_topology("frontier", 48)
    units = uniform_units(20e9, 44)
    w, per_node = topo.world_size, topo.ranks_per_node
    zeropp = named_plan("zeropp", topo)
    n = sum(padded_numel(u.numel, w, 256) for u in units)
    m = 2 * n  # bf16 bytes of the padded buffers
    ring = (w - 1) / w

    def by_kind(cost):
        out = {}
        for (phase, level, op), b in cost.bytes.items():
            if phase != "step":
                out[(level, op)] = out.get((level, op), 0.0) + b
        return out

    z3 = by_kind(predict(named_plan("zero3", topo), topo, units, dtype_bytes=2, grad_accum=1, reduce_bytes=2))
    zpp = by_kind(predict(zeropp, topo, units, dtype_bytes=2, grad_accum=1, reduce_bytes=2))
    m3 = 2 * sum(padded_numel(u.numel, w) for u in units)  # zero3 pads to the world size only
    assert sum(z3.values()) == pytest.approx(3 * m3 * ring, rel=1e-9)
    qwz = zpp[("cluster", "all_gather")]
    assert qwz == pytest.approx((0.5 + 4 / 256 / 2) * m * ring, rel=1e-9)  # int8 + fp32 scales, in units of M
    qgz = sum(b for (level, op), b in zpp.items() if op == "reduce_scatter")
    assert qgz == pytest.approx((0.25 + 4 / 256 / 2) * m * ring, rel=1e-9)  # every hop, int4 + scales
    assert (qwz + qgz) / (3 * m3 * ring) == pytest.approx((0.75 + 4 / 256) / 3, rel=1e-4)
    # hpZ: the backward gathers stay inside the node, in full precision
    assert ("cluster", "all_gather") in zpp and zpp[("node", "all_gather")] > 0
    # qgZ's hop across nodes carries what the node has already reduced: 1/per_node of it
    assert zpp[("cluster", "reduce_scatter")] == pytest.approx(
        (0.25 + 4 / 256 / 2) * m / per_node * (48 - 1) / 48, rel=1e-9)


def test_int8_weights_and_grads_on_the_cluster_level_only():
    topo = emulated_topology([2, 2])
    units = uniform_units(1 << 20, 4)
    plan = named_plan("zero3", topo, ParallelConfig(quant_weights="int8", quant_grads="int8", quant_block_size=128))
    cost = predict(plan, topo, units, dtype_bytes=4, grad_accum=2)
    n = padded_numel(units[0].numel, 4, 128)
    payload = n // 4 + n // 4 // 128 * 4  # one rank's chunk: int8 values + fp32 scales
    assert cost.bytes[("fwd", "cluster", "all_gather")] == 4 * 2 * 3 * payload
    # the gradient: a full-precision hop inside the node, then the cluster hop quantized
    assert cost.bytes[("bwd", "node", "reduce_scatter")] == 4 * 2 * (n // 2) * 4
    quarter = n // 4
    assert cost.bytes[("bwd", "cluster", "reduce_scatter")] == 4 * 2 * (quarter + quarter // 128 * 4)
    assert "error_feedback" in cost.memory and cost.memory["error_feedback"] == 0
    fb = predict(named_plan("zero3", topo, ParallelConfig(quant_grads="int4", quant_error_feedback=True)), topo,
                 units, dtype_bytes=4, grad_accum=2)
    assert fb.memory["error_feedback"] == 4 * padded_numel(units[0].numel, 4, 256) // 2 * 4  # the cluster hop's input


def test_auto_never_quantizes_unless_asked():
    topo = emulated_topology([2, 2])
    assert not any(p.quant.active for p in candidate_plans(topo, ParallelConfig()))
    asked = candidate_plans(topo, ParallelConfig(quant_weights="int8"))
    assert all(p.quant.weight_bits == 8 for p in asked) and not any(p.name == "zeropp" for p in asked)
    # auto: every shape with every width of each kind, full precision among them
    plain = candidate_plans(topo, ParallelConfig())
    every = candidate_plans(topo, ParallelConfig(quant_weights="auto", quant_grads="auto"))
    assert len(every) == 9 * len(plain)
    assert {(p.quant.weight_bits, p.quant.grad_bits) for p in every} == {(w, g) for w in (0, 8, 4) for g in (0, 8, 4)}


def test_auto_quantizes_where_the_model_says_it_pays_and_says_so():
    """On a slow inter-node link with fast nodes, int4 weights and gradients on the cluster
    level cut zero3's predicted time; auto (and a named plan with quant_*=auto) takes them."""
    from tierzero.parallel.choose import resolve_plan
    from tierzero.parallel.cost import PlanInputs
    from tierzero.parallel.topology import with_bandwidths

    topo = with_bandwidths(emulated_topology([4, 2]), [100.0, 0.1])
    inputs = PlanInputs(tuple(uniform_units(1e8, 8)), dtype_bytes=2, grad_accum=1, reduce_bytes=2)
    named = resolve_plan(ParallelConfig(plan="zero3", quant_weights="auto", quant_grads="auto"), topo, inputs,
                         memory_budget_bytes=None)
    assert (named.plan.name, named.plan.quant.weight_bits, named.plan.quant.grad_bits) == ("zero3", 4, 4), named.reason
    assert "parallel.quant_*=auto" in named.reason and "qW=int4@cluster" in named.plan.describe(topo)
    full = resolve_plan(ParallelConfig(plan="zero3"), topo, inputs, memory_budget_bytes=None)
    assert named.cost.comm_time_s < 0.5 * full.cost.comm_time_s


def test_zeropp_is_hpz_with_int8_weights_across_nodes_and_int4_gradients_everywhere():
    topo = emulated_topology([2, 4, 2])
    p = named_plan("zeropp", topo)
    hpz = named_plan("hpz", topo)
    assert (p.param_level, p.secondary_level, p.grad_level, p.optim_level) == (
        hpz.param_level, hpz.secondary_level, hpz.grad_level, hpz.optim_level)
    assert (p.quant.weight_bits, p.quant.weight_levels) == (8, ("cluster",))
    assert (p.quant.grad_bits, p.quant.grad_levels) == (4, ("package", "node", "cluster"))
    with pytest.raises(PlanError, match="parallel.quant_grads=int8"):
        named_plan("zeropp", topo, ParallelConfig(plan="zeropp", quant_grads="int8"))
    with pytest.raises(PlanError, match="one level"):
        named_plan("zeropp", emulated_topology([4]))


@pytest.mark.parametrize("overrides,named", [
    (["parallel.quant_grads=int4", "parallel.quant_block_size=255"], ["parallel.quant_block_size=255", "even"]),
    (["parallel.quant_weights=int2"], ["parallel.quant_weights='int2'", "int8"]),
    (["parallel.quant_block_size=0"], ["parallel.quant_block_size=0"]),
    (["parallel.quant_block_size=1000000000"], ["parallel.quant_block_size=1000000000", "65536"]),
    (["parallel.quant_scale_dtype=bfloat16"], ["parallel.quant_scale_dtype", "float16"]),
    (["parallel.quant_levels=[]"], ["parallel.quant_levels=[]"]),
    (["parallel.engine=deepspeed", "parallel.plan=zero3", "parallel.quant_weights=int8", "moe.num_experts=0",
      "parallel.ep=1"], ["parallel.quant_weights=int8", "parallel.engine=deepspeed", "parallel.engine=native"]),
    (["parallel.engine=fsdp2", "parallel.plan=zeropp", "moe.num_experts=0", "parallel.ep=1"],
     ["parallel.plan=zeropp", "parallel.engine=fsdp2", "parallel.engine=native"]),
])
def test_bad_quantization_settings_are_config_errors(overrides, named):
    from tierzero.launcher.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config([], overrides)
    for text in named:
        assert text in str(e.value), (text, str(e.value))


@pytest.mark.parametrize("overrides,named", [
    (["parallel.quant_levels=[rack]"], ["parallel.quant_levels=['rack']", "'rack'", "[cluster]"]),
    (["parallel.plan=zeropp", "topology.emulate=[4]", "topology.level_names=[cluster]"],
     ["parallel.plan=zeropp", "one level", "topology.emulate=[2,2]"]),
])
def test_quantization_the_topology_cannot_take_is_refused_before_a_rank_starts(overrides, named, tmp_path,
                                                                               monkeypatch, capfd):
    from tierzero.launcher.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["run", "dense_tiny_cpu", "launcher.nproc=4", "train.steps=1", "topology.emulate=[2,2]", *overrides])
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-2000:]
    for text in named:
        assert text in err, (text, err)
    assert not any(tmp_path.iterdir()), "a refused run wrote files"


# ---- on 4 gloo ranks: quantized plans train like full precision, and cost what is predicted ------

STEPS = 30
DENSE = ["moe.num_experts=0", "parallel.ep=1", "train.warmup_steps=3", "model.d_model=32", "model.n_heads=2",
         "model.n_layers=2", "data.seq_len=16", f"train.steps={STEPS}", "train.global_batch_size=16",
         "train.micro_batch_size=2"]
MOE = [*DENSE[2:], "moe.num_experts=8", "moe.top_k=2", "parallel.ep=2"]
SEEDS = (0, 1, 2)
# (label, recipe, overrides); every full-precision zero3 run differs from the others only in its seed
RUNS = [(f"{kind} zero3 seed{s}", base, ["parallel.plan=zero3", f"train.seed={s}"])
        for kind, base in (("dense", DENSE), ("moe", MOE)) for s in SEEDS] + [
    ("dense zeropp", DENSE, ["parallel.plan=zeropp"]),
    ("dense hpz int4 grads, error feedback, stochastic", DENSE,
     ["parallel.plan=hpz", "parallel.quant_grads=int4", "parallel.quant_error_feedback=true",
      "parallel.quant_stochastic=true"]),
    ("dense tiered int8 everywhere, fp16 scales", DENSE,
     ["parallel.plan=tiered", "parallel.quant_weights=int8", "parallel.quant_grads=int8",
      "parallel.quant_levels=[node,cluster]", "parallel.quant_scale_dtype=float16", "parallel.quant_block_size=64"]),
    ("moe zeropp", MOE, ["parallel.plan=zeropp"]),
]


def _worker(rank: int, world: int, rdzv: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    ctx = DistContext(rank=rank, world_size=world, local_rank=rank, local_world_size=world, device="cpu",
                      backend="gloo", topology=emulated_topology([2, 2]), host="test")
    results = {}
    for label, base, overrides in RUNS:
        rec = Recorder()
        res = train(Recipe.of(load_config([], [*base, *overrides])), ctx, rec, peak_tflops=1.0, show_progress=False)
        results[label] = {"losses": res.losses, "measured": rec.ledger_bytes()}
    Path(f"{out}.{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _predicted(base, overrides):
    from tierzero.parallel.engines.units import model_units
    from tierzero.recipes.data import build_dataset
    from tierzero.recipes.model import build_model

    cfg = load_config([], [*base, *overrides])
    topo = emulated_topology([2, 2])
    data = build_dataset(cfg.data)
    with torch.device("meta"):
        model = build_model(cfg.model, vocab_size=data.vocab_size, seq_len=data.seq_len, moe=cfg.moe)
    plan = named_plan(cfg.parallel.plan, topo, cfg.parallel)
    assert plan.quant.active
    cost = predict(plan, topo, model_units(model), dtype_bytes=4, grad_accum=2, ep=cfg.parallel.ep)
    # the experts' dispatch all-to-all depends on the routing; the cost model assumes uniform
    return {f"{p}|{lv}|{op}": b * STEPS for (p, lv, op), b in cost.bytes.items() if op != "all_to_all"}


@pytest.mark.multiprocess
def test_quantized_plans_train_like_full_precision_and_cost_what_is_predicted(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(4, str(tmp_path / "rdzv"), out), nprocs=4, join=True)
    per_rank = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(4)]

    def final(label, rank=0):  # the mean of the last 5 steps: one step's batch noise averaged out
        return sum(per_rank[rank][label]["losses"][-5:]) / 5

    failures = []
    for kind in ("dense", "moe"):
        fp32 = [final(f"{kind} zero3 seed{s}") for s in SEEDS]
        spread = max(fp32) - min(fp32)
        first = per_rank[0][f"{kind} zero3 seed0"]["losses"][0]
        assert first - fp32[0] > 0.5, f"{kind}: full precision did not train; the comparison would prove nothing"
        for label, base, overrides in RUNS:
            if not label.startswith(kind) or "zero3 seed" in label:
                continue
            gap = final(label) - fp32[0]  # the same seed as seed0: the same data and initial weights
            if abs(gap) > spread:
                failures.append(f"{label}: final loss {final(label):.4f}, {gap:+.4f} from full precision "
                                f"{fp32[0]:.4f}; seeds alone move it by {spread:.4f}")
            want = _predicted(base, overrides)
            for rank in range(4):
                got = per_rank[rank][label]
                if got["losses"] != per_rank[0][label]["losses"]:
                    failures.append(f"{label}: rank {rank}'s losses differ from rank 0's")
                m = {k: v for k, v in got["measured"].items() if not k.endswith("|all_to_all")}
                if set(m) != set(want) or any(abs(m[k] - want[k]) > 1e-6 * want[k] for k in m):
                    failures.append(f"{label} rank {rank}: ledger {m} != predicted {want}")
    assert not failures, "\n".join(failures)
    # ZeRO++'s point: the quantized plans send a fraction of zero3's bytes across nodes
    z3 = per_rank[0]["dense zero3 seed0"]["measured"]
    zpp = per_rank[0]["dense zeropp"]["measured"]

    def cross(m):
        return sum(v for k, v in m.items() if "|cluster|" in k and not k.startswith("step|"))

    assert cross(zpp) < 0.3 * cross(z3), (cross(zpp), cross(z3))


def test_a_measured_codec_rate_charges_each_encoded_and_decoded_element():
    """Topology.codec_gelems_per_s (the probe's rate): zero3 with int8 weights on 2 x 2 encodes
    its chunk and decodes 4 chunks per forward gather -- 5 chunk passes per call."""
    import dataclasses

    topo = emulated_topology([2, 2])
    units = uniform_units(1 << 20, 2)
    plan = named_plan("zero3", topo, ParallelConfig(quant_weights="int8"))
    timed = dataclasses.replace(topo, codec_gelems_per_s=1.0)
    cost = predict(plan, timed, units, dtype_bytes=4, grad_accum=3)
    chunk = padded_numel(units[0].numel, 4, 256) // 4
    assert cost.codec_s == pytest.approx(2 * 3 * 2 * chunk * 5 / 1e9, rel=1e-12)  # units x accum x (fwd, bwd)
    assert cost.predicted_s == pytest.approx(cost.comm_time_s + cost.codec_s)
    assert predict(plan, topo, units, dtype_bytes=4, grad_accum=3).codec_s == 0  # not measured: not charged
    assert predict(named_plan("zero3", topo), timed, units, dtype_bytes=4, grad_accum=3).codec_s == 0
