"""The native engine (`parallel.engine=native`): executes any PartitionPlan with torch.distributed.

The model is cut into units -- the "outer" parameters (embedding, final norm, head) and one
unit per transformer block -- each backed by one flat buffer padded to a multiple of the
world size. Module parameters are views into that buffer, whose storage exists only while
the unit is gathered (FSDP's flat-parameter technique: the autograd graph keeps the views,
the bytes come and go).

One micro-step, driven here block by block:
  forward   gather outer (or wait for its prefetch); for each block: wait for its gather,
            start the next block's (prefetch), run it, free it (hpz: keep the secondary shard
            first) -- but the last block, whose backward comes next, stays gathered
  backward  head + loss backward (outer still gathered), free outer; for each block in
            reverse: wait for its gather from the backward group (secondary level for hpz,
            the param level otherwise; none for the last block), prefetch the previous one
            (before block 0: the next micro-step's outer gather, when one follows in this
            optimizer step), backward through it, reduce-scatter its gradient inside the grad
            level into the fp32 accumulator (allocated by the first gradient), free it and the
            block's saved input and output; the embedding's backward needs no weights, then
            outer's gradient. With parallel.grad_sync=step a unit's gradient is only added to its
            full-size local sum until the optimizer step's last micro-step reduce-scatters it.
  step      gradient shards up to the optimizer level (reduce-scatter), across replicas
            (all-reduce), the global norm (fp32, read once), AdamW on the fp32 master shards
            in torch's fused kernel (`adamw_update_`: weight decay by layout, the 1/world
            average and clipping as its grad_scale), the accumulators released, new
            parameters back down to the param level (all-gather; in float32, a plan that shards
            parameters like the optimizer has one buffer for both).

A plan that quantizes (parallel.quant) changes only how collectives on its listed levels move
their bytes: the parameter gathers send block-quantized chunks (qwZ), and the gradient
reduce-scatter runs hop by hop with quantized hops as all-to-alls (qgZ; `_reduce_by_hops`),
both through parallel.codec and the byte ledger.

Model contract: `model.embed(tokens)`, `model.blocks` (a ModuleList), `model.head(h)`, and
optionally `model.head_loss(h, targets)` (head and loss in one call; else loss_fn(head(h))).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from tierzero.parallel.cost import Unit
from tierzero.parallel.engines import EngineSetup
from tierzero.parallel.engines.base import StepStats
from tierzero.parallel.codec import Codec, quantized_all_gather, quantized_reduce_scatter
from tierzero.parallel.groups import build_groups, build_hop_groups, build_partition
from tierzero.parallel.host import to_host
from tierzero.parallel.layout import chunk_index, level_of_group, span
from tierzero.parallel.ledger import ByteLedger, CommGroup
from tierzero.parallel.moe import moe_layers, set_aux_grad_scale
from tierzero.parallel.plans import PartitionPlan
from tierzero.parallel.topology import Topology, expert_data_topology
from tierzero.parallel.engines.adamw import adamw_update_
from tierzero.parallel.engines.flat import FlatUnit
from tierzero.parallel.engines.native_checkpoint import NativeCheckpoints
from tierzero.parallel.engines.units import _block_params, _outer_params, block_bwd_gathers, model_units


class Domain:
    """The ranks a set of units is sharded over, and the plan's groups among them: the whole
    world for dense units; for expert units, the ranks holding the same experts (one rank
    per expert-parallel group, `copies` = ep such sets side by side)."""

    def __init__(self, plan: PartitionPlan, topology: Topology, rank: int, copies: int = 1):
        self.plan, self.topo, self.rank, self.copies = plan, topology, rank, copies
        self.world_size = topology.world_size
        self.s_p, self.s_b, self.s_g, self.s_o = (
            span(topology, lv) for lv in (plan.param_level, plan.bwd_level, plan.grad_level, plan.optim_level))
        self.idx_p, self.idx_b, self.idx_g, self.idx_o = (
            chunk_index(topology, rank, lv) for lv in (plan.param_level, plan.bwd_level, plan.grad_level, plan.optim_level))
        self.groups: Dict[str, CommGroup] = build_groups(plan, topology, rank, copies=copies)
        self._position_cache: Dict[Tuple[Tuple[int, ...], int], List[int]] = {}
        q = plan.quant
        self.weight_codecs = {role: self._codec(q.weight_bits_at(self.groups[role].level), q)
                              if self.groups[role].size > 1 else None for role in ("param", "bwd")}
        """param / bwd gather -> its Codec when the level the group spans is quantized (qwZ)."""
        self.step_codecs = {"grad_up": self._codec(q.grad_bits_at(self.groups["grad_up"].level), q),
                            "param_down": self._codec(q.weight_bits_at(self.groups["param_down"].level), q)}
        """The step's gradient hop up to the optimizer level and its parameter gather back down,
        quantized where their level is (a tiered plan's only cross-node traffic)."""
        self.hops: List[Tuple[CommGroup, Optional[Codec]]] = []
        """A hierarchical gradient reduce-scatter (qgZ), one (group, codec or None) per hop, innermost
        first -- when the plan quantizes one of those hops; else [] and one flat reduce-scatter."""
        hop_groups = build_hop_groups(topology, plan.grad_level, rank, copies) if q.grad_bits else []
        if q.hierarchical_grads(tuple(g.level for g in hop_groups)):
            self.hops = [(g, self._codec(q.grad_bits_at(g.level), q)) for g in hop_groups]

    @staticmethod
    def _codec(bits: int, quant) -> Optional[Codec]:
        return Codec(bits, quant.block_size, quant.scale_bytes) if bits else None

    def positions(self, group: CommGroup, level: int) -> List[int]:
        """Chunk index of each group member at `level`, in group order (computed once per group:
        this runs for every unit on every gather and reduce-scatter)."""
        key = (group.ranks, level)
        if key not in self._position_cache:
            self._position_cache[key] = [chunk_index(self.topo, m // self.copies, level) for m in group.ranks]
        return self._position_cache[key]


class NativeEngine(NativeCheckpoints):
    """Executes a PartitionPlan; see the module docstring for the schedule."""

    name = "native"
    supports_snapshot_guard = True
    """A background checkpoint copies this engine's shards while the next forward/backward runs;
    step() waits on `snapshot_guard` (set by checkpoint.saver) before changing them."""

    def __init__(self, model: nn.Module, setup: EngineSetup):
        plan, topology, rank, ep, o = setup.plan, setup.topology, setup.rank, setup.ep, setup.optim
        self.model, self.plan, self.topo, self.rank = model, plan, topology, rank
        self.loss_fn = setup.loss_fn
        self.lr, self.betas, self.weight_decay, self.grad_clip, self.eps = o.lr, o.betas, o.weight_decay, o.grad_clip, o.eps
        self.device = device = setup.device
        self.world_size = topology.world_size
        self.dtype = torch.bfloat16 if setup.dtype == "bfloat16" else torch.float32
        self.reduce_dtype = torch.bfloat16 if (setup.reduce_dtype == "bfloat16" and setup.dtype == "bfloat16") \
            else torch.float32
        self.ledger = ByteLedger(gpu=device.startswith("cuda"), aligned=setup.comm_timing == "aligned")
        self._noise = torch.Generator(device=device).manual_seed(0x9E3779B1 + rank) if plan.quant.stochastic else None
        """Stochastic rounding's uniforms (parallel.quant_stochastic): a stream of its own per rank."""
        self._pending_rs: Optional[tuple] = None
        """The last unit's gradient reduce-scatter, in flight while the next block's backward runs."""
        self.grad_accum = setup.grad_accum
        self._micro = 0
        """Micro-steps since the last optimizer step (of grad_accum)."""
        self._next_outer: List = []
        """The next micro-step's outer gather, in flight since block 0's backward (_prefetch_outer)."""
        self.step_count = 0
        self._step_t = torch.zeros((), dtype=torch.float32, device=device)
        """step_count on the device, for the fused AdamW kernel (filled each step, never read back)."""
        self._copy_stream, self._copy_event, self._staging = None, None, None
        self.checkpoint_copy: Optional[Callable[[], list]] = None
        """After checkpoint_slices on a GPU: waits until the slices' copies have landed and
        returns the slices' data, in order (else None: the slices hold it)."""
        self.world_group_size = dist.get_world_size() if dist.is_initialized() else 1
        assert self.world_group_size == self.world_size, "topology and process group disagree"
        self.dense = Domain(plan, topology, rank)
        self.groups = self.dense.groups
        self.moe = moe_layers(model)
        self.ep = ep
        self.experts: Optional[Domain] = None
        self.ep_group: Optional[CommGroup] = None
        if self.moe:
            self._bind_experts(ep)

        # a model on the meta device is materialised here, one shard per rank (setup.init)
        unit = dict(dtype=self.dtype, device=device, model=model, init=setup.init)
        self.outer = FlatUnit("outer", _outer_params(model), domain=self.dense, fwd_gathers=1, bwd_gathers=0, **unit)
        self.blocks: List[List[FlatUnit]] = []
        for i in range(len(model.blocks)):
            bwd = block_bwd_gathers(i, len(model.blocks))
            units = [FlatUnit(f"blocks.{i}", _block_params(model, i, experts=False), domain=self.dense,
                              fwd_gathers=1, bwd_gathers=bwd, **unit)]
            expert_params = _block_params(model, i, experts=True)
            if expert_params:
                units.append(FlatUnit(f"blocks.{i}.experts", expert_params, domain=self.experts,
                                      fwd_gathers=1, bwd_gathers=bwd, expert_index=rank % ep, **unit))
            self.blocks.append(units)
        self.units = [self.outer] + [u for units in self.blocks for u in units]

    def _bind_experts(self, ep: int) -> None:
        """EP groups of ep consecutive ranks; each MoE layer keeps its EP rank's experts; expert
        units are sharded by the same plan over the ranks that hold the same experts."""
        from tierzero.parallel.moe import ExpertParallel
        from tierzero.parallel.moe_config import expert_parallel_errors, node_layout

        topo = self.topo
        sub = expert_data_topology(topo, ep)
        partition = [list(range(start, start + ep)) for start in range(0, self.world_size, ep)]
        level = topo.levels[level_of_group(topo, range(0, ep))].name
        ranks = partition[self.rank // ep]
        nodes = tuple(topo.node_of(r) for r in ranks)
        cfg = self.moe[0].cfg
        problems = expert_parallel_errors(cfg, nodes)
        if problems:
            raise ValueError("\n".join(problems))
        self.ep_group = build_partition(partition, self.rank, level)
        member_levels = tuple("" if r == self.rank else topo.levels[level_of_group(topo, (self.rank, r))].name
                              for r in ranks)
        hierarchical = ep > 1 and cfg.dispatch != "flat" and node_layout(nodes)[0] > 1
        binding = ExpertParallel(self.ep_group.pg, self.ep_group.ranks, self.rank % ep, level, nodes,
                                 ledger=self.ledger, member_levels=member_levels, hierarchical=hierarchical)
        for layer in self.moe:
            layer.bind_expert_parallel(binding)
        self.experts = Domain(self.plan, sub, self.rank // ep, copies=ep)

    def cost_units(self) -> List[Unit]:
        return model_units(self.model)

    # ---- gathers ---------------------------------------------------------------------------
    def _gather(self, unit: FlatUnit, phase: str, async_op: bool):
        """All-gather the unit's full buffer from the forward (param) or backward group; nothing
        for a backward without gathers (bwd_gathers 0: the forward's gather is still there --
        for hpZ the same values the secondary shard would give, being cut from it)."""
        if unit.persistent:
            return None
        if phase == "bwd" and not unit.bwd_gathers:
            assert unit.gathered, f"{unit.name}: its backward needs its forward's gather"
            return None
        d = unit.domain
        unit._alloc()
        unit.gathered = True
        if phase != "bwd" or self.plan.secondary_level is None:  # fwd, eval: the param group
            role, level, shard, c = "param", self.plan.param_level, unit.p_shard, unit.c_p
        else:
            role, level, shard, c = "bwd", self.plan.secondary_level, unit.b_shard, unit.c_b
        group, codec = d.groups[role], d.weight_codecs[role]
        outs = [unit.full[j * c:(j + 1) * c] for j in d.positions(group, level)]
        if codec is not None:
            return quantized_all_gather(self.ledger, outs, shard, group, phase, codec, async_op=async_op)
        return self.ledger.all_gather(outs, shard, group, phase, async_op=async_op)

    def _gather_all(self, units: List[FlatUnit], phase: str, async_op: bool) -> List:
        return [self._gather(u, phase, async_op) for u in units]

    @staticmethod
    def _after_fwd_gather(unit: FlatUnit) -> None:
        d = unit.domain
        if unit.b_shard is not None:  # hpZ: keep the secondary shard cut from this gather
            unit.b_shard.copy_(unit.full[d.idx_b * unit.c_b:(d.idx_b + 1) * unit.c_b])

    def _prefetch_outer(self) -> List:
        """The next micro-step's outer gather, issued asynchronously (as a block's prefetch) when
        another micro-step of this optimizer step follows -- the parameters stay as they are
        until the step; [] before the step, whose update changes them."""
        if self._micro >= self.grad_accum or self.outer.persistent:
            return []
        return [self._gather(self.outer, "fwd", async_op=True)]

    def _drop_prefetch(self) -> None:
        """An outer gather prefetched for a micro-step that did not come (a caller that ran fewer
        than grad_accum before the step, or evaluates between micro-steps): waited for, freed."""
        if self._next_outer:
            self._wait(self._next_outer)
            self._next_outer = []
            self.outer.free()

    @staticmethod
    def _wait(pending: List) -> None:
        for p in pending:
            if p is not None:
                p.wait()

    # ---- one micro-step --------------------------------------------------------------------
    def micro_step(self, inputs: torch.Tensor, targets: torch.Tensor, *, scale: float) -> float:
        """Forward and backward of one micro-batch; returns its (unscaled) loss."""
        model, blocks = self.model, self.blocks
        set_aux_grad_scale(model, scale)
        self._micro += 1
        self._wait(self._next_outer or [self._gather(self.outer, "fwd", async_op=False)])
        self._next_outer = []
        self._after_fwd_gather(self.outer)
        pending = self._gather_all(blocks[0], "fwd", async_op=True) if blocks else []

        h = model.embed(inputs)
        leaves, outs = [], []
        x = h.detach().requires_grad_()
        for i, units in enumerate(blocks):
            self._wait(pending)
            for u in units:
                self._after_fwd_gather(u)
            pending = self._gather_all(blocks[i + 1], "fwd", async_op=True) if i + 1 < len(blocks) else []
            leaves.append(x)
            outs.append(model.blocks[i](x))
            for u in units:
                if u.bwd_gathers:  # else kept for its backward, next after the head's (block_bwd_gathers)
                    u.free()
            x = outs[-1].detach().requires_grad_()
        loss = self._head_loss(x, targets)  # no logits held here: they go with the head's backward
        (loss * scale).backward()
        self.outer.free()
        grad, x = x.grad, None

        pending = self._gather_all(blocks[-1], "bwd", async_op=True) if blocks else []
        for i in range(len(blocks) - 1, -1, -1):
            self._wait(pending)
            # in flight beside block i's backward: block i-1's gather, or beside block 0's the next
            # micro-step's outer gather (the embedding's backward needs no weights)
            pending = self._gather_all(blocks[i - 1], "bwd", async_op=True) if i > 0 else []
            if i == 0:
                self._next_outer = self._prefetch_outer()
            torch.autograd.backward(outs[i], grad)
            grad = leaves[i].grad
            outs[i] = leaves[i] = None  # the residual stream around block i: its backward is done
            for u in blocks[i]:
                self._reduce_grads(u)
                u.free()
        torch.autograd.backward(h, grad)
        self._reduce_grads(self.outer)
        self._finish_reduce()
        return loss.detach()  # stays on the device: the loop reads the step's loss once

    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward only, under torch.no_grad: each unit gathered from the parameter shards for its
        part of the forward (ledger phase "eval") and freed after it; no gradient, no secondary
        (hpZ) shard touched. The loss stays on the device."""
        model, blocks = self.model, self.blocks
        self._drop_prefetch()
        with torch.no_grad():
            self._gather(self.outer, "eval", async_op=False)
            pending = self._gather_all(blocks[0], "eval", async_op=True) if blocks else []
            x = model.embed(inputs)
            for i, units in enumerate(blocks):
                self._wait(pending)
                pending = self._gather_all(blocks[i + 1], "eval", async_op=True) if i + 1 < len(blocks) else []
                x = model.blocks[i](x)
                for u in units:
                    u.free()
            loss = self._head_loss(x, targets)
            self.outer.free()
        return loss

    def _head_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss from the last block's output: the model's `head_loss` where it has one
        (recipes.model.Transformer: head and loss in one call, compiled together under
        train.compile), else loss_fn(head(x))."""
        head_loss = getattr(self.model, "head_loss", None)
        return head_loss(x, targets) if head_loss is not None else self.loss_fn(self.model.head(x), targets)

    def _reduce_grads(self, unit: FlatUnit, now: bool = False) -> None:
        """The unit's gradients (autograd's, on its parameters) into one flat buffer in the reduce
        dtype, reduce-scattered inside the grad level into its fp32 accumulator -- or, with
        parallel.grad_sync=step before the optimizer step's last micro-step (and not `now`), added
        up in that buffer, kept unreduced (FlatUnit.unreduced) until then."""
        d = unit.domain
        flat, fresh = unit.unreduced, unit.unreduced is None
        if fresh:
            flat = torch.zeros(unit.N, dtype=self.reduce_dtype, device=self.device)
        unit.unreduced = None
        for ent in unit.params:
            if ent.param.grad is not None:
                piece = flat[ent.offset: ent.offset + ent.numel]
                (piece.copy_ if fresh else piece.add_)(ent.param.grad.reshape(-1))
                ent.param.grad = None
        group, c = d.groups["grad"], unit.c_g
        if group.size == 1 and not d.hops:
            unit.accumulate(flat[d.idx_g * c:(d.idx_g + 1) * c], owned=c == unit.N)
            return
        if not now and self.plan.grad_sync == "step" and self._micro < self.grad_accum:
            unit.unreduced = flat
            return
        if d.hops:
            self._finish_reduce()
            self._reduce_by_hops(unit, flat)
            return
        out = torch.empty(c, dtype=self.reduce_dtype, device=self.device)
        ins = [flat[j * c:(j + 1) * c] for j in d.positions(group, self.plan.grad_level)]
        # on a GPU in flight while the next block's backward runs; on CPU tierzero's gloo ring
        # runs when issued, and waiting later would only add that backward to its ledger time
        work = self.ledger.reduce_scatter(out, ins, group, "bwd", async_op=self.device.startswith("cuda"))
        self._finish_reduce()  # the previous one had this block's backward to complete in
        self._pending_rs = (work, unit, out, flat)  # flat stays referenced until its collective is done

    def _reduce_by_hops(self, unit: FlatUnit, flat: torch.Tensor) -> None:
        """The gradient reduce-scatter one level at a time (parallel.layout.reduce_hops): each hop
        splits what the last one kept into one piece per member and leaves this rank its piece
        summed over the hop's group; a quantized hop sends its pieces encoded in one all-to-all
        (qgZ), the others reduce-scatter in parallel.reduce_dtype. Synchronous: the next
        hop needs this one's result."""
        q = self.plan.quant
        buf = flat
        for k, (group, codec) in enumerate(unit.domain.hops):
            piece = buf.numel() // group.size
            ins = [buf[j * piece:(j + 1) * piece] for j in range(group.size)]
            out = torch.empty(piece, dtype=buf.dtype, device=self.device)
            if codec is None:
                self.ledger.reduce_scatter(out, ins, group, "bwd")
            else:
                residual = None
                if q.error_feedback:
                    if k not in unit.residuals:
                        unit.residuals[k] = torch.zeros(buf.numel(), dtype=torch.float32, device=self.device)
                    residual = unit.residuals[k]
                quantized_reduce_scatter(self.ledger, out, ins, group, "bwd", codec, residual=residual,
                                         generator=self._noise, stochastic=q.stochastic)
            buf = out
        unit.accumulate(buf, owned=True)

    def _finish_reduce(self) -> None:
        """Wait for the reduce-scatter in flight and add it to its unit's fp32 accumulator (on
        CPU the ring has already run: tierzero's gloo rings complete when issued)."""
        if self._pending_rs is not None:
            work, unit, out, _ = self._pending_rs
            self._pending_rs = None
            work.wait()
            unit.accumulate(out, owned=True)

    # ---- optimizer step --------------------------------------------------------------------
    def _optimizer_grad(self, u: FlatUnit) -> torch.Tensor:
        """The unit's gradient on this rank's optimizer shard, summed over every rank (the update
        divides it by the world size: _grad_scale)."""
        d = u.domain
        up, reps = d.groups["grad_up"], d.groups["replicas"]
        acc = u.grad_acc if u.grad_acc is not None else torch.zeros(u.c_g, dtype=torch.float32, device=self.device)
        if up.size > 1:  # G-shard -> O-shard: the O-chunks inside my G-chunk
            base = d.idx_g * (d.s_o // d.s_g)
            ins = [acc[(j - base) * u.c_o:(j - base + 1) * u.c_o] for j in d.positions(up, self.plan.optim_level)]
            g = torch.empty(u.c_o, dtype=torch.float32, device=self.device)
            codec = d.step_codecs["grad_up"]
            if codec is None:
                self.ledger.reduce_scatter(g, ins, up, "step")
            else:
                quantized_reduce_scatter(self.ledger, g, ins, up, "step", codec, generator=self._noise,
                                         stochastic=self.plan.quant.stochastic)
        else:
            off = (d.idx_o - d.idx_g * (d.s_o // d.s_g)) * u.c_o
            g = acc[off: off + u.c_o]
        self.ledger.all_reduce(g, reps, "step")
        return g

    def _sum_squares(self, units: List[FlatUnit], grads: List[torch.Tensor], domain: "Domain") -> torch.Tensor:
        """The squared norm of the domain's gradients over all its ranks, float32, on the device
        (the shards' norms in one multi-tensor kernel)."""
        mine = [g for u, g in zip(units, grads) if u.domain is domain]
        total = torch.stack(torch._foreach_norm(mine)).square().sum().reshape(1)
        self.ledger.all_reduce(total, domain.groups["optim"], "step")
        return total

    def _grad_scale(self, norm: torch.Tensor) -> Optional[torch.Tensor]:
        """What the update divides the summed gradients by, 0-dim on the device: the world size
        (every rank's micro-batches reached these weights, experts through the all-to-all), over
        the clipping coefficient where clipping acts (clip / (norm + 1e-6) when norm > clip, as
        torch.nn.utils.clip_grad_norm_); None when that is 1."""
        w = float(self.world_size)
        if self.grad_clip > 0:
            coef = self.grad_clip / (norm + 1e-6)
            return torch.where(norm > self.grad_clip, w / coef, w).reshape(())
        return torch.full((), w, device=self.device) if self.world_size > 1 else None

    def step(self, lr: float) -> StepStats:
        guard, self.snapshot_guard = getattr(self, "snapshot_guard", None), None
        if guard is not None:
            guard.wait()  # a background checkpoint is still copying the optimizer shards
        if self._copy_event is not None:  # GPU: the update waits for the checkpoint's copies, on the device
            torch.cuda.current_stream(self.device).wait_event(self._copy_event)
            self._copy_event = None
        self._drop_prefetch()
        for u in self.units:  # grad_sync=step, should fewer micro-steps than grad_accum have come
            if u.unreduced is not None:
                self._reduce_grads(u, now=True)
        self._finish_reduce()
        self._micro = 0
        grads = [self._optimizer_grad(u) for u in self.units]
        sumsq = self._sum_squares(self.units, grads, self.dense)
        if self.experts is not None:
            expert_sq = self._sum_squares(self.units, grads, self.experts)
            self.ledger.all_reduce(expert_sq, self.ep_group, "step")  # the other EP ranks' experts
            sumsq = sumsq + expert_sq
        norm_t = sumsq.sqrt() / self.world_size  # the norm of the averaged gradient
        grad_scale = self._grad_scale(norm_t)
        norm = to_host(norm_t, "grad norm")[0]  # the step's one read: skip or not
        skipped = not math.isfinite(norm)  # global, so every rank skips: the state stays, the gradients go
        if not skipped:
            self.step_count += 1
            self.update_(grads, lr=lr, grad_scale=grad_scale)
        del grads
        for u in self.units:
            u.grad_acc = None
        if not skipped:
            self._params_down()
        return StepStats(grad_norm=norm, skipped=skipped)

    def update_(self, grads: List[torch.Tensor], *, lr: float, grad_scale: Optional[torch.Tensor] = None) -> None:
        """AdamW at step_count over every unit's optimizer shard, grads[i] being units[i]'s
        gradient on it (divided by grad_scale inside the kernel): two calls of adamw_update_,
        the decayed runs of every shard and the others at weight decay 0 -- pieces of the flat
        shards, no mask. benchmarks/step.py times it alone."""
        lists = {True: ([], [], [], []), False: ([], [], [], [])}
        for u, g in zip(self.units, grads):
            for a, b, decayed in u.decay_runs:
                for out, t in zip(lists[decayed], (u.master, u.exp_avg, u.exp_avg_sq, g)):
                    out.append(t[a:b])
        self._step_t.fill_(self.step_count)
        for decayed, (masters, avgs, sqs, gs) in lists.items():
            adamw_update_(masters, avgs, sqs, gs, lr=lr, betas=self.betas, eps=self.eps,
                          weight_decay=self.weight_decay if decayed else 0.0, step=self.step_count,
                          step_tensor=self._step_t, grad_scale=grad_scale)

    def _params_down(self) -> None:
        """New parameters from the fp32 optimizer shards down to the param level, cast into the
        parameter shard itself (no temporary but a quantized gather's)."""
        for u in self.units:
            if u.master is u.p_shard:  # float32, sharded like the optimizer: the update wrote them
                continue
            d = u.domain
            down = d.groups["param_down"]
            if down.size > 1:  # O-shard -> P-shard: gather the O-chunks that make up my P-chunk
                base = d.idx_p * (d.s_o // d.s_p)
                outs = [u.p_shard[(j - base) * u.c_o:(j - base + 1) * u.c_o]
                        for j in d.positions(down, self.plan.optim_level)]
                codec = d.step_codecs["param_down"]
                if codec is None:
                    mine = outs[down.index(self.rank)]  # this rank's own chunk: gathered in place
                    mine.copy_(u.master)
                    self.ledger.all_gather(outs, mine, down, "step")
                else:
                    quantized_all_gather(self.ledger, outs, u.master.to(self.dtype), down, "step", codec)
            else:
                off = (d.idx_o - d.idx_p * (d.s_o // d.s_p)) * u.c_o
                u.p_shard[off: off + u.c_o].copy_(u.master)

    def take_comm(self) -> List[dict]:
        return self.ledger.take()
