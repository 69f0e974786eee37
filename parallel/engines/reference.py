"""The reference engine (`parallel.engine=reference`): plain data parallelism with
torch.optim.AdamW -- a full replica on every rank, gradients all-reduced once per optimizer step.

It shares no code with the sharded engines, so it is what they are tested against: in one
process it is the single-process reference of every equivalence test (tests/reference.py).
It runs the ddp plan only, MoE with every expert on every rank, and no checkpoints.

Configured as data parallelism is run by its experts: float32 parameters (the masters) with
the forward under autocast for train.dtype=bfloat16, gradients synchronised once per optimizer
step (the micro-steps accumulate locally, as DDP's no_sync does), fused AdamW on a GPU and
foreach AdamW on CPU. With train.compile=true its blocks arrive compiled in place
(recipes.compiling.compile_model) and setup.loss_fn is the loss compiled alone.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from tierzero.parallel.engines import EngineSetup
from tierzero.parallel.engines.base import StepStats, fast_adamw_options, param_groups
from tierzero.parallel.moe import set_aux_grad_scale


class ReferenceEngine:
    """Replicated parameters and optimizer state; gradients averaged with one flat all-reduce."""

    name = "reference"

    def __init__(self, module: nn.Module, setup: EngineSetup):
        o = setup.optim
        self.module, self.loss_fn, self.grad_clip = module, setup.loss_fn, o.grad_clip
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.params = [p for g in param_groups(module, o.weight_decay) for p in g["params"]]
        self.optimizer = torch.optim.AdamW(param_groups(module, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                                           **fast_adamw_options(setup.device))
        self.autocast = dict(device_type="cuda" if setup.device.startswith("cuda") else "cpu", dtype=torch.bfloat16,
                             enabled=setup.dtype == "bfloat16")
        if self.world_size > 1:
            # Identical seeds give identical replicas, but make it a fact, not a hope.
            for p in self.params:
                dist.broadcast(p.data, src=0)

    def micro_step(self, inputs: torch.Tensor, targets: torch.Tensor, *, scale: float) -> float:
        """Forward + backward of one micro-batch, accumulating d(loss*scale)/dparams locally."""
        set_aux_grad_scale(self.module, scale)
        with torch.autocast(**self.autocast):
            logits = self.module(inputs)
        loss = self.loss_fn(logits, targets)
        (loss * scale).backward()
        return loss.detach()

    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The micro-step's forward and loss under torch.no_grad (on the device)."""
        with torch.no_grad():
            with torch.autocast(**self.autocast):
                logits = self.module(inputs)
            return self.loss_fn(logits, targets)

    def take_comm(self) -> list:
        return []

    def step(self, lr: float) -> StepStats:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.world_size > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(self.world_size)
            offset = 0
            for p, g in zip(self.params, grads):
                n = g.numel()
                p.grad = flat[offset: offset + n].view_as(p).clone()
                offset += n
        else:
            for p, g in zip(self.params, grads):
                p.grad = g
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in self.params])
        ).item()
        if not math.isfinite(norm):  # the same on every rank: the gradients were averaged first
            self.optimizer.zero_grad(set_to_none=True)
            return StepStats(grad_norm=norm, skipped=True)
        if self.grad_clip > 0 and norm > self.grad_clip:
            coef = self.grad_clip / (norm + 1e-6)
            for p in self.params:
                p.grad.mul_(coef)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(grad_norm=norm)
