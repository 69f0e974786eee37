"""Plan -> process groups. The only place that calls torch.distributed's group constructors.

Every rank must create every group, in the same order, even groups it is not in; each
distinct partition of the world is created once and shared by the roles that use it.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch.distributed as dist

from parallel.ledger import CommGroup
from parallel.plan import PartitionPlan, level_of_group, plan_groups
from parallel.topology import Topology

ROLES = ("param", "bwd", "grad", "grad_up", "replicas", "optim", "param_down")


def build_groups(plan: PartitionPlan, topo: Topology, rank: int) -> Dict[str, CommGroup]:
    """This rank's CommGroup for each role of the plan (pure lists from plan_groups)."""
    lists = plan_groups(plan, topo)
    cache: Dict[Tuple[Tuple[int, ...], ...], CommGroup] = {}
    out = {}
    for role in ROLES:
        partition: List[List[int]] = getattr(lists, role)
        key = tuple(tuple(g) for g in partition)
        if key not in cache:
            mine = next(tuple(g) for g in partition if rank in g)
            level = topo.levels[level_of_group(topo, mine)].name
            if len(mine) == 1:
                pg = None
            elif len(partition) == 1:
                pg = dist.group.WORLD
            else:
                pg, _ = dist.new_subgroups_by_enumeration([list(g) for g in partition])
            cache[key] = CommGroup(pg, mine, level)
        out[role] = cache[key]
    return out
