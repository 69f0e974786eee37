"""PyTorch FSDP2 (`fully_shard`) as an engine (`parallel.engine=fsdp2`): the reference the native
engine is measured and tested against.

FSDP2 runs zero3 (1-D mesh, parameters resharded after forward), zero2 (1-D mesh, parameters
kept gathered between forward and backward) and hsdp (2-D replicate x shard mesh);
parallel.engines.fsdp2_mesh_shape maps a plan to its mesh and refuses the others.

Configured as FSDP2's experts run it (torchtitan's settings): float32 sharded parameters as the
masters with a MixedPrecisionPolicy that gathers them in train.dtype and reduces gradients in
parallel.reduce_dtype; gradients reduce-scattered (and all-reduced across hsdp replicas) only
on the last micro-step of an optimizer step (set_requires_gradient_sync); fused AdamW on a GPU,
foreach AdamW on CPU. With train.compile=true each block arrives compiled in place
(recipes.compiling.compile_model, before fully_shard, as torchtitan compiles before it shards):
fully_shard's hooks run outside the block's graph, the head runs eagerly in the root module and
the loss is compiled alone.
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from torch import nn

from tierzero.parallel.engines import EngineSetup, fsdp2_mesh_shape
from tierzero.parallel.engines.base import StepStats, fast_adamw_options, param_groups


class FSDP2Engine:
    name = "fsdp2"

    def __init__(self, model: nn.Module, setup: EngineSetup):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        o = setup.optim
        if not dist.is_initialized():  # one rank: tierzero makes no process group, FSDP2 needs one
            dist.init_process_group("nccl" if setup.device.startswith("cuda") else "gloo", store=dist.HashStore(),
                                    rank=0, world_size=1)
        shape, names, reshard = fsdp2_mesh_shape(setup.plan, setup.topology)
        self.mesh = init_device_mesh("cuda" if setup.device.startswith("cuda") else "cpu", shape, mesh_dim_names=names)
        mp = MixedPrecisionPolicy()
        if setup.dtype == "bfloat16":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16
                                      if setup.reduce_dtype == "bfloat16" else torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=self.mesh, reshard_after_forward=reshard, mp_policy=mp)
        fully_shard(model, mesh=self.mesh, reshard_after_forward=reshard, mp_policy=mp)
        self.grad_accum, self.micro = setup.grad_accum, 0
        self.module, self.loss_fn, self.grad_clip = model, setup.loss_fn, o.grad_clip
        self.params: List[torch.Tensor] = list(model.parameters())
        self.optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                                           **fast_adamw_options(setup.device))

    def micro_step(self, inputs: torch.Tensor, targets: torch.Tensor, *, scale: float) -> float:
        self.micro += 1
        self.module.set_requires_gradient_sync(self.micro % self.grad_accum == 0)  # once per optimizer step
        loss = self.loss_fn(self.module(inputs), targets)
        (loss * scale).backward()
        return loss.detach()

    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The micro-step's forward and loss under torch.no_grad (FSDP2 gathers and reshards as in
        training); no gradient, so nothing is reduced. On the device."""
        with torch.no_grad():
            return self.loss_fn(self.module(inputs), targets)

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
