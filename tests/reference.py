"""The single-process reference every multi-rank test compares against.

Plain data parallelism with torch.optim.AdamW in this process (world size 1, all
accumulation local): `recipes.train.train(..., reference_engine=True)`, an implementation
that shares no code with the sharded engines under test.
"""

from __future__ import annotations

import torch

from tierzero.launcher.config import load_config
from tierzero.parallel.context import DistContext
from tierzero.parallel.topology import emulated_topology
from tierzero.recipes.train import TrainResult, train
from tierzero.telemetry.config import TelemetryConfig
from tierzero.telemetry.sink import Telemetry


def single_process_run(overrides) -> TrainResult:
    cfg = load_config([], list(overrides))
    ctx = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device="cpu", backend="none",
                      topology=emulated_topology([1]), host="reference")
    telemetry = Telemetry(TelemetryConfig(enabled=False), root="unused", run="reference", attempt=0, rank=0,
                          host="reference")
    threads = torch.get_num_threads()
    try:
        return train(train_cfg=cfg.train, model_cfg=cfg.model, data_cfg=cfg.data, ctx=ctx, telemetry=telemetry,
                     peak_tflops=1.0, show_progress=False, reference_engine=True, moe_cfg=cfg.moe)
    finally:
        torch.set_num_threads(threads)
