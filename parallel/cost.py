"""The cost model: bytes per level, memory per rank and predicted time of a plan per
optimizer step (pure: no torch, no processes).

Traffic accounting (per rank, bytes sent). The conventions of nccl-tests (doc/PERFORMANCE.md,
"bus bandwidth"): a ring all-gather or reduce-scatter of S bytes (the whole gathered /
scattered buffer) over n ranks moves S(n-1)/n; an all-reduce 2S(n-1)/n. A collective is
charged to the outermost level its group spans (the slowest link it crosses), as the ZeRO++
paper (Wang et al. 2023, arXiv 2306.10209) counts cross-node volume.

Link contention (time). A collective's bytes move at the bus bandwidth that the link-load
model of parallel.topology (peak_busbw_gbps / concurrent_busbw_gbps, the collective
benchmark's model) gives *all* of its groups running at once: a flow a->b loads the uplink
of a's unit at the outermost level where they differ, an uplink carries the level's per-rank
figure x the ranks of the unit, split between the flows on it. So a global ring in rank
order (zero3, hpz's forward) crosses each node link with one flow and gets the whole link,
while the one-rank-per-node groups of hsdp's replicas or tiered's step all leave a node at
once and get a rank's share. Collectives the engine has in flight together load the links
together: in backward, block i-1's prefetched gather runs beside block i's reduce-scatter.
Latency (time). Each collective also pays its steps' latency (Level.latency_us): a ring's
n-1 steps (an all-reduce's 2(n-1), an all-to-all's n-1 exchanges), each at the latency of
the level it crosses, as NCCL's own tuning model charges them (src/graph/tuning.cc). With
hundreds of ranks in one ring this is what makes a flat collective slow at small sizes.

Cost.time_s sums each collective's issue-to-completion time as the byte ledger does;
Cost.comm_time_s counts a pair in flight together once (what auto minimises). Where the probe
measured a level per operation (collectives_bench/probe.py), each collective uses its own op's
figure: on gloo the same link moves an all-reduce's bytes faster than an all-gather's.

The planner's inputs besides the plan and the topology (units, dtype, accumulation, MoE
traffic) travel together as PlanInputs, computed once from the recipe by
recipes.planning.planning_inputs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from tierzero.parallel.layout import level_of_group, padded_numel, reduce_hops, same_position_groups, span
from tierzero.parallel.plans import PartitionPlan
from tierzero.parallel.topology import Topology, concurrent_busbw_gbps, expert_data_topology, with_bandwidths

MASTER_BYTES = 4
"""fp32 master weights; AdamW keeps two more fp32 moments."""
OPTIM_BYTES_PER_PARAM = 12
GRAD_ACC_BYTES = 4
"""Gradients accumulate in fp32 across micro-steps."""
DEFAULT_BANDWIDTH_GBPS = 10.0
"""Used for a level whose bandwidth is unknown (not a preset, not measured)."""


@dataclass(frozen=True)
class Unit:
    """One flat parameter buffer: a transformer block, or the embedding/head ("outer")."""
    name: str
    numel: int
    fwd_gathers: int = 1
    bwd_gathers: int = 1
    """The outer unit stays gathered from forward into the head's backward: 0."""
    expert: bool = False
    """Routed-expert weights of one MoE layer (all experts): split by expert across the
    expert-parallel group, then partitioned by the plan over the ranks holding the same experts."""


