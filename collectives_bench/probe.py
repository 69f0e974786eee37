"""`topology.measure=true`: measure each level's bandwidth in a few seconds and hand the
planner a topology with measured figures (source 'measured'): per level each operation's
bandwidth, the per-step latency and, where one flow cannot fill the level's uplink, the
per-flow limit; per rank the optimizer-update rate and the block-quantization (codec) rate.

Level k is measured with groups of ranks that differ only in their level-k coordinate,
all at once, so every link of that level is loaded as training loads it. Each of the three
operations a plan issues is measured on its own, the way the native engine issues it
(parallel.ledger: gloo's list all_gather, the send/recv ring reduce-scatter on CPU, gloo's
all_reduce), because on the same link they can reach different rates: on the shaped link of
benchmarks/hierarchy.py gloo's all_reduce moved its bytes faster than its all_gather of two
ranks, a gap that mostly closed once the engine sent each direction of a two-rank exchange on
its own process group (parallel.ledger.CommGroup.pg_back; measured: docs/benchmarks.md,
Figures behind design choices). The figure kept per op is the per-rank bandwidth that makes
parallel.topology.peak_busbw_gbps predict the busbw measured (the median over the groups);
the level's general figure is the all_gather one.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

from tierzero.collectives_bench.backends import TorchBackend
from tierzero.collectives_bench.formulas import busbw_gbps, element_count
from tierzero.collectives_bench.runner import _time_block
from tierzero.collectives_bench.scopes import Scope
from tierzero.parallel.topology import Topology, peak_busbw_gbps, with_bandwidths, with_flow_limits, with_latencies

log = logging.getLogger(__name__)
PROBE_SIZES = (1 << 20, 4 << 20, 16 << 20, 64 << 20)
PROBE_OPS = ("all_gather", "reduce_scatter", "all_reduce")
"""The operations a partition plan issues (parallel.cost.KIND_OP); all_gather first: it is
the level's general figure."""
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


def engine_call(backend, comm, op: str, count: int) -> Callable[[], None]:
    """One call of `op` on `count` fp32 elements (the whole buffer S) as the training engine
    makes it: through parallel.ledger on the engine's own kind of group (`comm`, from
    parallel.groups.build_partition) with torch.distributed; through the backend's own case
    with MPI (which trains nothing)."""
    if not isinstance(backend, TorchBackend):
        case = backend.case(op, "out", count, "float32", comm)
        case.fill_zero()
        return case.call
    import torch

    from tierzero.parallel.ledger import ByteLedger

    ledger = ByteLedger()
    chunk = count // comm.size
    zeros = lambda k: torch.zeros(k, dtype=torch.float32, device=backend.device)  # noqa: E731
    if op == "all_gather":
        outputs, shard = [zeros(chunk) for _ in range(comm.size)], zeros(chunk)
        return lambda: ledger.all_gather(outputs, shard, comm, phase="probe")
    if op == "reduce_scatter":
        output, inputs = zeros(chunk), [zeros(chunk) for _ in range(comm.size)]
        return lambda: ledger.reduce_scatter(output, inputs, comm, phase="probe")
    if op == "all_reduce":
        buffer = zeros(count)
        return lambda: ledger.all_reduce(buffer, comm, phase="probe")
    raise ValueError(f"the probe measures {list(PROBE_OPS)}, not {op!r}")


def _time_calls(backend, call: Callable[[], None], iters: int) -> float:
    """Mean seconds per call, timed as the sweep times a case (barrier first, device synced)."""
    return _time_block(backend, SimpleNamespace(call=call), iters)


def measure_level(backend, topo: Topology, k: int, iters: int = 3) -> Optional[Dict[str, float]]:
    """Per-rank GB/s of level k for each op of PROBE_OPS (None when its fan-out is 1:
    nothing to measure)."""
    if topo.levels[k].size < 2:
        return None
    groups = level_groups(topo, k)
    name = topo.levels[k].name
    if isinstance(backend, TorchBackend):
        from tierzero.parallel.groups import build_partition

        comm = build_partition(groups, backend.rank, name)
    else:
        comm = backend.group(Scope(f"probe:{name}", tuple(tuple(x) for x in groups), name))
    group_id = next(i for i, x in enumerate(groups) if backend.rank in x)
    # the per-rank figure that makes the link model give 1 GB/s of busbw to these groups
    unit = peak_busbw_gbps(with_bandwidths(topo, [1.0 if j == k else None for j in range(len(topo.levels))]), groups)
    figures = {}
    for op in PROBE_OPS:
        best = None
        for size in PROBE_SIZES:
            count = element_count(op, size, 4, len(groups[group_id]))
            call = engine_call(backend, comm, op, count)
            call()  # warm-up
            backend.sync()
            t = _time_calls(backend, call, iters)
            gathered = backend.gather((group_id, t))
            decision = None
            if backend.rank == 0:
                per_group: dict = {}
                for gid, ti in gathered:
                    per_group.setdefault(gid, []).append(ti)
                bus = statistics.median(busbw_gbps(op, len(groups[group_id]), count * 4, statistics.fmean(ts))
                                        for ts in per_group.values())
                decision = (bus / unit, max(ti for _, ti in gathered) >= ENOUGH_S)
            best, enough = backend.broadcast(decision)
            if enough:
                break
        figures[op] = best
    return figures


