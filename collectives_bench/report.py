"""Rows and their text, nccl-tests style (pure: no processes, no files).

A Cell is one rank's measurement of one (scope, op, dtype, size, placement); rank 0
turns the cells of every rank into one Row per group (the Parquet rows) and one printed
line per size that pools every rank of the scope.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from tierzero.collectives_bench.formulas import algbw_gbps, busbw_gbps
from tierzero.collectives_bench.ops import Op, collective
from tierzero.collectives_bench.sizes import format_size

TYPE_NAMES = {"float32": "float", "bfloat16": "bfloat16", "float16": "half"}


@dataclass(frozen=True)
class Cell:
    rank: int
    group_id: int
    time_s: float
    wrong: int


@dataclass(frozen=True)
class Row:
    """One group's result for one (scope, op, dtype, size, placement): a row of table `collectives`."""
    op: str
    scope: str
    group: int
    ranks: str
    placement: str
    backend: str
    dtype: str
    size_bytes: int
    count: int
    nranks: int
    time_us: float
    time_min_us: float
    time_max_us: float
    algbw_gbps: float
    busbw_gbps: float
    wrong: int
    hosts: str
    peak_gbps: Optional[float]
    fraction_of_peak: Optional[float]


@dataclass
class Line:
    """One printed line: every group of the scope pooled."""
    op: str
    scope: str
    dtype: str
    size_bytes: int
    count: int
    nranks: int
    redop: str
    """nccl-tests' redop column: the reduction, or none."""
    root: int
    """nccl-tests' root column: the root's group position, or -1."""
    cells: Dict[str, Tuple[float, float, float, float, float, int]] = field(default_factory=dict)
    """placement -> (avg, min, max time in us, algbw, busbw, wrong)."""


def rows_for(op: Op, scope: str, groups: Sequence[Sequence[int]], placement: str, backend: str, dtype: str,
             size_bytes: int, count: int, cells: Sequence[Cell], host_labels: Sequence[str],
             peak_gbps: Optional[float]) -> List[Row]:
    """Time per group = the mean over its ranks (as nccl-tests averages over ranks)."""
    coll = collective(op)
    rows = []
    for gid, ranks in enumerate(groups):
        mine = [c for c in cells if c.group_id == gid]
        times = [c.time_s for c in mine]
        avg = statistics.fmean(times)
        n = len(ranks)
        bus = busbw_gbps(coll, n, size_bytes, avg)
        rows.append(Row(
            op=coll.name, scope=scope, group=gid, ranks=",".join(map(str, ranks)), placement=placement,
            backend=backend, dtype=dtype, size_bytes=size_bytes, count=count, nranks=n, time_us=avg * 1e6,
            time_min_us=min(times) * 1e6, time_max_us=max(times) * 1e6,
            algbw_gbps=algbw_gbps(size_bytes, avg), busbw_gbps=bus, wrong=sum(c.wrong for c in mine),
            hosts=",".join(sorted({host_labels[r] for r in ranks})), peak_gbps=peak_gbps,
            fraction_of_peak=bus / peak_gbps if peak_gbps else None,
        ))
    return rows


def pooled(op: Op, placement: str, size_bytes: int, nranks: int, cells: Sequence[Cell]):
    times = [c.time_s for c in cells]
    avg = statistics.fmean(times)
    return (avg * 1e6, min(times) * 1e6, max(times) * 1e6, algbw_gbps(size_bytes, avg),
            busbw_gbps(op, nranks, size_bytes, avg), sum(c.wrong for c in cells))


# ---- text -----------------------------------------------------------------------------

_LEFT = f"{'op':<15}{'scope':<15}{'size':>12}{'count':>12}{'type':>10}{'redop':>7}{'root':>6}"
_CELL_HEAD = f"{'avg':>10}{'min':>10}{'max':>10}{'algbw':>8}{'busbw':>8}{'#wrong':>7}"
_CELL_UNITS = f"{'(us)':>10}{'(us)':>10}{'(us)':>10}{'(GB/s)':>8}{'(GB/s)':>8}{'':>7}"
_CELL_W = len(_CELL_HEAD)


def header_lines() -> List[str]:
    pad = " " * len(_LEFT)
    return [
        f"# {pad}  {'out-of-place':^{_CELL_W}}  {'in-place':^{_CELL_W}}",
        f"# {_LEFT}  {_CELL_HEAD}  {_CELL_HEAD}",
        f"# {' ' * 30}{'(B)':>12}{'(elements)':>12}{' ' * 23}  {_CELL_UNITS}  {_CELL_UNITS}",
    ]


