"""`topology.measure=true`: measure each level's bandwidth in a few seconds and hand the
planner a topology with measured figures (source 'measured').

Level k is measured with groups of ranks that differ only in their level-k coordinate,
all at once, so every link of that level is loaded as training loads it. The figure kept
is the per-rank bandwidth that makes parallel.topology.peak_busbw_gbps predict the busbw
measured (all_gather, out of place; the median over the groups).
"""

from __future__ import annotations

import logging
import statistics
from typing import List, Optional

from collectives_bench.formulas import busbw_gbps, element_count
from collectives_bench.runner import _time_block
from collectives_bench.scopes import Scope
from parallel.topology import Topology, peak_busbw_gbps, with_bandwidths

log = logging.getLogger(__name__)
PROBE_SIZES = (1 << 20, 4 << 20, 16 << 20, 64 << 20)
ENOUGH_S = 0.25
"""Stop growing the message once one call takes this long: long enough to hide latency."""


def level_groups(topo: Topology, k: int) -> List[List[int]]:
    """Groups of ranks that differ only in their level-k coordinate (the ranks one level-k link joins)."""
    groups: dict = {}
    for r in range(topo.world_size):
        c = list(topo.coords(r))
        c[k] = 0
        groups.setdefault(tuple(c), []).append(r)
    return list(groups.values())


def measure_level(backend, topo: Topology, k: int, iters: int = 3) -> Optional[float]:
    """Per-rank GB/s of level k (None when its fan-out is 1: nothing to measure)."""
    if topo.levels[k].size < 2:
        return None
    groups = level_groups(topo, k)
    scope = Scope(f"probe:{topo.levels[k].name}", tuple(tuple(g) for g in groups), topo.levels[k].name)
    g = backend.group(scope)
    best = None
    for size in PROBE_SIZES:
        count = element_count("all_gather", size, 4, g.size)
        case = backend.case("all_gather", "out", count, "float32", g)
        case.fill_zero()
        case.call()  # warm-up
        backend.sync()
        t = _time_block(backend, case, iters)
        gathered = backend.gather((g.group_id, t))
        decision = None
        if backend.rank == 0:
            per_group = {}
            for gid, ti in gathered:
                per_group.setdefault(gid, []).append(ti)
            bus = statistics.median(busbw_gbps("all_gather", g.size, count * 4, statistics.fmean(ts))
                                    for ts in per_group.values())
            unit = with_bandwidths(topo, [1.0 if j == k else None for j in range(len(topo.levels))])
            decision = (bus / peak_busbw_gbps(unit, groups), max(ti for _, ti in gathered) >= ENOUGH_S)
        best, enough = backend.broadcast(decision)
        if enough:
            break
    return best


def measure_topology(backend, topo: Topology) -> Topology:
    """The same levels with measured bandwidths where a level has links to measure."""
    measured = [measure_level(backend, topo, k) for k in range(len(topo.levels))]
    if backend.rank == 0:
        log.info("measured per-rank bandwidths: %s", ", ".join(
            f"{lv.name} {bw:.3g} GB/s" if bw else f"{lv.name} -" for lv, bw in zip(topo.levels, measured)))
    return with_bandwidths(topo, measured, source="measured")