@dataclass
class Cost:
    plan: PartitionPlan
    bytes: Dict[Tuple[str, str, str], float] = field(default_factory=dict)
    """(phase, level name, op) -> bytes this rank sends per optimizer step."""
    memory: Dict[str, float] = field(default_factory=dict)
    """params, secondary, grads, optimizer, error_feedback, unreduced_grads (parallel.grad_sync=step),
    buffers (the engine's in flight), activations -> bytes per rank."""
    time_s: Dict[Tuple[str, str, str], float] = field(default_factory=dict)
    """(phase, level, op) -> predicted seconds per optimizer step from issue to completion of
    those collectives (what the byte ledger's time_s measures: two collectives in flight at
    once each count their whole duration)."""
    comm_time_s: float = 0.0
    """Predicted seconds per optimizer step this rank communicates (collectives in flight at
    once counted once)."""
    update_s: float = 0.0
    """Predicted seconds of this rank's optimizer update (its optimizer shard at the measured
    rate, Topology.update_gelems_per_s; 0 when the rate is not measured)."""
    codec_s: float = 0.0
    """Predicted seconds this rank spends encoding and decoding quantized payloads per step (the
    elements at the measured rate, Topology.codec_gelems_per_s; 0 when not measured)."""
    fits: bool = True
    expert_memory: float = 0.0
    """Bytes per rank of the routed experts' states (included in `memory`)."""

    def bytes_by_level(self) -> Dict[str, float]:
        return _by_level(self.bytes)

    def time_by_level(self) -> Dict[str, float]:
        """Predicted collective seconds per level (issue to completion, as the ledger sums them)."""
        return _by_level(self.time_s)

    @property
    def memory_total(self) -> float:
        return sum(self.memory.values())

    @property
    def predicted_s(self) -> float:
        """What auto minimises: communication plus the optimizer update, the parts of a step
        that differ between plans (forward and backward compute the same on every plan)."""
        return self.comm_time_s + self.update_s + self.codec_s


def _by_level(per_key: Dict[Tuple[str, str, str], float]) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for (_, level, _), v in per_key.items():
        out[level] = out.get(level, 0.0) + v
    return out


def _ring(n: int) -> float:
    return (n - 1) / n


@dataclass(frozen=True)
class MoETraffic:
    """What the cost model needs to charge the experts' all-to-all (uniform routing assumed)."""
    tokens_per_micro_step: int
    """Tokens one rank routes per micro-step (micro batch x sequence length)."""
    d_model: int
    top_k: int
    num_layers: int
    num_experts: int = 0
    """Routed experts per layer (0: unknown, read as top_k x ep -- only hierarchical dispatch needs it)."""
    max_nodes_per_token: int = 0
    dispatch: str = "flat"
    """moe.dispatch: flat, hierarchical or auto (hierarchical when the EP group spans nodes)."""


def expected_nodes_per_token(num_experts: int, top_k: int, num_nodes: int, max_nodes: int = 0) -> float:
    """Distinct nodes a token's top_k experts lie on, in expectation, with uniform routing over
    num_experts spread evenly on num_nodes: num_nodes x P(a node holds one of them) =
    num_nodes x (1 - C(E - E/N, k) / C(E, k)). Node-limited routing picks max_nodes nodes, then
    the top_k among their experts: the same formula over those nodes alone."""
    if max_nodes and max_nodes < num_nodes:
        num_experts, num_nodes = num_experts // num_nodes * max_nodes, max_nodes
    if num_nodes <= 1:
        return 1.0
    others = num_experts - num_experts // num_nodes
    return num_nodes * (1 - math.comb(others, top_k) / math.comb(num_experts, top_k))


def a2a_bytes_per_level(topo: Topology, ep: int, moe: "MoETraffic", dtype_bytes: int) -> Dict[str, float]:
    """Bytes one rank sends per MoE layer and micro-step for dispatch + combine (their gradients
    in the backward send the same again), by the level they cross, with uniform routing: what the
    byte ledger books (each member's rows at the level between the two ranks).

    flat: each assignment (token x top_k) to its expert's rank, 1/ep of them to each member.
    hierarchical: one row of d + 2 top_k (the token, its weights and expert ids) per (token,
    destination node) to this rank's peer there, one row of d back; then, inside the node, each
    assignment to its expert's rank and its output back (docs/moe.md, "Hierarchical dispatch")."""
    per_node = min(ep, topo.ranks_per_node)
    num_nodes = ep // per_node
    level = lambda j: topo.levels[level_of_group(topo, (0, j))].name  # noqa: E731
    d, k, t = moe.d_model, moe.top_k, moe.tokens_per_micro_step
    out: Dict[str, float] = {}

    def add(lv: str, rows: float, width: int) -> None:
        out[lv] = out.get(lv, 0.0) + rows * width * dtype_bytes

    hierarchical = num_nodes > 1 and moe.dispatch != "flat"
    if not hierarchical:
        for j in range(1, ep):
            add(level(j), 2 * t * k / ep, d)  # dispatch and combine
        return out
    experts = moe.num_experts or k * ep
    per_pair = t * expected_nodes_per_token(experts, k, num_nodes, moe.max_nodes_per_token) / num_nodes
    for n in range(1, num_nodes):  # stage 1: to the peer on each other node, and back
        add(level(n * per_node), per_pair, d + 2 * k)
        add(level(n * per_node), per_pair, d)
    for j in range(1, per_node):  # stage 2: the t x k assignments a peer receives (symmetry), 1/per_node to each
        add(level(j), 2 * t * k / per_node, d)
    return out


