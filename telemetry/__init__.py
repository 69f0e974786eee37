"""Telemetry: crash-safe Parquet rows per (rank, step), events and node samples, and the run report.

Imports are lazy so that `from tierzero.telemetry.config import TelemetryConfig` (the launcher
composing its config) does not pull in pyarrow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TelemetryConfig": "tierzero.telemetry.config",
    "TABLES": "tierzero.telemetry.schema",
    "DERIVED": "tierzero.telemetry.schema",
    "table_path": "tierzero.telemetry.schema",
    "telemetry_root": "tierzero.telemetry.schema",
    "TableWriter": "tierzero.telemetry.sink",
    "Telemetry": "tierzero.telemetry.sink",
    "NodeSampler": "tierzero.telemetry.nodes",
    "measure_matmul_tflops": "tierzero.telemetry.peak",
    "RunSummary": "tierzero.telemetry.report",
    "load_table": "tierzero.telemetry.report",
    "summarize": "tierzero.telemetry.report",
    "write_report": "tierzero.telemetry.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tierzero.telemetry' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
