"""The machine as an ordered list of link levels, fastest (innermost) first.

A Topology is pure data: each level has a name, a fan-out (how many units of the level
below it holds) and the link bandwidth between those units. Rank r's coordinate on level
k is its index inside its level-k unit; the innermost coordinate varies fastest, so with
`[node x2, cluster x2]` ranks 0,1 share node 0 and ranks 2,3 share node 1.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class Level:
    name: str
    size: int
    """Fan-out: units of the level below (or ranks, for the innermost) in one unit of this level."""
    bandwidth_gbps: Optional[float] = None
    """Per-rank link bandwidth inside this level in GB/s (bytes, not bits); None = unknown."""
    op_bandwidths_gbps: Tuple[Tuple[str, float], ...] = ()
    """Per-operation figures, (op, GB/s) pairs, where the probe measured them: the same link
    moves an all_reduce's bytes faster or slower than an all_gather's (gloo's algorithms
    differ). An op not listed uses bandwidth_gbps."""
    latency_us: Optional[float] = None
    """Time one step of a collective across this level's links takes besides its bytes (a
    ring's n-1 steps, an all-reduce's 2(n-1)), microseconds; None = unknown (0)."""
    flow_gbps: Optional[float] = None
    """The most one flow through this level's uplink carries (GB/s), where that is less than
    the whole uplink: measured by the probe with a ring over each unit, one flow leaving each
    unit below (gloo's 4-rank ring on a 1 Gbit/s shaped link reached ~2/3 of the link); None =
    one flow can fill the uplink."""

    def __post_init__(self):
        # a JSON round trip gives lists (or a dict): keep a hashable, ordered tuple of pairs
        pairs = self.op_bandwidths_gbps.items() if isinstance(self.op_bandwidths_gbps, dict) else self.op_bandwidths_gbps
        object.__setattr__(self, "op_bandwidths_gbps", tuple(sorted((str(op), float(bw)) for op, bw in pairs)))

    def bandwidth_for(self, op: Optional[str]) -> Optional[float]:
        """The per-rank figure for one operation: its own measured one, else the level's."""
        return dict(self.op_bandwidths_gbps).get(op, self.bandwidth_gbps) if op else self.bandwidth_gbps


@dataclass(frozen=True)
class Topology:
    levels: Tuple[Level, ...]
    source: str = "emulated"
    """Where the numbers came from: detected, emulated, preset:<name>, measured."""
    memory_per_rank_gb: Optional[float] = None
    """Device memory per rank (GB), when known (presets, GPUs)."""
    update_gelems_per_s: Optional[float] = None
    """Measured optimizer-update rate per rank (10^9 parameters/s: gradient norm, AdamW, cast),
    every rank updating at once; None = not measured, and the planner leaves the update out."""
    codec_gelems_per_s: Optional[float] = None
    """Measured block-quantization rate per rank (10^9 elements/s through one encode or one
    decode, every rank at once); None = not measured, and the planner charges no codec time."""

    def __post_init__(self):
        assert self.levels, "a topology has at least one level"
        assert self.levels[-1].name == "cluster", "the outermost level is always 'cluster'"
        assert all(lv.size >= 1 for lv in self.levels)

    @property
    def world_size(self) -> int:
        return math.prod(lv.size for lv in self.levels)

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(lv.name for lv in self.levels)

    def level_index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(
                f"level {name!r} is not in this topology; its levels are {list(self.names)}"
            ) from None

    @property
    def num_nodes(self) -> int:
        """Units of the level just inside 'cluster' (the nodes)."""
        return self.levels[-1].size

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.num_nodes

    def coords(self, rank: int) -> Tuple[int, ...]:
        assert 0 <= rank < self.world_size, f"rank {rank} outside world {self.world_size}"
        out = []
        for lv in self.levels:
            out.append(rank % lv.size)
            rank //= lv.size
        return tuple(out)

    def rank(self, coords: Sequence[int]) -> int:
        assert len(coords) == len(self.levels)
        r, stride = 0, 1
        for c, lv in zip(coords, self.levels):
            assert 0 <= c < lv.size
            r += c * stride
            stride *= lv.size
        return r

    def span(self, name: str) -> int:
        """Ranks inside one unit of level `name` (e.g. span('node') = ranks per node)."""
        k = self.level_index(name)
        return math.prod(lv.size for lv in self.levels[: k + 1])

    def groups_within(self, name: str) -> List[List[int]]:
        """Partition of all ranks into the units of level `name` (e.g. one list per node)."""
        n = self.span(name)
        return [list(range(start, start + n)) for start in range(0, self.world_size, n)]

    def groups_across(self, name: str) -> List[List[int]]:
        """One list per position inside a level-`name` unit: the ranks holding that
        position in every unit (e.g. local rank 0 of every node)."""
        n = self.span(name)
        return [list(range(pos, self.world_size, n)) for pos in range(n)]

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def describe(self) -> str:
        parts = []
        for lv in self.levels:
            bw = f" @ {lv.bandwidth_gbps:.3g} GB/s" if lv.bandwidth_gbps else ""
            own = [(op, v) for op, v in lv.op_bandwidths_gbps if v != lv.bandwidth_gbps]
            if own:
                bw += " (" + ", ".join(f"{op} {v:.3g}" for op, v in own) + ")"
            if lv.flow_gbps is not None:
                bw += f" (one flow <= {lv.flow_gbps:.3g})"
            parts.append(f"{lv.name} x{lv.size}{bw}")
        return "[" + ", ".join(parts) + "]"


# Presets. Bandwidths are per rank, GB/s, one direction, with every rank of a unit using the link
# at once (peak_busbw_gbps multiplies them back by the ranks sharing an uplink), and they are
# *achievable* figures -- what published measurements reach -- not datasheet peaks (those are in
# docs/topology.md beside them). Sources (docs/topology.md, "Where the preset figures come from"):
#   Frontier: no measured collective figures for Frontier itself could be read, so the figures are
#   from LUMI-G, whose node is the same hardware (4 MI250X = 8 GCDs, the same Infinity Fabric
#   wiring, 4 Slingshot-11 NICs of 25 GB/s), as the LUMI ReFrame checks hold them
#   (github.com/Lumi-supercomputer/lumi-reframe-tests @ a6d7984): a GPU kernel writing into the
#   other GCD of its MI250X (4 links) 148 GB/s (peak 200), into a GCD one link away 38 GB/s (peak
#   50; the preset's node level takes the single-link figure, as it took the lower peak before);
#   osu_mbw_mr with GPU buffers, 8 pairs across 2 nodes at once, 95,000 MB/s per node = 11.9 GB/s
#   per GCD (peak 12.5). The intra-node figures are one pair, one direction: a collective with both
#   directions busy may reach less.
#   DGX H100: nccl-tests all_gather/all_reduce busbw on 8 H100s levels off at ~360 GB/s, "exactly
#   what we'd expect on H100" (NCCL's lead, NVIDIA/nccl-tests#326; peak 450); a 400 Gb/s ConnectX-7
#   reaches 46-48 GB/s busbw per NIC, one per GPU (NVIDIA/nccl-tests#290; the lower figure; peak 50).
#
# Latency per collective step: NCCL's own tuning model (src/graph/tuning.cc, hwLat, ring
# algorithm, Simple protocol -- the one large transfers use): 3.4 us per step over NVLink, 9.6
# us per step over the network (its model charges a ring (n-1 - inter) x the intra-node figure +
# inter x the network one, inter = nodes - 1, which is what parallel.cost does per level). RCCL
# is NCCL's fork and keeps that model; no per-step figures for Frontier's Infinity Fabric or
# Slingshot are published that we could cite, so Frontier takes NCCL's NVLink figure inside the
# node and its network figure across -- an assumption, written down here and in docs/topology.md.
PRESETS = {
    "frontier": (("package", 2, 148.0, 3.4), ("node", 4, 38.0, 3.4), ("cluster", None, 11.9, 9.6)),
    "dgx-h100": (("node", 8, 360.0, 3.4), ("cluster", None, 46.0, 9.6)),
}
PRESET_MEMORY_GB = {"frontier": 64.0, "dgx-h100": 80.0}
"""HBM per rank: one MI250X GCD (64 of its 128 GB; OLCF Frontier User Guide), one H100 SXM (NVIDIA's datasheet)."""


def preset_topology(name: str, num_nodes: int) -> Topology:
    if name not in PRESETS:
        raise ValueError(
            f"topology.preset={name!r} is not a known preset; choose one of {sorted(PRESETS)}"
        )
    levels = tuple(
        Level(lv_name, size if size is not None else num_nodes, bw, latency_us=us)
        for lv_name, size, bw, us in PRESETS[name]
    )
    return Topology(levels, source=f"preset:{name}", memory_per_rank_gb=PRESET_MEMORY_GB[name])


def default_level_names(num_levels: int) -> List[str]:
    """Innermost to outermost; the last is 'cluster', the one inside it 'node'."""
    named = ["package", "node", "cluster"]
    if num_levels <= 3:
        return named[-num_levels:]
    return [f"level{i}" for i in range(num_levels - 3)] + named


def with_bandwidths(topo: Topology, bandwidths_gbps: Sequence[Optional[float]], source: Optional[str] = None,
                    op_bandwidths_gbps: Optional[Sequence[Optional[dict]]] = None) -> Topology:
    """The same levels with bandwidths replaced where a value is given. A level's per-op
    figures are replaced where op_bandwidths_gbps gives them, and dropped where its bandwidth
    changes without them (they were measured on the old link)."""
    assert len(bandwidths_gbps) == len(topo.levels)
    ops = list(op_bandwidths_gbps) if op_bandwidths_gbps is not None else [None] * len(topo.levels)
    assert len(ops) == len(topo.levels)
    levels = []
    for lv, bw, per_op in zip(topo.levels, bandwidths_gbps, ops):
        new_bw = bw if bw is not None else lv.bandwidth_gbps
        if per_op is None:
            per_op = lv.op_bandwidths_gbps if new_bw == lv.bandwidth_gbps else ()
        levels.append(dataclasses.replace(lv, bandwidth_gbps=new_bw, op_bandwidths_gbps=tuple(dict(per_op).items())))
    return dataclasses.replace(topo, levels=tuple(levels), source=source or topo.source)


def with_flow_limits(topo: Topology, flow_gbps: Sequence[Optional[float]]) -> Topology:
    """The same levels with per-flow limits replaced where a value is given."""
    assert len(flow_gbps) == len(topo.levels)
    return dataclasses.replace(topo, levels=tuple(lv if f is None else dataclasses.replace(lv, flow_gbps=float(f))
                                                  for lv, f in zip(topo.levels, flow_gbps)))


def with_latencies(topo: Topology, latencies_us: Sequence[Optional[float]]) -> Topology:
    """The same levels with per-step latencies replaced where a value is given."""
    assert len(latencies_us) == len(topo.levels)
    return dataclasses.replace(topo, levels=tuple(lv if us is None else dataclasses.replace(lv, latency_us=float(us))
                                                  for lv, us in zip(topo.levels, latencies_us)))


def emulated_topology(
    sizes: Sequence[int],
    names: Optional[Sequence[str]] = None,
    bandwidths_gbps: Optional[Sequence[Optional[float]]] = None,
) -> Topology:
    """`topology.emulate=[a, b]` -> node (a ranks per node) x cluster (b nodes)."""
    names = list(names) if names else default_level_names(len(sizes))
    bws = list(bandwidths_gbps) if bandwidths_gbps else [None] * len(sizes)
    levels = tuple(Level(n, int(s), bw) for n, s, bw in zip(names, sizes, bws))
    return Topology(levels, source="emulated")


def flat_topology(ranks_per_node: int, num_nodes: int, source: str = "detected") -> Topology:
    return Topology((Level("node", ranks_per_node), Level("cluster", num_nodes)), source=source)


@dataclass
class TopologyConfig:
    emulate: Optional[List[int]] = None
    """Emulated fan-outs innermost first, e.g. [2, 2] = 2 nodes x 2 ranks; product = launcher.nproc."""
    level_names: Optional[List[str]] = None
    """Names for the emulated levels, innermost first; the last must be 'cluster'."""
    preset: Optional[str] = None
    """Known machine for planning: frontier or dgx-h100."""
    nodes: Optional[int] = None
    """Nodes for a preset topology (default: the nodes of the launch)."""
    bandwidths_gbps: Optional[List[float]] = None
    """Per-rank link bandwidth of each level in GB/s, innermost first; overrides presets and detection."""
    latencies_us: Optional[List[float]] = None
    """Latency of one collective step across each level's links in microseconds, innermost first; overrides presets (topology.measure=true measures it instead)."""
    measure: bool = False
    """Measure each level's bandwidth per operation and the optimizer-update rate at start-up (a few seconds per level) and plan with them; in `tierzero plan` the local ranks are spawned to measure."""

    def errors(self) -> List[str]:
        errs = []
        if self.emulate is not None:
            if len(self.emulate) < 1 or any(s < 1 for s in self.emulate):
                errs.append(
                    f"topology.emulate={list(self.emulate)} needs one positive fan-out per level, "
                    "innermost first; e.g. topology.emulate=[2,2] for 2 nodes x 2 ranks"
                )
            if self.level_names is not None:
                if len(self.level_names) != len(self.emulate):
                    errs.append(
                        f"topology.level_names={list(self.level_names)} has {len(self.level_names)} names "
                        f"but topology.emulate={list(self.emulate)} has {len(self.emulate)} levels; "
                        "give one name per level"
                    )
                elif self.level_names[-1] != "cluster" or len(set(self.level_names)) != len(self.level_names):
                    errs.append(
                        f"topology.level_names={list(self.level_names)} must be distinct and end with "
                        "'cluster', e.g. [package, node, cluster]"
                    )
        elif self.level_names is not None:
            errs.append("topology.level_names is only used with topology.emulate; set both or neither")
        if self.preset is not None and self.preset not in PRESETS:
            errs.append(
                f"topology.preset={self.preset!r} is not a known preset; choose one of {sorted(PRESETS)}"
            )
        if self.bandwidths_gbps is not None and not all(b > 0 for b in self.bandwidths_gbps):
            errs.append(f"topology.bandwidths_gbps={list(self.bandwidths_gbps)} must all be > 0 (GB/s).")
        if self.latencies_us is not None and not all(0 <= us <= 1e6 for us in self.latencies_us):
            errs.append(f"topology.latencies_us={list(self.latencies_us)} must all be between 0 and 1e6 microseconds "
                        "(one collective step), e.g. [3.4, 9.6].")
        if self.nodes is not None and self.nodes < 1:
            errs.append(f"topology.nodes={self.nodes} must be >= 1")
        if self.preset is not None and self.emulate is not None:
            errs.append(
                "topology.preset and topology.emulate are both set; a run uses one of them "
                "(clear one with topology.preset=null or topology.emulate=null)"
            )
        return errs


def _unit_span(topo: Topology, level: int) -> int:
    """Ranks in one unit just below `level` (1 for the innermost): the ones sharing its uplink."""
    return math.prod(lv.size for lv in topo.levels[:level])


def crossing_level(topo: Topology, a: int, b: int) -> int:
    """Outermost level on which ranks a and b sit in different units: the link a flow a->b uses
    (the innermost level whose unit holds both; units are contiguous rank ranges)."""
    assert a != b, "a flow joins two ranks"
    span = 1
    for k, lv in enumerate(topo.levels):
        span *= lv.size
        if a // span == b // span:
            return k
    raise AssertionError(f"ranks {a} and {b} outside world {topo.world_size}")


def traffic_edges(groups: Sequence[Sequence[int]], pattern: str = "ring") -> List[Tuple[int, int, float]]:
    """(src, dst, share of src's bus bytes) for every group running at once: a ring sends all
    of it to the next rank; all_to_all spreads it evenly over the other n-1 ranks."""
    edges = []
    for g in groups:
        n = len(g)
        if n < 2:
            continue
        if pattern == "ring":
            edges += [(g[i], g[(i + 1) % n], 1.0) for i in range(n)]
        elif pattern == "all_to_all":
            edges += [(a, b, 1.0 / (n - 1)) for a in g for b in g if a != b]
        else:
            raise ValueError(f"unknown traffic pattern {pattern!r}; ring or all_to_all")
    return edges


def peak_busbw_gbps(topo: Topology, groups: Sequence[Sequence[int]], pattern: str = "ring",
                    op: Optional[str] = None) -> Optional[float]:
    """The bus bandwidth every group can reach when all of them run at once, by the
    topology's link figures; None if a link they use has no known bandwidth.

    Model: a flow a->b uses the uplink of a's unit at the outermost level where a and b
    differ. That uplink carries `bandwidth x ranks in the unit` (the level's figure is per
    rank, when every rank of the unit sends through it at once) and is shared by every flow
    leaving the unit. So a global ring in rank order, with one flow leaving each node, gets
    the node's whole NIC, while one-rank-per-node groups all at once get a rank's share.
    `op` picks a level's measured figure for that operation, where it has one.
    """
    return concurrent_busbw_gbps(topo, [(groups, pattern, op)])[0]


def concurrent_busbw_gbps(topo: Topology, collectives: Sequence[Tuple]) -> List[Optional[float]]:
    """peak_busbw_gbps for several collectives in flight at once, each given as (groups,
    pattern) or (groups, pattern, op): the flows of all of them load the uplinks together, and
    each collective gets the least, over the uplinks its own flows use, of its op's capacity /
    total load. One collective alone is peak_busbw_gbps; two global rings at once (a backward
    gather beside a gradient reduce-scatter) get half the node link each."""
    loads: dict = {}
    used: List[dict] = []
    ops: List[Optional[str]] = []
    below = [_unit_span(topo, k) for k in range(len(topo.levels))]
    for groups, pattern, *op in collectives:
        ops.append(op[0] if op else None)
        mine: dict = {}  # uplink -> the largest share one of this collective's flows puts on it
        for a, b, share in traffic_edges(groups, pattern):
            k = crossing_level(topo, a, b)
            key = (k, a // below[k])
            loads[key] = loads.get(key, 0.0) + share
            mine[key] = max(mine.get(key, 0.0), share)
        used.append(mine)
    out: List[Optional[float]] = []
    for mine, op in zip(used, ops):
        peak: Optional[float] = math.inf if mine else None
        for (k, unit), share in mine.items():
            bw = topo.levels[k].bandwidth_for(op)
            if bw is None:
                peak = None
                break
            peak = min(peak, bw * below[k] / loads[(k, unit)])
            cap = topo.levels[k].flow_gbps
            if cap is not None:  # one flow carries at most `cap`: a share of the bus bytes
                peak = min(peak, cap / share)
        out.append(peak)
    return out


def expert_data_topology(topo: Topology, ep: int) -> Topology:
    """The topology of the ranks that hold the same experts (one per EP group).

    Expert-parallel groups are `ep` consecutive ranks, so they sit in the fastest levels
    that hold them; removing a factor `ep` from the innermost fan-outs leaves the topology
    of the expert-data-parallel ranks. Rank q of it is global rank q * ep + e for the ranks
    at position e of their EP group."""
    if ep < 1 or topo.world_size % ep:
        divisors = [d for d in range(1, topo.world_size + 1) if topo.world_size % d == 0]
        raise ValueError(f"parallel.ep={ep} must divide the world size {topo.world_size}; pick one of {divisors}")
    left, levels = ep, []
    for lv in topo.levels:
        size = lv.size
        if left > 1:
            if size % left == 0:
                size, left = size // left, 1
            elif left % size == 0:
                size, left = 1, left // size
            else:
                raise ValueError(
                    f"parallel.ep={ep} does not fit the levels of {topo.describe()}: an expert-parallel group must "
                    f"fill whole units of the faster levels or divide one (at {lv.name} x{lv.size} it would "
                    f"need {left} of them); pick an ep such as "
                    f"{sorted({topo.span(n) for n in topo.names} | {d for d in range(1, topo.levels[0].size + 1) if topo.levels[0].size % d == 0})}"
                )
        levels.append(dataclasses.replace(lv, size=size))
    return dataclasses.replace(topo, levels=tuple(levels))
