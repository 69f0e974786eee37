"""The native engine (`parallel.engine=native`): executes any PartitionPlan with torch.distributed.

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

A plan that quantizes (parallel.quant) changes only how collectives on its listed levels move
their bytes: the parameter gathers send block-quantized chunks (qwZ), and the gradient
reduce-scatter runs hop by hop with quantized hops as all-to-alls (qgZ; `_reduce_by_hops`),
both through parallel.codec and the byte ledger.

Model contract: `model.embed(tokens)`, `model.blocks` (a ModuleList), `model.head(h)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from tierzero.parallel.cost import Unit
from tierzero.parallel.engines import EngineSetup
from tierzero.parallel.engines.base import CheckpointSlice, StepStats
from tierzero.parallel.codec import Codec, quantized_all_gather, quantized_reduce_scatter
from tierzero.parallel.groups import build_groups, build_hop_groups, build_partition
from tierzero.parallel.host import to_host
from tierzero.parallel.layout import chunk_index, level_of_group, padded_numel, span
from tierzero.parallel.ledger import ByteLedger, CommGroup
from tierzero.parallel.moe import moe_layers, set_aux_grad_scale
from tierzero.parallel.plans import PartitionPlan
from tierzero.parallel.topology import Topology, expert_data_topology


def adamw_update_(master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor,
                  decay: torch.Tensor, *, lr: float, betas: Tuple[float, float], eps: float, weight_decay: float,
                  step: int) -> None:
    """AdamW exactly as torch.optim.AdamW (single-tensor path), in place on an fp32 shard;
    `decay` marks the elements that take weight decay. The probe times it too
    (collectives_bench/probe.py: the planner's update term)."""
    b1, b2 = betas
    bc1 = 1 - b1 ** step
    bc2_sqrt = math.sqrt(1 - b2 ** step)
    master.mul_(torch.where(decay, 1 - lr * weight_decay, 1.0))
    exp_avg.lerp_(grad, 1 - b1)
    exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    master.addcdiv_(exp_avg, denom, value=-lr / bc1)


@dataclass
class _Param:
    name: str
    param: nn.Parameter
    shape: torch.Size
    offset: int
    numel: int


InitSlice = Callable[[str, int, int], torch.Tensor]
"""(parameter name, first element, elements) -> that slice of its flattened global initial value."""


def rebind(model: nn.Module, old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    """Replace parameter `old` (e.g. on the meta device, whose .data cannot be swapped for real
    storage) by a new Parameter over `data` everywhere the model holds it (tied weights too)."""
    new = nn.Parameter(torch.empty(0, dtype=data.dtype, device=data.device), requires_grad=old.requires_grad)
    # .data, not Parameter(data): a Parameter made from a view would share the flat buffer's
    # version counter, and every re-gather into the buffer would look like an in-place change
    # of the weights autograd saved
    new.data = data
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is old:
                module._parameters[key] = new
    return new


class FlatUnit:
    """One unit's flat buffer and its shards at every level of the plan.

    From a materialised model the values are copied from its parameters; from a model on the
    meta device (`init`: the model's init_slice) only this rank's shards are generated -- the
    parameter shard and the optimizer shard -- and the full buffer never holds values until it
    is gathered, so no rank ever holds the whole model."""

    def __init__(self, name: str, params: List[Tuple[str, nn.Parameter]], *, domain: "Domain",
                 dtype: torch.dtype, device: str, fwd_gathers: int, bwd_gathers: int,
                 model: Optional[nn.Module] = None, init: Optional[InitSlice] = None, expert_index: int = 0):
        self.name = name
        self.fwd_gathers, self.bwd_gathers = fwd_gathers, bwd_gathers
        self.domain = e = domain
        offset, entries = 0, []
        for pname, p in params:
            entries.append(_Param(pname, p, p.shape, offset, p.numel()))
            offset += p.numel()
        self.params = entries
        self.numel = offset
        self.N = padded_numel(offset, e.world_size, e.plan.quant.pad_block)
        self.dtype = dtype

        self.c_p, self.c_b, self.c_g, self.c_o = (self.N // s for s in (e.s_p, e.s_b, e.s_g, e.s_o))
        self.persistent = e.s_p == 1  # replicated params: the full buffer is the param shard
        # the parameters' initial values (float32) over a range of the flat buffer: the masters
        # start from these exact values, the working copy is them in the compute dtype
        if init is None:
            built = torch.zeros(self.N, dtype=torch.float32, device=device)
            with torch.no_grad():
                for ent in entries:
                    built[ent.offset: ent.offset + ent.numel].copy_(ent.param.detach().reshape(-1))

            def values(a: int, b: int) -> torch.Tensor:
                return built[a:b].clone()
        else:
            def values(a: int, b: int) -> torch.Tensor:
                return self._generate(init, a, b, expert_index).to(device)

        full = torch.empty(self.N, dtype=self.dtype, device=device)
        if self.persistent:
            full.copy_(values(0, self.N))
        self.full = full
        for ent in entries:
            view = full[ent.offset: ent.offset + ent.numel].view(ent.shape)
            if ent.param.is_meta:
                ent.param = rebind(model, ent.param, view)
            else:
                ent.param.data = view
        if self.persistent:
            self.p_shard = full
        else:
            self.p_shard = values(e.idx_p * self.c_p, (e.idx_p + 1) * self.c_p).to(self.dtype)
        self.b_shard = (torch.empty(self.c_b, dtype=self.dtype, device=device)
                        if e.plan.secondary_level is not None else None)
        self.grad_acc = torch.zeros(self.c_g, dtype=torch.float32, device=device)
        o = slice(e.idx_o * self.c_o, (e.idx_o + 1) * self.c_o)
        self.master = values(o.start, o.stop)
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        self.decay = self._decay_mask(o, device)
        self.residuals: Dict[int, torch.Tensor] = {}
        """Error feedback (parallel.quant_error_feedback): hop index -> what quantization dropped
        from this rank's hop input last micro-step, float32 (allocated on first use)."""
        self.gathered = True
        if not self.persistent:
            self.free()

    def _decay_mask(self, shard: slice, device: str) -> torch.Tensor:
        """Which elements of the optimizer shard take weight decay: matrices, not norms
        (parallel.engines.base.param_groups)."""
        decay = torch.zeros(self.N, dtype=torch.bool, device=device)
        for ent in self.params:
            if len(ent.shape) >= 2:
                decay[ent.offset: ent.offset + ent.numel] = True
        return decay[shard].clone()

    def _generate(self, init: InitSlice, a: int, b: int, expert_index: int) -> torch.Tensor:
        """Elements [a, b) of the flat buffer's initial values, float32 on the CPU (padding 0).
        An expert unit holds this EP rank's experts: rows expert_index x E_local .. of each
        global [E, ...] tensor."""
        out = torch.zeros(b - a, dtype=torch.float32)
        for ent in self.params:
            lo, hi = max(a, ent.offset), min(b, ent.offset + ent.numel)
            if lo < hi:
                out[lo - a:hi - a] = init(ent.name, expert_index * ent.numel + lo - ent.offset, hi - lo)
        return out

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


def model_units(model: nn.Module) -> List[Unit]:
    """The engine's units as the cost model sees them (works on a meta-device model)."""
    outer = Unit("outer", sum(p.numel() for _, p in _outer_params(model)), fwd_gathers=1, bwd_gathers=0)
    units = [outer]
    for i in range(len(model.blocks)):
        units.append(Unit(f"blocks.{i}", sum(p.numel() for _, p in _block_params(model, i, experts=False))))
        experts = sum(p.numel() for _, p in _block_params(model, i, experts=True))
        if experts:
            units.append(Unit(f"blocks.{i}.experts", experts, expert=True))
    return units


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


class NativeEngine:
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
        self.step_count = 0
        self._copy_stream, self._copy_event, self._pinned = None, None, []
        self.checkpoint_copy: Optional[Callable[[], None]] = None
        """After checkpoint_slices on a GPU: waits until the slices' copies have landed (else None)."""
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
            units = [FlatUnit(f"blocks.{i}", _block_params(model, i, experts=False), domain=self.dense,
                              fwd_gathers=1, bwd_gathers=1, **unit)]
            expert_params = _block_params(model, i, experts=True)
            if expert_params:
                units.append(FlatUnit(f"blocks.{i}.experts", expert_params, domain=self.experts,
                                      fwd_gathers=1, bwd_gathers=1, expert_index=rank % ep, **unit))
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
        """All-gather the unit's full buffer from the forward (param) or backward group."""
        if unit.persistent:
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
        self._gather(self.outer, "fwd", async_op=False)
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
            y = model.blocks[i](x)
            outs.append(y)
            for u in units:
                u.free()
            x = y.detach().requires_grad_()
        logits = model.head(x)
        loss = self.loss_fn(logits, targets)
        (loss * scale).backward()
        self.outer.free()
        grad = x.grad

        pending = self._gather_all(blocks[-1], "bwd", async_op=True) if blocks else []
        for i in range(len(blocks) - 1, -1, -1):
            self._wait(pending)
            pending = self._gather_all(blocks[i - 1], "bwd", async_op=True) if i > 0 else []
            torch.autograd.backward(outs[i], grad)
            grad = leaves[i].grad
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
            loss = self.loss_fn(model.head(x), targets)
            self.outer.free()
        return loss

    def _reduce_grads(self, unit: FlatUnit) -> None:
        d = unit.domain
        flat = torch.zeros(unit.N, dtype=self.reduce_dtype, device=self.device)
        for ent in unit.params:
            if ent.param.grad is not None:
                flat[ent.offset: ent.offset + ent.numel].copy_(ent.param.grad.reshape(-1))
                ent.param.grad = None
        if d.hops:
            self._finish_reduce()
            self._reduce_by_hops(unit, flat)
            return
        group, c = d.groups["grad"], unit.c_g
        if group.size == 1:
            unit.grad_acc.add_(flat[d.idx_g * c:(d.idx_g + 1) * c])
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
        unit.grad_acc.add_(buf)

    def _finish_reduce(self) -> None:
        """Wait for the reduce-scatter in flight and add it to its unit's fp32 accumulator (on
        CPU the ring has already run: tierzero's gloo rings complete when issued)."""
        if self._pending_rs is not None:
            work, unit, out, _ = self._pending_rs
            self._pending_rs = None
            work.wait()
            unit.grad_acc.add_(out)

    # ---- optimizer step --------------------------------------------------------------------
    def _optimizer_grad(self, u: FlatUnit) -> torch.Tensor:
        """The unit's gradient on this rank's optimizer shard, summed over every rank, / world."""
        d = u.domain
        up, reps = d.groups["grad_up"], d.groups["replicas"]
        if up.size > 1:  # G-shard -> O-shard: the O-chunks inside my G-chunk
            base = d.idx_g * (d.s_o // d.s_g)
            ins = [u.grad_acc[(j - base) * u.c_o:(j - base + 1) * u.c_o]
                   for j in d.positions(up, self.plan.optim_level)]
            g = torch.empty(u.c_o, dtype=torch.float32, device=self.device)
            codec = d.step_codecs["grad_up"]
            if codec is None:
                self.ledger.reduce_scatter(g, ins, up, "step")
            else:
                quantized_reduce_scatter(self.ledger, g, ins, up, "step", codec, generator=self._noise,
                                         stochastic=self.plan.quant.stochastic)
        else:
            off = (d.idx_o - d.idx_g * (d.s_o // d.s_g)) * u.c_o
            g = u.grad_acc[off: off + u.c_o]
        self.ledger.all_reduce(g, reps, "step")
        # every rank's micro-batches reached these weights (experts through the all-to-all)
        return g.div_(self.world_size)

    def _sum_squares(self, units: List[FlatUnit], grads: List[torch.Tensor], domain: "Domain") -> torch.Tensor:
        mine = [g for u, g in zip(units, grads) if u.domain is domain]
        total = torch.stack([g.double().pow(2).sum() for g in mine]).sum().float().reshape(1)
        self.ledger.all_reduce(total, domain.groups["optim"], "step")
        return total

    def step(self, lr: float) -> StepStats:
        guard, self.snapshot_guard = getattr(self, "snapshot_guard", None), None
        if guard is not None:
            guard.wait()  # a background checkpoint is still copying the optimizer shards
        if self._copy_event is not None:  # GPU: the update waits for the checkpoint's copies, on the device
            torch.cuda.current_stream(self.device).wait_event(self._copy_event)
            self._copy_event = None
        grads = [self._optimizer_grad(u) for u in self.units]
        sumsq = self._sum_squares(self.units, grads, self.dense)
        if self.experts is not None:
            expert_sq = self._sum_squares(self.units, grads, self.experts)
            self.ledger.all_reduce(expert_sq, self.ep_group, "step")  # the other EP ranks' experts
            sumsq = sumsq + expert_sq
        norm = math.sqrt(to_host(sumsq, "grad norm")[0])  # the step's one read: skip or clip
        if not math.isfinite(norm):  # global, so every rank skips: drop the gradients, keep the state
            for u in self.units:
                u.grad_acc.zero_()
            return StepStats(grad_norm=norm, skipped=True)
        if self.grad_clip > 0 and norm > self.grad_clip:
            coef = self.grad_clip / (norm + 1e-6)
            for g in grads:
                g.mul_(coef)

        self.step_count += 1
        for u, g in zip(self.units, grads):
            adamw_update_(u.master, u.exp_avg, u.exp_avg_sq, g, u.decay, lr=lr, betas=self.betas, eps=self.eps,
                          weight_decay=self.weight_decay, step=self.step_count)
            u.grad_acc.zero_()
        self._params_down()
        return StepStats(grad_norm=norm)

    def _params_down(self) -> None:
        """New parameters from the fp32 optimizer shards down to the param level."""
        for u in self.units:
            d = u.domain
            down = d.groups["param_down"]
            new = u.master.to(self.dtype)
            if down.size > 1:  # O-shard -> P-shard: gather the O-chunks that make up my P-chunk
                base = d.idx_p * (d.s_o // d.s_p)
                outs = [u.p_shard[(j - base) * u.c_o:(j - base + 1) * u.c_o]
                        for j in d.positions(down, self.plan.optim_level)]
                codec = d.step_codecs["param_down"]
                if codec is None:
                    self.ledger.all_gather(outs, new, down, "step")
                else:
                    quantized_all_gather(self.ledger, outs, new, down, "step", codec)
            else:
                off = (d.idx_o - d.idx_p * (d.s_o // d.s_p)) * u.c_o
                u.p_shard[off: off + u.c_o].copy_(new)

    def take_comm(self) -> List[dict]:
        return self.ledger.take()

    # ---- checkpoints: this rank's slices of the global tensors -----------------------------
    def _owned(self, u: FlatUnit):
        """(entry, first element in the O-shard, elements, global shape, first element of the
        flattened global tensor) for every parameter piece in this rank's optimizer shard."""
        a = u.domain.idx_o * u.c_o
        expert = u.domain is self.experts
        for ent in u.params:
            lo, hi = max(a, ent.offset), min(a + u.c_o, ent.offset + ent.numel)
            if lo >= hi:
                continue
            shape, base = tuple(ent.shape), 0
            if expert:  # local experts [E_local, ...] are rows ep_index*E_local.. of [E, ...]
                shape = (ent.shape[0] * self.ep,) + tuple(ent.shape[1:])
                base = (self.rank % self.ep) * ent.numel
            yield ent, lo - a, hi - lo, shape, base + lo - ent.offset

    def checkpoint_slices(self) -> List[CheckpointSlice]:
        """What this rank saves: its optimizer shard's master weights and AdamW moments (one
        replica saves), and on rank 0 the persistent buffers (MoE selection biases).

        On CPU the slices are views (the saver copies them while the next step computes). On a
        GPU they are pinned host buffers, reused from save to save, filled by copies issued on a
        side stream: the loop only issues them; `checkpoint_copy` (for the saver's thread)
        waits for them, and the next optimizer step waits for them on the device."""
        out = []
        cuda = self.device.startswith("cuda")
        if cuda:
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(device=self.device)
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        for u in self.units:
            if u.domain.groups["replicas"].index(self.rank) != 0:
                continue
            for ent, at, n, shape, start in self._owned(u):
                for key, prefix in STATE_KEYS:
                    src = getattr(u, key)[at:at + n].detach()
                    data = self._to_pinned(len(out), src) if cuda else src.numpy()  # a view on CPU: the saver copies
                    out.append(CheckpointSlice(f"{prefix}/{ent.name}", shape, "float32", start, data))
        self.checkpoint_copy = None
        if cuda:
            event = torch.cuda.Event()
            event.record(self._copy_stream)
            self._copy_event, self.checkpoint_copy = event, event.synchronize
        if self.rank == 0:
            for name, buf in persistent_buffers(self.model):
                out.append(CheckpointSlice(f"buffer/{name}", tuple(buf.shape), "float32", 0,
                                           buf.detach().float().cpu().numpy().reshape(-1).copy()))
        return out

    def checkpoint_layout(self) -> Dict[str, Tuple[Tuple[int, ...], str]]:
        """{name: (global shape, dtype)} of what checkpoint_slices saves from this rank, without
        copying a byte (a resume checks a manifest against it before reading)."""
        out = {}
        for u in self.units:
            if u.domain.groups["replicas"].index(self.rank) != 0:
                continue
            for ent, _at, _n, shape, _start in self._owned(u):
                for _key, prefix in STATE_KEYS:
                    out[f"{prefix}/{ent.name}"] = (tuple(shape), "float32")
        if self.rank == 0:
            for name, buf in persistent_buffers(self.model):
                out[f"buffer/{name}"] = (tuple(buf.shape), "float32")
        return out

    def _to_pinned(self, i: int, src: torch.Tensor):
        """Slice i's pinned host buffer (reused while its size holds), its copy issued on the side stream."""
        while len(self._pinned) <= i:
            self._pinned.append(None)
        buf = self._pinned[i]
        if buf is None or buf.numel() != src.numel():
            buf = self._pinned[i] = torch.empty(src.numel(), dtype=torch.float32, pin_memory=True)
        with torch.cuda.stream(self._copy_stream):
            buf.copy_(src, non_blocking=True)
        return buf.numpy()

    def load_checkpoint(self, read: Callable[[str, int, int], "object"], step_count: int) -> None:
        """Fill this rank's shards from global tensors (`read(name, start, numel)` returns a
        numpy array), whatever layout saved them. Local only (no collectives), so a rank that
        fails to read cannot leave the others waiting; `after_load` then rebuilds the
        parameters from the masters, on every rank together."""
        for u in self.units:
            for key, _ in STATE_KEYS:
                getattr(u, key).zero_()
            for ent, at, n, _, start in self._owned(u):
                for key, prefix in STATE_KEYS:
                    getattr(u, key)[at:at + n].copy_(torch.from_numpy(read(f"{prefix}/{ent.name}", start, n)))
        with torch.no_grad():
            for name, buf in persistent_buffers(self.model):
                buf.copy_(torch.from_numpy(read(f"buffer/{name}", 0, buf.numel())).view(buf.shape))
        self.step_count = step_count

    def after_load(self) -> None:
        self._params_down()

    # ---- global tensors (checkpoints, tests) -----------------------------------------------
    def global_tensors(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """name -> {'param', 'exp_avg', 'exp_avg_sq'} as full fp32 tensors, on every rank.
        Expert weights come back with all experts (global shape [E, ...])."""
        out: Dict[str, Dict[str, torch.Tensor]] = {}
        for u in self.units:
            d = u.domain
            group = d.groups["optim"]
            fulls = {}
            for key in ("master", "exp_avg", "exp_avg_sq"):
                shard = getattr(u, key)
                full = torch.empty(u.N, dtype=torch.float32, device=self.device)
                outs = [full[j * u.c_o:(j + 1) * u.c_o] for j in d.positions(group, self.plan.optim_level)]
                if group.size > 1:
                    dist.all_gather(outs, shard, group=group.pg)
                else:
                    outs[0].copy_(shard)
                fulls[key] = full
            for ent in u.params:
                tensors = {("param" if k == "master" else k): v[ent.offset: ent.offset + ent.numel].view(ent.shape).clone()
                           for k, v in fulls.items()}
                if d is self.experts and self.ep_group.size > 1:  # concatenate the EP ranks' experts
                    for k, t in tensors.items():
                        parts = [torch.empty_like(t) for _ in range(self.ep_group.size)]
                        dist.all_gather(parts, t, group=self.ep_group.pg)
                        tensors[k] = torch.cat(parts, 0)
                out[ent.name] = tensors
        return out
