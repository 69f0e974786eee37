"""The byte ledger's own CPU collectives (the send/recv ring reduce-scatter, the pair gather on
two process groups) against what torch.distributed's reference ops produce, on real gloo ranks.

The pair paths exist because gloo sends and receives in turn on one pair (docs/bench.md, "Why
per op"); they must give exactly what the plain collectives give, including when a group of
two has its second process group and when the output is a view of an input.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tierzero.parallel.groups import build_partition
from tierzero.parallel.ledger import ByteLedger

pytestmark = pytest.mark.multiprocess

# world size -> partitions into groups (every rank of a partition creates its groups)
PARTITIONS = {
    2: [[[0, 1]]],
    3: [[[0, 1, 2]]],
    4: [[[0, 1], [2, 3]], [[0, 2], [1, 3]], [[0, 1, 2, 3]]],
}


def _worker(rank: int, world: int, rdzv: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    ledger, report = ByteLedger(), []
    for partition in PARTITIONS[world]:
        comm = build_partition(partition, rank, "cluster")
        n, i = comm.size, comm.index(rank)
        gen = torch.Generator().manual_seed(1000 + rank)
        chunk = 5
        flat = torch.randn(n * chunk, generator=gen, dtype=torch.float64)
        # reference: every member's flat buffer, summed, then member i's chunk
        every = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(every, flat)
        total = sum(every[r] for r in comm.ranks)
        expect_rs = total[i * chunk:(i + 1) * chunk]
        got = torch.empty(chunk, dtype=torch.float64)
        ledger.reduce_scatter(got, [flat[j * chunk:(j + 1) * chunk] for j in range(n)], comm, "t")
        aliased = flat.clone()
        ledger.reduce_scatter(aliased[i * chunk:(i + 1) * chunk],
                              [aliased[j * chunk:(j + 1) * chunk] for j in range(n)], comm, "t")
        shard = torch.full((chunk,), float(rank), dtype=torch.float64)
        gathered = [torch.empty(chunk, dtype=torch.float64) for _ in range(n)]
        ledger.all_gather(gathered, shard, comm, "t", async_op=True).wait()
        report.append({
            "partition": partition, "pair_groups": comm.pg_back is not None,
            "rs_err": float((got - expect_rs).abs().max()),
            "rs_aliased_err": float((aliased[i * chunk:(i + 1) * chunk] - expect_rs).abs().max()),
            "ag_ok": all(torch.equal(gathered[j], torch.full((chunk,), float(r), dtype=torch.float64))
                         for j, r in enumerate(comm.ranks)),
        })
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


@pytest.mark.parametrize("world", sorted(PARTITIONS))
def test_ring_reduce_scatter_and_pair_gather_match_the_sums(tmp_path, world):
    mp.spawn(_worker, args=(world, str(tmp_path / "rdzv"), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        for row in json.loads((tmp_path / f"rank{rank}.json").read_text()):
            assert row["pair_groups"] == (len(row["partition"][0]) == 2), row
            assert row["rs_err"] < 1e-12, row
            assert row["rs_aliased_err"] < 1e-12, row
            assert row["ag_ok"], row


def test_one_buffer_finds_the_single_tensor_that_chunks_tile_in_order():
    """On NCCL the ledger sends chunks that tile one buffer in rank order as one single-tensor
    collective (all_gather_into_tensor / reduce_scatter_tensor), with no temporary buffer."""
    from tierzero.parallel.ledger import one_buffer

    full = torch.arange(12.0)
    chunks = [full[i * 3:(i + 1) * 3] for i in range(4)]
    whole = one_buffer(chunks)
    assert whole is not None and whole.data_ptr() == full.data_ptr() and torch.equal(whole, full)
    whole[5] = -1.0  # the same storage: what a collective writes lands in the chunks
    assert float(chunks[1][2]) == -1.0
    assert one_buffer([chunks[0], chunks[2], chunks[1], chunks[3]]) is None  # another order: staged
    assert one_buffer([chunks[0], chunks[1].clone()]) is None  # another storage
    assert one_buffer([full[0:3], full[3:5]]) is None  # unequal
    assert one_buffer([full.view(3, 4)[:, 0], full.view(3, 4)[:, 1]]) is None  # not contiguous


def _late_peer_worker(rank: int, rdzv: str, out: str):
    """Rank 1 reaches each all-reduce 0.3 s after rank 0, once per timing mode."""
    import time

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=2)
    comm = build_partition([[0, 1]], rank, "cluster")
    rows = {}
    for aligned in (False, True):
        ledger = ByteLedger(aligned=aligned)
        x = torch.ones(1000)
        if rank == 1:
            time.sleep(0.3)
        ledger.all_reduce(x, comm, "t")
        rows[str(aligned)] = ledger.take()[0] | {"sum_ok": bool(torch.all(x == 2))}
    Path(out, f"{rank}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def test_aligned_timing_books_a_late_peer_as_wait_not_as_transfer(tmp_path):
    """parallel.comm_timing=aligned: the barrier's wait for a late member goes to wait_s and
    time_s keeps the transfer alone; issue timing counts the late member in time_s."""
    mp.spawn(_late_peer_worker, args=(str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2, join=True)
    first = json.loads((tmp_path / "0.json").read_text())
    issue, aligned = first["False"], first["True"]
    assert issue["sum_ok"] and aligned["sum_ok"]
    assert issue["time_s"] >= 0.25 and "wait_s" not in issue
    assert aligned["wait_s"] >= 0.25 and aligned["time_s"] < 0.1, aligned
