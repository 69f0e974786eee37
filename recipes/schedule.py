"""What a step reads and at what learning rate (pure): the shared rules every engine and every
reference implementation follow.

Batch layout: optimizer step s reads global samples [s*G, (s+1)*G) (G = global batch).
Micro-step m on data-parallel rank r reads the slice starting at s*G + (m*dp + r)*mb.
Every sample is a pure function of (data.seed, index), so any world size reads the same
global token stream and, with equal-sized micro-batches, computes the same mean loss.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from tierzero.recipes.config import TrainConfig


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to `lr`, then cosine decay to lr*min_lr_ratio at the last step (1-based step)."""
    if warmup_steps and step <= warmup_steps:
        return lr * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def micro_batch_indices(step: int, micro: int, *, dp_rank: int, dp_size: int, micro_batch: int, global_batch: int,
                        first_sample: Optional[int] = None) -> np.ndarray:
    """Global sample indices of one micro-batch. `step` is 0-based; the step's global batch
    starts at `first_sample` (default step x global_batch; a resumed run passes where the
    checkpoint left the token stream, so a changed world size or batch continues it)."""
    base = step * global_batch if first_sample is None else first_sample
    start = base + (micro * dp_size + dp_rank) * micro_batch
    return np.arange(start, start + micro_batch, dtype=np.int64)


def grad_accum_steps(train_cfg: TrainConfig, dp_size: int) -> int:
    mb, gb = train_cfg.micro_batch_size, train_cfg.global_batch_size
    assert gb % (mb * dp_size) == 0, "checked before launch (launcher.config.check_world)"
    return gb // (mb * dp_size)
