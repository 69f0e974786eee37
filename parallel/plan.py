"""Partition plans and their cost model (pure: no torch, no processes).

A plan names, for each training state, the topology level it is sharded over:

    param_level      the persistent working copy of the parameters; a block's forward
                     (and, without a secondary level, backward) all-gathers inside it
    secondary_level  ZeRO++ hpZ: the backward all-gather comes from a secondary shard at
                     this (faster) level, cut from the forward gather at no extra traffic
    grad_level       gradients are reduce-scattered inside it every micro-step
    optim_level      fp32 master weights and AdamW moments are sharded inside it

Levels are indices into Topology.levels (0 = innermost); REPLICATED (-1) means "a group of
one rank". param <= grad <= optim must hold. States are replicated across the units of the
optimizer level (HSDP / MiCS), so gradients are all-reduced across those replicas once per
optimizer step.

Shard layout. Every unit (flat parameter buffer) is padded to a multiple of the world size
and cut into span(L) equal chunks at level L. Rank r holds chunk idx_L(r): its coordinates
inside its level-L unit read as a mixed-radix number with the *innermost* digit most
significant. That nesting makes every hop a plain collective over one group:
a level-L chunk is the concatenation of the level-L' chunks (L' > L) held by the ranks of
its L'-unit that share r's level-L position -- so gradients go up the levels by
reduce-scatter and parameters come down by all-gather, with no reshuffling.

Traffic accounting (per rank, bytes sent, nccl-tests conventions, BACKGROUND.md): a ring
all-gather or reduce-scatter of S bytes (the whole gathered / scattered buffer) over n ranks
moves S(n-1)/n; an all-reduce 2S(n-1)/n. A collective is charged to the outermost level its
group spans (the slowest link it crosses), as the ZeRO++ paper counts cross-node volume.

Link contention (time). A collective's bytes move at the bus bandwidth that the link-load
model of parallel.topology (peak_busbw_gbps / concurrent_busbw_gbps, the collective
benchmark's model) gives *all* of its groups running at once: a flow a->b loads the uplink
of a's unit at the outermost level where they differ, an uplink carries the level's per-rank
figure x the ranks of the unit, split between the flows on it. So a global ring in rank
order (zero3, hpz's forward) crosses each node link with one flow and gets the whole link,
while the one-rank-per-node groups of hsdp's replicas or tiered's step all leave a node at
once and get a rank's share. Collectives the engine has in flight together load the links
together: in backward, block i-1's prefetched gather runs beside block i's reduce-scatter.
Cost.time_s sums each collective's issue-to-completion time as the byte ledger does;
Cost.comm_time_s counts a pair in flight together once (what auto minimises). Where the probe
measured a level per operation (collectives_bench/probe.py), each collective uses its own op's
figure: on gloo the same link moves an all-reduce's bytes faster than an all-gather's.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from tierzero.parallel.topology import Topology, concurrent_busbw_gbps, expert_data_topology, with_bandwidths

REPLICATED = -1
PLAN_NAMES = ("auto", "ddp", "zero1", "zero2", "zero3", "hpz", "hsdp", "tiered")
ENGINES = ("native", "deepspeed", "fsdp2")
MASTER_BYTES = 4
"""fp32 master weights; AdamW keeps two more fp32 moments."""
OPTIM_BYTES_PER_PARAM = 12
GRAD_ACC_BYTES = 4
"""Gradients accumulate in fp32 across micro-steps."""


@dataclass
class ParallelConfig:
    plan: str = "auto"
    """Partition plan: auto, ddp, zero1, zero2, zero3, hpz, hsdp or tiered."""
    levels: Optional[List[str]] = None
    """Explicit [param, grad, optimizer] levels for plan=tiered, e.g. [package, node, cluster]; 'none' = replicated."""
    secondary_level: Optional[str] = None
    """hpz: level of the secondary parameter partition (default node)."""
    hsdp_level: Optional[str] = None
    """hsdp: level inside which everything is sharded (default node); replicated across it."""
    memory_budget_gb: Optional[float] = None
    """Memory per rank for parameters, gradients and optimizer states; default 80% of the device's (or of host RAM / ranks per node)."""
    engine: str = "native"
    """Engine executing the plan: native (every plan), deepspeed (ddp, zero1-3, hpz) or fsdp2 (zero2, zero3, hsdp)."""
    ep: int = 1
    """Expert-parallel size (MoE): experts split over ep consecutive ranks, the fastest level that holds them."""

    def errors(self) -> List[str]:
        errs = []
        if self.plan not in PLAN_NAMES:
            errs.append(f"parallel.plan={self.plan!r} is not a plan; choose one of {list(PLAN_NAMES)}.")
        if self.engine not in ENGINES:
            errs.append(f"parallel.engine={self.engine!r} is not one of {list(ENGINES)}.")
        if self.levels is not None:
            if self.plan not in ("tiered", "auto"):
                errs.append(
                    f"parallel.levels={list(self.levels)} is an explicit tiered assignment, but "
                    f"parallel.plan={self.plan}; set parallel.plan=tiered (or drop parallel.levels)."
                )
            if len(self.levels) != 3:
                errs.append(
                    f"parallel.levels={list(self.levels)} needs exactly three level names "
                    "[param, grad, optimizer], e.g. [package, node, cluster]."
                )
        if self.ep < 1:
            errs.append(f"parallel.ep={self.ep} must be >= 1 (1 = every rank holds every expert)")
        if self.memory_budget_gb is not None and self.memory_budget_gb <= 0:
            errs.append(f"parallel.memory_budget_gb={self.memory_budget_gb} must be > 0.")
        return errs


