"""Config section owned by checkpoints: `checkpoint.*` (docs/checkpoint.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

ON_ERROR = ("continue", "stop")


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """Where checkpoints go: a path or fsspec URL (file://, memory://, s3://); default <run.dir>/checkpoints."""
    every_steps: int = 0
    """Save every N optimizer steps (and after the last); 0 = never save."""
    async_save: bool = True
    """Copy the shards to host memory and write them in the background while training goes on."""
    fsync: bool = True
    """fsync a save's files and folders before COMMITTED counts (local and shared filesystems); false skips it."""
    resume: str = "auto"
    """auto (the newest committed checkpoint in checkpoint.dir, else start fresh), none, or a path: a step folder, or a checkpoints folder (its newest committed step)."""
    keep: int = 3
    """Committed checkpoints kept (the newest ones); older ones are deleted after each commit."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this; 0 = none."""
    on_error: str = "continue"
    """A save that fails (disk full, permission denied): continue training (an error event) or stop."""
    init_from: Optional[str] = None
    """Start from the weights of a .safetensors file or a Hugging Face folder (`tierzero ckpt export`, save_pretrained; fp32/bf16/fp16, sharded or not); fresh optimizer."""

    def errors(self) -> List[str]:
        errs = []
        if self.dir is not None and not str(self.dir).strip():
            errs.append("checkpoint.dir='' is empty; leave it unset for <run.dir>/checkpoints or give a path or URL")
        if self.every_steps < 0:
            errs.append(f"checkpoint.every_steps={self.every_steps} must be >= 0 (0 = never), e.g. 100")
        if self.keep < 1:
            errs.append(f"checkpoint.keep={self.keep} must be >= 1: the newest committed checkpoint is always kept")
        if self.keep_every < 0:
            errs.append(f"checkpoint.keep_every={self.keep_every} must be >= 0 (0 = none)")
        if self.on_error not in ON_ERROR:
            errs.append(f"checkpoint.on_error={self.on_error!r} is not one of {list(ON_ERROR)}")
        if not str(self.resume).strip():
            errs.append("checkpoint.resume='' is empty; use auto, none or a checkpoint path")
        if self.init_from is not None and str(self.init_from).endswith((".pt", ".pth", ".bin", ".ckpt", ".pkl")):
            errs.append(f"checkpoint.init_from={self.init_from!r} looks like a pickled PyTorch file, which tierzero "
                        "never loads (loading runs code); give a .safetensors file or a Hugging Face folder "
                        "(`tierzero ckpt export`, save_pretrained)")
        return errs
