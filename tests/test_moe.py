"""Mixture-of-Experts: routing math against its definitions, the layer against a per-token
loop, and expert parallelism (ep = 1, 2, 4 on 2 emulated nodes x 2 ranks) against the
single-process run, with and without capacity dropping."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from reference import Recorder, single_process_run

from tierzero.launcher.config import ConfigError, load_config
from tierzero.parallel.config import ParallelConfig
from tierzero.parallel.context import DistContext
from tierzero.parallel.cost import predict
from tierzero.parallel.moe import (MoEConfig, MoEFeedForward, balance_loss, capacity, keep_mask, route, z_loss)
from tierzero.parallel.plans import named_plan
from tierzero.parallel.topology import emulated_topology, expert_data_topology
from tierzero.recipes.trainer import Recipe, train

# ---- routing, pure -----------------------------------------------------------------------


def test_softmax_top_k_weights_are_normalised_and_bias_only_selects():
    torch.manual_seed(0)
    logits = torch.randn(50, 8)
    idx, w, scores = route(logits, top_k=2, gate="softmax", norm_topk_prob=True)
    assert torch.equal(idx, logits.topk(2, dim=-1).indices)  # softmax is monotone
    assert torch.allclose(w.sum(-1), torch.ones(50))
    assert torch.allclose(scores, logits.softmax(-1))
    # a bias that favours expert 7 changes the selection, not the weights' source
    bias = torch.zeros(8)
    bias[7] = 10.0
    idx_b, w_b, _ = route(logits, top_k=2, gate="softmax", norm_topk_prob=False, bias=bias)
    assert (idx_b == 7).any(-1).all()
    assert torch.allclose(w_b, logits.softmax(-1).gather(1, idx_b))


def test_sigmoid_gate_uses_sigmoid_scores():
    logits = torch.randn(10, 4)
    _, w, scores = route(logits, top_k=1, gate="sigmoid", norm_topk_prob=False)
    assert torch.allclose(scores, logits.sigmoid())
    assert torch.allclose(w[:, 0], logits.sigmoid().max(-1).values)


def test_capacity_keeps_first_choices_before_second_choices():
    # 4 tokens, 2 experts, top-2, capacity 2: expert 0 is everybody's first choice for
    # tokens 0-2 and token 3's second; GShard priority keeps tokens 0 and 1 in expert 0
    idx = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    keep = keep_mask(idx, num_experts=2, cap=2)
    assert keep.tolist() == [[True, True], [True, False], [False, False], [True, False]]
    assert capacity(num_tokens=4, num_experts=2, top_k=2, factor=1.0) == 4
    assert capacity(num_tokens=10, num_experts=8, top_k=2, factor=1.25) == math.ceil(1.25 * 10 * 2 / 8)


def test_balance_and_z_loss_match_their_definitions():
    torch.manual_seed(1)
    logits = torch.randn(64, 4)
    idx, _, scores = route(logits, top_k=2, gate="softmax", norm_topk_prob=True)
    f = torch.tensor([(idx == e).sum().item() / idx.numel() for e in range(4)])
    p = scores.mean(0)
    assert balance_loss(scores, idx, 4, "softmax") == pytest.approx(4 * float((f * p).sum()), rel=1e-6)
    # perfectly balanced routing with uniform probabilities gives exactly 1 (Switch, eq. 4)
    uniform = torch.full((4, 4), 0.25)
    assert balance_loss(uniform, torch.tensor([[0], [1], [2], [3]]), 4, "softmax") == pytest.approx(1.0)
    assert z_loss(logits) == pytest.approx(float((torch.logsumexp(logits, -1) ** 2).mean()), rel=1e-6)


def test_node_limited_routing_stays_on_max_nodes():
    torch.manual_seed(2)
    logits = torch.randn(200, 8)
    expert_node = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for k, m in ((2, 1), (4, 2), (3, 2)):
        idx, _, _ = route(logits, top_k=k, gate="sigmoid", norm_topk_prob=True, expert_node=expert_node,
                          max_nodes=m)
        nodes_per_token = [len(set(expert_node[row].tolist())) for row in idx]
        assert max(nodes_per_token) <= m
    unlimited, _, _ = route(logits, top_k=4, gate="sigmoid", norm_topk_prob=True)
    assert max(len(set(expert_node[row].tolist())) for row in unlimited) > 2  # the limit did something
    with pytest.raises(ValueError, match="moe.max_nodes_per_token=1"):
        route(logits, top_k=4, gate="sigmoid", norm_topk_prob=True, expert_node=expert_node, max_nodes=1)


def test_expert_data_topology():
    topo = emulated_topology([2, 2])
    assert [lv.size for lv in expert_data_topology(topo, 2).levels] == [1, 2]
    assert [lv.size for lv in expert_data_topology(topo, 4).levels] == [1, 1]
    assert [lv.size for lv in expert_data_topology(emulated_topology([4, 2]), 2).levels] == [2, 2]
    with pytest.raises(ValueError, match="parallel.ep=3"):
        expert_data_topology(emulated_topology([2, 3]), 3)


def test_moe_config_errors_name_the_keys():
    with pytest.raises(ConfigError) as e:
        load_config([], ["moe.num_experts=0", "parallel.ep=2"])
    assert "moe.num_experts" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config([], ["moe.num_experts=6", "parallel.ep=4", "moe.top_k=9", "moe.gate=relu"])
    text = str(e.value)
    for key in ("parallel.ep=4", "moe.top_k=9", "moe.gate='relu'"):
        assert key in text
    with pytest.raises(ConfigError, match="parallel.engine=native"):
        load_config([], ["moe.num_experts=4", "parallel.engine=deepspeed"])


# ---- the layer against a per-token loop ----------------------------------------------------

def _loop_reference(layer: MoEFeedForward, x: torch.Tensor, keep: torch.Tensor, idx, w) -> torch.Tensor:
    """y_t = sum over kept choices of w * SwiGLU_e(x_t) (+ shared), one token at a time."""
    ex = layer.experts
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            if keep[t, j]:
                e = idx[t, j]
                h = F.silu(x[t] @ ex.w_gate[e]) * (x[t] @ ex.w_up[e])
                out[t] += w[t, j] * (h @ ex.w_down[e])
    if layer.shared is not None:
        out = out + layer.shared(x)
    return out


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
def test_layer_matches_a_per_token_loop(capacity_factor):
    torch.manual_seed(3)
    cfg = MoEConfig(num_experts=4, top_k=2, capacity_factor=capacity_factor, shared_experts=1,
                    aux_loss_coef=0.0, z_loss_coef=0.0)
    layer = MoEFeedForward(16, 24, cfg)
    layer.init_weights(0.3, 0.3)
    x = torch.randn(2, 10, 16, requires_grad=True)
    y = layer(x)
    xf = x.reshape(-1, 16)
    logits = F.linear(xf, layer.router.weight)
    idx, w, _ = route(logits, top_k=2, gate="softmax", norm_topk_prob=True)
    keep = keep_mask(idx, 4, capacity(20, 4, 2, capacity_factor)) if capacity_factor else torch.ones_like(idx).bool()
    want = _loop_reference(layer, xf, keep, idx, w)
    assert torch.allclose(y.reshape(-1, 16), want, atol=1e-5)
    stats = layer.take_stats()
    assert stats["dropped"] == int((~keep).sum()) and stats["assignments"] == 40
    if capacity_factor:
        assert stats["dropped"] > 0  # the case tests dropping
    # gradients of the expert weights agree with the loop's
    g = torch.randn_like(y)
    (y * g).sum().backward()
    got = layer.experts.w_down.grad.clone()
    layer.zero_grad()
    (want * g.reshape(-1, 16)).sum().backward()
    assert torch.allclose(got, layer.experts.w_down.grad, atol=1e-5)


def test_aux_loss_gradient_reaches_the_router():
    """The balance loss is attached inside the layer: backward through the output alone
    trains the router towards balance, scaled by the engine's loss scale."""
    torch.manual_seed(4)
    cfg = MoEConfig(num_experts=4, top_k=1, aux_loss_coef=1.0, z_loss_coef=0.0)
    layer = MoEFeedForward(8, 8, cfg)
    layer.init_weights(0.5, 0.5)
    x = torch.randn(32, 8)
    layer.aux_grad_scale = 0.5
    layer(x).sum().mul(0).backward()  # zero task loss: only the attached aux loss has a gradient
    got = layer.router.weight.grad.clone()
    layer.zero_grad()
    logits = F.linear(x, layer.router.weight)
    idx, _, scores = route(logits, top_k=1, gate="softmax", norm_topk_prob=True)
    (0.5 * balance_loss(scores, idx, 4, "softmax")).backward()
    assert got.abs().sum() > 0
    assert torch.allclose(got, layer.router.weight.grad, atol=1e-6)


