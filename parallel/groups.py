"""Plan -> process groups. The only place that calls torch.distributed's group constructors.

Every rank must create every group, in the same order, even groups it is not in; each
distinct partition of the world is created once and shared by the roles that use it.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch.distributed as dist

from tierzero.parallel.ledger import CommGroup
from tierzero.parallel.layout import level_of_group, plan_groups, reduce_hops
from tierzero.parallel.plans import PartitionPlan
from tierzero.parallel.topology import Topology

ROLES = ("param", "bwd", "grad", "grad_up", "replicas", "optim", "param_down")


def build_groups(plan: PartitionPlan, topo: Topology, rank: int, copies: int = 1) -> Dict[str, CommGroup]:
    """This rank's CommGroup for each role of the plan (pure lists from plan_groups).

    `copies` > 1: `topo` is the topology of one of `copies` interleaved rank sets (the
    expert-data-parallel ranks of each position in an expert-parallel group): its rank q
    is global rank q * copies + e, and `rank` is this rank's q. Groups are created for
    every set (group creation is collective) and hold global ranks."""
    lists = plan_groups(plan, topo)
    me = rank * copies + _position(copies)
    cache: Dict[Tuple[Tuple[int, ...], ...], CommGroup] = {}
    out = {}
    for role in ROLES:
        partition: List[List[int]] = getattr(lists, role)
        key = tuple(tuple(g) for g in partition)
        if key not in cache:
            level = topo.levels[level_of_group(topo, next(g for g in partition if rank in g))].name
            world = [[q * copies + e for q in g] for e in range(copies) for g in partition]
            cache[key] = build_partition(world, me, level)
        out[role] = cache[key]
    return out


def build_hop_groups(topo: Topology, level: int, rank: int, copies: int = 1) -> List[CommGroup]:
    """This rank's group for each hop of a hierarchical reduce-scatter over the units of
    `level` (parallel.layout.reduce_hops), innermost first; `copies` as in build_groups."""
    me = rank * copies + _position(copies)
    out = []
    for hop in reduce_hops(topo, level):
        world = [[q * copies + e for q in g] for e in range(copies) for g in hop.groups]
        out.append(build_partition(world, me, topo.levels[hop.level].name))
    return out


def _position(copies: int) -> int:
    return dist.get_rank() % copies if copies > 1 else 0


def build_partition(partition: List[List[int]], rank: int, level: str) -> CommGroup:
    """One CommGroup from a partition of the world into groups (every rank calls it)."""
    mine = next(tuple(g) for g in partition if rank in g)
    if len(mine) == 1:
        pg = None
    elif len(partition) == 1:
        pg = dist.group.WORLD
    else:
        pg, _ = dist.new_subgroups_by_enumeration([list(g) for g in partition])
    pg_back = None
    if all(len(g) == 2 for g in partition) and dist.get_backend() == "gloo":
        # the CPU reduce-scatter's ring exchanges with one peer: one direction per group (CommGroup.pg_back)
        pg_back, _ = dist.new_subgroups_by_enumeration([list(g) for g in partition])
    return CommGroup(pg, mine, level, pg_back)
