"""The engine interface the training loop talks to, and its first implementation.

The loop only ever calls `micro_step(inputs, targets, scale)` per micro-batch, `step(lr)`
per optimizer step and `take_comm()` for the byte ledger, so any engine can run it.
DataParallelEngine keeps a full replica on every rank, uses torch.optim.AdamW and
all-reduces the gradients once per optimizer step. It is the single-process reference the
sharded engine (parallel/zero.py) is tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from tierzero.parallel.moe import set_aux_grad_scale


@dataclass(frozen=True)
class StepStats:
    grad_norm: float
    """Global gradient norm before clipping (the same on every rank)."""
    skipped: bool = False
    """The norm was NaN or inf: no parameter or optimizer state changed, gradients dropped."""


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Decay matrices only; norms (1-D) are not decayed (the usual AdamW practice)."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class DataParallelEngine:
    """Replicated parameters and optimizer state; gradients averaged with one flat all-reduce."""

    name = "ddp"

    def __init__(
        self,
        module: nn.Module,
        *,
        lr: float,
        betas=(0.9, 0.95),
        weight_decay: float = 0.0,
        grad_clip: float = 0.0,
        group: Optional[dist.ProcessGroup] = None,
        loss_fn=None,
    ):
        self.module = module
        self.loss_fn = loss_fn
        self.group = group
        self.world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.grad_clip = grad_clip
        self.params = [p for g in param_groups(module, weight_decay) for p in g["params"]]
        self.optimizer = torch.optim.AdamW(
            param_groups(module, weight_decay), lr=lr, betas=betas, foreach=False
        )
        if self.world_size > 1:
            # Identical seeds give identical replicas, but make it a fact, not a hope.
            for p in self.params:
                dist.broadcast(p.data, src=dist.get_global_rank(group, 0) if group else 0, group=group)

    def micro_step(self, inputs: torch.Tensor, targets: torch.Tensor, *, scale: float) -> float:
        """Forward + backward of one micro-batch, accumulating d(loss*scale)/dparams locally."""
        set_aux_grad_scale(self.module, scale)
        loss = self.loss_fn(self.module(inputs), targets)
        (loss * scale).backward()
        return loss.item()

    def take_comm(self) -> list:
        return []

    def step(self, lr: float) -> StepStats:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.world_size > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
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


