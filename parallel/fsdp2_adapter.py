"""PyTorch FSDP2 (`fully_shard`) as an engine: the reference the native engine is measured
and tested against (`parallel.engine=fsdp2`).

Plans FSDP2 expresses:
    zero3  1-D mesh over all ranks, parameters resharded after forward
    zero2  1-D mesh, parameters kept gathered between forward and backward
    hsdp   2-D mesh (replicate x shard), shard = ranks of one unit of parallel.hsdp_level
Anything else (ddp, zero1, hpz, tiered) is refused with a message naming the native engine.
"""

from __future__ import annotations

from typing import Callable, List

import torch
import torch.distributed as dist
from torch import nn

from tierzero.parallel.choose import Choice, restrict_choice
from tierzero.parallel.engine import StepStats, param_groups
from tierzero.parallel.layout import span
from tierzero.parallel.plans import PartitionPlan, PlanError
from tierzero.parallel.topology import Topology


def fsdp2_mesh_shape(plan: PartitionPlan, topo: Topology):
    """(mesh shape, dim names, reshard_after_forward) for a plan FSDP2 can run (pure)."""
    c = len(topo.levels) - 1
    levels = (plan.param_level, plan.grad_level, plan.optim_level)
    if plan.secondary_level is None and levels == (c, c, c):
        return (topo.world_size,), ("shard",), True
    if plan.secondary_level is None and levels == (-1, c, c):
        return (topo.world_size,), ("shard",), False
    lv = plan.param_level
    if plan.secondary_level is None and lv >= 0 and levels == (lv, lv, lv):
        shard = span(topo, lv)
        return (topo.world_size // shard, shard), ("replicate", "shard"), True
    raise PlanError(
        f"parallel.engine=fsdp2 cannot run {plan.describe(topo)}: FSDP2 shards parameters, gradients and "
        "optimizer states over one group (zero3, zero2) or shards inside a level and replicates across it "
        "(hsdp). Use parallel.engine=native, which runs every plan."
    )


def fsdp2_can_run(plan: PartitionPlan, topo: Topology) -> bool:
    try:
        fsdp2_mesh_shape(plan, topo)
        return True
    except PlanError:
        return False


def restrict_auto_choice(choice: Choice, topo: Topology) -> Choice:
    return restrict_choice(choice, topo, lambda plan: fsdp2_can_run(plan, topo), "FSDP2")


class FSDP2Engine:
    name = "fsdp2"

    def __init__(self, model: nn.Module, *, plan: PartitionPlan, topology: Topology, rank: int,
                 loss_fn: Callable, lr: float, betas=(0.9, 0.95), weight_decay: float = 0.0,
                 grad_clip: float = 0.0, device: str = "cpu"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        shape, names, reshard = fsdp2_mesh_shape(plan, topology)
        self.mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", shape, mesh_dim_names=names)
        for block in model.blocks:
            fully_shard(block, mesh=self.mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=self.mesh, reshard_after_forward=reshard)
        self.module, self.loss_fn, self.grad_clip = model, loss_fn, grad_clip
        self.params: List[torch.Tensor] = list(model.parameters())
        self.optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, foreach=False)

    def micro_step(self, inputs: torch.Tensor, targets: torch.Tensor, *, scale: float) -> float:
        loss = self.loss_fn(self.module(inputs), targets)
        (loss * scale).backward()
        return loss.item()

    def step(self, lr: float) -> StepStats:
        from torch.distributed.tensor import DTensor

        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(grad_norm=float(norm))

    def take_comm(self) -> list:
        """FSDP2's collectives are not in tierzero's byte ledger."""
        return []

    def global_tensors(self):
        out = {}
        for name, p in self.module.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
            state = self.optimizer.state.get(p, {})
            entry = {"param": full.detach().float().clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    t = state[key]
                    entry[key] = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().clone()
            out[name] = entry
        if dist.is_initialized():
            dist.barrier()
        return out
