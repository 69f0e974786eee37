"""What a rank knows about itself once torch.distributed is up (plain data, no env reads)."""

from __future__ import annotations

from dataclasses import dataclass

from tierzero.parallel.topology import Topology


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: str
    """torch device string: cpu or cuda:<local_rank>."""
    backend: str
    """gloo or nccl ('none' for a single process without a process group)."""
    topology: Topology
    host: str
    attempt: int = 0
