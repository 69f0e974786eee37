"""The native engine: executes any PartitionPlan with torch.distributed.

The model is cut into units -- the "outer" parameters (embedding, final norm, head) and one
unit per transformer block -- each backed by one flat buffer padded to a multiple of the
world size. Module parameters are views into that buffer, whose storage exists only while
the unit is gathered (FSDP's flat-parameter technique: the autograd graph keeps the views,
the bytes come and go).

One micro-step, driven here block by block:
  forward   gather outer; for each block: wait for its gather, start the next block's
            (prefetch), run it, free it (hpz: keep the secondary shard first)
  backward  head + loss backward (outer still gathered), free outer; for each block in
            reverse: wait for its gather from the backward group (secondary level for hpz,
            the param level otherwise), prefetch the previous one, backward through it,
            reduce-scatter its gradient inside the grad level into the fp32 accumulator,
            free it; the embedding's backward needs no weights, then outer's gradient.
  step      gradient shards up to the optimizer level (reduce-scatter), across replicas
            (all-reduce), global norm and clipping, AdamW on the fp32 master shard, new
            parameters back down to the param level (all-gather).

Model contract: `model.embed(tokens)`, `model.blocks` (a ModuleList), `model.head(h)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
import torch.distributed as dist
from torch import nn

from parallel.engine import StepStats
from parallel.groups import build_groups
from parallel.ledger import ByteLedger, CommGroup
from parallel.plan import PartitionPlan, Unit, chunk_index, padded_numel, span
from parallel.topology import Topology


@dataclass
class _Param:
    name: str
    param: nn.Parameter
    shape: torch.Size
    offset: int
    numel: int


class FlatUnit:
    """One unit's flat buffer and its shards at every level of the plan."""

    def __init__(self, name: str, params: List[Tuple[str, nn.Parameter]], *, engine: "ShardedEngine",
                 fwd_gathers: int, bwd_gathers: int):
        self.name = name
        self.fwd_gathers, self.bwd_gathers = fwd_gathers, bwd_gathers
        e = engine
        offset, entries = 0, []
        for pname, p in params:
            entries.append(_Param(pname, p, p.shape, offset, p.numel()))
            offset += p.numel()
        self.params = entries
        self.numel = offset
        self.N = padded_numel(offset, e.world_size)
        self.dtype = e.dtype

        full = torch.zeros(self.N, dtype=self.dtype, device=e.device)
        with torch.no_grad():
            for ent in entries:
                full[ent.offset: ent.offset + ent.numel].copy_(ent.param.detach().reshape(-1))
        init = full.clone()
        self.full = full
        for ent in entries:
            ent.param.data = full[ent.offset: ent.offset + ent.numel].view(ent.shape)

        self.c_p, self.c_b, self.c_g, self.c_o = (self.N // s for s in (e.s_p, e.s_b, e.s_g, e.s_o))
        self.persistent = e.s_p == 1  # replicated params: the full buffer is the param shard
        if self.persistent:
            self.p_shard = full
        else:
            self.p_shard = init[e.idx_p * self.c_p:(e.idx_p + 1) * self.c_p].clone()
        self.b_shard = (torch.empty(self.c_b, dtype=self.dtype, device=e.device)
                        if e.plan.secondary_level is not None else None)
        self.grad_acc = torch.zeros(self.c_g, dtype=torch.float32, device=e.device)
        o = slice(e.idx_o * self.c_o, (e.idx_o + 1) * self.c_o)
        self.master = init[o].float().clone()
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        decay = torch.zeros(self.N, dtype=torch.bool, device=e.device)
        for ent in entries:
            if len(ent.shape) >= 2:  # norms are not decayed (parallel.engine.param_groups)
                decay[ent.offset: ent.offset + ent.numel] = True
        self.decay = decay[o].clone()
        self.gathered = True
        if not self.persistent:
            self.free()

    # storage management -------------------------------------------------------------
    def _alloc(self) -> None:
        st = self.full.untyped_storage()
        want = self.N * self.full.element_size()
        if st.size() != want:
            st.resize_(want)

    def free(self) -> None:
        if not self.persistent:
            self.full.untyped_storage().resize_(0)
        self.gathered = False


def _outer_params(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    block_ids = {id(p) for p in model.blocks.parameters()}
    outer, seen = [], set()
    for name, p in model.named_parameters():
        if id(p) not in block_ids and id(p) not in seen:
            seen.add(id(p))
            outer.append((name, p))
    return outer


def model_units(model: nn.Module) -> List[Unit]:
    """The engine's units as the cost model sees them (works on a meta-device model)."""
    outer = Unit("outer", sum(p.numel() for _, p in _outer_params(model)), fwd_gathers=1, bwd_gathers=0)
    return [outer] + [Unit(f"blocks.{i}", sum(p.numel() for p in blk.parameters()))
                      for i, blk in enumerate(model.blocks)]


class ShardedEngine:
    """Executes a PartitionPlan; see the module docstring for the schedule."""

    name = "native"

    def __init__(
        self,
        model: nn.Module,
        *,
        plan: PartitionPlan,
        topology: Topology,
        rank: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        lr: float,
        betas=(0.9, 0.95),
        weight_decay: float = 0.0,
        grad_clip: float = 0.0,
        eps: float = 1e-8,
        device: str = "cpu",
    ):
        self.model, self.plan, self.topo, self.rank = model, plan, topology, rank
        self.loss_fn = loss_fn
        self.lr, self.betas, self.weight_decay, self.grad_clip, self.eps = lr, betas, weight_decay, grad_clip, eps
        self.device = device
        self.world_size = topology.world_size
        self.dtype = next(model.parameters()).dtype
        self.s_p, self.s_b, self.s_g, self.s_o = (
            span(topology, lv) for lv in (plan.param_level, plan.bwd_level, plan.grad_level, plan.optim_level))
        self.idx_p, self.idx_b, self.idx_g, self.idx_o = (
            chunk_index(topology, rank, lv) for lv in (plan.param_level, plan.bwd_level, plan.grad_level, plan.optim_level))
        self.groups: Dict[str, CommGroup] = build_groups(plan, topology, rank)
        self.ledger = ByteLedger()
        self._position_cache: Dict[Tuple[Tuple[int, ...], int], List[int]] = {}
        self.step_count = 0
        self.world_group_size = dist.get_world_size() if dist.is_initialized() else 1
        assert self.world_group_size == self.world_size, "topology and process group disagree"

        self.outer = FlatUnit("outer", _outer_params(model), engine=self, fwd_gathers=1, bwd_gathers=0)
        self.blocks = [
            FlatUnit(f"blocks.{i}", [(f"blocks.{i}.{n}", p) for n, p in blk.named_parameters()],
                     engine=self, fwd_gathers=1, bwd_gathers=1)
            for i, blk in enumerate(model.blocks)
        ]
        self.units = [self.outer] + self.blocks

    def cost_units(self) -> List[Unit]:
        return model_units(self.model)

    # ---- gathers ---------------------------------------------------------------------------
    def _positions(self, group: CommGroup, level: int) -> List[int]:
        """Chunk index of each group member at `level`, in group order (computed once per group:
        this runs for every unit on every gather and reduce-scatter)."""
        key = (group.ranks, level)
        if key not in self._position_cache:
            self._position_cache[key] = [chunk_index(self.topo, m, level) for m in group.ranks]
        return self._position_cache[key]

    def _gather(self, unit: FlatUnit, phase: str, async_op: bool):
        """All-gather the unit's full buffer from the forward (param) or backward group."""
        if unit.persistent:
            return None
        unit._alloc()
        unit.gathered = True
        if phase == "fwd" or self.plan.secondary_level is None:
            group, level, shard, c = self.groups["param"], self.plan.param_level, unit.p_shard, unit.c_p
        else:
            group, level, shard, c = self.groups["bwd"], self.plan.secondary_level, unit.b_shard, unit.c_b
        outs = [unit.full[j * c:(j + 1) * c] for j in self._positions(group, level)]
        return self.ledger.all_gather(outs, shard, group, phase, async_op=async_op)

    def _after_fwd_gather(self, unit: FlatUnit) -> None:
        if unit.b_shard is not None:  # hpZ: keep the secondary shard cut from this gather
            unit.b_shard.copy_(unit.full[self.idx_b * unit.c_b:(self.idx_b + 1) * unit.c_b])

    # ---- one micro-step --------------------------------------------------------------------
    def micro_step(self, inputs: torch.Tensor, targets: torch.Tensor, *, scale: float) -> float:
        """Forward and backward of one micro-batch; returns its (unscaled) loss."""
        model, blocks = self.model, self.blocks
        self._gather(self.outer, "fwd", async_op=False)
        self._after_fwd_gather(self.outer)
        pending = self._gather(blocks[0], "fwd", async_op=True) if blocks else None

        h = model.embed(inputs)
        leaves, outs = [], []
        x = h.detach().requires_grad_()
        for i, blk in enumerate(blocks):
            if pending is not None:
                pending.wait()
            self._after_fwd_gather(blk)
            pending = self._gather(blocks[i + 1], "fwd", async_op=True) if i + 1 < len(blocks) else None
            leaves.append(x)
            y = model.blocks[i](x)
            outs.append(y)
            blk.free()
            x = y.detach().requires_grad_()
        logits = model.head(x)
        loss = self.loss_fn(logits, targets)
        (loss * scale).backward()
        self.outer.free()
        grad = x.grad

        pending = self._gather(blocks[-1], "bwd", async_op=True) if blocks else None
        for i in range(len(blocks) - 1, -1, -1):
            if pending is not None:
                pending.wait()
            pending = self._gather(blocks[i - 1], "bwd", async_op=True) if i > 0 else None
            torch.autograd.backward(outs[i], grad)
            grad = leaves[i].grad
            self._reduce_grads(blocks[i])
            blocks[i].free()
        torch.autograd.backward(h, grad)
        self._reduce_grads(self.outer)
        return loss.item()

    def _reduce_grads(self, unit: FlatUnit) -> None:
        flat = torch.zeros(unit.N, dtype=self.dtype, device=self.device)
        for ent in unit.params:
            if ent.param.grad is not None:
                flat[ent.offset: ent.offset + ent.numel].copy_(ent.param.grad.reshape(-1))
                ent.param.grad = None
        group, c = self.groups["grad"], unit.c_g
        if group.size == 1:
            unit.grad_acc.add_(flat[self.idx_g * c:(self.idx_g + 1) * c])
            return
        out = torch.empty(c, dtype=self.dtype, device=self.device)
        ins = [flat[j * c:(j + 1) * c] for j in self._positions(group, self.plan.grad_level)]
        self.ledger.reduce_scatter(out, ins, group, "bwd")
        unit.grad_acc.add_(out)

    # ---- optimizer step --------------------------------------------------------------------
    def step(self, lr: float) -> StepStats:
        up, reps = self.groups["grad_up"], self.groups["replicas"]
        grads = []
        for u in self.units:
            if up.size > 1:  # G-shard -> O-shard: the O-chunks inside my G-chunk
                base = self.idx_g * (self.s_o // self.s_g)
                ins = [u.grad_acc[(j - base) * u.c_o:(j - base + 1) * u.c_o]
                       for j in self._positions(up, self.plan.optim_level)]
                g = torch.empty(u.c_o, dtype=torch.float32, device=self.device)
                self.ledger.reduce_scatter(g, ins, up, "step")
            else:
                off = (self.idx_o - self.idx_g * (self.s_o // self.s_g)) * u.c_o
                g = u.grad_acc[off: off + u.c_o]
            self.ledger.all_reduce(g, reps, "step")
            g.div_(self.world_size)
            grads.append(g)
        sumsq = torch.stack([g.double().pow(2).sum() for g in grads]).sum().float().reshape(1)
        self.ledger.all_reduce(sumsq, self.groups["optim"], "step")
        norm = math.sqrt(sumsq.item())
        if self.grad_clip > 0 and norm > self.grad_clip:
            coef = self.grad_clip / (norm + 1e-6)
            for g in grads:
                g.mul_(coef)

        self.step_count += 1
        b1, b2 = self.betas
        bc1 = 1 - b1 ** self.step_count
        bc2_sqrt = math.sqrt(1 - b2 ** self.step_count)
        decay_factor = 1 - lr * self.weight_decay
        down = self.groups["param_down"]
        for u, g in zip(self.units, grads):
            # AdamW exactly as torch.optim.AdamW (single-tensor path), on the fp32 shard
            u.master.mul_(torch.where(u.decay, decay_factor, 1.0))
            u.exp_avg.lerp_(g, 1 - b1)
            u.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (u.exp_avg_sq.sqrt() / bc2_sqrt).add_(self.eps)
            u.master.addcdiv_(u.exp_avg, denom, value=-lr / bc1)
            u.grad_acc.zero_()
            new = u.master.to(self.dtype)
            if down.size > 1:  # O-shard -> P-shard: gather the O-chunks that make up my P-chunk
                base = self.idx_p * (self.s_o // self.s_p)
                outs = [u.p_shard[(j - base) * u.c_o:(j - base + 1) * u.c_o]
                        for j in self._positions(down, self.plan.optim_level)]
                self.ledger.all_gather(outs, new, down, "step")
            else:
                off = (self.idx_o - self.idx_p * (self.s_o // self.s_p)) * u.c_o
                u.p_shard[off: off + u.c_o].copy_(new)
        return StepStats(grad_norm=norm)

    def take_comm(self) -> List[dict]:
        return self.ledger.take()

    # ---- global tensors (checkpoints, tests) -----------------------------------------------
    def global_tensors(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """name -> {'param', 'exp_avg', 'exp_avg_sq'} as full fp32 tensors, on every rank."""
        group = self.groups["optim"]
        out: Dict[str, Dict[str, torch.Tensor]] = {}
        for u in self.units:
            fulls = {}
            for key in ("master", "exp_avg", "exp_avg_sq"):
                shard = getattr(u, key)
                full = torch.empty(u.N, dtype=torch.float32, device=self.device)
                outs = [full[j * u.c_o:(j + 1) * u.c_o] for j in self._positions(group, self.plan.optim_level)]
                if group.size > 1:
                    dist.all_gather(outs, shard, group=group.pg)
                else:
                    outs[0].copy_(shard)
                fulls[key] = full
            for ent in u.params:
                out[ent.name] = {
                    ("param" if k == "master" else k): v[ent.offset: ent.offset + ent.numel].view(ent.shape).clone()
                    for k, v in fulls.items()
                }
        return out
