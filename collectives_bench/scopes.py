"""Which ranks talk to each other in a scope (pure; docs/bench.md).

- `global`: one group of every rank.
- `level:<name>`: the units of level <name> (e.g. every node's ranks), all at once: the
  links inside that level, loaded as training loads them.
- `cross:<name>`: one rank per <name> unit (local rank 0 of every node, local rank 1 of
  every node, ...), all such groups at once: the links of the level above <name>, each
  shared by every rank of a unit, as the replica groups of hsdp and hpz share them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from tierzero.collectives_bench.ops import Op, collective
from tierzero.parallel.topology import Topology, peak_busbw_gbps


@dataclass(frozen=True)
class Scope:
    name: str
    groups: Tuple[Tuple[int, ...], ...]
    level: Optional[str]
    """The topology level whose links bound this scope (None when unknown)."""

    @property
    def nranks(self) -> int:
        return len(self.groups[0])

    def group_of(self, rank: int) -> int:
        return next(i for i, g in enumerate(self.groups) if rank in g)


class ScopeError(ValueError):
    pass


def auto_scopes(topo: Topology) -> List[str]:
    """global, then level:<name> and cross:<name> for every inner level that splits the
    world into units of more than one rank (a level of fan-out 1 repeats the one below)."""
    names, seen = ["global"], set()
    for lv in topo.levels[:-1]:
        span = topo.span(lv.name)
        if 1 < span < topo.world_size and span not in seen:
            seen.add(span)
            names += [f"level:{lv.name}", f"cross:{lv.name}"]
    return names


def bounding_level(topo: Topology, groups: Sequence[Sequence[int]]) -> int:
    """Index of the outermost level a group spans (the slowest link it crosses)."""
    worst = 0
    for g in groups:
        coords = [topo.coords(r) for r in g]
        for k in range(len(topo.levels)):
            if len({c[k] for c in coords}) > 1:
                worst = max(worst, k)
    return worst


def build_scope(name: str, topo: Topology) -> Scope:
    if name == "global":
        groups = (tuple(range(topo.world_size)),)
    else:
        kind, _, level = name.partition(":")
        if level not in topo.names or level == "cluster":
            raise ScopeError(
                f"bench.scopes has {name!r} but {level!r} is not an inner level of the topology "
                f"{topo.describe()}; use one of {auto_scopes(topo)}"
            )
        groups = tuple(tuple(g) for g in (topo.groups_within(level) if kind == "level" else topo.groups_across(level)))
    if len(groups[0]) < 2:
        raise ScopeError(
            f"bench.scopes has {name!r}, whose groups on {topo.describe()} hold one rank each; "
            f"nothing would be sent. Pick a scope from {auto_scopes(topo)}"
        )
    return Scope(name, groups, topo.levels[bounding_level(topo, groups)].name)


def resolve_scopes(names: Sequence[str], topo: Topology) -> List[Scope]:
    wanted: List[str] = []
    for n in names:
        for m in (auto_scopes(topo) if n == "auto" else [n]):
            if m not in wanted:
                wanted.append(m)
    if topo.world_size < 2:
        raise ScopeError("tierzero bench needs at least 2 ranks; e.g. launcher.nproc=4")
    return [build_scope(n, topo) for n in wanted]


def peak_gbps(scope: Scope, topo: Topology, op: Op) -> Optional[float]:
    """The busbw this scope can reach by the topology's link figures, all its groups at
    once, with the collective's link pattern (parallel.topology.peak_busbw_gbps); None when
    a bandwidth it needs is unknown."""
    return peak_busbw_gbps(topo, scope.groups, collective(op).link)
