"""The two ways to run a collective: torch.distributed (the job's gloo/nccl process group)
and MPI (mpi4py on host numpy buffers). Each gives the runner the same small surface:
global barrier and gather, one group handle per scope, and a Case per (op, placement, size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import numpy as np

from tierzero.collectives_bench.formulas import CHUNKED, pattern
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


def _split(count: int, n: int, r: int, op: str):
    c = count // n if op in CHUNKED else count
    return c, slice(r * c, (r + 1) * c)


class TorchBackend:

    def __init__(self, device: str = "cpu"):
        import torch
        import torch.distributed as dist

        self.torch, self.dist, self.device = torch, dist, device
        # torch 2.13 renamed the tensor forms; older releases (>= 2.3) have only the old names
        self._all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
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

    def case(self, op: str, placement: str, count: int, dtype: str, g: Group) -> Case:
        torch, dist = self.torch, self.dist
        tdtype = getattr(torch, dtype)
        n, r, pg = g.size, g.index, g.handle
        c, mine = _split(count, n, r, op)

        def empty(k):
            return torch.empty(k, dtype=tdtype, device=self.device)

        if op in ("all_reduce", "broadcast", "reduce"):
            send = recv = empty(count)
            call = {
                "all_reduce": lambda: dist.all_reduce(recv, group=pg),
                "broadcast": lambda: dist.broadcast(recv, src=g.ranks[0], group=pg),
                "reduce": lambda: dist.reduce(recv, dst=g.ranks[0], group=pg),
            }[op]
        elif op == "reduce_scatter":
            send = empty(count)
            recv = send[mine] if placement == "in" else empty(c)
            call = lambda: self._reduce_scatter(recv, send, group=pg)  # noqa: E731
        elif op == "all_gather":
            recv = empty(count)
            send = recv[mine] if placement == "in" else empty(c)
            call = lambda: self._all_gather(recv, send, group=pg)  # noqa: E731
        elif op == "all_to_all":
            send, recv = empty(count), empty(count)
            call = lambda: dist.all_to_all_single(recv, send, group=pg)  # noqa: E731
        elif op == "sendrecv":
            send, recv = empty(count), empty(count)
            p2p = [dist.P2POp(dist.isend, send, g.ranks[(r + 1) % n], pg),
                   dist.P2POp(dist.irecv, recv, g.ranks[(r - 1) % n], pg)]

            def call():
                for work in dist.batch_isend_irecv(p2p):
                    work.wait()
        else:
            raise ValueError(f"unknown collective {op!r}")

        def write(t, values):
            t.copy_(torch.from_numpy(values).to(tdtype))

        return Case(send, recv, call, lambda t: t.float().cpu().numpy(), write, r)


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

    def case(self, op: str, placement: str, count: int, dtype: str, g: Group) -> Case:
        MPI, comm = self.MPI, g.handle
        n, r = g.size, g.index
        c, mine = _split(count, n, r, op)
        assert dtype == "float32", "config validation keeps the MPI backend to float32"

        def empty(k):
            return np.empty(k, dtype=np.float32)

        if op == "all_reduce":
            send = recv = empty(count)
            call = lambda: comm.Allreduce(MPI.IN_PLACE, recv, op=MPI.SUM)  # noqa: E731
        elif op == "broadcast":
            send = recv = empty(count)
            call = lambda: comm.Bcast(recv, root=0)  # noqa: E731
        elif op == "reduce":
            send = recv = empty(count)
            if r == 0:
                call = lambda: comm.Reduce(MPI.IN_PLACE, recv, op=MPI.SUM, root=0)  # noqa: E731
            else:
                call = lambda: comm.Reduce(recv, None, op=MPI.SUM, root=0)  # noqa: E731
        elif op == "reduce_scatter":
            send = empty(count)
            if placement == "in":
                # MPI's in-place reduce-scatter leaves the result at the front of the buffer
                recv = send[:c]
                call = lambda: comm.Reduce_scatter_block(MPI.IN_PLACE, send, op=MPI.SUM)  # noqa: E731
            else:
                recv = empty(c)
                call = lambda: comm.Reduce_scatter_block(send, recv, op=MPI.SUM)  # noqa: E731
        elif op == "all_gather":
            recv = empty(count)
            if placement == "in":
                send = recv[mine]
                call = lambda: comm.Allgather(MPI.IN_PLACE, recv)  # noqa: E731
            else:
                send = empty(c)
                call = lambda: comm.Allgather(send, recv)  # noqa: E731
        elif op == "all_to_all":
            send, recv = empty(count), empty(count)
            call = lambda: comm.Alltoall(send, recv)  # noqa: E731
        elif op == "sendrecv":
            send, recv = empty(count), empty(count)
            call = lambda: comm.Sendrecv(send, dest=(r + 1) % n, recvbuf=recv, source=(r - 1) % n)  # noqa: E731
        else:
            raise ValueError(f"unknown collective {op!r}")

        def write(a, values):
            a[:] = values

        return Case(send, recv, call, lambda a: np.asarray(a, dtype=np.float64), write, r)
