"""train.activation_checkpointing=blocks (parallel/engines/base.py: checkpoint_blocks): the same
losses as without it, far fewer bytes kept for the backward, refused for MoE, and planned.
(Multi-rank: tests/test_references.py runs it on FSDP2 and on the native engine's zero3.)"""

from __future__ import annotations

import torch

from tierzero.parallel.engines import engine_errors
from tierzero.parallel.engines.base import checkpoint_blocks
from tierzero.parallel.config import ParallelConfig
from tierzero.parallel.moe import MoEConfig
from tierzero.checkpoint.config import CheckpointConfig
from tierzero.recipes.config import ModelConfig, TrainConfig, train_errors
from tierzero.recipes.model import build_model, loss_fn
from tierzero.recipes.planning import activation_bytes


def _saved_bytes_and_grads(recompute: bool):
    model = build_model(ModelConfig(d_model=64, n_layers=4, n_heads=4), vocab_size=64, seq_len=64, seed=3)
    if recompute:
        checkpoint_blocks(model)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, 64, (8, 65), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = sum(n for ptr, n in seen.items() if ptr not in params)
    return float(loss.detach()), kept, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_recomputed_blocks_give_the_same_gradients_from_fewer_kept_bytes():
    loss_a, kept_a, grads_a = _saved_bytes_and_grads(False)
    loss_b, kept_b, grads_b = _saved_bytes_and_grads(True)
    assert loss_a == loss_b
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-7)
    assert kept_b < 0.5 * kept_a, (kept_a, kept_b)


def test_it_is_refused_for_moe_and_for_unknown_values():
    train = TrainConfig(activation_checkpointing="blocks")
    errs = engine_errors(parallel=ParallelConfig(), moe=MoEConfig(num_experts=4), checkpoint=CheckpointConfig(),
                         train=train)
    assert any("train.activation_checkpointing=blocks" in e and "moe.num_experts=4" in e for e in errs), errs
    assert engine_errors(parallel=ParallelConfig(), moe=MoEConfig(), checkpoint=CheckpointConfig(), train=train) == []
    assert any("train.activation_checkpointing='layers'" in e
               for e in train_errors(TrainConfig(activation_checkpointing="layers")))


def test_the_planner_counts_what_recomputation_keeps():
    model = ModelConfig(d_model=1024, n_layers=24, n_heads=16)
    full = activation_bytes(TrainConfig(micro_batch_size=4), model, None, 2048, 32000)
    recomputed = activation_bytes(TrainConfig(micro_batch_size=4, activation_checkpointing="blocks"), model, None,
                                  2048, 32000)
    assert recomputed < full / 2