# ---- expert parallelism against the single-process run --------------------------------------

STEPS = 20
BASE = ["train.warmup_steps=3", "model.d_model=32", "model.n_heads=2", "model.n_layers=2", "data.seq_len=16",
        f"train.steps={STEPS}", "moe.num_experts=8", "moe.top_k=2", "moe.shared_experts=1",
        "moe.bias_update_rate=0.001", "train.global_batch_size=16", "train.micro_batch_size=2"]
# (label, parallel overrides)
LAYOUTS = [
    ("ep1 tiered", ["parallel.ep=1", "parallel.plan=tiered"]),
    ("ep2 zero3", ["parallel.ep=2", "parallel.plan=zero3"]),
    ("ep2 hsdp", ["parallel.ep=2", "parallel.plan=hsdp"]),
    ("ep4 zero2", ["parallel.ep=4", "parallel.plan=zero2", "moe.dispatch=flat"]),
    ("ep4 zero2 hierarchical", ["parallel.ep=4", "parallel.plan=zero2", "moe.dispatch=hierarchical"]),
]
NODE_LIMITED = [layout for layout in LAYOUTS if layout[0].startswith("ep4")]
"""moe.max_nodes_per_token=1: flat and hierarchical dispatch, compared with each other (a single
process has no nodes to limit the routing to)."""