@dataclass(frozen=True)
class PartitionPlan:
    name: str
    param_level: int
    grad_level: int
    optim_level: int
    secondary_level: Optional[int] = None

    def describe(self, topo: Topology) -> str:
        def nm(level):
            return "rep" if level == REPLICATED else topo.levels[level].name

        parts = [f"P={nm(self.param_level)}"]
        if self.secondary_level is not None:
            parts.append(f"S={nm(self.secondary_level)}")
        parts += [f"G={nm(self.grad_level)}", f"O={nm(self.optim_level)}"]
        return f"{self.name}({','.join(parts)})"

    @property
    def bwd_level(self) -> int:
        return self.param_level if self.secondary_level is None else self.secondary_level


class PlanError(ValueError):
    pass


# ---- levels and shards ------------------------------------------------------------------

def span(topo: Topology, level: int) -> int:
    """Ranks in one unit of `level` (1 for REPLICATED)."""
    return 1 if level == REPLICATED else topo.span(topo.levels[level].name)


def chunk_index(topo: Topology, rank: int, level: int) -> int:
    """Which of the span(level) chunks rank holds: its coordinates up to `level`, innermost
    digit most significant (see the module docstring for why)."""
    if level == REPLICATED:
        return 0
    coords = topo.coords(rank)
    idx = 0
    for k in range(level + 1):
        idx = idx * topo.levels[k].size + coords[k]
    return idx


def level_of_group(topo: Topology, ranks: Sequence[int]) -> int:
    """The outermost level a group spans: the smallest level whose unit holds all of it."""
    lo, hi = min(ranks), max(ranks)
    for k in range(len(topo.levels)):
        n = span(topo, k)
        if lo // n == hi // n:  # units are contiguous rank ranges
            return k
    return len(topo.levels) - 1


