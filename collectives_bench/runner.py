"""The sweep: every dtype x scope x op x size, timed like nccl-tests.

For each (dtype, scope, op): a warm-up pass over the whole size range, then per size and
placement a barrier, `iters` back-to-back calls timed as one block (device synchronised
at its end), and a separate checked call on freshly patterned buffers. Rank 0 gathers
every rank's time and #wrong after each size (outside the timed block) and emits the line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from tierzero.collectives_bench.config import BenchConfig
from tierzero.collectives_bench.formulas import count_wrong, element_count, expected
from tierzero.collectives_bench.ops import COLLECTIVES, Collective, collective
from tierzero.collectives_bench.report import Cell, Line, Row, pooled, rows_for
from tierzero.collectives_bench.scopes import Scope, peak_gbps
from tierzero.parallel.topology import Topology

ELEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Sweep:
    rows: List[Row]
    lines: List[Line]

    @property
    def wrong(self) -> int:
        return sum(r.wrong for r in self.rows)


def _time_block(backend, case, iters: int) -> float:
    backend.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        case.call()
    backend.sync()
    return (time.perf_counter() - t0) / iters


def _check(backend, case, coll: Collective, count: int, group, corrupt: bool) -> int:
    case.fill_pattern()
    backend.sync()
    case.call()
    backend.sync()
    got = case.output()
    if corrupt and group.index == 0:
        got = got.copy()
        got.reshape(-1)[0] += 1  # one corrupted element, as a flipped bit would make
    return count_wrong(got, expected(coll, count, group.size, group.index))


def run_sweep(backend, topo: Topology, cfg: BenchConfig, scopes: Sequence[Scope], sizes: Sequence[int],
              host_labels: Sequence[str], emit: Callable[[Line], None] = lambda line: None,
              on_rows: Callable[[List[Row]], None] = lambda rows: None,
              progress: Optional[Callable[[str, int, int], None]] = None, corrupt_op: Optional[str] = None,
              collectives: Mapping[str, Collective] = COLLECTIVES) -> Sweep:
    """Run the sweep on every rank; rank 0 gets the rows and lines (others get empty lists).

    corrupt_op: fault injection for testing the checker: after the checked call of that op,
    the first rank of every group adds 1 to one output element (docs/bench.md).
    collectives: the registry cfg.ops names (ops.COLLECTIVES unless a test adds one)."""
    groups = {s.name: backend.group(s) for s in scopes}  # collective: same order on every rank
    rows: List[Row] = []
    lines: List[Line] = []
    blocks = [(d, s, o) for d in cfg.dtypes for s in scopes for o in cfg.ops]
    for i, (dtype, scope, op) in enumerate(blocks):
        if progress and backend.rank == 0:
            progress(f"{op} {scope.name} {dtype}", i, len(blocks))
        coll = collective(op, collectives)
        g = groups[scope.name]
        counts = []
        for size in sizes:
            count = element_count(coll, size, ELEM_BYTES[dtype], g.size)
            if count not in counts:
                counts.append(count)
        placements = coll.placements
        for count in counts:  # warm-up over the size range
            for placement in placements:
                case = backend.case(coll, placement, count, dtype, g)
                case.fill_zero()
                for _ in range(cfg.warmup):
                    case.call()
        backend.sync()
        peak = peak_gbps(scope, topo, coll)
        for count in counts:
            size_bytes = count * ELEM_BYTES[dtype]
            mine: Dict[str, tuple] = {}
            for placement in placements:
                case = backend.case(coll, placement, count, dtype, g)
                case.fill_zero()
                t = _time_block(backend, case, cfg.iters)
                wrong = _check(backend, case, coll, count, g, corrupt_op == op) if cfg.check else 0
                mine[placement] = (t, wrong)
            gathered = backend.gather((backend.rank, g.group_id, mine))
            if backend.rank != 0:
                continue
            line = Line(op, scope.name, dtype, size_bytes, count, g.size, coll.redop, 0 if coll.rooted else -1)
            new_rows = []
            for placement in placements:
                cells = [Cell(r, gid, m[placement][0], m[placement][1]) for r, gid, m in gathered]
                line.cells[placement] = pooled(coll, placement, size_bytes, g.size, cells)
                new_rows += rows_for(coll, scope.name, scope.groups, placement, backend.name, dtype, size_bytes,
                                     count, cells, host_labels, peak)
            rows += new_rows
            lines.append(line)
            emit(line)
            on_rows(new_rows)
    if progress and backend.rank == 0:
        progress("done", len(blocks), len(blocks))
    return Sweep(rows, lines)


def host_labels(hosts: Sequence[str], topo: Topology) -> List[str]:
    """One label per rank: its host name, or host/node<k> when emulated nodes share one host."""
    if len(set(hosts)) == 1 and topo.num_nodes > 1 and len(hosts) == topo.world_size:
        return [f"{hosts[r]}/node{topo.node_of(r)}" for r in range(len(hosts))]
    return list(hosts)