@dataclass(frozen=True)
class PlanInputs:
    """What the planner needs from the recipe besides the topology and `parallel.*`: computed
    once (recipes.planning.planning_inputs) for `tierzero plan` and `tierzero run` alike."""
    units: Tuple[Unit, ...]
    """The model's flat buffers as the engine cuts them, or equal blocks when only its size is known."""
    dtype_bytes: int
    """Bytes per parameter and activation element of the compute dtype: 2 for bfloat16, 4 for float32."""
    grad_accum: int
    """Micro-steps per optimizer step."""
    moe: Optional[MoETraffic] = None
    """The experts' all-to-all (None: a dense model, or one known only by its size)."""
    model_summary: str = ""
    """What the units describe, for a person, e.g. "2e+10 params (model.params, 44 equal blocks)"."""
    notes: Tuple[str, ...] = ()
    """What the inputs had to assume, for a person (e.g. a batch that does not split over the ranks)."""
    reduce_bytes: int = 4
    """Bytes per element of the gradient reduce-scatter (parallel.reduce_dtype): 4 for float32."""
    activation_bytes: float = 0.0
    """One micro-batch's activations kept for the backward, per rank (recipes.planning.activation_bytes)."""

    def __post_init__(self):
        # lists would make the frozen value unhashable
        object.__setattr__(self, "units", tuple(self.units))
        object.__setattr__(self, "notes", tuple(self.notes))


