"""The byte ledger: every collective the engine issues, counted as it is issued.

Bytes use the same per-rank conventions as the cost model (parallel/plan.py), computed from
the tensors actually passed to torch.distributed, so `measured == predicted` is a real check.
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

    @property
    def size(self) -> int:
        return len(self.ranks)

    def index(self, rank: int) -> int:
        return self.ranks.index(rank)


class _RingWork:
    """Ring reduce-scatter from send/recv (n-1 exchanges of one chunk with the neighbours).

    Member i starts by sending its own chunk i-1; at exchange s it receives the partial sum
    of chunk i-2-s from member i-1, adds its own, and passes it on; after n-1 exchanges it
    holds chunk i summed over all members. Runs to completion when created."""

    def __init__(self, output: torch.Tensor, inputs: Sequence[torch.Tensor], group: CommGroup):
        n = group.size
        i = group.index(dist.get_rank())
        nxt, prv = group.ranks[(i + 1) % n], group.ranks[(i - 1) % n]
        acc = inputs[(i - 1) % n].clone()
        tmp = torch.empty_like(acc)
        for s in range(n - 1):
            ops = [dist.P2POp(dist.isend, acc, nxt, group.pg), dist.P2POp(dist.irecv, tmp, prv, group.pg)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            acc = tmp + inputs[(i - 2 - s) % n]
        output.copy_(acc)

    def wait(self) -> None:
        return None


class _Pending:
    def __init__(self, ledger: "ByteLedger", key, work, t0: float):
        self.ledger, self.key, self.work, self.t0 = ledger, key, work, t0

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None
            self.ledger._add_time(self.key, time.perf_counter() - self.t0)


class _Done:
    def wait(self) -> None:
        return None


class ByteLedger:
    def __init__(self):
        self.records: Dict[Tuple[str, str, str], List[float]] = {}
        """(phase, level, op) -> [bytes, seconds, calls] since the last take()."""

    def _add(self, key, nbytes: float) -> None:
        rec = self.records.setdefault(key, [0.0, 0.0, 0])
        rec[0] += nbytes
        rec[2] += 1

    def _add_time(self, key, seconds: float) -> None:
        self.records[key][1] += seconds

    def take(self) -> List[dict]:
        rows = [
            {"phase": p, "level": lv, "op": op, "bytes": b, "time_s": t, "calls": int(n)}
            for (p, lv, op), (b, t, n) in sorted(self.records.items())
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
        return self._issue((phase, group.level, "all_gather"), nbytes,
                           lambda: dist.all_gather(list(outputs), shard, group=group.pg, async_op=True), async_op)

    def reduce_scatter(self, output: torch.Tensor, inputs: Sequence[torch.Tensor], group: CommGroup,
                       phase: str, async_op: bool = False):
        if group.size == 1:
            output.copy_(inputs[0])
            return _Done()
        n = group.size
        nbytes = sum(i.numel() for i in inputs) * output.element_size() * (n - 1) / n
        if output.device.type == "cpu":
            # gloo's reduce_scatter took ~1.8x the time of an all-gather of the same size on a
            # shaped link (benchmarks/hierarchy.py); a ring of send/recv moves exactly S(n-1)/n.
            call = lambda: _RingWork(output, inputs, group)  # noqa: E731
        else:
            call = lambda: dist.reduce_scatter(output, list(inputs), group=group.pg, async_op=True)  # noqa: E731
        return self._issue((phase, group.level, "reduce_scatter"), nbytes, call, async_op)

    def all_reduce(self, tensor: torch.Tensor, group: CommGroup, phase: str, async_op: bool = False):
        if group.size == 1:
            return _Done()
        n = group.size
        nbytes = 2 * tensor.numel() * tensor.element_size() * (n - 1) / n
        return self._issue((phase, group.level, "all_reduce"), nbytes,
                           lambda: dist.all_reduce(tensor, group=group.pg, async_op=True), async_op)

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, output_splits: Sequence[int],
                   input_splits: Sequence[int], group, phase: str) -> None:
        """Uneven all_to_all_single (MoE dispatch / combine); bytes = rows sent to the other members."""
        row_bytes = math.prod(input.shape[1:]) * input.element_size()
        me = group.ranks.index(dist.get_rank())
        nbytes = (sum(input_splits) - input_splits[me]) * row_bytes
        self._issue((phase, group.level, "all_to_all"), nbytes,
                    lambda: dist.all_to_all_single(output, input, list(output_splits), list(input_splits),
                                                   group=group.pg, async_op=True), False)

    def _issue(self, key, nbytes: float, call, async_op: bool):
        self._add(key, nbytes)
        t0 = time.perf_counter()
        pending = _Pending(self, key, call(), t0)
        if not async_op:
            pending.wait()
        return pending
