"""Config section owned by telemetry: `telemetry.*`.

Each field's docstring (the string literal under it) is what `tierzero config --describe`
and docs/telemetry.md show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class TelemetryConfig:
    enabled: bool = True
    """Write Parquet telemetry (steps, events, node samples); false makes every telemetry call a no-op."""
    dir: Optional[str] = None
    """None = <run.dir>/telemetry; a local path, or a file://, memory:// (one process) or s3:// URL."""
    flush_every_s: float = 10.0
    """Seconds between background flushes: a rank killed with SIGKILL loses at most this many seconds of rows."""
    peak_tflops: Optional[float] = None
    """Peak TFLOP/s of one rank's device, the MFU denominator; None = the device's datasheet peak for train.dtype (telemetry/peak.py), or a measured matmul where the device is not in that table (CPU)."""
    node_sample_every_s: float = 5.0
    """Seconds between node samples (CPU, memory, every GPU) taken by one rank per node."""

    def errors(self) -> list[str]:
        """Every impossible value, as messages naming the dotted key and a fix."""
        errors = []
        if self.dir is not None and not str(self.dir).strip():
            errors.append(
                "telemetry.dir='' is empty; leave it unset for <run.dir>/telemetry "
                "or give a folder or URL, e.g. telemetry.dir=s3://bucket/tierzero/telemetry"
            )
        for key, example in (("flush_every_s", 10), ("node_sample_every_s", 5)):
            value = getattr(self, key)
            if not _positive(value):
                errors.append(f"telemetry.{key}={_fmt(value)} must be > 0; set e.g. telemetry.{key}={example}")
        if self.peak_tflops is not None and not _positive(self.peak_tflops):
            errors.append(
                f"telemetry.peak_tflops={_fmt(self.peak_tflops)} must be > 0; set the device's peak, "
                "e.g. telemetry.peak_tflops=989 (H100 SXM bf16 dense), or leave it unset for the datasheet's"
            )
        return errors


def _positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _fmt(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