FLOW_SHORTFALL = 0.85
"""A unit ring that reaches less than this fraction of the link-load model's figure sets the
level's per-flow limit (Level.flow_gbps); above it, the difference is noise."""


def measure_flow_limit(backend, topo: Topology, k: int, iters: int = 3) -> Optional[float]:
    """GB/s one flow carries through level k's uplink, or None when it can fill the uplink
    (or level k has nothing to measure). A ring over each level-k unit in rank order has one
    flow leaving each unit below, so the model gives it the whole uplink (the level-k figure x
    the ranks under it); a ring that reaches clearly less is limited per flow, and its busbw is
    that limit. `topo` holds the figures measured for every level already."""
    if topo.levels[k].size < 2 or _unit_ranks(topo, k) < 2:
        return None  # one rank per unit: the level's own groups are such rings already
    groups = topo.groups_within(topo.levels[k].name)
    expected = peak_busbw_gbps(topo, groups, op="all_gather")
    if expected is None:
        return None
    if isinstance(backend, TorchBackend):
        from tierzero.parallel.groups import build_partition

        comm = build_partition(groups, backend.rank, topo.levels[k].name)
    else:
        comm = backend.group(Scope(f"flow:{topo.levels[k].name}", tuple(tuple(x) for x in groups),
                                   topo.levels[k].name))
    n = len(groups[0])
    count = None
    for size in PROBE_SIZES:
        count = element_count("all_gather", size, 4, n)
        call = engine_call(backend, comm, "all_gather", count)
        call()
        backend.sync()
        t = max(backend.gather(_time_calls(backend, call, iters)) or [0.0])
        t = backend.broadcast(t if backend.rank == 0 else None)
        if t >= ENOUGH_S:
            break
    bus = busbw_gbps("all_gather", n, count * 4, t)
    return bus if bus < FLOW_SHORTFALL * expected else None


def _unit_ranks(topo: Topology, k: int) -> int:
    """Ranks in one unit of the level below k (1 for the innermost level)."""
    return topo.span(topo.levels[k - 1].name) if k > 0 else 1


LATENCY_ITERS = 20
"""Calls of the one-element-per-rank all_gather that times a level's per-step latency."""


def measure_latency(backend, topo: Topology, k: int) -> Optional[float]:
    """Microseconds per step of a collective across level k: an all_gather of one fp32 element
    per rank (the bytes take no time) over the groups level_groups gives, all at once, as the
    engine issues it; its time / (n - 1) ring steps, the slowest group's. None when the level's
    fan-out is 1 or with MPI."""
    if topo.levels[k].size < 2 or not isinstance(backend, TorchBackend):
        return None
    from tierzero.parallel.groups import build_partition

    groups = level_groups(topo, k)
    comm = build_partition(groups, backend.rank, topo.levels[k].name)
    n = topo.levels[k].size
    call = engine_call(backend, comm, "all_gather", n)
    call()
    backend.sync()
    t = _time_calls(backend, call, LATENCY_ITERS)
    slowest = max(backend.gather(t) or [t])
    return backend.broadcast(slowest / (n - 1) * 1e6 if backend.rank == 0 else None)


UPDATE_NUMEL = 1 << 22
"""Parameters in the update probe's shard (4M: 80 MB of fp32 state per rank), long enough to
time and short enough for start-up (measured: docs/benchmarks.md, Figures behind design choices)."""


