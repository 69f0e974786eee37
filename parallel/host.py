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


def to_host(t, why: str):
    """`t.tolist()` (a number for a 0-dim tensor), counted under `why`."""
    READS[why] += 1
    return t.tolist()
