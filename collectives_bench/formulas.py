"""nccl-tests' bandwidth definitions, and the values each collective must produce.

algbw = S / t, where S is the size column: the whole buffer of all_reduce, broadcast,
reduce and sendrecv, and the whole gathered / scattered buffer (per-rank count x n) of
all_gather, reduce_scatter and all_to_all. busbw = algbw x factor, the factor making a
result comparable with the link's peak whatever n is (nccl-tests doc/PERFORMANCE.md):
2(n-1)/n for all_reduce, (n-1)/n for reduce_scatter, all_gather and all_to_all, 1 for
broadcast, reduce and sendrecv.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

# Ops whose buffer is split into n chunks (one per rank): S must be a multiple of n elements.
CHUNKED = frozenset({"reduce_scatter", "all_gather", "all_to_all"})
PLACEMENTS = {
    # out-of-place / in-place as torch.distributed can express them: all_reduce, broadcast
    # and reduce only exist in place; all_to_all_single and send/recv only out of place.
    "all_reduce": ("in",), "reduce_scatter": ("out", "in"), "all_gather": ("out", "in"),
    "broadcast": ("in",), "all_to_all": ("out",), "reduce": ("in",), "sendrecv": ("out",),
}
REDOP = {"all_reduce": "sum", "reduce_scatter": "sum", "reduce": "sum"}
ROOTED = frozenset({"broadcast", "reduce"})


def bus_factor(op: str, nranks: int) -> float:
    n = nranks
    if op == "all_reduce":
        return 2 * (n - 1) / n
    if op in CHUNKED:
        return (n - 1) / n
    if op in ("broadcast", "reduce", "sendrecv"):
        return 1.0
    raise ValueError(f"unknown collective {op!r}")


def algbw_gbps(size_bytes: float, time_s: float) -> float:
    return size_bytes / time_s / 1e9 if time_s > 0 else float("nan")


def busbw_gbps(op: str, nranks: int, size_bytes: float, time_s: float) -> float:
    return algbw_gbps(size_bytes, time_s) * bus_factor(op, nranks)


def element_count(op: str, size_bytes: int, elem_bytes: int, nranks: int) -> int:
    """Elements of the whole buffer S; a multiple of n for the chunked ops (rounded down, at least n)."""
    count = max(1, size_bytes // elem_bytes)
    if op in CHUNKED:
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


def input_spec(op: str, count: int, nranks: int) -> Tuple[int, int]:
    """(elements of this rank's input, elements of its output) for the whole-buffer count."""
    c = count // nranks if op in CHUNKED else count
    if op == "reduce_scatter":
        return count, c
    if op == "all_gather":
        return c, count
    return count, count


def expected(op: str, count: int, nranks: int, group_rank: int) -> Optional[np.ndarray]:
    """What the output buffer of the rank at `group_rank` holds after the op; None when the
    op leaves nothing defined there (reduce on a non-root rank)."""
    n, r = nranks, group_rank
    if op == "all_reduce":
        return sum(pattern(k, 0, count) for k in range(n))
    if op == "reduce":
        return sum(pattern(k, 0, count) for k in range(n)) if r == 0 else None
    if op == "broadcast":
        return pattern(0, 0, count)
    c = count // n
    if op == "reduce_scatter":
        return sum(pattern(k, r * c, c) for k in range(n))
    if op == "all_gather":
        return np.concatenate([pattern(k, 0, c) for k in range(n)])
    if op == "all_to_all":
        return np.concatenate([pattern(k, r * c, c) for k in range(n)])
    if op == "sendrecv":
        return pattern((r - 1) % n, 0, count)
    raise ValueError(f"unknown collective {op!r}")


def count_wrong(got: np.ndarray, want: Optional[np.ndarray]) -> int:
    """Elements that differ from the exact expected value (inputs make every result exact)."""
    if want is None:
        return 0
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    if got.shape != want.shape:
        return int(want.size)
    return int(np.count_nonzero(~(np.abs(got - want) < 0.5)))
