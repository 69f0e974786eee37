"""Telemetry: crash-safe Parquet rows per (rank, step), events and node samples, and the run report.

Imports are lazy so that `from telemetry.config import TelemetryConfig` (the launcher
composing its config) does not pull in pyarrow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TelemetryConfig": "telemetry.config",
    "TABLES": "telemetry.schema",
    "table_path": "telemetry.schema",
    "telemetry_root": "telemetry.schema",
    "TableWriter": "telemetry.sink",
    "Telemetry": "telemetry.sink",
    "NodeSampler": "telemetry.nodes",
    "measure_matmul_tflops": "telemetry.peak",
    "RunSummary": "telemetry.report",
    "load_table": "telemetry.report",
    "summarize": "telemetry.report",
    "write_report": "telemetry.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'telemetry' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
