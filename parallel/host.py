"""Reading device values on the host: the one place the hot path waits for the device.

On a GPU every `.item()`, `.tolist()`, `int(t)` or `float(t)` of a device tensor blocks the
host until the stream catches up, so the work queued behind it cannot overlap. The engines,
the MoE layer and the training loop read through `to_host`, which counts each read by reason:
tests/test_host_reads.py demands no read per dense micro-step, one per MoE layer (the
all-to-all sizes and the largest expert batch in one read), and one or two per optimizer step
(the gradient norm, the step's global loss).
"""

from __future__ import annotations

from collections import Counter

READS: Counter = Counter()
"""Host reads since the process started, by reason."""


def return_large_frees() -> None:
    """Host buffers of 1 MiB or more straight from mmap, so a freed one goes back to the OS.

    The engines free and re-allocate a gathered block's buffer every micro-step. glibc raises
    its mmap threshold after such a free (up to 32 MiB), after which those buffers come from
    the heap, and the heap cannot give memory back from under longer-lived allocations: on CPU
    ranks the peak RSS of a zero3 step grew by ~250 MB for a 50M-parameter model (measured,
    tests/test_sharded_build.py). A fixed threshold turns that off. Does nothing off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def to_host(t, why: str):
    """`t.tolist()` (a number for a 0-dim tensor), counted under `why`."""
    READS[why] += 1
    return t.tolist()
