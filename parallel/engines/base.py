"""The contract between the training loop and an engine, and the pieces every engine shares.

The loop (recipes/trainer.py) calls `micro_step(inputs, targets, scale=...)` per micro-batch,
`step(lr)` once per optimizer step, `eval_loss(inputs, targets)` per held-out micro-batch
(train.eval_every) and `take_comm()` for the byte ledger's rows; checkpoints
(checkpoint/saver.py) use the Checkpointable methods. Nothing else of an engine is reached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Protocol, Tuple, runtime_checkable

import numpy as np
from torch import nn


@dataclass(frozen=True)
class StepStats:
    grad_norm: float
    """Global gradient norm before clipping (the same on every rank)."""
    skipped: bool = False
    """The norm was NaN or inf: no parameter or optimizer state changed, gradients dropped."""


class CheckpointSlice(NamedTuple):
    """A part of a global tensor this rank saves: elements [start, start + data.size) of its
    flattened form (checkpoint.store.Slice on disk)."""
    name: str
    shape: Tuple[int, ...]
    dtype: str
    start: int
    data: np.ndarray


@runtime_checkable
class Engine(Protocol):
    name: str

    def micro_step(self, inputs, targets, *, scale: float):
        """Forward and backward of one micro-batch, gradients of loss x scale accumulated; the
        (unscaled) loss, a 0-dim tensor left on the device (or a float): the loop sums the
        micro-steps' losses on the device and reads the step's once (parallel/host.py)."""

    def eval_loss(self, inputs, targets):
        """The loss of one held-out micro-batch under torch.no_grad: the micro-step's forward, no
        backward, no state changed; a 0-dim tensor left on the device (train.eval_every)."""

    def step(self, lr: float) -> StepStats:
        """One optimizer step at learning rate `lr` over everything accumulated since the last."""

    def take_comm(self) -> List[dict]:
        """The byte ledger's rows since the last call (phase, level, op, bytes, time_s, calls);
        [] for an engine whose collectives tierzero does not issue."""


@runtime_checkable
class Checkpointable(Engine, Protocol):
    step_count: int
    """Optimizer steps taken (AdamW's bias correction); a checkpoint records it."""

    def checkpoint_slices(self) -> List[CheckpointSlice]:
        """What this rank saves of the global tensors (model/<name>, optim.exp_avg/<name>, ...)."""

    def load_checkpoint(self, read: Callable[[str, int, int], np.ndarray], step_count: int) -> None:
        """Fill this rank's state from global tensors, `read(name, start, numel)`; local reads only."""

    def after_load(self) -> None:
        """Collectives that rebuild the working state once every rank has read (all ranks call it)."""


def checkpoint_blocks(model: nn.Module) -> None:
    """train.activation_checkpointing=blocks: each of `model.blocks` keeps only its input for the
    backward and runs its forward again there (torch.utils.checkpoint, non-reentrant). Done on
    the blocks' forward, so every engine gets it the same way: the native engine calls the
    blocks itself (and has them gathered again before their backward), FSDP2's and the
    reference's model calls them."""
    import functools

    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def fast_adamw_options(device: str) -> dict:
    """How an expert runs torch's AdamW on `device`: the fused kernel on a GPU, the foreach
    (multi-tensor) path on CPU -- the references are configured this way, not with the slow
    single-tensor loop."""
    return {"fused": True} if device.startswith("cuda") else {"foreach": True}


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Decay matrices only; norms (1-D) are not decayed (the usual AdamW practice)."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