def _cell(values) -> str:
    if values is None:
        return f"{'-':>10}{'-':>10}{'-':>10}{'-':>8}{'-':>8}{'-':>7}"
    avg, lo, hi, alg, bus, wrong = values
    return f"{avg:>10.1f}{lo:>10.1f}{hi:>10.1f}{alg:>8.3f}{bus:>8.3f}{wrong:>7d}"


def format_line(line: Line) -> str:
    left = (f"{line.op:<15}{line.scope:<15}{line.size_bytes:>12d}{line.count:>12d}"
            f"{TYPE_NAMES[line.dtype]:>10}{line.redop:>7}{line.root:>6d}")
    return f"  {left}  {_cell(line.cells.get('out'))}  {_cell(line.cells.get('in'))}"


def footer_lines(lines: Sequence[Line]) -> List[str]:
    """nccl-tests' footer: wrong elements and the average busbw over every size and placement."""
    wrong = sum(c[5] for ln in lines for c in ln.cells.values())
    buses = [c[4] for ln in lines for c in ln.cells.values()]
    avg = statistics.fmean(buses) if buses else float("nan")
    out = [f"# Out of bounds values : {wrong} {'OK' if wrong == 0 else 'FAILED'}",
           f"# Avg bus bandwidth    : {avg:.4g} GB/s"]
    by_key: Dict[Tuple[str, str, str], List[float]] = {}
    for ln in lines:
        by_key.setdefault((ln.op, ln.scope, ln.dtype), []).extend(c[4] for c in ln.cells.values())
    out.append("#")
    out.append(f"# {'op':<15}{'scope':<15}{'type':>10}{'avg busbw GB/s':>16}")
    for (op, scope, dtype), vals in by_key.items():
        out.append(f"# {op:<15}{scope:<15}{TYPE_NAMES[dtype]:>10}{statistics.fmean(vals):>16.4g}")
    return out


def compare_lines(rows: Sequence[Row], slow_fraction: float, peak_note: str) -> Tuple[List[str], List[Row]]:
    """Expected vs measured at each (op, scope, dtype)'s largest size: busbw as a fraction of
    the topology's peak, and every group below slow_fraction x its peers' median flagged.
    Returns the lines and the flagged rows."""
    out = [f"# expected vs measured, largest size of each op and scope; peak from {peak_note}",
           f"# {'op':<15}{'scope':<15}{'size':>7}{'busbw':>9}{'peak':>9}{'of peak':>9}  groups (busbw GB/s)"]
    flagged: List[Row] = []
    keys = []
    for r in rows:
        if (r.op, r.scope, r.dtype) not in keys:
            keys.append((r.op, r.scope, r.dtype))
    for op, scope, dtype in keys:
        mine = [r for r in rows if (r.op, r.scope, r.dtype) == (op, scope, dtype)]
        top = max(r.size_bytes for r in mine)
        # the out-of-place rows when the op has them (the placement nccl-tests leads with)
        placement = "out" if any(r.placement == "out" for r in mine) else "in"
        at_top = [r for r in mine if r.size_bytes == top and r.placement == placement]
        buses = [r.busbw_gbps for r in at_top]
        mean_bus = statistics.fmean(buses)
        peak = at_top[0].peak_gbps
        frac = f"{mean_bus / peak:>8.0%}" if peak else f"{'-':>8}"
        peak_s = f"{peak:>9.3g}" if peak else f"{'?':>9}"
        median = statistics.median(buses)
        parts = []
        for r in at_top:
            slow = len(at_top) > 1 and r.busbw_gbps < slow_fraction * median
            if slow:
                flagged.append(r)
            parts.append(f"{r.group}:{r.busbw_gbps:.3g}{' SLOW' if slow else ''}")
        shown = " ".join(parts) if len(at_top) > 1 else "(one group)"
        out.append(f"# {op:<15}{scope:<15}{format_size(top):>7}{mean_bus:>9.3g}{peak_s} {frac}  {shown}")
    for r in flagged:
        out.append(f"# SLOW: {r.op} {r.scope} group {r.group} (ranks {r.ranks}; hosts {r.hosts}) reached "
                   f"{r.busbw_gbps:.3g} GB/s, below {slow_fraction:.0%} of its peers' median: "
                   "a slow link or a bad node")
    return out, flagged
