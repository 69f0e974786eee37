"""Shard layout and the rank lists of a plan's collectives (pure: no torch, no processes).

Every unit (flat parameter buffer) is padded to a multiple of the world size and cut into
span(L) equal chunks at level L. Rank r holds chunk idx_L(r): its coordinates inside its
level-L unit read as a mixed-radix number with the *innermost* digit most significant.
That nesting makes every hop a plain collective over one group: a level-L chunk is the
concatenation of the level-L' chunks (L' > L) held by the ranks of its L'-unit that share
r's level-L position -- so gradients go up the levels by reduce-scatter and parameters come
down by all-gather, with no reshuffling.

Groups are lists of ranks (plan_groups); parallel.groups turns them into process groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

from tierzero.parallel.plans import REPLICATED, PartitionPlan
from tierzero.parallel.topology import Topology


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


def padded_numel(numel: int, world_size: int, block: int = 1) -> int:
    """numel rounded up to a multiple of world_size x block: every chunk at every level is then
    whole `block`s (block > 1: a plan that quantizes, parallel.quant)."""
    m = world_size * block
    return -(-numel // m) * m


@dataclass(frozen=True)
class Hop:
    """One hop of a hierarchical reduce-scatter inside a level-L unit: the ranks that differ
    only in their level-k coordinate, member i at coordinate i."""
    level: int
    groups: List[List[int]]
    input_fraction: int
    """The hop's input is the unit's buffer / this (what the hops before it have kept)."""


def reduce_hops(topo: Topology, level: int) -> List[Hop]:
    """A reduce-scatter over the units of `level` as one hop per level up to it, innermost
    first. Because chunk indices read the innermost coordinate as the most significant digit
    (chunk_index), the hop at level k splits what the hops before it kept into size_k
    consecutive pieces, and after the last hop each rank holds exactly its level-`level`
    chunk. Levels of size 1 have no hop."""
    if level == REPLICATED:
        return []
    w = topo.world_size
    hops, inner = [], 1
    for k in range(level + 1):
        size = topo.levels[k].size
        if size > 1:
            hops.append(Hop(k, same_position_groups(w, inner * size, inner), inner))
        inner *= size
    return hops


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


def same_position_groups(world: int, outer: int, inner: int) -> List[List[int]]:
    """Inside each `outer`-sized unit, the ranks that share their position in `inner` units
    (the shape of every group a plan issues: (s, 1) is the units of span s)."""
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
        grad_up=same_position_groups(w, s_o, s_g),
        replicas=[list(range(pos, w, s_o)) for pos in range(s_o)],
        optim=_units(w, s_o),
        param_down=same_position_groups(w, s_o, s_p),
    )
