"""`tierzero bench`: nccl-tests' bandwidth units, the expected values of every collective,
sizes, scopes and the peak model (pure, first), then the real launch paths (tierzero's
own supervisor, mpirun, torchrun) as subprocesses whose Parquet rows are read back.

References: the busbw factors are restated from nccl-tests' sources; the expected
outputs are checked against a direct numpy simulation of each collective; the peaks
against figures worked out by hand from the link model. No timing is asserted: only
that the rows' bandwidths follow from their own sizes and times.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tierzero.collectives_bench.config import BACKENDS, DTYPES, OPS, BenchConfig
from tierzero.collectives_bench.formulas import (PLACEMENTS, algbw_gbps, bus_factor, busbw_gbps, count_wrong,
                                                 element_count, expected, input_spec, pattern)
from tierzero.collectives_bench.ops import (COLLECTIVES, Collective, collective, registry, spread_factor,
                                            whole_to_chunk)
from tierzero.collectives_bench.report import Cell, Line, compare_lines, format_line, rows_for
from tierzero.collectives_bench.scopes import ScopeError, peak_gbps, resolve_scopes
from tierzero.collectives_bench.sizes import SizeError, default_sizes, parse_sizes
from tierzero.parallel.topology import emulated_topology, peak_busbw_gbps

ROOT = Path(__file__).resolve().parent.parent
NS = (2, 3, 4, 5, 8, 16, 64)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = ["bench.iters=2", "bench.warmup=1"]


# ---- a toy extra collective: what adding one takes ------------------------------------------
# One record, defined here and never registered in ops.py: the tests below hand a copy of the
# registry with it added to config validation, the formulas and a real sweep on gloo ranks.

def _scatter_torch(dist, send, recv, g, in_place):
    chunks = list(send.chunk(g.size)) if g.index == 0 else None
    return lambda: dist.scatter(recv, chunks, src=g.ranks[0], group=g.handle)


def _scatter_mpi(MPI, send, recv, g, in_place):
    if g.index == 0:
        return lambda: g.handle.Scatter(send, MPI.IN_PLACE if in_place else recv, root=0)
    return lambda: g.handle.Scatter(None, recv, root=0)


TOY = Collective(
    "scatter", ("out", "in"), spread_factor, chunked=True, elements=whole_to_chunk,
    expected=lambda x, s, n, r: x(0, r * (s // n), s // n),  # rank r gets chunk r of the root's buffer
    torch_call=_scatter_torch, mpi_call=_scatter_mpi, rooted=True,
)
WITH_TOY = {**COLLECTIVES, TOY.name: TOY}


# ---- busbw: nccl-tests' definitions ------------------------------------------------------

NCCL_TESTS_FACTORS = {
    "all_reduce": lambda n: 2.0 * (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n, "all_gather": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0, "reduce": lambda n: 1.0, "sendrecv": lambda n: 1.0,
    "scatter": lambda n: (n - 1) / n,
}
"""busBw / algBw per nccl-tests source file (src/*.cu, <Op>GetBw): see nccl_tests_bw."""


def nccl_tests_bw(op: str, nranks: int, size_bytes: float, sec: float):
    """(algBw, busBw) in GB/s as nccl-tests computes them (src/*.cu, <Op>GetBw), restated
    with S = our size column (the whole buffer):
    - all_reduce.cu AllReduceGetBw: baseBw = count*typesize/sec, factor 2(n-1)/n.
    - reduce_scatter.cu, all_gather.cu, alltoall.cu: baseBw = count*typesize*nranks/sec
      (count per rank, so count*nranks*typesize = the whole buffer S), factor (n-1)/n.
    - broadcast.cu, reduce.cu: baseBw = count*typesize/sec, factor 1.
    - sendrecv.cu: baseBw = count*typesize/sec, factor 1.
    - scatter.cu ScatterGetBw: baseBw = count*nranks*typesize/sec, factor (n-1)/n.
    """
    base = size_bytes / 1.0e9 / sec
    factor = NCCL_TESTS_FACTORS[op](nranks)
    return base, base * factor, factor


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("op", list(WITH_TOY))
def test_busbw_matches_nccl_tests(op, n):
    size, sec = 3 * 2**20, 1.7e-3
    alg, bus, factor = nccl_tests_bw(op, n, size, sec)
    record = WITH_TOY[op]
    assert bus_factor(record, n) == pytest.approx(factor, rel=1e-15)
    assert algbw_gbps(size, sec) == pytest.approx(alg, rel=1e-12)
    assert busbw_gbps(record, n, size, sec) == pytest.approx(bus, rel=1e-12)
    if op in COLLECTIVES:  # registered ones by name too
        assert bus_factor(op, n) == pytest.approx(factor, rel=1e-15)
        assert busbw_gbps(op, n, size, sec) == pytest.approx(bus, rel=1e-12)


def test_every_collective_has_a_nccl_tests_row():
    assert set(COLLECTIVES) <= set(NCCL_TESTS_FACTORS)


def test_bus_factor_rejects_an_unknown_op():
    with pytest.raises(ValueError, match="allreduce"):
        bus_factor("allreduce", 4)
    with pytest.raises(ValueError, match="scatter"):  # the toy is in no registry but WITH_TOY
        bus_factor("scatter", 4)


# ---- the registry --------------------------------------------------------------------------

def test_registry_is_in_nccl_tests_order():
    assert tuple(COLLECTIVES) == OPS == ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "all_to_all",
                                         "reduce", "sendrecv")
    assert all(name == c.name for name, c in COLLECTIVES.items())
    assert PLACEMENTS == {name: c.placements for name, c in COLLECTIVES.items()}
    assert collective("all_gather") is COLLECTIVES["all_gather"] and collective(TOY) is TOY
    assert collective("scatter", WITH_TOY) is TOY
    with pytest.raises(TypeError):
        COLLECTIVES["scatter"] = TOY  # read-only: a test adds a collective to a copy


def test_a_record_is_checked():
    with pytest.raises(ValueError, match="placements"):
        dataclasses.replace(TOY, placements=("in", "out"))
    with pytest.raises(ValueError, match="link"):
        dataclasses.replace(TOY, link="tree")
    with pytest.raises(ValueError, match="share a name"):
        registry(TOY, COLLECTIVES["all_reduce"], TOY)


def test_no_module_branches_on_a_collective_name():
    """Every per-collective fact lives in ops.py: outside it no code (docstrings aside) names
    a collective. probe.py is the exception: it times the training engine's own calls
    (parallel.ledger) for the three ops a partition plan issues, not the bench's records."""
    import ast

    names = set(WITH_TOY)
    found = []
    for path in sorted((ROOT / "collectives_bench").glob("*.py")):
        if path.name in ("ops.py", "probe.py"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.value) for node in ast.walk(tree)
                      if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
        found += [f"{path.name}:{node.lineno} {node.value!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings]
    assert not found, found


# ---- expected values vs a direct numpy simulation -------------------------------------------

def simulate(op: str, count: int, n: int, inputs=None):
    """Every rank's output after `op`, computed from the inputs (default: the pattern) by the
    collective's definition."""
    if inputs is None:
        in_len, _ = input_spec(WITH_TOY[op], count, n)
        inputs = [pattern(k, 0, in_len) for k in range(n)]
    c = count // n
    if op == "all_reduce":
        return [np.sum(inputs, axis=0) for _ in range(n)]
    if op == "reduce":  # root 0 holds the sum; the others' buffers are undefined
        return [np.sum(inputs, axis=0)] + [None] * (n - 1)
    if op == "broadcast":  # root 0's buffer everywhere
        return [inputs[0].copy() for _ in range(n)]
    if op == "reduce_scatter":  # rank r keeps chunk r of the sum
        total = np.sum(inputs, axis=0)
        return [total[r * c:(r + 1) * c] for r in range(n)]
    if op == "all_gather":  # every rank's chunk, in rank order
        return [np.concatenate(inputs) for _ in range(n)]
    if op == "all_to_all":  # a transpose of chunks: rank r gets chunk r of every rank
        chunks = np.stack([x.reshape(n, c) for x in inputs])  # [src, dst, c]
        return [chunks[:, r, :].reshape(-1) for r in range(n)]
    if op == "sendrecv":  # a ring shift: r sends to r+1, receives from r-1
        return [inputs[(r - 1) % n].copy() for r in range(n)]
    if op == "scatter":  # the toy: root 0's buffer, chunk r to rank r
        return [inputs[0][r * c:(r + 1) * c].copy() for r in range(n)]
    raise AssertionError(op)


COUNT = 4 * 3 * 5 * 7  # a multiple of every n in 2..7


@pytest.mark.parametrize("n", (2, 3, 4, 5))
@pytest.mark.parametrize("op", list(WITH_TOY))
def test_expected_matches_a_numpy_simulation(op, n):
    record, count = WITH_TOY[op], COUNT
    assert element_count(record, count * 4, 4, n) == count
    sim = simulate(op, count, n)
    _, out_len = input_spec(record, count, n)
    for r in range(n):
        want = expected(record, count, n, r)
        if sim[r] is None:
            assert want is None
            continue
        assert want.shape == (out_len,)
        np.testing.assert_array_equal(want, sim[r])
    # the pattern must tell ranks and positions apart, or a swapped chunk would pass the check
    assert not np.array_equal(pattern(0, 0, count), pattern(1, 0, count))


@pytest.mark.parametrize("n", (2, 3, 4, 5))
@pytest.mark.parametrize("op", list(WITH_TOY))
def test_records_match_a_numpy_simulation_on_random_inputs(op, n):
    """The record's definition, on inputs that are not the check pattern."""
    record, count = WITH_TOY[op], COUNT
    in_len, out_len = record.elements(count, n)
    inputs = [np.random.default_rng(10 * n + k).integers(-1000, 1000, in_len).astype(np.float64) for k in range(n)]
    sim = simulate(op, count, n, inputs)
    for r in range(n):
        got = record.expected(lambda k, start, length: inputs[k][start:start + length].copy(), count, n, r)
        if sim[r] is None:
            assert got is None
            continue
        assert got.shape == (out_len,)
        np.testing.assert_array_equal(got, sim[r])


def test_chunked_counts_are_multiples_of_n():
    for op in [c for c in WITH_TOY.values() if c.chunked]:
        for n in (3, 5, 7):
            count = element_count(op, 4096, 4, n)
            assert count % n == 0 and count <= 1024
    assert element_count("all_reduce", 4096, 4, 3) == 1024
    assert element_count("all_gather", 4, 4, 8) == 8  # at least one element per rank


def test_sums_are_exact_in_bfloat16_up_to_128_ranks():
    """The check demands equality, so every expected value must be exactly representable."""
    torch = pytest.importorskip("torch", reason="torch gives the bfloat16 rounding")
    want = expected("all_reduce", 640, 128, 0)
    rounded = torch.from_numpy(want).to(torch.bfloat16).to(torch.float64).numpy()
    np.testing.assert_array_equal(rounded, want)
    assert np.abs(want).max() > 0


def test_count_wrong():
    want = expected("all_gather", 64, 4, 1)
    assert count_wrong(want.copy(), want) == 0
    one = want.copy()
    one[17] += 1
    assert count_wrong(one, want) == 1
    nan = want.copy()
    nan[3] = np.nan
    assert count_wrong(nan, want) == 1
    assert count_wrong(want[:-1], want) == want.size
    assert count_wrong(np.zeros(5), None) == 0  # reduce on a non-root rank: nothing to check


# ---- sizes -----------------------------------------------------------------------------------

def test_parse_sizes():
    s = parse_sizes("1K:16M")
    assert len(s) == 15 and s[0] == 1024 and s[-1] == 16 * 2**20
    assert all(b == 2 * a for a, b in zip(s, s[1:]))
    g = parse_sizes("1K:1G:4")
    assert g[0] == 2**10 and g[-1] == 2**30 and all(b == 4 * a for a, b in zip(g, g[1:]))
    assert parse_sizes("1M,8M") == [2**20, 8 * 2**20]
    assert parse_sizes("8M,1M") == [2**20, 8 * 2**20]


@pytest.mark.parametrize("bad", ["abc", "16M:1K", "1K:1M:1", "1K:1M:x", "1K:2K:4:8", "0"])
def test_bad_sizes_name_the_key(bad):
    with pytest.raises(SizeError, match=r"bench\.sizes"):
        parse_sizes(bad)


def test_default_sizes():
    assert default_sizes(None)[-1] == 16 * 2**20 and default_sizes(None)[0] == 1024
    assert default_sizes(80e9)[-1] == 2**30
    small = default_sizes(8e9)[-1]
    # capped so the largest size's ~3 buffers stay under 1/8 of the memory, and no lower than needed
    assert small < 2**30 and 3 * small <= 8e9 / 8 < 3 * 2 * small


# ---- scopes -----------------------------------------------------------------------------------

def test_auto_scopes_on_2x2():
    topo = emulated_topology([2, 2])
    scopes = {s.name: s for s in resolve_scopes(["auto"], topo)}
    assert list(scopes) == ["global", "level:node", "cross:node"]
    assert scopes["global"].groups == ((0, 1, 2, 3),)
    assert scopes["level:node"].groups == ((0, 1), (2, 3))
    assert scopes["cross:node"].groups == ((0, 2), (1, 3))
    assert (scopes["global"].level, scopes["level:node"].level, scopes["cross:node"].level) == \
        ("cluster", "node", "cluster")
    # asking twice for a scope runs it once
    assert [s.name for s in resolve_scopes(["global", "auto", "global"], topo)] == list(scopes)


def test_auto_scopes_on_2x2x2():
    topo = emulated_topology([2, 2, 2], names=["package", "node", "cluster"])
    scopes = {s.name: s for s in resolve_scopes(["auto"], topo)}
    assert list(scopes) == ["global", "level:package", "cross:package", "level:node", "cross:node"]

    # independent definition from coordinates: level:X = ranks sharing every coordinate
    # outside X's unit; cross:X = ranks sharing every coordinate inside it
    def partition(key):
        out = {}
        for r in range(topo.world_size):
            out.setdefault(key(topo.coords(r)), []).append(r)
        return {tuple(g) for g in out.values()}

    for k, name in enumerate(["package", "node"]):
        assert set(scopes[f"level:{name}"].groups) == partition(lambda c: c[k + 1:])
        assert set(scopes[f"cross:{name}"].groups) == partition(lambda c: c[:k + 1])
    assert scopes["level:package"].groups == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert scopes["cross:node"].groups == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert scopes["level:package"].level == "package" and scopes["level:node"].level == "node"
    assert scopes["cross:node"].level == "cluster"
    assert all(len({s.group_of(r) for r in range(8)}) == len(s.groups) for s in scopes.values())


@pytest.mark.parametrize("topo_sizes,name,valid", [
    ([2, 2], "level:rack", "level:node"),
    ([2, 2], "level:cluster", "level:node"),
    ([2, 2], "cross:rack", "cross:node"),
    ([4, 1], "cross:node", "global"),  # one node: one rank per node per group, nothing sent
])
def test_bad_scopes_list_the_valid_ones(topo_sizes, name, valid):
    with pytest.raises(ScopeError) as e:
        resolve_scopes([name], emulated_topology(topo_sizes))
    assert name in str(e.value) and valid in str(e.value)


def test_one_rank_is_refused():
    with pytest.raises(ScopeError, match="at least 2 ranks"):
        resolve_scopes(["global"], emulated_topology([1, 1]))


# ---- the peak model ----------------------------------------------------------------------------

def test_peak_busbw_on_2x2():
    topo = emulated_topology([2, 2], bandwidths_gbps=[10, 0.0625])
    s = {sc.name: sc for sc in resolve_scopes(["auto"], topo)}
    # global ring 0->1->2->3->0: 1->2 leaves node 0, 3->0 leaves node 1, one flow per node
    # uplink (capacity 0.0625 GB/s per rank x 2 ranks); the in-node hops get 10 GB/s each
    assert peak_busbw_gbps(topo, s["global"].groups) == pytest.approx(min(10, 0.0625 * 2), rel=1e-12)
    assert peak_busbw_gbps(topo, s["level:node"].groups) == pytest.approx(10, rel=1e-12)
    # cross:node: both groups (0,2) and (1,3) leave node 0 at once: 2 flows share 0.0625 x 2
    assert peak_busbw_gbps(topo, s["cross:node"].groups) == pytest.approx(0.0625, rel=1e-12)
    # all_to_all on the world: each rank sends 1/3 of its bus bytes to each of its 3 peers,
    # 2 of whom are on the other node, so 2/3 of each rank's bytes leave the node; node 0's
    # uplink (0.0625 x 2 = 0.125) carries 2 ranks x 2/3 = 4/3 -> 0.125 / (4/3) = 0.09375.
    # The in-node link of each rank carries 1/3 -> 10 / (1/3) = 30, not the bound.
    a2a = 0.0625 * 2 / (2 * 2 / 3)
    assert a2a == pytest.approx(0.09375)
    assert peak_busbw_gbps(topo, s["global"].groups, "all_to_all") == pytest.approx(a2a, rel=1e-12)
    assert peak_gbps(s["global"], topo, "all_to_all") == pytest.approx(a2a, rel=1e-12)
    assert peak_gbps(s["global"], topo, "all_gather") == pytest.approx(0.125, rel=1e-12)
    # the link pattern is the record's: every registered collective but all_to_all is a ring
    for name, record in WITH_TOY.items():
        want = a2a if name == "all_to_all" else 0.125
        assert peak_gbps(s["global"], topo, record) == pytest.approx(want, rel=1e-12), name


def test_peak_busbw_unknown_bandwidth_is_none():
    unknown = emulated_topology([2, 2])
    assert peak_busbw_gbps(unknown, [[0, 1, 2, 3]]) is None
    half = emulated_topology([2, 2], bandwidths_gbps=[10, None])
    assert peak_busbw_gbps(half, [[0, 1, 2, 3]]) is None  # crosses the unknown node uplink
    assert peak_busbw_gbps(half, [[0, 1], [2, 3]]) == pytest.approx(10)  # stays inside nodes


# ---- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,keys", [
    (dict(ops=["all_reduce", "allgather"]), ["bench.ops", "allgather"]),
    (dict(dtypes=["float64"]), ["bench.dtypes", "float64"]),
    (dict(scopes=["node"]), ["bench.scopes", "level:<level name>"]),
    (dict(backend="mpi", dtypes=["bfloat16"]), ["bench.backend=mpi", "bench.dtypes"]),
    (dict(backend="nccl-tests"), ["bench.backend", "nccl-tests"]),
    (dict(iters=0), ["bench.iters"]),
    (dict(warmup=-1), ["bench.warmup"]),
    (dict(sizes="16M:1K"), ["bench.sizes"]),
    (dict(slow_fraction=1.5), ["bench.slow_fraction"]),
])
def test_config_errors_name_the_key(changes, keys):
    errs = BenchConfig(**changes).errors()
    assert len(errs) == 1, errs
    for key in keys:
        assert key in errs[0]


def test_default_config_is_valid():
    assert BenchConfig().errors() == []
    assert BenchConfig(ops=list(OPS), dtypes=list(DTYPES), backend=BACKENDS[0],
                       scopes=["global", "level:node", "cross:node"], sizes="1K:1M").errors() == []


def _choices(err: str):
    import ast

    return ast.literal_eval(err[err.index("choose from ") + len("choose from "):])


def test_config_lists_exactly_the_registry():
    assert BenchConfig().ops == list(COLLECTIVES)
    (err,) = BenchConfig(ops=[TOY.name]).errors()
    assert _choices(err) == list(COLLECTIVES)
    # a registry with one more record: its name is valid, and an unknown name lists it too
    assert BenchConfig(ops=[TOY.name, "all_reduce"]).errors(WITH_TOY) == []
    (err,) = BenchConfig(ops=["no_such_op"]).errors(WITH_TOY)
    assert _choices(err) == list(WITH_TOY)


# ---- rows and the slow-group flag ----------------------------------------------------------------

def test_rows_pool_each_group_and_flag_a_slow_one():
    groups = ((0, 1), (2, 3), (4, 5))
    times = {0: 1e-3, 1: 3e-3, 2: 2e-3, 3: 2e-3, 4: 20e-3, 5: 20e-3}  # group 2 is 10x slower
    cells = [Cell(r, r // 2, t, 1 if r == 3 else 0) for r, t in times.items()]
    labels = [f"h{r // 2}" for r in range(6)]
    rows = rows_for("all_gather", "level:node", groups, "out", "gloo", "float32", 8192, 2048, cells, labels, 4.0)
    assert [r.ranks for r in rows] == ["0,1", "2,3", "4,5"]
    assert [r.wrong for r in rows] == [0, 1, 0]
    assert rows[0].time_us == pytest.approx(2e3) and rows[0].time_min_us == pytest.approx(1e3)
    assert rows[0].time_max_us == pytest.approx(3e3)
    for r in rows:
        _, bus, _ = nccl_tests_bw("all_gather", 2, 8192, r.time_us * 1e-6)
        assert r.busbw_gbps == pytest.approx(bus, rel=1e-12)
        assert r.fraction_of_peak == pytest.approx(bus / 4.0, rel=1e-12)
    lines, flagged = compare_lines(rows, 0.75, "test")
    assert [r.group for r in flagged] == [2]
    assert any("SLOW" in ln and "4,5" in ln for ln in lines)


def test_printed_line_shows_the_records_root_and_redop():
    def line(record):
        return format_line(Line(record.name, "global", "float32", 4096, 1024, 4, record.redop,
                                0 if record.rooted else -1, {"in": (1.0, 1.0, 1.0, 4.0, 4.0, 0)}))

    assert line(COLLECTIVES["reduce"]).split()[5:7] == ["sum", "0"]
    assert line(COLLECTIVES["all_gather"]).split()[5:7] == ["none", "-1"]
    assert line(TOY).split()[5:7] == ["none", "0"]


@pytest.mark.parametrize("op", list(WITH_TOY))
@pytest.mark.parametrize("n", (2, 3))
def test_buffers_are_built_from_the_record(op, n):
    """Out of place two buffers; in place one, or the smaller as a chunk of the larger."""
    from tierzero.collectives_bench.backends import build_buffers

    record, count = WITH_TOY[op], 6
    in_len, out_len = record.elements(count, n)
    for placement in record.placements:
        for chunk in range(n):
            send, recv = build_buffers(np.zeros, in_len, out_len, placement == "in", chunk)
            assert (len(send), len(recv)) == (in_len, out_len)
            assert np.shares_memory(send, recv) == (placement == "in")
            if placement == "in" and in_len != out_len:
                small, big = (recv, send) if in_len > out_len else (send, recv)
                small[:] = 1
                assert list(np.flatnonzero(big)) == list(range(chunk * len(small), (chunk + 1) * len(small)))


# ---- the toy collective on real ranks ---------------------------------------------------------

def _toy_sweeps(backend, topo, out: Path) -> None:
    """Rank 0 writes the rows of a clean and a corrupted sweep of the toy (and all_gather, a
    registered one, beside it) run with the registry copy WITH_TOY."""
    from tierzero.collectives_bench.runner import run_sweep
    from tierzero.collectives_bench.scopes import resolve_scopes

    cfg = BenchConfig(ops=["scatter", "all_gather"], sizes="4K,16K", iters=2, warmup=1, scopes=["global"])
    assert cfg.errors(WITH_TOY) == []
    scopes = resolve_scopes(cfg.scopes, topo)
    labels = ["h"] * topo.world_size
    result = {}
    for name, corrupt_op in (("clean", None), ("corrupt", "scatter")):
        printed = []
        sweep = run_sweep(backend, topo, cfg, scopes, parse_sizes(cfg.sizes), labels,
                          emit=lambda line: printed.append(format_line(line)), corrupt_op=corrupt_op,
                          collectives=WITH_TOY)
        if backend.rank == 0:
            compare_lines(sweep.rows, cfg.slow_fraction, "test")  # the report needs no lookup by name
            result[name] = {"rows": [dataclasses.asdict(r) for r in sweep.rows], "printed": printed}
    if backend.rank == 0:
        out.write_text(json.dumps(result))


def _toy_rank(rank: int, world: int, rdzv: str, out: str) -> None:
    import torch.distributed as dist

    from tierzero.collectives_bench.backends import TorchBackend
    from tierzero.parallel.topology import flat_topology

    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    _toy_sweeps(TorchBackend("cpu"), flat_topology(world, 1), Path(out))
    dist.destroy_process_group()


def check_toy_sweeps(out: Path, backend: str) -> None:
    result = json.loads(out.read_text())
    sizes = parse_sizes("4K,16K")
    for name, wrong in (("clean", 0), ("corrupt", 1)):
        rows = result[name]["rows"]
        toy = [r for r in rows if r["op"] == "scatter"]
        assert {(r["size_bytes"], r["placement"]) for r in toy} == {(s, p) for s in sizes for p in TOY.placements}
        assert {(r["nranks"], r["backend"]) for r in rows} == {(2, backend)}
        # the fault hits only the toy: one element on the first rank of the one group
        assert [r["wrong"] for r in toy] == [wrong] * len(toy), name
        assert all(r["wrong"] == 0 for r in rows if r["op"] == "all_gather"), name
        check_bandwidth_columns(rows)
        scatter_lines = [ln for ln in result[name]["printed"] if ln.split()[0] == "scatter"]
        assert len(scatter_lines) == len(sizes) and all(ln.split()[5:7] == ["none", "0"] for ln in scatter_lines)


@pytest.mark.multiprocess
def test_a_new_collective_is_one_record(tmp_path):
    """TOY, in a copy of the registry and nowhere else, is validated, timed and checked by the
    torch backend on 2 gloo ranks, and the corrupt_op fault is caught in it."""
    import torch.multiprocessing as mp

    out = tmp_path / "toy.json"
    mp.spawn(_toy_rank, args=(2, str(tmp_path / "rdzv"), str(out)), nprocs=2, join=True)
    check_toy_sweeps(out, "gloo")


@pytest.mark.multiprocess
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun (pip install mpich mpi4py)")
def test_a_new_collective_under_mpirun(tmp_path):
    pytest.importorskip("mpi4py", reason="the mpi backend times mpi4py collectives")
    out = tmp_path / "toy.json"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; import test_bench as t; "
            "from tierzero.collectives_bench.backends import MpiBackend; "
            "from tierzero.parallel.topology import flat_topology; "
            "t._toy_sweeps(MpiBackend(), flat_topology(2, 1), Path(sys.argv[2]))")
    run_cmd(["mpirun", "-n", "2", sys.executable, "-c", code, str(Path(__file__).parent), str(out)], tmp_path)
    check_toy_sweeps(out, "mpi")


# ---- the CLI, end to end ----------------------------------------------------------------------

def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TIERZERO_BENCH_FAULT")}
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def run_cmd(argv, tmp_path, *, expect=0, timeout=180, **env):
    r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=_env(**env), timeout=timeout)
    assert r.returncode == expect, \
        f"{argv} exited {r.returncode}, expected {expect}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def tierzero(args, tmp_path, **kw):
    return run_cmd([sys.executable, "-m", "tierzero.launcher.cli", *args], tmp_path, **kw)


def bench_rows(run_dir: Path):
    from tierzero.telemetry.report import load_table

    return load_table(str(run_dir / "telemetry"), "collectives").to_pylist()


def check_bandwidth_columns(rows):
    """Every row's bandwidths follow from its own size and time by nccl-tests' definitions."""
    for r in rows:
        alg, bus, _ = nccl_tests_bw(r["op"], r["nranks"], r["size_bytes"], r["time_us"] * 1e-6)
        assert r["algbw_gbps"] == pytest.approx(r["size_bytes"] / r["time_us"] / 1e3, rel=1e-9)
        assert r["busbw_gbps"] == pytest.approx(
            r["size_bytes"] / r["time_us"] / 1e3 * bus_factor(WITH_TOY[r["op"]], r["nranks"]), rel=1e-9)
        assert (r["algbw_gbps"], r["busbw_gbps"]) == (pytest.approx(alg, rel=1e-9), pytest.approx(bus, rel=1e-9))
        assert r["time_min_us"] <= r["time_us"] <= r["time_max_us"]
        assert r["count"] * 4 == r["size_bytes"]  # float32


@pytest.mark.multiprocess
def test_every_op_on_four_local_ranks(tmp_path):
    run_dir = tmp_path / "run"
    sizes = parse_sizes("4K:16K")
    r = tierzero(["bench", "bench.sizes=4K:16K", *FAST, "launcher.nproc=4", f"run.dir={run_dir}"], tmp_path)
    assert "Out of bounds values : 0 OK" in r.stdout
    rows = bench_rows(run_dir)
    assert {row["op"] for row in rows} == set(OPS)
    for op in OPS:
        mine = [row for row in rows if row["op"] == op]
        assert len(mine) == len(sizes) * len(PLACEMENTS[op]), op
        assert {(row["size_bytes"], row["placement"]) for row in mine} == \
            {(s, p) for s in sizes for p in PLACEMENTS[op]}
    assert {row["scope"] for row in rows} == {"global"}
    assert {(row["ranks"], row["nranks"], row["backend"], row["dtype"]) for row in rows} == \
        {("0,1,2,3", 4, "gloo", "float32")}
    assert all(row["wrong"] == 0 for row in rows)
    check_bandwidth_columns(rows)
    png = run_dir / "bench" / "busbw.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert (run_dir / "bench" / "config.yaml").is_file()
    assert (run_dir / "bench" / "bench.txt").read_text().count("Out of bounds values : 0 OK") == 1
    assert not (run_dir / "config.yaml").exists(), "bench must leave the run's own config.yaml alone"


@pytest.mark.multiprocess
def test_a_corrupted_result_is_caught_in_every_scope(tmp_path):
    from tierzero.launcher.exitcodes import Exit

    FAULT_ENV = "TIERZERO_BENCH_FAULT"  # read by the launcher, which passes run_sweep(corrupt_op=...)

    run_dir = tmp_path / "run"
    r = tierzero(["bench", "bench.ops=[all_reduce,all_gather]", "bench.sizes=4K:8K", *FAST,
                  "topology.emulate=[2,2]", "launcher.nproc=4", f"run.dir={run_dir}"], tmp_path,
                 expect=Exit.WRONG_RESULTS, **{FAULT_ENV: "all_gather"})
    assert "FAILED" in r.stdout
    rows = bench_rows(run_dir)
    assert {row["scope"] for row in rows} == {"global", "level:node", "cross:node"}
    gathers = [row for row in rows if row["op"] == "all_gather"]
    reduces = [row for row in rows if row["op"] == "all_reduce"]
    # 3 scopes with 1 + 2 + 2 groups, 2 sizes, 2 placements (and 1 placement for all_reduce)
    assert len(gathers) == 5 * 2 * 2 and len(reduces) == 5 * 2
    # the fault adds 1 to one element on the first rank of each group: exactly one wrong
    assert all(row["wrong"] == 1 for row in gathers), [row["wrong"] for row in gathers]
    assert all(row["wrong"] == 0 for row in reduces)
    node = [row for row in rows if row["scope"] == "level:node"]
    assert {(row["group"], row["ranks"]) for row in node} == {(0, "0,1"), (1, "2,3")}
    for row in node:
        assert row["hosts"].endswith(f"node{row['group']}") and "," not in row["hosts"]
    cross = [row for row in rows if row["scope"] == "cross:node"]
    assert {(row["group"], row["ranks"]) for row in cross} == {(0, "0,2"), (1, "1,3")}
    assert all("node0" in row["hosts"] and "node1" in row["hosts"] for row in cross)
    check_bandwidth_columns(rows)


def test_bad_scope_exits_2_before_writing_anything(tmp_path):
    run_dir = tmp_path / "x"
    r = tierzero(["bench", "bench.scopes=[level:rack]", f"run.dir={run_dir}"], tmp_path, expect=2)
    # on one node the only scope with anything to send is global: the message offers just it
    assert "level:rack" in r.stderr and "['global']" in r.stderr
    assert not run_dir.exists()


def test_mpi_backend_outside_mpirun_exits_2(tmp_path):
    run_dir = tmp_path / "x"
    r = tierzero(["bench", "bench.backend=mpi", f"run.dir={run_dir}"], tmp_path, expect=2)
    assert "mpirun" in r.stderr and "bench.backend=mpi" in r.stderr
    assert not run_dir.exists()


@pytest.mark.multiprocess
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun (pip install mpich mpi4py)")
def test_mpi_backend_under_mpirun(tmp_path):
    pytest.importorskip("mpi4py", reason="the mpi backend times mpi4py collectives")
    run_dir = tmp_path / "run"
    r = run_cmd(["mpirun", "-n", "4", sys.executable, "-m", "tierzero.launcher.cli", "bench", "bench.backend=mpi",
                 "bench.sizes=4K:8K", *FAST, f"run.dir={run_dir}"], tmp_path)
    assert "Out of bounds values : 0 OK" in r.stdout
    rows = bench_rows(run_dir)
    assert {row["op"] for row in rows} == set(OPS)
    assert {row["backend"] for row in rows} == {"mpi"}
    assert {row["nranks"] for row in rows} == {4}
    # in-place and out-of-place both checked (in-place Reduce_scatter_block leaves the result in front)
    assert {row["placement"] for row in rows if row["op"] == "reduce_scatter"} == {"out", "in"}
    assert all(row["wrong"] == 0 for row in rows)
    check_bandwidth_columns(rows)


@pytest.mark.multiprocess
def test_torchrun_two_ranks(tmp_path):
    run_dir = tmp_path / "run"
    # --standalone: a free rendezvous port, not the fixed 29500
    run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             "-m", "tierzero.launcher.cli", "bench", "bench.ops=[all_reduce]", "bench.sizes=4K", *FAST,
             f"run.dir={run_dir}"], tmp_path)
    rows = bench_rows(run_dir)
    assert len(rows) == 1
    assert (rows[0]["op"], rows[0]["nranks"], rows[0]["ranks"], rows[0]["wrong"]) == ("all_reduce", 2, "0,1", 0)
    check_bandwidth_columns(rows)


@pytest.mark.multiprocess
def test_probe_writes_measured_levels(tmp_path):
    run_dir = tmp_path / "run"
    r = tierzero(["bench", "--probe", "topology.emulate=[2,2]", "launcher.nproc=4", f"run.dir={run_dir}"], tmp_path)
    assert "measured topology" in r.stdout
    data = json.loads((run_dir / "bench" / "topology.json").read_text())
    levels = data["levels"]
    assert [(lv["name"], lv["size"]) for lv in levels] == [("node", 2), ("cluster", 2)]
    assert data["update_gelems_per_s"] > 0  # the optimizer-update rate, every rank at once
    assert data["codec_gelems_per_s"] > 0  # the block-quantization rate, likewise
    assert all(math.isfinite(lv["bandwidth_gbps"]) and lv["bandwidth_gbps"] > 0 for lv in levels)
    assert all(0 < lv["latency_us"] < 1e6 for lv in levels)  # per-step latency of each level
    # a per-flow limit only where one flow leaves each unit below and reaches clearly less than
    # the whole uplink (two ranks per node: 2 x the per-rank figure); never on the innermost level
    node, cluster = levels
    assert node["flow_gbps"] is None
    assert cluster["flow_gbps"] is None or 0 < cluster["flow_gbps"] < 0.85 * 2 * cluster["bandwidth_gbps"]
    for lv in levels:  # one figure per op a plan issues, the level's own being all_gather's
        ops = dict(lv["op_bandwidths_gbps"])
        assert set(ops) == {"all_gather", "reduce_scatter", "all_reduce"}
        assert ops["all_gather"] == lv["bandwidth_gbps"] and all(v > 0 for v in ops.values())
    assert not list((run_dir / "telemetry").glob("collectives/**/*.parquet")), "the probe runs no sweep"


@pytest.mark.multiprocess
def test_plan_with_measured_topology(tmp_path):
    run_dir = tmp_path / "run"
    r = tierzero(["plan", "topology.emulate=[2,2]", "launcher.nproc=4", "topology.measure=true",
                  f"run.dir={run_dir}"], tmp_path)
    head = [ln for ln in r.stdout.splitlines() if ln.startswith("# tierzero plan")]
    assert len(head) == 1 and "(measured)" in head[0], r.stdout
    # both levels carry a measured figure ("node x2 @ ... GB/s, cluster x2 @ ... GB/s")
    assert head[0].count(" GB/s") == 2
    assert "unknown" not in r.stdout
    # the measured update rate adds the update column, and auto weighs it
    table = r.stdout.splitlines()
    header = next(ln for ln in table if ln.startswith("plan "))
    assert "update s" in header
    assert "optimizer update measured at" in r.stdout
