"""Build sharded, not replicated: with the native engine the model is built on the meta device
and each rank generates only its own shards (recipes.model.Transformer.init_slice), so a
rank's memory follows its share of the model states, never the whole model.

One spawn of 8 gloo ranks (each rank's share is 1/8 of the model) trains one zero3 step of a
~50M-parameter model and measures each rank's RSS high-water mark (ru_maxrss) growth from
just before the Trainer is built, after a warm-up run of a tiny model on the same path (so
the runtime's own ~100 MiB of imports, gloo and autograd are not counted). Bounds:
- building: model states / world size (20 bytes a parameter in float32: working parameter,
  gradient accumulator, master, two AdamW moments) + a fixed margin. Building the whole model
  on every rank first, as before, holds a full float32 replica (~190 MiB, more than the rank's
  ~120 MiB share) and breaks it;
- the whole step: that + two gathered blocks (the one computing and the prefetched next) +
  one block's gradients twice (autograd's and the flat copy reduced) + the margin. Leaving
  glibc's dynamic mmap threshold on (parallel.host.return_large_frees) breaks it.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from reference import Recorder, recipe

from tierzero.launcher.config import load_config
from tierzero.parallel.config import ParallelConfig
from tierzero.parallel.context import DistContext
from tierzero.parallel.topology import emulated_topology
from tierzero.recipes.model import count_params
from tierzero.recipes.trainer import Trainer

pytestmark = pytest.mark.multiprocess

WORLD = 8
OVERRIDES = ["moe.num_experts=0", "parallel.ep=1", "model.d_model=512", "model.n_heads=8", "model.n_layers=16",
             "data.seq_len=16", "train.steps=1", "train.warmup_steps=1", "train.micro_batch_size=1",
             f"train.global_batch_size={WORLD}"]
MARGIN = 64 * 2**20


def _worker(rank: int, rdzv: str, out: str):
    from tierzero.parallel.host import return_large_frees

    return_large_frees()  # as every rank does (launcher.world.join)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=WORLD)
    cfg = load_config([], OVERRIDES)
    ctx = DistContext(rank=rank, world_size=WORLD, local_rank=rank, local_world_size=WORLD, device="cpu",
                      backend="gloo", topology=emulated_topology([WORLD]), host="test")
    # warm-up: the same path with a tiny model, so the runtime's own growth (imports, gloo,
    # autograd, ~100 MiB) is not counted below
    tiny = load_config([], [*OVERRIDES, "model.d_model=32", "model.n_heads=2", "model.n_layers=2"])
    Trainer(recipe(tiny, parallel=ParallelConfig(plan="zero3")), ctx, Recorder(), peak_tflops=1.0,
            show_progress=False).fit()
    dist.barrier()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainer = Trainer(recipe(cfg, parallel=ParallelConfig(plan="zero3")), ctx, Recorder(), peak_tflops=1.0,
                      show_progress=False)
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = trainer.fit()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(f"{out}.{rank}.json").write_text(json.dumps({
        "build_growth": built - before, "peak_growth": after - before, "loss": result.losses,
        "largest_block": max(u.N for u in trainer.engine.units if u.name.startswith("blocks.")),
        "params": sum(u.numel for u in trainer.engine.units)}))
    dist.destroy_process_group()


def test_a_rank_holds_its_share_of_the_model_not_the_model(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(str(tmp_path / "rdzv"), out), nprocs=WORLD, join=True)
    per_rank = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(WORLD)]
    cfg = load_config([], OVERRIDES)
    params = count_params(cfg.model, cfg.data.vocab_size)
    assert per_rank[0]["params"] == params > 45e6
    states = 20 * params
    block = 4 * per_rank[0]["largest_block"]  # one gathered block, fp32
    bound = states / WORLD + 2 * block + 2 * block + MARGIN  # two gathered, one block's gradients (twice)
    replica = 4 * params
    summary = [f"rank {r}: build +{d['build_growth'] / 2**20:.0f} MiB, peak +{d['peak_growth'] / 2**20:.0f} MiB"
               for r, d in enumerate(per_rank)]
    print(f"bound {bound / 2**20:.0f} MiB (states/world {states / WORLD / 2**20:.0f}, block {block / 2**20:.0f}); "
          f"a replica alone {replica / 2**20:.0f} MiB; " + "; ".join(summary))
    assert all(d["loss"] and d["loss"][0] > 0 for d in per_rank)
    for r, d in enumerate(per_rank):
        assert d["peak_growth"] < bound, summary[r]
        # building holds the rank's shards, never the model
        assert d["build_growth"] < states / WORLD + MARGIN, summary[r]