def padded_numel(numel: int, world_size: int) -> int:
    return -(-numel // world_size) * world_size


@dataclass(frozen=True)
class PlanGroups:
    """Rank lists (each a partition of the world) for every collective a plan issues."""
    param: List[List[int]]
    """all-gather before forward: units of param_level."""
    bwd: List[List[int]]
    """all-gather before backward: units of the secondary level (hpz) or param_level."""
    grad: List[List[int]]
    """reduce-scatter every micro-step: units of grad_level."""
    grad_up: List[List[int]]
    """reduce-scatter at the step: inside an optimizer unit, ranks sharing the grad position."""
    replicas: List[List[int]]
    """all-reduce at the step: the same optimizer chunk in every optimizer unit."""
    optim: List[List[int]]
    """units of optim_level (grad-norm reduction)."""
    param_down: List[List[int]]
    """all-gather after the step: inside an optimizer unit, ranks sharing the param position."""


def _units(world: int, size: int) -> List[List[int]]:
    return [list(range(s, s + size)) for s in range(0, world, size)]


def _inside_with_same_position(world: int, outer: int, inner: int) -> List[List[int]]:
    """Inside each `outer`-sized unit, the ranks that share their position in `inner` units."""
    groups = []
    for base in range(0, world, outer):
        for pos in range(inner):
            groups.append(list(range(base + pos, base + outer, inner)))
    return groups


def plan_groups(plan: PartitionPlan, topo: Topology) -> PlanGroups:
    w = topo.world_size
    s_p, s_b, s_g, s_o = (span(topo, lv) for lv in (plan.param_level, plan.bwd_level, plan.grad_level, plan.optim_level))
    return PlanGroups(
        param=_units(w, s_p),
        bwd=_units(w, s_b),
        grad=_units(w, s_g),
        grad_up=_inside_with_same_position(w, s_o, s_g),
        replicas=[list(range(pos, w, s_o)) for pos in range(s_o)],
        optim=_units(w, s_o),
        param_down=_inside_with_same_position(w, s_o, s_p),
    )


# ---- naming plans -------------------------------------------------------------------------

def _level_by_name(topo: Topology, name: str, key: str) -> int:
    if name in ("none", "replicated", "rep"):
        return REPLICATED
    if name not in topo.names:
        raise PlanError(
            f"{key}={name!r} is not a level of this topology {list(topo.names)}; "
            f"use one of them or 'none' (replicated)."
        )
    return topo.level_index(name)


def _node_level(topo: Topology) -> int:
    return topo.level_index("node") if "node" in topo.names else 0


def named_plan(name: str, topo: Topology, cfg: Optional[ParallelConfig] = None) -> PartitionPlan:
    cfg = cfg or ParallelConfig()
    c = len(topo.levels) - 1
    node = _node_level(topo)
    if name == "ddp":
        return PartitionPlan("ddp", REPLICATED, REPLICATED, REPLICATED)
    if name == "zero1":
        return PartitionPlan("zero1", REPLICATED, REPLICATED, c)
    if name == "zero2":
        return PartitionPlan("zero2", REPLICATED, c, c)
    if name == "zero3":
        return PartitionPlan("zero3", c, c, c)
    if name == "hpz":
        sec = _level_by_name(topo, cfg.secondary_level, "parallel.secondary_level") if cfg.secondary_level else node
        if sec >= c:
            raise PlanError(
                f"parallel.secondary_level={topo.levels[sec].name if sec >= 0 else 'none'} must be a level "
                f"inside the cluster for hpz (one of {list(topo.names[:-1])})."
            )
        return PartitionPlan("hpz", c, c, c, secondary_level=sec)
    if name == "hsdp":
        lv = _level_by_name(topo, cfg.hsdp_level, "parallel.hsdp_level") if cfg.hsdp_level else node
        return PartitionPlan("hsdp", lv, lv, lv)
    if name == "tiered":
        if cfg.levels:
            p, g, o = (_level_by_name(topo, n, "parallel.levels") for n in cfg.levels)
            if not p <= g <= o:
                raise PlanError(
                    f"parallel.levels={list(cfg.levels)} breaks param <= grad <= optimizer: a state cannot be "
                    f"sharded over a wider group than the state derived from it. Order them innermost first, "
                    f"e.g. {[topo.names[0], topo.names[node], topo.names[c]]}."
                )
            return PartitionPlan("tiered", p, g, o)
        return PartitionPlan("tiered", 0, node, c)
    raise PlanError(f"parallel.plan={name!r} is not a plan; choose one of {list(PLAN_NAMES)}.")


def candidate_plans(topo: Topology, cfg: Optional[ParallelConfig] = None) -> List[PartitionPlan]:
    """The named plans plus every assignment param <= grad <= optimizer (what auto searches)."""
    named = [named_plan(n, topo, cfg) for n in PLAN_NAMES if n != "auto"]
    seen = {(p.param_level, p.secondary_level, p.grad_level, p.optim_level) for p in named}
    levels = [REPLICATED] + list(range(len(topo.levels)))
    out = list(named)
    for p, g, o in itertools.combinations_with_replacement(levels, 3):
        if (p, None, g, o) not in seen:
            out.append(PartitionPlan("tiered", p, g, o))
            seen.add((p, None, g, o))
    for sec in range(len(topo.levels) - 1):  # hpz-style secondary under any wider param level
        for p, g, o in itertools.combinations_with_replacement(range(sec + 1, len(topo.levels)), 3):
            if (p, sec, g, o) not in seen:
                out.append(PartitionPlan("hpz" if (p, g, o) == (len(topo.levels) - 1,) * 3 else "tiered", p, g, o, sec))
                seen.add((p, sec, g, o))
    return out


# ---- cost model ---------------------------------------------------------------------------

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
    """params, secondary, grads, optimizer, buffers -> bytes per rank."""
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
        return self.comm_time_s + self.update_s


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
) -> Cost:
    """Bytes per level per optimizer step, memory per rank and predicted communication time.

    Mirrors exactly what parallel.zero.ShardedEngine issues, so a test can demand
    measured == predicted. Expert units (all experts of a layer) are split by expert over
    the ep ranks of an expert-parallel group and partitioned by the same plan over the
    expert-data-parallel topology (parallel.topology.expert_data_topology); their
    all-to-all, which depends on the routing, is charged for uniform routing.

    Time (see "Link contention" in the module docstring): each collective moves its bytes at
    the bus bandwidth the link-load model (parallel.topology.concurrent_busbw_gbps) gives all
    of its groups at once, beside what the engine has in flight with it."""
    cost = Cost(plan)
    links = _link_topology(topo)

    def add(phase: str, level: str, op: str, nbytes: float, seconds: float = 0.0, wall_s: Optional[float] = None
            ) -> None:
        """Charge a collective: its bytes, its duration, and (wall_s, when it runs beside
        another already charged) what it adds to the rank's time on the network."""
        if nbytes:
            key = (phase, level, op)
            cost.bytes[key] = cost.bytes.get(key, 0.0) + nbytes
            cost.time_s[key] = cost.time_s.get(key, 0.0) + seconds
            cost.comm_time_s += seconds if wall_s is None else wall_s

    def alone(outer: int, inner: int, op: str, pattern: str = "ring") -> float:
        """Bus bandwidth, bytes/s, of the groups (outer, inner) running `op` by themselves."""
        return _busbw(links, ((outer, inner, pattern, op),))[0] * 1e9

    dense = [u for u in units if not u.expert]
    memory, largest = _domain_traffic(add, plan, topo, dense, links, stride=1, dtype_bytes=dtype_bytes,
                                      grad_accum=grad_accum)
    experts = [Unit(u.name, u.numel // ep, u.fwd_gathers, u.bwd_gathers, expert=True) for u in units if u.expert]
    if experts:
        sub = expert_data_topology(topo, ep)
        mem_e, largest_e = _domain_traffic(add, plan, sub, experts, links, stride=ep, dtype_bytes=dtype_bytes,
                                           grad_accum=grad_accum)
        memory = {k: memory[k] + mem_e[k] for k in memory}
        cost.expert_memory = sum(mem_e.values())
        largest += largest_e  # a block's dense and expert buffers are gathered together
        if ep > 1:
            ep_level = topo.levels[level_of_group(topo, range(0, ep))].name
            nbytes = 2 * GRAD_ACC_BYTES * _ring(ep)  # expert part of the norm
            add("step", ep_level, "all_reduce", nbytes, nbytes / alone(ep, 1, "all_reduce"))
            if moe is not None:
                per_call = moe.tokens_per_micro_step * moe.top_k * moe.d_model * dtype_bytes * _ring(ep)
                a2a = 2 * grad_accum * moe.num_layers * per_call  # dispatch + combine; their gradients in bwd
                rate = alone(ep, 1, "all_to_all", "all_to_all")
                add("fwd", ep_level, "all_to_all", a2a, a2a / rate)
                add("bwd", ep_level, "all_to_all", a2a, a2a / rate)
    # a gathered unit and the prefetched next one
    memory["buffers"] = 2 * largest * dtype_bytes if span(topo, plan.param_level) > 1 else 0.0
    cost.memory = memory
    if topo.update_gelems_per_s:
        cost.update_s = memory["optimizer"] / OPTIM_BYTES_PER_PARAM / (topo.update_gelems_per_s * 1e9)
    if memory_budget_bytes is not None:
        cost.fits = cost.memory_total <= memory_budget_bytes
    return cost


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
    rates = concurrent_busbw_gbps(links, [(_inside_with_same_position(w, o, i), pat, op)
                                          for o, i, pat, op in collectives])
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
                    stride: int, dtype_bytes: int, grad_accum: int):
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

    rates: Dict[Tuple[str, ...], Tuple[float, ...]] = {}

    def rate(*kinds: str) -> Tuple[float, ...]:
        """bytes/s of each kind of collective with all the named ones in flight at once."""
        if kinds not in rates:
            rates[kinds] = tuple(r * 1e9 for r in _busbw(links, tuple((*shape[k], "ring", KIND_OP[k]) for k in kinds)))
        return rates[kinds]

    total = 0
    largest = 0
    blocks = []  # (bwd gather bytes, reduce-scatter bytes) per micro-step of each unit, in order
    for u in units:
        n = padded_numel(u.numel, w)
        total += n
        largest = max(largest, n)
        if s_p > 1:
            nbytes = grad_accum * u.fwd_gathers * n * dtype_bytes * _ring(s_p)
            add("fwd", lv_p, "all_gather", nbytes, nbytes / rate("p")[0])
        blocks.append((u.bwd_gathers * n * dtype_bytes * _ring(s_b) if s_b > 1 else 0.0,
                       n * dtype_bytes * _ring(s_g) if s_g > 1 else 0.0))
        if s_o > s_g:
            nbytes = n / s_g * GRAD_ACC_BYTES * _ring(s_o // s_g)
            add("step", lv_up, "reduce_scatter", nbytes, nbytes / rate("up")[0])
        if n_rep > 1:
            nbytes = 2 * n / s_o * GRAD_ACC_BYTES * _ring(n_rep)
            add("step", lv_rep, "all_reduce", nbytes, nbytes / rate("rep")[0])
        if s_o > s_p:
            nbytes = n / s_p * dtype_bytes * _ring(s_o // s_p)
            add("step", lv_down, "all_gather", nbytes, nbytes / rate("down")[0])
    _backward(add, blocks, lv_b, lv_g, rate, grad_accum)
    if units and s_o > 1:  # the squared grad norm, one fp32 scalar per unit, summed in one all-reduce
        nbytes = 2 * GRAD_ACC_BYTES * _ring(s_o)
        add("step", lv_o, "all_reduce", nbytes, nbytes / rate("o")[0])
    memory = {
        "params": total * dtype_bytes / s_p,
        "secondary": total * dtype_bytes / s_b if plan.secondary_level is not None else 0.0,
        "grads": total * GRAD_ACC_BYTES / s_g,
        "optimizer": total * OPTIM_BYTES_PER_PARAM / s_o,
    }
    return memory, largest


def _backward(add, blocks: Sequence[Tuple[float, float]], lv_b: str, lv_g: str, rate, grad_accum: int) -> None:
    """The backward schedule of parallel.zero.ShardedEngine.micro_step: blocks in reverse; while
    block i computes and reduce-scatters its gradient, block i-1's gather is already in flight
    (prefetch), so the two share whatever links both cross. Units without a backward gather
    (the outer unit) reduce-scatter last, alone."""
    gathers = [i for i, (ag, _) in enumerate(blocks) if ag]
    paired = {}  # reduce-scatter of block i -> the gather in flight beside it
    for prev, cur in zip(gathers, gathers[1:]):
        if blocks[cur][1]:
            paired[cur] = prev
    pair_rates = rate("b", "g") if paired else None
    rs_alone = rate("g")[0] if any(rs for _, rs in blocks) else None
    ag_alone = rate("b")[0] if gathers else None
    overlapped = set(paired.values())
    for i, (ag, rs) in enumerate(blocks):
        if ag and i not in overlapped:
            add("bwd", lv_b, "all_gather", grad_accum * ag, grad_accum * ag / ag_alone)
        if rs and i not in paired:
            add("bwd", lv_g, "reduce_scatter", grad_accum * rs, grad_accum * rs / rs_alone)
    for cur, prev in paired.items():
        ag, rs = blocks[prev][0], blocks[cur][1]
        t_ag, t_rs = _side_by_side(ag, ag_alone, pair_rates[0], rs, rs_alone, pair_rates[1])
        # side by side on the wire: the rank waits for the longer of the two, once
        add("bwd", lv_b, "all_gather", grad_accum * ag, grad_accum * t_ag, wall_s=0.0)
        add("bwd", lv_g, "reduce_scatter", grad_accum * rs, grad_accum * t_rs, wall_s=grad_accum * max(t_ag, t_rs))


DEFAULT_BANDWIDTH_GBPS = 10.0
"""Used for a level whose bandwidth is unknown (not a preset, not measured)."""


@dataclass
class Choice:
    plan: PartitionPlan
    cost: Cost
    reason: str
    costs: List[Cost]


TIE_REL = 1e-3
"""Predicted times this close are a tie (a few bytes of grad-norm all-reduce must not decide)."""


def _fastest(costs: Sequence[Cost]) -> Cost:
    """Least predicted time (communication + update); among ties, the least memory."""
    fastest = min(c.predicted_s for c in costs)
    ties = [c for c in costs if c.predicted_s <= fastest * (1 + TIE_REL)]
    return min(ties, key=lambda c: (c.memory_total, c.predicted_s))


def _time_words(cost: Cost) -> str:
    if not cost.update_s:
        return f"least predicted communication per optimizer step, {cost.comm_time_s * 1e3:.3g} ms"
    return (f"least predicted communication + optimizer update per step, {cost.predicted_s * 1e3:.3g} ms "
            f"({cost.comm_time_s * 1e3:.3g} + {cost.update_s * 1e3:.3g})")


def choose_plan(
    topo: Topology,
    units: Sequence[Unit],
    *,
    dtype_bytes: int,
    grad_accum: int,
    memory_budget_bytes: Optional[float],
    cfg: Optional[ParallelConfig] = None,
    moe: Optional[MoETraffic] = None,
) -> Choice:
    """auto: the least predicted communication time (plus the optimizer update, where its rate
    was measured) that fits memory; ties (within 0.1 %) go to the plan that needs less memory."""
    ep = cfg.ep if cfg is not None else 1
    costs = [
        predict(p, topo, units, dtype_bytes=dtype_bytes, grad_accum=grad_accum,
                memory_budget_bytes=memory_budget_bytes, ep=ep, moe=moe)
        for p in candidate_plans(topo, cfg)
    ]
    fitting = [c for c in costs if c.fits]
    if not fitting:
        smallest = min(costs, key=lambda c: c.memory_total)
        raise PlanError(
            f"no plan fits parallel.memory_budget_gb={_gb(memory_budget_bytes)} per rank: the smallest, "
            f"{smallest.plan.describe(topo)}, needs {_gb(smallest.memory_total)} GB. Raise the budget, add "
            f"ranks, or shrink the model."
        )
    best = _fastest(fitting)
    others = sorted((c for c in fitting if c is not best), key=lambda c: c.predicted_s)
    runner = others[0] if others else None
    reason = (
        _time_words(best)
        + (f" (next: {runner.plan.describe(topo)} at {runner.predicted_s * 1e3:.3g} ms)" if runner else "")
        + f", among {len(fitting)} of {len(costs)} candidate plans that fit "
        + (f"{_gb(memory_budget_bytes)} GB/rank" if memory_budget_bytes else "(no memory budget)")
        + f"; needs {_gb(best.memory_total)} GB/rank"
    )
    return Choice(best.plan, best, reason, costs)


def _gb(nbytes: Optional[float]) -> str:
    return "unlimited" if nbytes is None else f"{nbytes / 1e9:.3g}"


def restrict_choice(choice: Choice, topo: Topology, can_run, engine_label: str) -> Choice:
    """auto on an engine that runs only some plans: the fastest fitting plan it can run
    (auto's ranking, choose_plan, applied to that subset). A named plan is left alone: the
    engine refuses it with its own message."""
    fitting = [c for c in choice.costs if c.fits and can_run(c.plan)]
    if not fitting or choice.plan in [c.plan for c in fitting]:
        return choice
    best = _fastest(fitting)
    reason = (f"{_time_words(best)}, among the "
              f"{len(fitting)} fitting plans {engine_label} can run (auto's overall pick, "
              f"{choice.plan.describe(topo)}, needs parallel.engine=native)")
    return Choice(best.plan, best, reason, choice.costs)


def resolve_plan(
    cfg: ParallelConfig,
    topo: Topology,
    units: Sequence[Unit],
    *,
    dtype_bytes: int,
    grad_accum: int,
    memory_budget_bytes: Optional[float],
    moe: Optional[MoETraffic] = None,
) -> Choice:
    """The plan a run uses: the named one (checked against memory) or auto's choice."""
    if any(u.expert for u in units):
        try:
            expert_data_topology(topo, cfg.ep)
        except ValueError as e:
            raise PlanError(str(e)) from e
    if cfg.plan == "auto" and not cfg.levels:
        return choose_plan(topo, units, dtype_bytes=dtype_bytes, grad_accum=grad_accum,
                           memory_budget_bytes=memory_budget_bytes, cfg=cfg, moe=moe)
    plan = named_plan("tiered" if cfg.levels else cfg.plan, topo, cfg)
    cost = predict(plan, topo, units, dtype_bytes=dtype_bytes, grad_accum=grad_accum,
                   memory_budget_bytes=memory_budget_bytes, ep=cfg.ep, moe=moe)
    if not cost.fits:
        fitting = []
        for name in PLAN_NAMES[1:]:
            other = predict(named_plan(name, topo, cfg), topo, units, dtype_bytes=dtype_bytes,
                            grad_accum=grad_accum, memory_budget_bytes=memory_budget_bytes, ep=cfg.ep, moe=moe)
            if other.fits:
                fitting.append(f"{name} ({_gb(other.memory_total)} GB)")
        raise PlanError(
            f"parallel.plan={cfg.plan} needs {_gb(cost.memory_total)} GB per rank for parameters, gradients and "
            f"optimizer states, more than parallel.memory_budget_gb={_gb(memory_budget_bytes)}. Plans that fit: "
            + (", ".join(fitting) if fitting else "none -- add ranks or raise the budget")
            + ". parallel.plan=auto picks the fastest of them."
        )
    return Choice(plan, cost, f"parallel.plan={cfg.plan} as configured", [cost])


def uniform_units(num_params: float, num_blocks: int) -> List[Unit]:
    """A model known only by its size: equal blocks, each gathered for forward and backward."""
    num_blocks = max(1, num_blocks)
    per = int(math.ceil(num_params / num_blocks))
    return [Unit(f"block{i}", per) for i in range(num_blocks)]
