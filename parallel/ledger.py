"""The byte ledger: every collective the engine issues, counted as it is issued.

Bytes use the same per-rank conventions as the cost model (parallel/cost.py), computed from
the tensors actually passed to torch.distributed, so `measured == predicted` is a real check.

Time is from issue to completion. On CPU that is the host's wait(); on a GPU, wait() only makes
the compute stream wait for the collective, so the time comes from CUDA events recorded on the
compute stream at the issue and after the wait, read once per step in take().

Issue-to-completion includes waiting for a member that arrives late (still computing, or
encoding, on a shared core). `aligned` timing (parallel.comm_timing=aligned, CPU only) takes
that out: the members meet at a barrier first, its wait booked apart as wait_s, and the
collective is waited at once, so time_s is the transfer alone -- what the cost model predicts
-- at the price of one small-message round per collective and of any overlap.

On NCCL a collective over chunks that are consecutive views of one buffer in the group's rank
order goes out as one single-tensor call (all_gather_into_tensor, reduce_scatter_tensor) with
no temporary buffer; chunks in another order go through one contiguous staging buffer and one
copy. gloo keeps the list calls and tierzero's own rings (below).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class CommGroup:
    """A process group with what the ledger needs to know about it."""
    pg: Optional[dist.ProcessGroup]
    ranks: Tuple[int, ...]
    level: str
    """Outermost topology level the group spans."""
    pg_back: Optional[dist.ProcessGroup] = None
    """A second process group over the same two ranks (gloo, groups of two): a ring's send
    and receive go to the same peer there, and on one gloo pair they take turns, so each
    direction gets about half the link; with one direction on each group they overlap
    (measured: docs/benchmarks.md, Figures behind design choices)."""

    @property
    def size(self) -> int:
        return len(self.ranks)

    def index(self, rank: int) -> int:
        return self.ranks.index(rank)


class _RingWork:
    """Ring reduce-scatter from send/recv (n-1 exchanges of one chunk with the neighbours).

    Member i starts by sending its own chunk i-1; at exchange s it receives the partial sum
    of chunk i-2-s from member i-1, adds its own, and passes it on; after n-1 exchanges it
    holds chunk i summed over all members. The last exchange lands in `output`, and at most
    one more buffer is allocated (fresh 16 MB buffers cost more page faults than the add).
    Runs to completion when created."""

    def __init__(self, output: torch.Tensor, inputs: Sequence[torch.Tensor], group: CommGroup):
        n = group.size
        i = group.index(dist.get_rank())
        nxt, prv = group.ranks[(i + 1) % n], group.ranks[(i - 1) % n]
        into_output = not any(x.untyped_storage().data_ptr() == output.untyped_storage().data_ptr() for x in inputs)
        send, free = inputs[(i - 1) % n].contiguous(), []
        for s in range(n - 1):
            last = s == n - 2
            recv = output if last and into_output else (free.pop() if free else torch.empty_like(output))
            self._exchange(send, nxt, recv, prv, group, i)
            recv.add_(inputs[(i - 2 - s) % n])
            if s > 0:
                free.append(send)  # a buffer of ours (step 0 sent an input)
            send = recv
        if not into_output:
            output.copy_(send)

    @staticmethod
    def _exchange(send: torch.Tensor, nxt: int, recv: torch.Tensor, prv: int, group: CommGroup, i: int) -> None:
        if group.pg_back is not None:
            # member 0 sends on pg, member 1 on pg_back: each direction has its own pair
            send_pg, recv_pg = (group.pg, group.pg_back) if i == 0 else (group.pg_back, group.pg)
            works = [dist.isend(send, nxt, group=send_pg), dist.irecv(recv, prv, group=recv_pg)]
        else:
            ops = [dist.P2POp(dist.isend, send, nxt, group.pg), dist.P2POp(dist.irecv, recv, prv, group.pg)]
            works = dist.batch_isend_irecv(ops)
        for work in works:
            work.wait()

    def wait(self) -> None:
        return None


class _PairWork:
    """All-gather of a group of two (CPU, CommGroup.pg_back set): one exchange with the peer,
    each direction on its own process group, in flight until wait() (a prefetch stays one)."""

    def __init__(self, outputs: Sequence[torch.Tensor], shard: torch.Tensor, group: CommGroup):
        i = group.index(dist.get_rank())
        peer = group.ranks[1 - i]
        send_pg, recv_pg = (group.pg, group.pg_back) if i == 0 else (group.pg_back, group.pg)
        outputs[i].copy_(shard)
        self.works = [dist.isend(shard, peer, group=send_pg, tag=PAIR_GATHER_TAG),
                      dist.irecv(outputs[1 - i], peer, group=recv_pg, tag=PAIR_GATHER_TAG)]

    def wait(self) -> None:
        for work in self.works:
            work.wait()


class _PairExchange:
    """all_to_all_single of a group of two (CPU, CommGroup.pg_back set): this member's own rows
    copied, the peer's rows exchanged with one send and one receive on separate process groups."""

    def __init__(self, output: torch.Tensor, input: torch.Tensor, output_splits: Sequence[int],
                 input_splits: Sequence[int], group: CommGroup):
        i = group.index(dist.get_rank())
        peer = group.ranks[1 - i]
        send_pg, recv_pg = (group.pg, group.pg_back) if i == 0 else (group.pg_back, group.pg)
        ins, outs = input.split(list(input_splits)), output.split(list(output_splits))
        outs[i].copy_(ins[i])
        self.works = [dist.isend(ins[1 - i].contiguous(), peer, group=send_pg, tag=PAIR_EXCHANGE_TAG),
                      dist.irecv(outs[1 - i], peer, group=recv_pg, tag=PAIR_EXCHANGE_TAG)]

    def wait(self) -> None:
        for work in self.works:
            work.wait()


