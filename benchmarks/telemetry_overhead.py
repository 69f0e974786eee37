"""What does telemetry cost the training loop? Two measurements in one run.

1. Direct: the time one `Telemetry.record("steps", ...)` call (schema check, coercion, buffer
   append) takes on the loop's thread, against the median step time of the default recipe.
   This is the cost the loop pays per step.
2. A/B: the default recipe (1 rank, in this process) with telemetry off and on, interleaved
   `--repeats` times, flushing every second with the node sampler running (harsher than the
   10 s default). On a shared 2-core machine the A/B noise is larger than 1%, so it is a
   sanity check; the direct figure is the precise one.

    python benchmarks/telemetry_overhead.py [--steps 60] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from datetime import date

import torch

from tierzero.launcher.config import load_config
from tierzero.parallel.context import DistContext
from tierzero.parallel.topology import flat_topology
from tierzero.recipes.trainer import Recipe, train
from tierzero.telemetry.config import TelemetryConfig
from tierzero.telemetry.sink import Telemetry


def disabled_telemetry():
    """telemetry.enabled=false: every call is a no-op and nothing is written."""
    return Telemetry(TelemetryConfig(enabled=False), root="unused", run="ref", attempt=0, rank=0, host="ref")


def run_once(cfg, telemetry) -> float:
    ctx = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device="cpu",
                      backend="none", topology=flat_topology(1, 1), host=platform.node())
    # the recipe's dense trunk (no MoE sections: one rank cannot hold parallel.ep=2)
    result = train(Recipe(train=cfg.train, model=cfg.model, data=cfg.data), ctx, telemetry, peak_tflops=1.0,
                   show_progress=False)
    return statistics.median(result.step_times_s[5:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config([], [f"train.steps={args.steps}", "telemetry.flush_every_s=1",
                           "telemetry.node_sample_every_s=1"])

    off, on = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            off.append(run_once(cfg, disabled_telemetry()))
            tel = Telemetry(cfg.telemetry, root=f"{tmp}/telemetry", run="bench", attempt=rep, rank=0,
                            host=platform.node())
            tel.start_node_sampler()
            on.append(run_once(cfg, tel))
            tel.close()

        tel = Telemetry(cfg.telemetry, root=f"{tmp}/direct", run="bench", attempt=0, rank=0,
                        host=platform.node(), peak_tflops=1.0)
        n = 20000
        row = dict(loss=1.0, lr=1e-3, grad_norm=0.5, tokens=2048, step_time_s=0.1, tokens_per_s=20480.0,
                   tflops=0.01, mfu=0.01, mem_rss_bytes=1 << 28, gpu_mem_bytes=None)
        t0 = time.perf_counter()
        for i in range(n):
            tel.record("steps", step=i, **row)
        per_call_s = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        tel.close()
        flush_s = time.perf_counter() - t0

    step_off = statistics.median(off)
    step_on = statistics.median(on)
    print(f"# tierzero telemetry overhead | {platform.node()} | {platform.processor() or platform.machine()} | "
          f"torch {torch.__version__} | {date.today()}")
    print(f"# default recipe, 1 rank, 1 thread, {args.steps} steps x {args.repeats} repeats, flush every 1 s")
    print(f"{'measure':<38}{'value':>14}")
    print(f"{'median step time, telemetry off':<38}{step_off * 1e3:>11.2f} ms")
    print(f"{'median step time, telemetry on':<38}{step_on * 1e3:>11.2f} ms")
    print(f"{'A/B ratio on/off':<38}{step_on / step_off:>14.4f}")
    print(f"{'Telemetry.record() per call':<38}{per_call_s * 1e6:>11.1f} us")
    print(f"{'direct cost / step time':<38}{per_call_s / step_off * 100:>13.3f} %")
    print(f"{'flush of {0} rows (background)'.format(n):<38}{flush_s * 1e3:>11.1f} ms")


if __name__ == "__main__":
    main()