def _worker(rank: int, world: int, rdzv: str, out: str, extra, layouts, fan_outs=(2, 2)):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    topo = emulated_topology(list(fan_outs))
    ctx = DistContext(rank=rank, world_size=world, local_rank=rank, local_world_size=world, device="cpu",
                      backend="gloo", topology=topo, host="test")
    results = {}
    for label, overrides in layouts:
        cfg = load_config([], [*BASE, *extra, *overrides])
        rec = Recorder()
        res = train(Recipe.of(cfg), ctx, rec, peak_tflops=1.0, show_progress=False)
        measured = rec.ledger_bytes()
        results[label] = {"losses": res.losses, "dropped": res.dropped_fraction, "measured": measured,
                          "cross_node": res.cross_node,
                          "tokens": [t.tolist() for t in res.expert_tokens], "expert_rows": len(rec.expert_rows)}
    Path(f"{out}.{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _run(tmp_path, extra, layouts=LAYOUTS, fan_outs=(2, 2)):
    out, world = str(tmp_path / "result"), math.prod(fan_outs)
    mp.spawn(_worker, args=(world, str(tmp_path / "rdzv"), out, list(extra), layouts, fan_outs), nprocs=world,
             join=True)
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(world)]


def _predicted(overrides, extra):
    from tierzero.parallel.engines.units import model_units
    from tierzero.recipes.data import build_dataset
    from tierzero.recipes.model import build_model

    cfg = load_config([], [*BASE, *extra, *overrides])
    topo = emulated_topology([2, 2])
    data = build_dataset(cfg.data)
    with torch.device("meta"):
        model = build_model(cfg.model, vocab_size=data.vocab_size, seq_len=data.seq_len, moe=cfg.moe)
    plan = named_plan(cfg.parallel.plan, topo, ParallelConfig())
    cost = predict(plan, topo, model_units(model), dtype_bytes=4, grad_accum=2, ep=cfg.parallel.ep)
    return {f"{p}|{lv}|{op}": b * STEPS for (p, lv, op), b in cost.bytes.items()}