PAIR_GATHER_TAG = 1
PAIR_EXCHANGE_TAG = 2
"""Pair gathers and ring reduce-scatters (tag 0) may be in flight on one pair together: each
kind matches its own messages, in the order every rank issues them."""


class _Pending:
    def __init__(self, ledger: "ByteLedger", key, work, t0: float, start=None, after=None):
        self.ledger, self.key, self.work, self.t0, self.start, self.after = ledger, key, work, t0, start, after

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None
            if self.after is not None:
                self.after()
            if self.start is None:
                self.ledger._add_time(self.key, time.perf_counter() - self.t0)
            else:  # the compute stream now waits for the collective: its completion is an event there
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self.ledger._events.append((self.key, self.start, end))


def one_buffer(views: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The single tensor `views` tile in order (consecutive, equal, contiguous pieces of one
    storage), or None."""
    first = views[0]
    n = first.numel()
    if not all(v.is_contiguous() and v.numel() == n and v.dtype == first.dtype for v in views):
        return None
    ptr, off = first.untyped_storage().data_ptr(), first.storage_offset()
    if any(v.untyped_storage().data_ptr() != ptr or v.storage_offset() != off + i * n for i, v in enumerate(views)):
        return None
    return first.new_empty(0).set_(first.untyped_storage(), off, (n * len(views),))


def _is_nccl(group: CommGroup) -> bool:
    return group.pg is not None and dist.get_backend(group.pg) == "nccl"


class _Done:
    def wait(self) -> None:
        return None


class ByteLedger:
    def __init__(self, gpu: bool = False, aligned: bool = False):
        self.records: Dict[Tuple[str, str, str], List[float]] = {}
        """(phase, level, op) -> [bytes, seconds, calls, wait seconds] since the last take()."""
        self.gpu = gpu
        """Time collectives with CUDA events on the compute stream (the engine's device is a GPU)."""
        self.aligned = aligned and not gpu
        """Barrier before each collective, the collective waited at once (see the module docstring)."""
        self._events: List[Tuple[Tuple[str, str, str], "torch.cuda.Event", "torch.cuda.Event"]] = []

    def _add(self, key, nbytes: float) -> None:
        rec = self.records.setdefault(key, [0.0, 0.0, 0, 0.0])
        rec[0] += nbytes
        rec[2] += 1

    def _add_time(self, key, seconds: float) -> None:
        self.records[key][1] += seconds

    def take(self) -> List[dict]:
        if self._events:  # one host wait per step, here: the step's last collective is done
            self._events[-1][2].synchronize()
            for key, start, end in self._events:
                self._add_time(key, start.elapsed_time(end) / 1e3)
            self._events = []
        rows = [
            {"phase": p, "level": lv, "op": op, "bytes": b, "time_s": t, "calls": int(n),
             **({"wait_s": w} if self.aligned else {})}
            for (p, lv, op), (b, t, n, w) in sorted(self.records.items())
        ]
        self.records = {}
        return rows

    # Each wrapper: skip groups of one (nothing moves), count, issue, time until wait().

    def all_gather(self, outputs: Sequence[torch.Tensor], shard: torch.Tensor, group: CommGroup,
                   phase: str, async_op: bool = False):
        if group.size == 1:
            outputs[0].copy_(shard)
            return _Done()
        n = group.size
        nbytes = sum(o.numel() for o in outputs) * shard.element_size() * (n - 1) / n
        after = None
        if group.pg_back is not None and shard.device.type == "cpu":
            # gloo's all_gather of two ranks sends and receives on one pair in turn, well below
            # what rings of three or more reach on the same link (measured: docs/benchmarks.md,
            # Figures behind design choices)
            call = lambda: _PairWork(outputs, shard, group)  # noqa: E731
        elif _is_nccl(group):
            whole = one_buffer(outputs)
            if whole is None:  # chunks out of rank order: gather into one staging buffer, then place them
                whole = torch.empty(sum(o.numel() for o in outputs), dtype=shard.dtype, device=shard.device)

                def place(staged=whole):
                    for o, piece in zip(outputs, staged.view(len(outputs), -1)):
                        o.copy_(piece.view_as(o))
                after = place
            call = lambda: dist.all_gather_into_tensor(whole, shard, group=group.pg, async_op=True)  # noqa: E731
        else:
            call = lambda: dist.all_gather(list(outputs), shard, group=group.pg, async_op=True)  # noqa: E731
        return self._issue((phase, group.level, "all_gather"), nbytes, call, async_op, after, group=group)

    def reduce_scatter(self, output: torch.Tensor, inputs: Sequence[torch.Tensor], group: CommGroup,
                       phase: str, async_op: bool = False):
        if group.size == 1:
            output.copy_(inputs[0])
            return _Done()
        n = group.size
        nbytes = sum(i.numel() for i in inputs) * output.element_size() * (n - 1) / n
        if output.device.type == "cpu":
            # gloo's reduce_scatter took much longer than an all-gather of the same size on a
            # shaped link (measured: docs/benchmarks.md, Figures behind design choices); a ring
            # of send/recv moves exactly S(n-1)/n.
            call = lambda: _RingWork(output, inputs, group)  # noqa: E731
        elif _is_nccl(group):
            whole = one_buffer(inputs)
            if whole is None:  # chunks out of rank order: one contiguous copy in group order
                whole = torch.cat([i.reshape(-1) for i in inputs])
            call = lambda: dist.reduce_scatter_tensor(output, whole, group=group.pg, async_op=True)  # noqa: E731
        else:
            call = lambda: dist.reduce_scatter(output, list(inputs), group=group.pg, async_op=True)  # noqa: E731
        return self._issue((phase, group.level, "reduce_scatter"), nbytes, call, async_op, group=group)

    def all_reduce(self, tensor: torch.Tensor, group: CommGroup, phase: str, async_op: bool = False):
        if group.size == 1:
            return _Done()
        n = group.size
        nbytes = 2 * tensor.numel() * tensor.element_size() * (n - 1) / n
        return self._issue((phase, group.level, "all_reduce"), nbytes,
                           lambda: dist.all_reduce(tensor, group=group.pg, async_op=True), async_op, group=group)

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, output_splits: Sequence[int],
                   input_splits: Sequence[int], group, phase: str, op: str = "all_to_all",
                   member_levels: Optional[Sequence[str]] = None) -> None:
        """Uneven all_to_all_single (MoE dispatch / combine); bytes = rows sent to the other members.
        `op` names what it implements in the ledger (a quantized reduce-scatter is "reduce_scatter").
        `member_levels[j]`: the level between this rank and member j; the bytes to each member are
        then booked at that level (an MoE exchange's same-node part at the node level), and the
        call's time at the slowest level that carried bytes."""
        row_bytes = math.prod(input.shape[1:]) * input.element_size()
        me = group.ranks.index(dist.get_rank())
        nbytes = (sum(input_splits) - input_splits[me]) * row_bytes
        level = group.level
        if member_levels is not None:
            per_level: Dict[str, float] = {}
            for j, rows in enumerate(input_splits):
                if j != me and rows:
                    per_level[member_levels[j]] = per_level.get(member_levels[j], 0.0) + rows * row_bytes
            if per_level:  # the timed key: the group's outermost level if it carried bytes
                level = group.level if group.level in per_level else next(iter(per_level))
                for lv, b in per_level.items():
                    if lv != level:
                        self._add((phase, lv, op), b)
                nbytes = per_level[level]
        if getattr(group, "pg_back", None) is not None and input.device.type == "cpu":
            # two members on gloo: one exchange, each direction on its own pair (CommGroup.pg_back)
            call = lambda: _PairExchange(output, input, output_splits, input_splits, group)  # noqa: E731
        else:
            call = lambda: dist.all_to_all_single(output, input, list(output_splits), list(input_splits),  # noqa: E731
                                                  group=group.pg, async_op=True)
        self._issue((phase, level, op), nbytes, call, False, group=group)

    def _issue(self, key, nbytes: float, call, async_op: bool, after=None, group: Optional[CommGroup] = None):
        self._add(key, nbytes)
        if self.aligned and group is not None:
            t = time.perf_counter()
            dist.barrier(group=group.pg)
            self.records[key][3] += time.perf_counter() - t
            async_op = False
        t0 = time.perf_counter()
        start = None
        if self.gpu:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        pending = _Pending(self, key, call(), t0, start, after)
        if not async_op:
            pending.wait()
        return pending
