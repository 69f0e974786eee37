"""How the native engine cuts a model into units (the outer parameters, then each block's dense
and expert parameters), as the cost model sees them; which tensors a checkpoint holds."""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from tierzero.parallel.cost import Unit


STATE_KEYS = (("master", "model"), ("exp_avg", "optim.exp_avg"), ("exp_avg_sq", "optim.exp_avg_sq"))
"""FlatUnit attribute -> checkpoint tensor prefix: fp32 master weights and the AdamW moments."""


def persistent_buffers(model: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """Buffers that belong in a checkpoint (the MoE selection bias; not the rotary tables)."""
    keys = set(model.state_dict().keys())
    return [(n, b) for n, b in model.named_buffers() if n in keys]


def _is_expert(name: str) -> bool:
    """Routed-expert weights (parallel.moe.Experts): sharded over the expert-data-parallel ranks."""
    return ".experts." in f".{name}"


def _block_params(model: nn.Module, i: int, experts: bool) -> List[Tuple[str, nn.Parameter]]:
    return [(f"blocks.{i}.{n}", p) for n, p in model.blocks[i].named_parameters() if _is_expert(n) == experts]


def _outer_params(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    block_ids = {id(p) for p in model.blocks.parameters()}
    outer, seen = [], set()
    for name, p in model.named_parameters():
        if id(p) not in block_ids and id(p) not in seen:
            seen.add(id(p))
            outer.append((name, p))
    return outer


def block_bwd_gathers(i: int, num_blocks: int) -> int:
    """Backward gathers of block i's units per micro-step: none for the last block, whose
    backward comes right after its forward (the head's between them), so its forward gather
    stays for it (FSDP2 does the same for the last module), one for the others."""
    return 0 if i == num_blocks - 1 else 1


def model_units(model: nn.Module) -> List[Unit]:
    """The engine's units as the cost model sees them (works on a meta-device model)."""
    outer = Unit("outer", sum(p.numel() for _, p in _outer_params(model)), fwd_gathers=1, bwd_gathers=0)
    units, n = [outer], len(model.blocks)
    for i in range(n):
        bwd = block_bwd_gathers(i, n)
        units.append(Unit(f"blocks.{i}", sum(p.numel() for _, p in _block_params(model, i, experts=False)),
                          bwd_gathers=bwd))
        experts = sum(p.numel() for _, p in _block_params(model, i, experts=True))
        if experts:
            units.append(Unit(f"blocks.{i}.experts", experts, bwd_gathers=bwd, expert=True))
    return units