@pytest.mark.multiprocess
@pytest.mark.parametrize("extra", [[], ["moe.capacity_factor=1.0"]], ids=["dropless", "capacity"])
def test_expert_parallel_matches_single_process(tmp_path, extra):
    per_rank = _run(tmp_path, extra)
    ref = single_process_run([*BASE, *extra])
    assert ref.losses[-1] < ref.losses[0] - 0.3, "the reference did not train"
    ref_dropped = ref.dropped_fraction
    if extra:
        assert any(f > 0 for step in ref_dropped for f in step), "capacity 1.0 dropped nothing; the test proves nothing"
    failures = []
    for label, overrides in LAYOUTS:
        want_bytes = _predicted(overrides, extra)
        for rank, results in enumerate(per_rank):
            got = results[label]
            for step, (g, w) in enumerate(zip(got["losses"], ref.losses), start=1):
                if abs(g - w) > 1e-5 * abs(w):
                    failures.append(f"{label} rank {rank} step {step}: loss {g!r} vs reference {w!r}")
                    break
            # the same tokens reach the same experts, and the same share is dropped, every step
            if got["tokens"] != [t.tolist() for t in ref.expert_tokens]:
                failures.append(f"{label} rank {rank}: tokens per expert differ from the reference")
            if got["dropped"] != ref_dropped:
                failures.append(f"{label} rank {rank}: dropped fraction {got['dropped'][:3]} vs {ref_dropped[:3]}")
            m = got["measured"]
            a2a = {k: v for k, v in m.items() if k.endswith("|all_to_all")}
            ep = int(overrides[0].split("=")[1])
            if ep > 1:  # each member's bytes at the level between the two ranks: ep 4 spans both
                levels = ["node"] if ep == 2 else ["node", "cluster"]
                if set(a2a) != {f"{p}|{lv}|all_to_all" for p in ("fwd", "bwd") for lv in levels}:
                    failures.append(f"{label}: all-to-all rows {sorted(a2a)} not at levels {levels}")
            elif a2a:
                failures.append(f"{label}: ep=1 sent all-to-all traffic {a2a}")
            rest = {k: v for k, v in m.items() if k not in a2a}
            if set(rest) != set(want_bytes) or any(abs(rest[k] - want_bytes[k]) > 1e-6 * want_bytes[k] for k in rest):
                failures.append(f"{label} rank {rank}: ledger {rest} != predicted {want_bytes}")
        assert per_rank[0][label]["expert_rows"] == STEPS * 2 * 8  # steps x layers x experts, rank 0
        assert per_rank[1][label]["expert_rows"] == 0
    assert not failures, "\n".join(failures)