def predict(
    plan: PartitionPlan,
    topo: Topology,
    units: Sequence[Unit],
    *,
    dtype_bytes: int,
    grad_accum: int,
    memory_budget_bytes: Optional[float] = None,
    ep: int = 1,
    moe: Optional[MoETraffic] = None,
    reduce_bytes: Optional[int] = None,
    activation_bytes: float = 0.0,
    serial: bool = False,
) -> Cost:
    """Bytes per level per optimizer step, memory per rank and predicted communication time.

    Mirrors exactly what parallel.engines.native.NativeEngine issues, so a test can demand
    measured == predicted. Expert units (all experts of a layer) are split by expert over
    the ep ranks of an expert-parallel group and partitioned by the same plan over the
    expert-data-parallel topology (parallel.topology.expert_data_topology); their
    all-to-all, which depends on the routing, is charged for uniform routing.

    Time (see "Link contention" in the module docstring): each collective moves its bytes at
    the bus bandwidth the link-load model (parallel.topology.concurrent_busbw_gbps) gives all
    of its groups at once, beside what the engine has in flight with it. serial=True: nothing in
    flight beside it (what parallel.comm_timing=aligned measures: each collective waited at once)."""
    cost = Cost(plan)
    reduce_bytes = dtype_bytes if reduce_bytes is None else reduce_bytes
    links = _link_topology(topo)
    add = _Charger(cost)
    dense = [u for u in units if not u.expert]
    memory, largest = _domain_traffic(add, plan, topo, dense, links, stride=1, dtype_bytes=dtype_bytes,
                                      grad_accum=grad_accum, reduce_bytes=reduce_bytes, serial=serial)
    experts = [Unit(u.name, u.numel // ep, u.fwd_gathers, u.bwd_gathers, expert=True) for u in units if u.expert]
    if experts:
        mem_e, largest_e = _expert_traffic(add, plan, topo, experts, links, ep=ep, moe=moe, dtype_bytes=dtype_bytes,
                                           grad_accum=grad_accum, reduce_bytes=reduce_bytes, serial=serial)
        memory = {k: memory[k] + mem_e[k] for k in memory}
        cost.expert_memory = sum(mem_e.values())
        largest += largest_e  # a block's dense and expert buffers are gathered together
    # a gathered unit and the prefetched next one; the gradients of the block in backward
    # (autograd's, in the compute dtype, and the flat copy reduced, in reduce_bytes)
    memory["buffers"] = (2 * largest * dtype_bytes if span(topo, plan.param_level) > 1 else 0.0) \
        + largest * (dtype_bytes + reduce_bytes)
    memory["activations"] = activation_bytes
    cost.memory = memory
    if topo.update_gelems_per_s:
        cost.update_s = memory["optimizer"] / OPTIM_BYTES_PER_PARAM / (topo.update_gelems_per_s * 1e9)
    if topo.codec_gelems_per_s:
        cost.codec_s = add.codec_elements / (topo.codec_gelems_per_s * 1e9)
    if memory_budget_bytes is not None:
        cost.fits = cost.memory_total <= memory_budget_bytes
    return cost


class _Charger:
    """The `add` every traffic function charges a collective with: its bytes, its duration, and
    (wall_s, when it runs beside another already charged) what it adds to the rank's time on
    the network; `codec` counts the elements a quantized collective encodes and decodes."""

    def __init__(self, cost: Cost):
        self.cost = cost
        self.codec_elements = 0.0

    def __call__(self, phase: str, level: str, op: str, nbytes: float, seconds: float = 0.0,
                 wall_s: Optional[float] = None) -> None:
        cost = self.cost
        if nbytes:
            key = (phase, level, op)
            cost.bytes[key] = cost.bytes.get(key, 0.0) + nbytes
            cost.time_s[key] = cost.time_s.get(key, 0.0) + seconds
            cost.comm_time_s += seconds if wall_s is None else wall_s

    def codec(self, elements: float) -> None:
        self.codec_elements += elements


@functools.lru_cache(maxsize=1024)
def _step_latency_s(links: Topology, outer: int, inner: int) -> float:
    """Seconds of latency in one ring (or pairwise all-to-all) of the groups (outer, inner):
    n - 1 steps, each step paying the latency of the level it crosses -- NCCL's model
    (src/graph/tuning.cc: (n-1 - inter) x intra-node + inter x network), one term per level.
    Rank 0's group stands for all. 0 where levels' latencies are unknown."""
    members = range(0, outer, inner)
    total, prev, unit = 0.0, len(members), 1
    for lv in links.levels:
        unit *= lv.size
        units = len({m // unit for m in members})  # the group's members fall in this many level units
        total += (prev - units) * (lv.latency_us or 0.0) * 1e-6
        prev = units
    return total


def _alone_bps(links: Topology, outer: int, inner: int, op: str, pattern: str = "ring") -> float:
    """Bus bandwidth, bytes/s, of the groups (outer, inner) running `op` by themselves."""
    return _busbw(links, ((outer, inner, pattern, op),))[0] * 1e9


def _expert_traffic(add, plan: PartitionPlan, topo: Topology, experts: Sequence[Unit], links: Topology, *, ep: int,
                    moe: Optional[MoETraffic], dtype_bytes: int, grad_accum: int, reduce_bytes: int,
                    serial: bool = False):
    """The routed experts (each unit already cut to one expert-parallel rank's share): the plan
    over the expert-data-parallel topology, the expert part of the grad norm across the ep
    group, and the dispatch/combine all-to-all. Returns their memory per rank and largest unit."""
    sub = expert_data_topology(topo, ep)
    memory, largest = _domain_traffic(add, plan, sub, experts, links, stride=ep, dtype_bytes=dtype_bytes,
                                      reduce_bytes=reduce_bytes, serial=serial,
                                      grad_accum=grad_accum)
    if ep > 1:
        ep_level = topo.levels[level_of_group(topo, range(0, ep))].name
        nbytes = 2 * GRAD_ACC_BYTES * _ring(ep)  # expert part of the norm
        add("step", ep_level, "all_reduce", nbytes,
            nbytes / _alone_bps(links, ep, 1, "all_reduce") + 2 * _step_latency_s(links, ep, 1))
        if moe is not None:
            calls = grad_accum * moe.num_layers
            inside = min(ep, topo.ranks_per_node)  # the part that stays in a node runs at its groups' rate
            for lv, per_call in a2a_bytes_per_level(topo, ep, moe, dtype_bytes).items():
                a2a = calls * per_call
                outer = lv == ep_level
                rate = _alone_bps(links, ep if outer else inside, 1, "all_to_all", "all_to_all")
                lat = 2 * calls * _step_latency_s(links, ep, 1) if outer else 0.0
                for phase in ("fwd", "bwd"):  # dispatch + combine, and their gradients
                    add(phase, lv, "all_to_all", a2a, a2a / rate + lat)
    return memory, largest


def _link_topology(topo: Topology) -> Topology:
    """The topology the time model uses: unknown bandwidths at DEFAULT_BANDWIDTH_GBPS."""
    return with_bandwidths(topo, [lv.bandwidth_gbps or DEFAULT_BANDWIDTH_GBPS for lv in topo.levels])


@functools.lru_cache(maxsize=1024)
def _busbw(links: Topology, collectives: Tuple[Tuple[int, int, str, str], ...]) -> Tuple[float, ...]:
    """GB/s each collective reaches with all of them in flight at once. A collective is
    (outer, inner, pattern, op): every group "inside each `outer` consecutive ranks, those
    sharing their position mod `inner`" at once -- the shape of every group a plan issues --
    running `op` (a level's measured figure for that op, where it has one). Cached: auto asks
    for the same few shapes for every candidate plan."""
    w = links.world_size
    rates = concurrent_busbw_gbps(links, [(same_position_groups(w, o, i), pat, op) for o, i, pat, op in collectives])
    assert all(r is not None for r in rates), f"{collectives} move nothing on {links.describe()}"
    return tuple(rates)


def _side_by_side(a: float, a_alone: float, a_shared: float, b: float, b_alone: float, b_shared: float):
    """Durations of two transfers (bytes, bytes/s alone, bytes/s while both run) started
    together: both at their shared rate until the first ends, then the other alone."""
    t_a, t_b = a / a_shared, b / b_shared
    if t_a <= t_b:
        return t_a, t_a + (b - t_a * b_shared) / b_alone
    return t_b + (a - t_b * a_shared) / a_alone, t_b


KIND_OP = dict(p="all_gather", b="all_gather", down="all_gather", g="reduce_scatter", up="reduce_scatter",
               rep="all_reduce", o="all_reduce")
"""The operation each kind of group runs (its measured figure, where the probe has one)."""


def _domain_traffic(add, plan: PartitionPlan, topo: Topology, units: Sequence[Unit], links: Topology, *,
                    stride: int, dtype_bytes: int, grad_accum: int, reduce_bytes: int, serial: bool = False):
    """Charge one domain's units (the world's dense units, or the expert units over the
    expert-data-parallel topology, whose rank q is world rank q * stride + e for each of the
    `stride` expert positions e); returns its memory per rank and its largest unit."""
    w = topo.world_size
    names = topo.names
    s_p, s_b, s_g, s_o = (span(topo, lv) for lv in (plan.param_level, plan.bwd_level, plan.grad_level, plan.optim_level))
    n_rep = w // s_o
    # the outermost level each kind of group spans (rank 0's group stands for all: symmetry)
    lv_p, lv_b, lv_g, lv_o, lv_up, lv_down, lv_rep = (
        names[level_of_group(topo, r)] for r in (range(0, s_p), range(0, s_b), range(0, s_g), range(0, s_o),
                                                  range(0, s_o, s_g), range(0, s_o, s_p), range(0, w, s_o)))
    # each kind of group as (outer, inner) on the world's ranks (plan_groups' shapes; the
    # expert domain's rank q is world rank q * stride + e, so its shapes stretch by stride)
    shape = {k: (o * stride, i * stride) for k, (o, i) in dict(
        p=(s_p, 1), b=(s_b, 1), g=(s_g, 1), up=(s_o, s_g), rep=(w, s_o), down=(s_o, s_p), o=(s_o, 1)).items()}

    rate = _rate_table(links, shape, serial)
    quant = plan.quant
    q_p, q_b = quant.weight_bits_at(lv_p), quant.weight_bits_at(lv_b)
    hops = reduce_hops(topo, plan.grad_level)
    hierarchical = quant.hierarchical_grads(tuple(names[h.level] for h in hops))
    # gradient reduce-scatters per optimizer step: every micro-step, or once (grad_sync=step: each
    # rank keeps its units' full-size gradients, summed over the micro-steps, until the last)
    once = plan.grad_sync == "step" and s_g > 1 and grad_accum > 1
    reduce_calls = 1 if once else grad_accum

    def gathered(n: int, s: int, bits: int) -> float:
        return _gathered_bytes(quant, n, s, bits, dtype_bytes)

    total = largest = feedback = secondary = 0  # elements: all, error-feedback residuals, bwd-gathered units
    blocks = []  # (bwd gather bytes, reduce-scatter bytes) per micro-step of each unit, in order
    for u in units:
        n = padded_numel(u.numel, w, quant.pad_block)
        total += n
        secondary += n if u.bwd_gathers else 0
        largest = max(largest, n)
        if s_p > 1:
            if q_p:  # each call encodes this rank's chunk and decodes every member's
                add.codec(grad_accum * u.fwd_gathers * (n // s_p) * (1 + s_p))
            nbytes = grad_accum * u.fwd_gathers * gathered(n, s_p, q_p)
            add("fwd", lv_p, "all_gather", nbytes,
                nbytes / rate("p")[0] + grad_accum * u.fwd_gathers * rate.latency("p"))
        if s_b > 1 and q_b:
            add.codec(grad_accum * u.bwd_gathers * (n // s_b) * (1 + s_b))
        blocks.append((u.bwd_gathers * gathered(n, s_b, q_b) if s_b > 1 else 0.0,
                       n * reduce_bytes * _ring(s_g) if s_g > 1 and not hierarchical else 0.0))
        if hierarchical:
            feedback += _hop_traffic(add, quant, topo, hops, links, n, stride=stride, grad_accum=reduce_calls,
                                     reduce_bytes=reduce_bytes)
        _step_traffic(add, quant, n, s_p, s_g, s_o, n_rep, (lv_up, lv_rep, lv_down), rate, dtype_bytes=dtype_bytes)
    _backward(add, blocks, lv_b, lv_g, rate, grad_accum, reduce_calls)
    if units and s_o > 1:  # the squared grad norm, one fp32 scalar per unit, summed in one all-reduce
        nbytes = 2 * GRAD_ACC_BYTES * _ring(s_o)
        add("step", lv_o, "all_reduce", nbytes, nbytes / rate("o")[0] + 2 * rate.latency("o"))
    memory = _memory(plan, (s_p, s_b, s_g, s_o), (total, secondary, feedback), dtype_bytes=dtype_bytes,
                     reduce_bytes=reduce_bytes if once else 0)
    return memory, largest


def _memory(plan: PartitionPlan, spans: Tuple[int, int, int, int], elements: Tuple[int, int, int], *,
            dtype_bytes: int, reduce_bytes: int) -> Dict[str, float]:
    """One domain's states, bytes per rank, from the spans of its param / bwd / grad / optimizer
    levels and its elements: all units', those gathered for their backward (hpZ keeps their
    secondary shard), the error-feedback residuals'. reduce_bytes 0: no unreduced gradients
    (parallel.grad_sync=micro, or nothing to accumulate)."""
    (s_p, s_b, s_g, s_o), (total, secondary, feedback) = spans, elements
    return {
        "params": total * dtype_bytes / s_p,
        "secondary": secondary * dtype_bytes / s_b if plan.secondary_level is not None else 0.0,
        "grads": total * GRAD_ACC_BYTES / s_g,
        "optimizer": total * OPTIM_BYTES_PER_PARAM / s_o,
        "error_feedback": feedback * GRAD_ACC_BYTES if plan.quant.error_feedback else 0.0,
        "unreduced_grads": total * reduce_bytes,
    }


def _rate_table(links: Topology, shape: Dict[str, Tuple[int, int]], serial: bool = False):
    """rate(*kinds): bytes/s of each kind of collective (its (outer, inner) shape) with all the
    named ones in flight at once (serial: each alone); kind "a2a:<k>" is kind k's groups running
    an all-to-all."""
    rates: Dict[Tuple[str, ...], Tuple[float, ...]] = {}

    def collective(kind: str):
        if kind.startswith("a2a:"):
            return (*shape[kind[4:]], "all_to_all", "all_to_all")
        return (*shape[kind], "ring", KIND_OP[kind])

    def rate(*kinds: str) -> Tuple[float, ...]:
        if serial and len(kinds) > 1:
            return tuple(rate(k)[0] for k in kinds)
        if kinds not in rates:
            rates[kinds] = tuple(r * 1e9 for r in _busbw(links, tuple(collective(k) for k in kinds)))
        return rates[kinds]

    rate.latency = lambda kind: _step_latency_s(links, *shape[kind])  # seconds per call of a ring of `kind`
    return rate


def _gathered_bytes(quant, n: int, s: int, bits: int, dtype_bytes: int) -> float:
    """Bytes a rank sends in one all-gather of an n-element buffer over s ranks (its chunk's
    payload to each other member when quantized)."""
    return (s - 1) * quant.payload_bytes(n // s, bits) if bits else n * dtype_bytes * _ring(s)


def _step_traffic(add, quant, n: int, s_p: int, s_g: int, s_o: int, n_rep: int, levels: Tuple[str, str, str], rate,
                  *, dtype_bytes: int) -> None:
    """One unit's collectives at the optimizer step: gradient shards up to the optimizer level
    (one quantized all-to-all hop where that level is quantized), across the replicas, and the
    new parameters back down to the param level."""
    lv_up, lv_rep, lv_down = levels
    up_bits = quant.grad_bits_at(lv_up)
    if s_o > s_g and up_bits:
        add.codec(2 * (s_o // s_g - 1) * (n // s_o))
        nbytes = (s_o // s_g - 1) * quant.payload_bytes(n // s_o, up_bits)
        add("step", lv_up, "reduce_scatter", nbytes, nbytes / rate("a2a:up")[0] + rate.latency("up"))
    elif s_o > s_g:
        nbytes = n / s_g * GRAD_ACC_BYTES * _ring(s_o // s_g)
        add("step", lv_up, "reduce_scatter", nbytes, nbytes / rate("up")[0] + rate.latency("up"))
    if n_rep > 1:
        nbytes = 2 * n / s_o * GRAD_ACC_BYTES * _ring(n_rep)
        add("step", lv_rep, "all_reduce", nbytes, nbytes / rate("rep")[0] + 2 * rate.latency("rep"))
    if s_o > s_p:
        if quant.weight_bits_at(lv_down):
            add.codec(n // s_o * (1 + s_o // s_p))
        nbytes = _gathered_bytes(quant, n // s_p, s_o // s_p, quant.weight_bits_at(lv_down), dtype_bytes)
        add("step", lv_down, "all_gather", nbytes, nbytes / rate("down")[0] + rate.latency("down"))


def _hop_traffic(add, quant, topo: Topology, hops, links: Topology, n: int, *, stride: int, grad_accum: int,
                 reduce_bytes: int) -> int:
    """One unit's gradient reduce-scatter hop by hop (parallel.layout.reduce_hops), as the
    engine runs it when a hop is quantized: a quantized hop is an all-to-all of each piece's
    payload to its owner (qgZ; the ledger books it as the reduce_scatter it implements, at the
    all-to-all's rate), the others a ring reduce-scatter; each hop alone on the wire.
    Returns the elements of the quantized hops' inputs (the error-feedback residual)."""
    quantized_inputs = 0
    for hop in hops:
        size, inner = topo.levels[hop.level].size, hop.input_fraction
        level = topo.levels[hop.level].name
        piece = n // (inner * size)
        bits = quant.grad_bits_at(level)
        if bits:  # the others' pieces encoded, theirs decoded (and with error feedback decoded again here)
            add.codec(grad_accum * (size - 1) * piece * (3 if quant.error_feedback else 2))
            nbytes = grad_accum * (size - 1) * quant.payload_bytes(piece, bits)
            pattern, op = "all_to_all", "all_to_all"
            quantized_inputs += n // inner
        else:
            nbytes = grad_accum * (size - 1) * piece * reduce_bytes
            pattern, op = "ring", "reduce_scatter"
        bps = _busbw(links, ((inner * size * stride, inner * stride, pattern, op),))[0] * 1e9
        add("bwd", level, "reduce_scatter", nbytes,
            nbytes / bps + grad_accum * _step_latency_s(links, inner * size * stride, inner * stride))
    return quantized_inputs


def _backward(add, blocks: Sequence[Tuple[float, float]], lv_b: str, lv_g: str, rate, grad_accum: int,
              reduce_calls: int) -> None:
    """The backward schedule of parallel.engines.native.NativeEngine.micro_step: blocks in reverse; while
    block i computes and reduce-scatters its gradient, block i-1's gather is already in flight
    (prefetch), so the two share whatever links both cross. Units without a backward gather keep
    their forward's: the outer unit (it reduce-scatters last, alone) and the last block (no
    gather before its backward; its reduce-scatter runs beside the gather of the block before).
    Gathers run every micro-step, reduce-scatters `reduce_calls` times (parallel.grad_sync): the
    micro-steps without one have their gathers alone."""
    gathers = [i for i, (ag, _) in enumerate(blocks) if ag]
    # reduce-scatter of block i -> the gather in flight beside it: block i-1's, prefetched before
    # block i's backward whether or not block i was gathered for it (the last block is not)
    paired = {i: i - 1 for i in range(1, len(blocks)) if blocks[i][1] and blocks[i - 1][0]}
    pair_rates = rate("b", "g") if paired else None
    rs_alone = rate("g")[0] if any(rs for _, rs in blocks) else None
    ag_alone = rate("b")[0] if gathers else None
    overlapped = set(paired.values())
    lat_b = rate.latency("b") if gathers else 0.0
    lat_g = rate.latency("g") if any(rs for _, rs in blocks) else 0.0
    for i, (ag, rs) in enumerate(blocks):
        alone = grad_accum - (reduce_calls if i in overlapped else 0)
        if ag and alone:
            add("bwd", lv_b, "all_gather", alone * ag, alone * (ag / ag_alone + lat_b))
        if rs and i not in paired:
            add("bwd", lv_g, "reduce_scatter", reduce_calls * rs, reduce_calls * (rs / rs_alone + lat_g))
    k = reduce_calls
    for cur, prev in paired.items():
        ag, rs = blocks[prev][0], blocks[cur][1]
        t_ag, t_rs = _side_by_side(ag, ag_alone, pair_rates[0], rs, rs_alone, pair_rates[1])
        t_ag, t_rs = t_ag + lat_b, t_rs + lat_g
        # side by side on the wire: the rank waits for the longer of the two, once
        add("bwd", lv_b, "all_gather", k * ag, k * t_ag, wall_s=0.0)
        add("bwd", lv_g, "reduce_scatter", k * rs, k * t_rs, wall_s=k * max(t_ag, t_rs))


def uniform_units(num_params: float, num_blocks: int) -> List[Unit]:
    """A model known only by its size: equal blocks, each gathered for forward and backward."""
    num_blocks = max(1, num_blocks)
    per = int(math.ceil(num_params / num_blocks))
    return [Unit(f"block{i}", per) for i in range(num_blocks)]
