"""The reference engines are configured as their own experts run them, so a ratio against them is
a fair one (parallel/engines/fsdp2.py, parallel/engines/reference.py):

- FSDP2 reduce-scatters gradients once per optimizer step, on the last micro-step
  (set_requires_gradient_sync), not on every micro-step -- counted on the real collectives;
- with train.dtype=bfloat16 both keep float32 parameters as the masters and compute in bf16
  (FSDP2's MixedPrecisionPolicy, autocast for data parallelism);
- AdamW runs its foreach path on CPU (fused on a GPU);
- and with all that, the FSDP2 engine (zero2 and zero3, 2 gloo ranks, 2 micro-steps per step)
  follows the data-parallel reference step for step.

One spawn of 2 ranks checks all of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

fsdp = pytest.importorskip("torch.distributed.fsdp", reason="PyTorch FSDP2 (fully_shard) is not available")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip(reason="this torch has no torch.distributed.fsdp.fully_shard (FSDP2)", allow_module_level=True)

from tierzero.parallel.engines import ENGINES, EngineSetup, Optim  # noqa: E402
from tierzero.parallel.plans import named_plan  # noqa: E402
from tierzero.parallel.topology import emulated_topology  # noqa: E402
from tierzero.recipes.config import DataConfig, ModelConfig  # noqa: E402
from tierzero.recipes.data import build_dataset  # noqa: E402
from tierzero.recipes.model import build_model, loss_fn  # noqa: E402
from tierzero.recipes.schedule import micro_batch_indices  # noqa: E402

pytestmark = pytest.mark.multiprocess

WORLD, MICRO, ACCUM, STEPS = 2, 2, 2, 4


def _engine(name: str, plan: str, rank: int, dtype: str = "float32"):
    torch.manual_seed(0)
    model = build_model(ModelConfig(d_model=32, n_layers=2, n_heads=2), vocab_size=64, seq_len=16)
    topo = emulated_topology([WORLD])
    setup = EngineSetup(plan=named_plan(plan, topo), topology=topo, rank=rank, loss_fn=loss_fn,
                        optim=Optim(lr=1e-2, weight_decay=0.1, grad_clip=1.0), micro_batch_size=MICRO,
                        grad_accum=ACCUM, dtype=dtype)
    return ENGINES[name].load()(model, setup)


def _train(engine, rank: int, calls: list):
    """STEPS optimizer steps; the loss of each micro-step, the reduce-scatters each one issued,
    the gradient norms, and the final parameters (full, float32)."""
    data = build_dataset(DataConfig(seq_len=16))
    losses, rs_per_micro, norms = [], [], []
    for step in range(STEPS):
        for micro in range(ACCUM):
            idx = micro_batch_indices(step, micro, dp_rank=rank, dp_size=WORLD, micro_batch=MICRO,
                                      global_batch=MICRO * ACCUM * WORLD)
            batch = data.samples(idx)
            before = len(calls)
            losses.append(float(engine.micro_step(batch[:, :-1], batch[:, 1:], scale=1.0 / ACCUM)))
            rs_per_micro.append(len(calls) - before)
        norms.append(engine.step(1e-2).grad_norm)
    if hasattr(engine, "global_tensors"):
        final = {n: t["param"] for n, t in engine.global_tensors().items()}
    else:
        final = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    return losses, rs_per_micro, norms, final


def _worker(rank: int, rdzv: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=WORLD)
    calls = []

    def counting(real):
        def counted(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)
        return counted

    # FSDP2 looks its reduce-scatter up at call time (reduce_scatter_single in torch 2.13)
    for name in ("reduce_scatter_tensor", "reduce_scatter_single"):
        if hasattr(dist, name):
            setattr(dist, name, counting(getattr(dist, name)))
    result = {}
    ref_losses, _, ref_norms, ref_final = _train(_engine("reference", "ddp", rank), rank, calls)
    result["reference"] = {"losses": ref_losses, "norms": ref_norms}
    for plan in ("zero2", "zero3"):
        engine = _engine("fsdp2", plan, rank)
        losses, rs, norms, final = _train(engine, rank, calls)
        result[plan] = {
            "losses": losses, "norms": norms, "rs_per_micro": rs,
            "param_diff": max(float((final[n] - ref_final[n]).abs().max()) for n in ref_final),
            "travel": max(float((ref_final[n] - final[n]).abs().max()) for n in ref_final),
            "optimizer": {k: engine.optimizer.defaults.get(k) for k in ("foreach", "fused")},
        }

    # train.activation_checkpointing=blocks on FSDP2 and on the native engine (its blocks are
    # gathered again before their backward, where the recompute runs): the same model
    from tierzero.parallel.engines.base import checkpoint_blocks

    for name, plan in (("fsdp2", "zero3"), ("native", "zero3")):
        torch.manual_seed(0)
        model = build_model(ModelConfig(d_model=32, n_layers=2, n_heads=2), vocab_size=64, seq_len=16)
        checkpoint_blocks(model)
        topo = emulated_topology([WORLD])
        engine = ENGINES[name].load()(model, EngineSetup(
            plan=named_plan(plan, topo), topology=topo, rank=rank, loss_fn=loss_fn, micro_batch_size=MICRO,
            grad_accum=ACCUM, optim=Optim(lr=1e-2, weight_decay=0.1, grad_clip=1.0)))
        losses, _, _, final = _train(engine, rank, calls)
        result[f"{name} recompute"] = {
            "losses": losses, "param_diff": max(float((final[n] - ref_final[n]).abs().max()) for n in ref_final)}

    # bfloat16: float32 masters, bf16 compute
    fsdp2 = _engine("fsdp2", "zero3", rank, dtype="bfloat16")
    local = [p.to_local() if hasattr(p, "to_local") else p for p in fsdp2.module.parameters()]
    data = build_dataset(DataConfig(seq_len=16)).samples([rank])
    result["bf16_fsdp2"] = {"master_dtypes": sorted({str(p.dtype) for p in local}),
                            "logits": str(fsdp2.module(data[:, :-1]).dtype)}
    ref = _engine("reference", "ddp", rank, dtype="bfloat16")
    seen = []
    hook = ref.module.register_forward_hook(lambda m, i, o: seen.append(str(o.dtype)))
    ref.micro_step(data[:, :-1], data[:, 1:], scale=1.0)
    hook.remove()
    result["bf16_reference"] = {"master_dtypes": sorted({str(p.dtype) for p in ref.module.parameters()}),
                                "grad_dtypes": sorted({str(p.grad.dtype) for p in ref.module.parameters()
                                                       if p.grad is not None}),
                                "head_out": seen,
                                "optimizer": {k: ref.optimizer.defaults.get(k) for k in ("foreach", "fused")}}
    Path(f"{out}.{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_references_are_configured_as_their_experts_run_them(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(str(tmp_path / "rdzv"), out), nprocs=WORLD, join=True)
    per_rank = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(WORLD)]
    r0 = per_rank[0]
    ref = r0["reference"]
    assert ref["losses"][-1] < ref["losses"][0] - 0.2, ref["losses"]  # it really trains
    for plan in ("zero2", "zero3"):
        r = r0[plan]
        # one reduce-scatter round per optimizer step, on the last micro-step only
        assert r["rs_per_micro"][0::ACCUM] == [0] * STEPS, r["rs_per_micro"]
        assert all(n > 0 for n in r["rs_per_micro"][ACCUM - 1::ACCUM]), r["rs_per_micro"]
        # and it still trains the same model as data parallelism
        for got, want in zip(r["losses"], ref["losses"]):
            assert abs(got - want) <= 1e-5 * abs(want), (plan, r["losses"], ref["losses"])
        for got, want in zip(r["norms"], ref["norms"]):
            assert abs(got - want) <= 1e-4 * abs(want), (plan, r["norms"], ref["norms"])
        assert r["param_diff"] < 1e-5, (plan, r["param_diff"])
        assert r["optimizer"]["foreach"] is True, r["optimizer"]
    for name in ("fsdp2 recompute", "native recompute"):
        r = r0[name]
        for got, want in zip(r["losses"], ref["losses"]):
            assert abs(got - want) <= 1e-5 * abs(want), (name, r["losses"], ref["losses"])
        assert r["param_diff"] < 1e-5, (name, r["param_diff"])
    bf16 = r0["bf16_fsdp2"]
    assert bf16 == {"master_dtypes": ["torch.float32"], "logits": "torch.bfloat16"}, bf16
    dp = r0["bf16_reference"]
    assert dp["master_dtypes"] == ["torch.float32"] and dp["grad_dtypes"] == ["torch.float32"], dp
    assert dp["head_out"] == ["torch.bfloat16"], dp
    assert dp["optimizer"]["foreach"] is True, dp