def measure_update_rate(backend, iters: int = 3) -> Optional[float]:
    """10^9 parameters/s of the native engine's per-parameter optimizer work as its step does it
    (the gradient's fp32 norm, parallel.engines.adamw.adamw_update_ -- the fused kernel with
    the 1/world and clipping scale -- and the cast down into a bfloat16 parameter shard; the
    gradient is released, not zeroed), every rank at once so that ranks sharing cores or memory
    bandwidth slow each other as in training; the slowest rank's rate (the step waits for it).
    None with MPI (no engine)."""
    if not isinstance(backend, TorchBackend):
        return None
    import torch

    from tierzero.parallel.engines.adamw import adamw_update_

    n, device = UPDATE_NUMEL, backend.device
    master, grad = torch.zeros(n, device=device), torch.full((n,), 1e-3, device=device)
    exp_avg, exp_avg_sq = torch.zeros(n, device=device), torch.zeros(n, device=device)
    param = torch.empty(n, dtype=torch.bfloat16, device=device)
    step_t, scale = torch.zeros((), device=device), torch.ones((), device=device)  # scale 1: grad stays

    def update(step: int) -> None:
        torch._foreach_norm([grad])
        step_t.fill_(step)
        adamw_update_([master], [exp_avg], [exp_avg_sq], [grad], lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                      weight_decay=0.1, step=step, step_tensor=step_t, grad_scale=scale)
        param.copy_(master)

    update(1)  # warm-up
    t = _time_calls(backend, lambda: update(2), iters)
    slowest = max(backend.gather(t) or [t])
    return backend.broadcast(n / slowest / 1e9 if backend.rank == 0 else None)


def measure_codec_rate(backend, iters: int = 3) -> Optional[float]:
    """10^9 elements/s through one block-quantization pass (encode or decode: parallel.codec,
    int4 with 256-element blocks, the narrowest format and so the most work per byte), every
    rank at once, the slowest rank's. None with MPI."""
    if not isinstance(backend, TorchBackend):
        return None
    import torch

    from tierzero.parallel.codec import Codec

    codec = Codec(4, 256)
    n = UPDATE_NUMEL
    x = torch.randn(n, device=backend.device)
    payload = codec.encode(x)

    def passes() -> None:
        codec.encode(x, out=payload)
        codec.decode(payload, n)

    passes()  # warm-up
    t = _time_calls(backend, passes, iters)
    slowest = max(backend.gather(t) or [t])
    return backend.broadcast(2 * n / slowest / 1e9 if backend.rank == 0 else None)


def measure_topology(backend, topo: Topology) -> Topology:
    """The same levels with measured bandwidths where a level has links to measure: the
    all_gather figure as the level's, every op's as its per-op figures; plus the optimizer
    update rate."""
    measured = [measure_level(backend, topo, k) for k in range(len(topo.levels))]
    latencies = [measure_latency(backend, topo, k) for k in range(len(topo.levels))]
    rate = measure_update_rate(backend)
    codec_rate = measure_codec_rate(backend)
    if backend.rank == 0:
        log.info("measured per-rank GB/s: %s", format_measured(topo, measured))
        if any(us is not None for us in latencies):
            log.info("measured per-step latency us: %s", " ".join(
                f"{lv.name}={us:.4g}" for lv, us in zip(topo.levels, latencies) if us is not None))
        if rate:
            log.info("measured optimizer update: %.4g e9 params/s per rank", rate)
        if codec_rate:
            log.info("measured block quantization: %.4g e9 elements/s per rank", codec_rate)
    out = with_bandwidths(topo, [m["all_gather"] if m else None for m in measured], source="measured",
                          op_bandwidths_gbps=[m if m else None for m in measured])
    flows = [measure_flow_limit(backend, out, k) for k in range(len(topo.levels))]
    if backend.rank == 0 and any(f is not None for f in flows):
        log.info("measured per-flow limit GB/s: %s", " ".join(
            f"{lv.name}={f:.4g}" for lv, f in zip(topo.levels, flows) if f is not None))
    out = with_flow_limits(out, flows)
    out = with_latencies(out, latencies)
    return dataclasses.replace(out, update_gelems_per_s=rate or out.update_gelems_per_s,
                               codec_gelems_per_s=codec_rate or out.codec_gelems_per_s)


def format_measured(topo: Topology, measured: List[Optional[Dict[str, float]]]) -> str:
    """'node all_gather=0.9 reduce_scatter=0.8 all_reduce=1.1; cluster ...' (parse_measured reads it back)."""
    return "; ".join(
        f"{lv.name} " + (" ".join(f"{op}={bw:.4g}" for op, bw in m.items()) if m else "-")
        for lv, m in zip(topo.levels, measured))


def parse_measured(text: str) -> Dict[str, Optional[Dict[str, float]]]:
    """format_measured's text -> {level: {op: GB/s}} (None for a level with nothing to measure)."""
    out: Dict[str, Optional[Dict[str, float]]] = {}
    for part in text.strip().split("; "):
        name, _, rest = part.partition(" ")
        out[name] = None if rest.strip() == "-" else {
            op: float(v) for op, v in (item.split("=") for item in rest.split())}
    return out
