"""The single-process reference every multi-rank test compares against, and the telemetry
stand-in the tests hand the training loop.

The reference: plain data parallelism with torch.optim.AdamW in this process (world size 1,
all accumulation local), i.e. the real Trainer with `parallel.engine=reference` -- an engine
that shares no code with the sharded engines under test.
"""

from __future__ import annotations

import dataclasses

import torch

from tierzero.launcher.config import load_config
from tierzero.parallel.context import DistContext
from tierzero.parallel.topology import emulated_topology
from tierzero.recipes.trainer import Recipe, TrainResult, train


class Recorder:
    """Telemetry that keeps the rows the training loop records (validated by no schema: the
    real sink's checks are tests/test_telemetry.py's)."""

    def __init__(self):
        self.rows = {}

    def record(self, table: str, /, **row) -> None:
        self.rows.setdefault(table, []).append(row)

    def event(self, kind, detail="", step=None, **_):
        self.record("events", kind=kind, detail=detail, step=step)

    def flush(self) -> None:
        return None

    @property
    def comm_rows(self):
        return self.rows.get("comm", [])

    @property
    def expert_rows(self):
        return self.rows.get("experts", [])

    def ledger_bytes(self) -> dict:
        """'phase|level|op' -> bytes over the run (the byte ledger's rows summed)."""
        out = {}
        for row in self.comm_rows:
            key = f"{row['phase']}|{row['level']}|{row['op']}"
            out[key] = out.get(key, 0.0) + row["bytes"]
        return out


def recipe(cfg, **sections) -> Recipe:
    """The training sections of a composed config, some replaced (e.g. parallel=...)."""
    return dataclasses.replace(Recipe.of(cfg), **sections)


def single_process_run(overrides) -> TrainResult:
    # whatever layout the run under test used, the reference is one replica saving nothing
    cfg = load_config([], [*overrides, "parallel.engine=reference", "parallel.plan=auto", "parallel.levels=null",
                           "parallel.ep=1", "checkpoint.every_steps=0", "checkpoint.resume=auto",
                           "train.on_nonfinite=skip"])
    ctx = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device="cpu", backend="none",
                      topology=emulated_topology([1]), host="reference")
    threads = torch.get_num_threads()
    try:
        return train(Recipe.of(cfg), ctx, Recorder(), peak_tflops=1.0, show_progress=False)
    finally:
        torch.set_num_threads(threads)
