"""The two ways to run a collective: torch.distributed (the job's gloo/nccl process group)
and MPI (mpi4py on host numpy buffers). Each gives the runner the same small surface:
global barrier and gather, one group handle per scope, and a Case per (op, placement, size).
A backend builds the buffers the same way for every collective (ops.Collective.elements)
and asks the collective's record for the call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import numpy as np

from tierzero.collectives_bench.formulas import pattern
from tierzero.collectives_bench.ops import Op, collective
from tierzero.collectives_bench.scopes import Scope

SENTINEL = 99.0
"""Written into output buffers before a checked op: a value no collective of the test pattern produces."""


@dataclass
class Group:
    handle: Any
    """torch ProcessGroup (None = the world) or an MPI communicator."""
    ranks: tuple
    index: int
    """This rank's position in ranks (its rank inside the group)."""
    group_id: int
    """Which group of the scope this rank is in."""

    @property
    def size(self) -> int:
        return len(self.ranks)


class Case:
    """Buffers and the call for one (op, placement, element count) on one group.
    `send` and `recv` may alias (in place)."""

    def __init__(self, send, recv, call: Callable[[], None], to_numpy: Callable[[Any], np.ndarray],
                 write: Callable[[Any, np.ndarray], None], group_index: int):
        self.send, self.recv, self.call = send, recv, call
        self._to_numpy, self._write, self._index = to_numpy, write, group_index

    def fill_zero(self) -> None:
        """Timing contents: zeros, so repeated in-place sums never overflow."""
        self._write(self.recv, np.zeros(len(self.recv)))
        self._write(self.send, np.zeros(len(self.send)))

    def fill_pattern(self) -> None:
        """Check contents: the sentinel in the output, then the rank's pattern in the input
        (last, since an in-place input is a view of the output)."""
        self._write(self.recv, np.full(len(self.recv), SENTINEL))
        self._write(self.send, pattern(self._index, 0, len(self.send)))

    def output(self) -> np.ndarray:
        return self._to_numpy(self.recv)


def build_buffers(empty: Callable[[int], Any], in_len: int, out_len: int, in_place: bool, chunk: int):
    """(send, recv) of in_len and out_len elements. In place, one is a view of the other: the
    same buffer when the lengths agree, else the smaller is chunk `chunk` of the larger."""
    if not in_place:
        return empty(in_len), empty(out_len)
    if in_len == out_len:
        buf = empty(in_len)
        return buf, buf
    small = min(in_len, out_len)
    big = empty(max(in_len, out_len))
    view = big[chunk * small:(chunk + 1) * small]
    return (big, view) if in_len > out_len else (view, big)


class TorchBackend:

    def __init__(self, device: str = "cpu"):
        import torch
        import torch.distributed as dist

        self.torch, self.dist, self.device = torch, dist, device
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.name = dist.get_backend()  # gloo / nccl: what the rows record

    def barrier(self) -> None:
        self.dist.barrier()

    def gather(self, obj) -> Optional[List]:
        out = [None] * self.world_size if self.rank == 0 else None
        self.dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def group(self, scope: Scope) -> Group:
        """Every rank calls this for every scope, in the same order (group creation is collective)."""
        gid = scope.group_of(self.rank)
        ranks = scope.groups[gid]
        if len(scope.groups) == 1 and len(ranks) == self.world_size:
            pg = None
        else:
            pg, _ = self.dist.new_subgroups_by_enumeration([list(g) for g in scope.groups])
        return Group(pg, ranks, ranks.index(self.rank), gid)

    def case(self, op: Op, placement: str, count: int, dtype: str, g: Group) -> Case:
        """`op` is a collective's name or its record; `count` the elements of the whole buffer S."""
        torch, coll = self.torch, collective(op)
        tdtype = getattr(torch, dtype)
        in_len, out_len = coll.elements(count, g.size)
        send, recv = build_buffers(lambda k: torch.empty(k, dtype=tdtype, device=self.device), in_len, out_len,
                                   placement == "in", g.index)
        call = coll.torch_call(self.dist, send, recv, g, placement == "in")

        def write(t, values):
            t.copy_(torch.from_numpy(values).to(tdtype))

        return Case(send, recv, call, lambda t: t.float().cpu().numpy(), write, g.index)


class MpiBackend:
    """mpi4py on numpy float32 buffers; imported only here (mpi4py initialises MPI on import)."""

    name = "mpi"

    def __init__(self):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        self.version = MPI.Get_library_version().strip().splitlines()[0][:60]

    def barrier(self) -> None:
        self.comm.Barrier()

    def gather(self, obj) -> Optional[List]:
        return self.comm.gather(obj, root=0)

    def broadcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def sync(self) -> None:
        pass

    def group(self, scope: Scope) -> Group:
        gid = scope.group_of(self.rank)
        ranks = scope.groups[gid]
        sub = self.comm.Split(color=gid, key=ranks.index(self.rank))
        return Group(sub, ranks, ranks.index(self.rank), gid)

    def case(self, op: Op, placement: str, count: int, dtype: str, g: Group) -> Case:
        """As TorchBackend.case, on numpy float32 buffers."""
        assert dtype == "float32", "config validation keeps the MPI backend to float32"
        coll = collective(op)
        in_len, out_len = coll.elements(count, g.size)
        send, recv = build_buffers(lambda k: np.empty(k, dtype=np.float32), in_len, out_len, placement == "in",
                                   0 if coll.mpi_in_place_at_front else g.index)
        call = coll.mpi_call(self.MPI, send, recv, g, placement == "in")

        def write(a, values):
            a[:] = values

        return Case(send, recv, call, lambda a: np.asarray(a, dtype=np.float64), write, g.index)
