"""Plan -> process groups. The only place that calls torch.distributed's group constructors.

Every rank must create every group, in the same order, even groups it is not in; each
distinct partition of the world is created once and shared by the roles that use it -- except
that on NCCL the gradient reduce-scatters get groups of their own where a gather shares their
partition: each NCCL group is a communicator with its own stream, so a block's reduce-scatter
does not queue behind the next block's prefetched gather (FSDP2 keeps them on separate streams
too). gloo keeps one group per partition: its collectives complete when issued.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch.distributed as dist

from tierzero.parallel.ledger import CommGroup
from tierzero.parallel.layout import level_of_group, plan_groups, reduce_hops
from tierzero.parallel.plans import PartitionPlan
from tierzero.parallel.topology import Topology

ROLES = ("param", "bwd", "grad", "grad_up", "replicas", "optim", "param_down")
GATHER_ROLES = ("param", "bwd", "param_down")
REDUCE_SCATTER_ROLES = ("grad", "grad_up")

GroupKey = Tuple[Tuple[Tuple[int, ...], ...], str]
"""(a partition of the ranks, "reduce_scatter" for a reduce-scatter's own group or ""): roles
with equal keys share one process group."""


def group_keys(plan: PartitionPlan, topo: Topology, *, own_reduce_scatter: bool) -> Dict[str, GroupKey]:
    """role -> the key of the group it uses (pure). own_reduce_scatter (NCCL): a reduce-scatter
    role whose partition a gather role also uses gets a group of its own."""
    lists = plan_groups(plan, topo)
    partitions = {role: tuple(tuple(g) for g in getattr(lists, role)) for role in ROLES}
    gathered = {partitions[role] for role in GATHER_ROLES}
    return {role: (p, "reduce_scatter" if own_reduce_scatter and role in REDUCE_SCATTER_ROLES and p in gathered
                   else "") for role, p in partitions.items()}


def build_groups(plan: PartitionPlan, topo: Topology, rank: int, copies: int = 1) -> Dict[str, CommGroup]:
    """This rank's CommGroup for each role of the plan (pure keys from group_keys).

    `copies` > 1: `topo` is the topology of one of `copies` interleaved rank sets (the
    expert-data-parallel ranks of each position in an expert-parallel group): its rank q
    is global rank q * copies + e, and `rank` is this rank's q. Groups are created for
    every set (group creation is collective) and hold global ranks."""
    keys = group_keys(plan, topo, own_reduce_scatter=dist.is_initialized() and dist.get_backend() == "nccl")
    me = rank * copies + _position(copies)
    cache: Dict[GroupKey, CommGroup] = {}
    out = {}
    for role in ROLES:
        key = keys[role]
        if key not in cache:
            partition = key[0]
            level = topo.levels[level_of_group(topo, next(g for g in partition if rank in g))].name
            world = [[q * copies + e for q in g] for e in range(copies) for g in partition]
            cache[key] = build_partition(world, me, level, fresh=bool(key[1]))
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


def build_partition(partition: List[List[int]], rank: int, level: str, fresh: bool = False) -> CommGroup:
    """One CommGroup from a partition of the world into groups (every rank calls it); `fresh`:
    new process groups even for the whole world (a reduce-scatter's own, group_keys)."""
    mine = next(tuple(g) for g in partition if rank in g)
    if len(mine) == 1:
        pg = None
    elif len(partition) == 1 and not fresh:
        pg = dist.group.WORLD
    else:
        pg, _ = dist.new_subgroups_by_enumeration([list(g) for g in partition])
    pg_back = None
    if all(len(g) == 2 for g in partition) and dist.get_backend() == "gloo":
        # the CPU reduce-scatter's ring exchanges with one peer: one direction per group (CommGroup.pg_back)
        pg_back, _ = dist.new_subgroups_by_enumeration([list(g) for g in partition])
    return CommGroup(pg, mine, level, pg_back)
