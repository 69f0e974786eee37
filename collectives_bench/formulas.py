"""nccl-tests' bandwidth definitions, and the values each collective must produce.

algbw = S / t, where S is the size column: the whole buffer, which for the chunked
collectives is the whole gathered / scattered buffer (per-rank count x n). busbw = algbw x
the collective's bus factor, which makes a result comparable with the link's peak whatever
n is (nccl-tests doc/PERFORMANCE.md; the factors live in ops.py). Every function takes a
collective's name or its record (ops.collective).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from tierzero.collectives_bench.ops import COLLECTIVES, Op, collective

PLACEMENTS = {name: c.placements for name, c in COLLECTIVES.items()}
"""name -> placements of every registered collective (derived from ops.COLLECTIVES)."""


def bus_factor(op: Op, nranks: int) -> float:
    return collective(op).bus_factor(nranks)


def algbw_gbps(size_bytes: float, time_s: float) -> float:
    return size_bytes / time_s / 1e9 if time_s > 0 else float("nan")


def busbw_gbps(op: Op, nranks: int, size_bytes: float, time_s: float) -> float:
    return algbw_gbps(size_bytes, time_s) * bus_factor(op, nranks)


def element_count(op: Op, size_bytes: int, elem_bytes: int, nranks: int) -> int:
    """Elements of the whole buffer S; a multiple of n for the chunked ops (rounded down, at least n)."""
    count = max(1, size_bytes // elem_bytes)
    if collective(op).chunked:
        count = max(nranks, count - count % nranks)
    return count


# ---- expected values ------------------------------------------------------------------
# Inputs are small integers (-2..2) so that every sum up to 128 ranks is exact even in
# bfloat16 (8 significant bits): a check can then demand equality, and one flipped
# element is one wrong element.

def pattern(group_rank: int, start: int, count: int) -> np.ndarray:
    """The input value of elements start..start+count of the rank at position group_rank."""
    i = np.arange(start, start + count, dtype=np.int64)
    return (((group_rank * 3 + i * 7) % 5) - 2).astype(np.float64)


def input_spec(op: Op, count: int, nranks: int) -> Tuple[int, int]:
    """(elements of this rank's input, elements of its output) for the whole-buffer count."""
    return collective(op).elements(count, nranks)


def expected(op: Op, count: int, nranks: int, group_rank: int) -> Optional[np.ndarray]:
    """What the output buffer of the rank at `group_rank` holds after the op, every rank's
    input being its pattern; None when the op leaves nothing defined there (reduce on a
    non-root rank)."""
    return collective(op).expected(pattern, count, nranks, group_rank)


def count_wrong(got: np.ndarray, want: Optional[np.ndarray]) -> int:
    """Elements that differ from the exact expected value (inputs make every result exact)."""
    if want is None:
        return 0
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    if got.shape != want.shape:
        return int(want.size)
    return int(np.count_nonzero(~(np.abs(got - want) < 0.5)))
