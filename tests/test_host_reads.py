"""No host read per micro-step (parallel/host.py): on a GPU each one stalls the host until the
stream drains. Counted on CPU through the one helper every hot-path read goes through; the
counts would go up if a `.item()` / `.tolist()` came back into a micro-step."""

from __future__ import annotations

import pytest
import torch

from tierzero.parallel import host
from tierzero.parallel.context import DistContext
from tierzero.parallel.engines import EngineSetup, Optim
from tierzero.parallel.engines.native import NativeEngine
from tierzero.parallel.moe import MoEConfig
from tierzero.parallel.plans import named_plan
from tierzero.parallel.topology import emulated_topology
from tierzero.recipes.config import DataConfig, ModelConfig, TrainConfig
from tierzero.recipes.model import build_model, loss_fn
from tierzero.recipes.trainer import Recipe, Trainer

from reference import Recorder


def _reads(fn) -> dict:
    before = host.READS.copy()
    fn()
    return dict(host.READS - before)


@pytest.fixture
def no_item(monkeypatch):
    """A `.item()` anywhere in the engine's micro-step fails the test outright."""
    def item(self):
        raise AssertionError("Tensor.item() in the hot path: read through parallel.host.to_host")
    monkeypatch.setattr(torch.Tensor, "item", item)


@pytest.mark.parametrize("experts", [0, 4])
def test_a_micro_step_reads_nothing_but_one_value_per_moe_layer(experts, no_item):
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=experts, top_k=2, expert_hidden=16) if experts else None
    model = build_model(ModelConfig(d_model=32, n_layers=3, n_heads=2), vocab_size=64, seq_len=16, moe=moe)
    topo = emulated_topology([1])
    engine = NativeEngine(model, EngineSetup(plan=named_plan("zero3", topo), topology=topo, rank=0, loss_fn=loss_fn,
                                             optim=Optim(lr=1e-3, grad_clip=1.0)))
    tokens = torch.randint(0, 64, (2, 17))
    losses = []
    reads = _reads(lambda: losses.append(engine.micro_step(tokens[:, :-1], tokens[:, 1:], scale=0.5)))
    assert reads == ({"moe": 3} if experts else {})  # one per MoE layer, none for a dense model
    assert isinstance(losses[0], torch.Tensor) and losses[0].dim() == 0  # left on the device
    reads = _reads(lambda: engine.step(1e-3))
    assert reads == {"grad norm": 1}


def test_the_loop_reads_the_loss_once_per_optimizer_step():
    train = TrainConfig(steps=3, global_batch_size=8, micro_batch_size=2, warmup_steps=1)
    recipe = Recipe(train=train, model=ModelConfig(d_model=16, n_layers=1, n_heads=2), data=DataConfig(seq_len=8))
    ctx = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device="cpu", backend="none",
                      topology=emulated_topology([1]), host="test")
    trainer = Trainer(recipe, ctx, Recorder(), peak_tflops=1.0, show_progress=False)
    assert trainer.accum == 4
    reads = _reads(trainer.fit)
    assert reads == {"step loss": 3, "grad norm": 3}  # 4 micro-steps per step, none of them read