@pytest.mark.multiprocess
@pytest.mark.parametrize("extra", [[], ["moe.capacity_factor=1.0"]], ids=["dropless", "capacity"])
def test_node_limited_hierarchical_dispatch_halves_the_cross_node_bytes(tmp_path, extra):
    """ep 4 over 2 nodes, top-2, moe.max_nodes_per_token=1: both of a token's experts are on one
    node, so flat dispatch sends it across twice (and brings two rows back), hierarchical once
    with its 2k weights and ids (and one row back, reduced inside the node). Summed over the
    ranks, forward and backward: flat 4 A d, hierarchical 2 T (2d + 2k) with A = 2T assignments
    for T crossing tokens, so hierarchical / flat = (d + k) / (2d) exactly when the routing is
    the same -- and the same losses and tokens per expert say it is. With capacity, some tokens
    keep one expert of two: the same losses and drops, and the ledger still equals the rows sent."""
    per_rank = _run(tmp_path, ["moe.max_nodes_per_token=1", *extra], NODE_LIMITED)
    (flat, _), (hier, _) = NODE_LIMITED
    d, k = 32, 2  # model.d_model, moe.top_k in BASE
    for rank, results in enumerate(per_rank):
        f, h = results[flat], results[hier]
        assert f["tokens"] == h["tokens"], f"rank {rank}: the two dispatches routed differently"
        assert f["dropped"] == h["dropped"], f"rank {rank}: the two dispatches dropped differently"
        for step, (a, b) in enumerate(zip(f["losses"], h["losses"]), start=1):
            assert abs(a - b) <= 1e-5 * abs(a), f"rank {rank} step {step}: hierarchical {b!r} vs flat {a!r}"
    cross = {label: sum(r[label]["measured"].get(f"{p}|cluster|all_to_all", 0) for r in per_rank for p in ("fwd", "bwd"))
             for label in (flat, hier)}
    # the ledger from the measured routing, exactly: each row that crossed goes out (d, or d + 2k
    # with its weights and ids) and one of d comes back, and the backward sends the same again
    for label, width in ((flat, 2 * d), (hier, 2 * d + 2 * k)):
        rows = sum(r for layers in per_rank[0][label]["cross_node"] for _, r in layers)
        assert cross[label] == 2 * rows * width * 4, (label, cross[label], rows)
    if extra:
        assert any(f > 0 for step in per_rank[0][flat]["dropped"] for f in step), "capacity 1.0 dropped nothing"
        assert cross[hier] < cross[flat]
        return
    assert cross[flat] > 0
    assert cross[hier] / cross[flat] == pytest.approx((d + k) / (2 * d), rel=1e-12)
    # the forwarding inside the nodes is what pays for it: hierarchical sends more at the node level
    inner = {label: sum(r[label]["measured"].get(f"{p}|node|all_to_all", 0) for r in per_rank for p in ("fwd", "bwd"))
             for label in (flat, hier)}
    assert inner[hier] > inner[flat]
    # the layer's own count (the `experts` table's cross_node_* columns): flat sends one row per
    # assignment that leaves the node, hierarchical one per token, and each such token has 2
    for label, rows_per_assignment in ((flat, 1.0), (hier, 0.5)):
        per_step = per_rank[0][label]["cross_node"]  # summed over every rank
        assert len(per_step) == STEPS and all(a > 0 and r == a * rows_per_assignment
                                              for layers in per_step for a, r in layers), (label, per_step[:2])


@pytest.mark.multiprocess
def test_hierarchical_dispatch_over_three_levels_matches_single_process(tmp_path):
    """8 ranks as [package x2, node x2, cluster x2], parallel.ep=8 (one expert per rank, 4 per
    node): stage 1 crosses the cluster level, stage 2 the package and node levels inside each
    node. Flat and hierarchical dispatch both reproduce the single process."""
    steps = 8
    extra = [f"train.steps={steps}", "train.global_batch_size=16", "train.micro_batch_size=2"]
    layouts = [("ep8 flat", ["parallel.ep=8", "parallel.plan=zero2", "moe.dispatch=flat"]),
               ("ep8 hierarchical", ["parallel.ep=8", "parallel.plan=zero2", "moe.dispatch=hierarchical"])]
    per_rank = _run(tmp_path, extra, layouts, fan_outs=(2, 2, 2))
    ref = single_process_run([*BASE, *extra])
    for label, _ in layouts:
        for rank, results in enumerate(per_rank):
            got = results[label]
            for step, (g, w) in enumerate(zip(got["losses"], ref.losses), start=1):
                assert abs(g - w) <= 1e-5 * abs(w), f"{label} rank {rank} step {step}: {g!r} vs reference {w!r}"
            assert got["tokens"] == [t.tolist() for t in ref.expert_tokens], f"{label} rank {rank}: tokens differ"
        levels = {k.split("|")[1] for k in per_rank[0][label]["measured"] if k.endswith("|all_to_all")}
        assert levels == {"package", "node", "cluster"}, (label, levels)
    cross = {label: sum(r[label]["measured"].get(f"{p}|cluster|all_to_all", 0) for r in per_rank for p in ("fwd", "bwd"))
             for label, _ in layouts}
    assert cross["ep8 hierarchical"] < cross["ep8 flat"]  # a token with both experts on the far node crosses once


