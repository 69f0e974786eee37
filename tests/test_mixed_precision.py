"""Mixed precision done right (native engine, train.dtype=bfloat16): parameters in bf16, master
weights and buffers in float32. Before, `model.to(bfloat16)` also rounded the rotary tables
(error ~2e-3) and the auxiliary-loss-free expert bias (its 1e-3 steps vanish above 0.5), and
the masters started from bf16-rounded weights."""

from __future__ import annotations

import torch

from tierzero.parallel.engines import EngineSetup, Optim
from tierzero.parallel.engines.native import NativeEngine
from tierzero.parallel.moe import MoEConfig, moe_layers
from tierzero.parallel.plans import named_plan
from tierzero.parallel.topology import emulated_topology
from tierzero.recipes.config import ModelConfig
from tierzero.recipes.model import build_model, loss_fn, rotary_tables


def _engine(dtype: str):
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=16, bias_update_rate=1e-3)
    model = build_model(ModelConfig(d_model=32, n_layers=2, n_heads=2), vocab_size=64, seq_len=16, moe=moe)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    topo = emulated_topology([1])
    setup = EngineSetup(plan=named_plan("ddp", topo), topology=topo, rank=0, loss_fn=loss_fn,
                        optim=Optim(lr=1e-3), dtype=dtype)
    return model, NativeEngine(model, setup), init


def test_bfloat16_keeps_buffers_and_masters_in_float32():
    model, engine, init = _engine("bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    attn = model.blocks[0].attn
    cos, sin = rotary_tables(attn.head_dim, 16, attn.rope_theta)
    assert attn.rope_cos.dtype == torch.float32 and torch.equal(attn.rope_cos, cos) and torch.equal(attn.rope_sin, sin)
    # the masters are the float32 weights as built, not their bf16 rounding
    masters = {n: t["param"] for n, t in engine.global_tensors().items()}
    assert all(torch.equal(masters[n], init[n]) for n in init)
    assert any(not torch.equal(init[n].bfloat16().float(), init[n]) for n in init)  # rounding would show
    # the expert bias keeps steps far below bf16's spacing at its size (2^-8 at 0.5 .. 1)
    layer = moe_layers(model)[0]
    assert layer.expert_bias.dtype == torch.float32
    layer.expert_bias.fill_(0.6)
    layer.update_bias(torch.tensor([4.0, 0.0, 0.0, 0.0]))
    assert float(layer.expert_bias[0]) != 0.6 and abs(float(layer.expert_bias[0]) - (0.6 - 1e-3)) < 1e-6


def test_bfloat16_forward_and_backward_run_with_float32_buffers():
    model, engine, _ = _engine("bfloat16")
    tokens = torch.randint(0, 64, (2, 17))
    loss = float(engine.micro_step(tokens[:, :-1], tokens[:, 1:], scale=1.0))
    stats = engine.step(1e-3)
    assert torch.isfinite(torch.tensor(loss)) and stats.grad_norm > 0 and not stats.skipped
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_float32_is_unchanged():
    model, engine, init = _engine("float32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(torch.equal(p, init[n]) for n, p in model.named_parameters())
