"""One record per collective, as nccl-tests keeps one test per collective.

Everything that differs between collectives lives in its record: the placements it has,
its bus factor, how the whole buffer S splits into a rank's input and output, the value
each rank must hold afterwards, the link pattern of the peak model, and the call that
torch.distributed and mpi4py make on buffers the backend built. Config validation,
formulas, backends, scopes and the report look a collective up here and branch on
nothing else, so adding one is one record below plus its test.

torch and mpi4py are never imported here (the calls get torch.distributed or mpi4py's MPI
from the backend) and numpy only when a result is computed, so that config validation,
which reads the names, stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Tuple, Union

if TYPE_CHECKING:
    import numpy as np

Inputs = Callable[[int, int, int], "np.ndarray"]
"""inputs(k, start, count): elements start..start+count of the input of the rank at group position k."""
Bind = Callable[[Any, Any, Any, Any, bool], Callable[[], None]]
"""(library, send, recv, group, in_place) -> the call, made once per case so that binding
costs nothing inside the timed block. library is torch.distributed or mpi4py's MPI; group
is a backends.Group (its handle, global ranks and this rank's index)."""

PLACEMENT_ORDER = ("out", "in")
LINKS = ("ring", "all_to_all")


@dataclass(frozen=True)
class Collective:
    name: str
    """What bench.ops, the rows and the printed lines call it."""
    placements: Tuple[str, ...]
    """Out-of-place and/or in-place ("out", "in", in that order), as far as torch.distributed can express them."""
    bus_factor: Callable[[int], float]
    """n -> busbw / algbw (nccl-tests doc/PERFORMANCE.md)."""
    chunked: bool
    """S is split into n chunks, one per rank, so S must be a multiple of n elements."""
    elements: Callable[[int, int], Tuple[int, int]]
    """(S in elements, n) -> (elements of a rank's input, elements of its output)."""
    expected: Callable[[Inputs, int, int, int], Optional["np.ndarray"]]
    """(inputs, S, n, r) -> the output of the rank at group position r; None where the op leaves it undefined."""
    torch_call: Bind
    """The torch.distributed call."""
    mpi_call: Bind
    """The mpi4py call (host float32 buffers)."""
    link: str = "ring"
    """Traffic pattern of the peak model (parallel.topology.traffic_edges): ring or all_to_all."""
    rooted: bool = False
    """Group position 0 is the root (nccl-tests' root column)."""
    redop: str = "none"
    """The reduction, as nccl-tests' redop column shows it: sum, or none."""
    mpi_in_place_at_front: bool = False
    """In place, the smaller buffer is the first chunk of the larger one rather than this rank's chunk."""

    def __post_init__(self):
        if not self.placements or tuple(p for p in PLACEMENT_ORDER if p in self.placements) != self.placements:
            raise ValueError(f"collective {self.name!r}: placements={self.placements} must be a non-empty "
                             f"subsequence of {PLACEMENT_ORDER}")
        if self.link not in LINKS:
            raise ValueError(f"collective {self.name!r}: link={self.link!r} is not one of {list(LINKS)}")


# ---- bus factors: nccl-tests doc/PERFORMANCE.md -----------------------------------------

def ring_all_reduce_factor(n: int) -> float:
    """2(n-1)/n: a ring all-reduce is a reduce-scatter then an all-gather."""
    return 2 * (n - 1) / n


def spread_factor(n: int) -> float:
    """(n-1)/n: every rank sends (or receives) all but its own chunk of S."""
    return (n - 1) / n


def unit_factor(n: int) -> float:
    """1: the whole of S crosses every link once, whatever n is."""
    return 1.0


# ---- how S splits into a rank's input and output -----------------------------------------

def whole_to_whole(count: int, n: int) -> Tuple[int, int]:
    """Input and output are both all of S."""
    return count, count


def whole_to_chunk(count: int, n: int) -> Tuple[int, int]:
    """Input: all of S; output: the rank's chunk."""
    return count, count // n


def chunk_to_whole(count: int, n: int) -> Tuple[int, int]:
    """Input: the rank's chunk; output: all of S."""
    return count // n, count


def _concat(parts):
    import numpy as np

    return np.concatenate(list(parts))


def _tensor_fn(dist, new: str, old: str):
    # torch 2.13 renamed the tensor forms; older releases (>= 2.3) have only the old names
    return getattr(dist, new, None) or getattr(dist, old)


# ---- the collectives, in nccl-tests' order -------------------------------------------------

def _reduce_scatter_torch(dist, send, recv, g, in_place):
    f = _tensor_fn(dist, "reduce_scatter_single", "reduce_scatter_tensor")
    return lambda: f(recv, send, group=g.handle)


def _reduce_scatter_mpi(MPI, send, recv, g, in_place):
    if in_place:
        return lambda: g.handle.Reduce_scatter_block(MPI.IN_PLACE, send, op=MPI.SUM)
    return lambda: g.handle.Reduce_scatter_block(send, recv, op=MPI.SUM)


def _all_gather_torch(dist, send, recv, g, in_place):
    f = _tensor_fn(dist, "all_gather_single", "all_gather_into_tensor")
    return lambda: f(recv, send, group=g.handle)


def _all_gather_mpi(MPI, send, recv, g, in_place):
    if in_place:
        return lambda: g.handle.Allgather(MPI.IN_PLACE, recv)
    return lambda: g.handle.Allgather(send, recv)


def _reduce_mpi(MPI, send, recv, g, in_place):
    if g.index == 0:
        return lambda: g.handle.Reduce(MPI.IN_PLACE, recv, op=MPI.SUM, root=0)
    return lambda: g.handle.Reduce(recv, None, op=MPI.SUM, root=0)


def _sendrecv_torch(dist, send, recv, g, in_place):
    n, r = g.size, g.index
    p2p = [dist.P2POp(dist.isend, send, g.ranks[(r + 1) % n], g.handle),
           dist.P2POp(dist.irecv, recv, g.ranks[(r - 1) % n], g.handle)]

    def call():
        for work in dist.batch_isend_irecv(p2p):
            work.wait()
    return call


def _sendrecv_mpi(MPI, send, recv, g, in_place):
    n, r = g.size, g.index
    return lambda: g.handle.Sendrecv(send, dest=(r + 1) % n, recvbuf=recv, source=(r - 1) % n)


ALL_REDUCE = Collective(
    "all_reduce", ("in",), ring_all_reduce_factor, chunked=False, elements=whole_to_whole,
    expected=lambda x, s, n, r: sum(x(k, 0, s) for k in range(n)),
    torch_call=lambda dist, send, recv, g, in_place: lambda: dist.all_reduce(recv, group=g.handle),
    mpi_call=lambda MPI, send, recv, g, in_place: lambda: g.handle.Allreduce(MPI.IN_PLACE, recv, op=MPI.SUM),
    redop="sum",
)
REDUCE_SCATTER = Collective(
    "reduce_scatter", ("out", "in"), spread_factor, chunked=True, elements=whole_to_chunk,
    # rank r keeps chunk r of the sum
    expected=lambda x, s, n, r: sum(x(k, r * (s // n), s // n) for k in range(n)),
    torch_call=_reduce_scatter_torch, mpi_call=_reduce_scatter_mpi,
    redop="sum",
    # MPI_Reduce_scatter_block with MPI_IN_PLACE leaves the result at the front of the buffer
    mpi_in_place_at_front=True,
)
ALL_GATHER = Collective(
    "all_gather", ("out", "in"), spread_factor, chunked=True, elements=chunk_to_whole,
    expected=lambda x, s, n, r: _concat(x(k, 0, s // n) for k in range(n)),
    torch_call=_all_gather_torch, mpi_call=_all_gather_mpi,
)
BROADCAST = Collective(
    "broadcast", ("in",), unit_factor, chunked=False, elements=whole_to_whole,
    expected=lambda x, s, n, r: x(0, 0, s),
    torch_call=lambda dist, send, recv, g, in_place: lambda: dist.broadcast(recv, src=g.ranks[0], group=g.handle),
    mpi_call=lambda MPI, send, recv, g, in_place: lambda: g.handle.Bcast(recv, root=0),
    rooted=True,
)
ALL_TO_ALL = Collective(
    "all_to_all", ("out",), spread_factor, chunked=True, elements=whole_to_whole,
    # a transpose of chunks: rank r gets chunk r of every rank, in rank order
    expected=lambda x, s, n, r: _concat(x(k, r * (s // n), s // n) for k in range(n)),
    torch_call=lambda dist, send, recv, g, in_place: lambda: dist.all_to_all_single(recv, send, group=g.handle),
    mpi_call=lambda MPI, send, recv, g, in_place: lambda: g.handle.Alltoall(send, recv),
    link="all_to_all",
)
REDUCE = Collective(
    "reduce", ("in",), unit_factor, chunked=False, elements=whole_to_whole,
    # only the root's buffer is defined afterwards
    expected=lambda x, s, n, r: sum(x(k, 0, s) for k in range(n)) if r == 0 else None,
    torch_call=lambda dist, send, recv, g, in_place: lambda: dist.reduce(recv, dst=g.ranks[0], group=g.handle),
    mpi_call=_reduce_mpi,
    rooted=True, redop="sum",
)
SENDRECV = Collective(
    "sendrecv", ("out",), unit_factor, chunked=False, elements=whole_to_whole,
    # a ring shift: r sends to r+1 and receives from r-1
    expected=lambda x, s, n, r: x((r - 1) % n, 0, s),
    torch_call=_sendrecv_torch, mpi_call=_sendrecv_mpi,
)


def registry(*records: Collective) -> Mapping[str, Collective]:
    """name -> record, in the order given (read-only)."""
    by_name = {c.name: c for c in records}
    if len(by_name) != len(records):
        raise ValueError(f"two collectives share a name: {[c.name for c in records]}")
    return MappingProxyType(by_name)


COLLECTIVES = registry(ALL_REDUCE, REDUCE_SCATTER, ALL_GATHER, BROADCAST, ALL_TO_ALL, REDUCE, SENDRECV)

Op = Union[str, Collective]
"""A collective's name (looked up in COLLECTIVES) or its record."""


def collective(op: Op, collectives: Mapping[str, Collective] = COLLECTIVES) -> Collective:
    """The record of `op`; a record passes through, so a registry other than COLLECTIVES can be used."""
    if isinstance(op, Collective):
        return op
    try:
        return collectives[op]
    except KeyError:
        raise ValueError(f"unknown collective {op!r}; choose from {list(collectives)}") from None