def test_expert_parallel_config_errors_name_the_keys():
    from tierzero.parallel.moe_config import expert_parallel_errors

    cfg = MoEConfig(num_experts=8, top_k=2)
    assert expert_parallel_errors(cfg, (0, 0, 1, 1)) == []
    [e] = expert_parallel_errors(MoEConfig(num_experts=8, dispatch="hierarchical"), (0, 0))
    assert "moe.dispatch=hierarchical" in e and "parallel.ep=2" in e and "moe.dispatch=flat" in e
    [e] = expert_parallel_errors(MoEConfig(num_experts=8, max_nodes_per_token=3), (0, 0, 1, 1))
    assert "moe.max_nodes_per_token=3" in e and "2 node(s)" in e and "at most 2" in e
    [e] = expert_parallel_errors(MoEConfig(num_experts=4, top_k=3, max_nodes_per_token=1), (0, 0, 1, 1))
    assert "hold 2 experts, fewer than moe.top_k=3" in e and "at least 2" in e
    with pytest.raises(ConfigError, match="moe.dispatch='ring'"):
        load_config([], ["moe.num_experts=4", "moe.dispatch=ring"])
    # before any rank starts, on the launch's topology (and again in the ranks, for a scheduler's job)
    from tierzero.launcher.program import training_checks

    cfg = load_config([], ["topology.emulate=[2,2]", "parallel.ep=2", "moe.dispatch=hierarchical"])
    assert any("moe.dispatch=hierarchical needs an EP group that spans nodes" in p for p in training_checks(cfg))
    cfg = load_config([], ["topology.emulate=[2,2]", "parallel.ep=4", "moe.dispatch=hierarchical"])
    assert not [p for p in training_checks(cfg) if "moe." in p]


def test_report_draws_the_expert_load_heatmap(tmp_path):
    """Rows in the `experts` table -> a per-layer load summary and expert_load.png."""
    from tierzero.telemetry.config import TelemetryConfig
    from tierzero.telemetry.report import write_report
    from tierzero.telemetry.sink import Telemetry

    tel = Telemetry(TelemetryConfig(), root=str(tmp_path / "telemetry"), run="r", attempt=0, rank=0, host="h")
    for step in (1, 2):
        tel.record("steps", step=step, loss=1.0, tokens=10, step_time_s=0.1)
        for e, tokens in enumerate([30, 10, 10, 10]):  # expert 0 takes half the tokens: 2x the mean
            tel.record("experts", step=step, layer=0, expert=e, tokens=tokens, dropped_fraction=0.25, aux_loss=0.01,
                       cross_node_fraction=0.25 * step, cross_node_rows=10 * step,
                       z_loss=1.0, bias=0.001 * e)
    tel.close()
    text = write_report(tmp_path)
    assert "experts layer 0: step 2 load max/mean 2.00x, min/mean 0.67x, dropped 25.0%" in text
    assert "cross-node 37.5% of assignments, 15 rows/step across" in text  # means over steps 1 and 2
    png = tmp_path / "report" / "expert_load.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
