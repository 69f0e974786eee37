"""DeepSpeed as an engine (`parallel.engine=deepspeed`): the plans DeepSpeed's ZeRO can express,
run by DeepSpeed itself.

`parallel.engine=deepspeed` hands the resolved PartitionPlan to DeepSpeed instead of tierzero's
native engine. It is there to cross-check the native engine against a well-known implementation
and to run recipes where DeepSpeed is the site's standard.

What maps (DeepSpeed shards a state either over every data-parallel rank or not at all):

    plan    param  grad     optimizer  ->  DeepSpeed
    ddp     rep    rep      rep            zero_optimization.stage 0
    zero1   rep    rep      cluster        stage 1
    zero2   rep    cluster  cluster        stage 2
    zero3   cluster cluster cluster        stage 3
    hpz     cluster cluster cluster        stage 3 + zero_hpz_partition_size = span(secondary)
            + secondary level                (ZeRO++ hpZ, arXiv:2306.10209)

The mapping goes by the plan's levels, not its name, so e.g. tiered[none,cluster,cluster] runs
as stage 2. Every other shape -- hsdp, tiered's default, anything sharded inside a level below
the cluster -- is refused before launch (parallel.engines.deepspeed_stage, the registry's):
DeepSpeed has no such partition (MiCS was its hsdp and was removed in 0.19.7), and
parallel.engine=native runs them.

deepspeed_config() is pure (no deepspeed import) so the mapping is tested without processes;
deepspeed is imported inside DeepSpeedEngine only.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn

from tierzero.parallel.engines import EngineSetup, deepspeed_stage
from tierzero.parallel.engines.base import CheckpointSlice, StepStats, param_groups
from tierzero.parallel.layout import span
from tierzero.parallel.plans import PartitionPlan
from tierzero.parallel.topology import Topology

log = logging.getLogger(__name__)

BUCKET_NUMEL = 2**24
"""Elements per reduce / all-gather / stage-3 prefetch bucket (64 MiB in fp32). DeepSpeed's
default, 5e8, allocates 2 GB buffers per rank on first backward -- too much for CPU ranks that
share one host's memory. Bucket boundaries do not change any element's sum, so not the numerics."""
STEPS_PER_PRINT = 2**31 - 1
"""DeepSpeed prints its own progress every N steps; the training loop already reports them."""
_SHM_OP = "deepspeed_shm_comm"


def deepspeed_config(
    plan: PartitionPlan,
    topo: Topology,
    *,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    dtype: str,
    grad_clip: float,
) -> dict:
    """The DeepSpeed config (the dict deepspeed.initialize takes) that runs `plan`.

    No "optimizer" or "scheduler" section: the engine passes a torch.optim.AdamW, which keeps
    the optimizer identical to the native engine's and avoids DeepSpeed's FusedAdam build, and
    sets the learning rate itself every step."""
    if world_size != topo.world_size:
        raise ValueError(f"world_size={world_size} but the topology {topo.describe()} has {topo.world_size} ranks")
    stage = deepspeed_stage(plan, topo)
    zero: Dict[str, object] = {
        "stage": stage,
        "overlap_comm": False,  # CPU ranks have no streams to overlap on; keeps the schedule simple
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": BUCKET_NUMEL,
        "allgather_bucket_size": BUCKET_NUMEL,
    }
    if stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": BUCKET_NUMEL,
            # 0: every parameter is partitioned, none kept whole on every rank (DeepSpeed's default
            # keeps tensors under 1e5 elements, e.g. norms, replicated -- not the plan).
            "stage3_param_persistence_threshold": 0,
            "stage3_model_persistence_threshold": 0,
        })
        if plan.secondary_level is not None:
            zero["zero_hpz_partition_size"] = span(topo, plan.secondary_level)
    cfg: Dict[str, object] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": float(grad_clip) if grad_clip > 0 else 0.0,
        "zero_optimization": zero,
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    if dtype == "bfloat16":
        cfg["bf16"] = {"enabled": True}
        if stage > 0:
            # fp32 gradient accumulation across micro-steps, as the native engine does. DeepSpeed
            # refuses it at stage 0 ("unsupported mix"), where bf16 gradients accumulate in bf16.
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    elif dtype != "float32":
        raise ValueError(f"train.dtype={dtype!r} is not one of ['float32', 'bfloat16'].")
    return cfg


def _init_single_process_group() -> None:
    """DeepSpeed needs a process group even for one rank; tierzero creates none for world 1."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def _skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce, which takes most of a
    minute on first use (measured: docs/benchmarks.md, Figures behind design choices).

    DeepSpeed's CPU comm backend builds the op whenever it is 'compatible', but only
    inference_all_reduce uses it; training goes through torch.distributed (gloo) either way.
    There is no environment switch, so mark it incompatible in the dict DeepSpeed probes
    (deepspeed/ops/__init__.py keeps that dict so edits to it persist)."""
    import deepspeed.comm.comm as ds_comm
    import deepspeed.ops

    if ds_comm.cdb is None:  # the comm backend (and with it the op) is created once per process
        deepspeed.ops.__compatible_ops__[_SHM_OP] = False


class DeepSpeedEngine:
    """The engine contract (parallel/engines/base.py), run by deepspeed.initialize."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, setup: EngineSetup):
        plan, topology, o = setup.plan, setup.topology, setup.optim
        # the config first: a plan DeepSpeed cannot run fails here, before deepspeed is imported
        self.config = deepspeed_config(plan, topology, micro_batch_size=setup.micro_batch_size,
                                       grad_accum=setup.grad_accum, world_size=topology.world_size, dtype=setup.dtype,
                                       grad_clip=o.grad_clip)
        self.stage = self.config["zero_optimization"]["stage"]
        self.plan, self.topo, self.rank, self.loss_fn = plan, topology, setup.rank, setup.loss_fn
        self.grad_accum, self.device = setup.grad_accum, setup.device
        self.world_size = topology.world_size
        self.step_count = 0

        import deepspeed

        if not log.isEnabledFor(logging.DEBUG):  # DeepSpeed logs INFO lines on every rank
            deepspeed.utils.logger.setLevel(logging.WARNING)
        if not dist.is_initialized():
            assert self.world_size == 1, "a multi-rank run initialises torch.distributed before the engine"
            _init_single_process_group()
        assert dist.get_world_size() == self.world_size, "topology and process group disagree"
        # deepspeed.initialize asserts LOCAL_RANK is in the environment (set by torchrun and DeepSpeed's
        # own launcher; tierzero's supervisor tells its ranks TIERZERO_LOCAL_RANK instead, srun and
        # mpirun their own variables)
        os.environ.setdefault("LOCAL_RANK", str(setup.local_rank))
        _skip_shm_comm_build()
        # The same optimizer as the reference engine: torch AdamW, single-tensor path, no decay on
        # 1-D params. ZeRO hands it flat fp32 shards, on which AdamW is the same elementwise math.
        self.optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                                           foreach=False)
        if setup.dtype == "bfloat16":  # DeepSpeed's bf16 mode takes bf16 weights and keeps fp32 masters of them
            model.to(torch.bfloat16)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.config)
        self.model = model

    # ---- one micro-step --------------------------------------------------------------------
    def micro_step(self, inputs: torch.Tensor, targets: torch.Tensor, *, scale: float) -> float:
        """Forward and backward of one micro-batch; returns its (unscaled) loss.

        engine.backward divides the loss by gradient_accumulation_steps itself and ZeRO averages
        over the ranks, so the gradient is the mean over all micro-batches of all ranks -- as in
        the native engine, which is handed scale = 1/grad_accum. Only a different scale is applied."""
        loss = self.loss_fn(self.engine(inputs), targets)
        extra = scale * self.grad_accum
        self.engine.backward(loss if math.isclose(extra, 1.0, rel_tol=1e-12) else loss * extra)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # not an optimizer step: DeepSpeed counts micro-steps in step()
        return loss.detach()

    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The micro-step's forward and loss under torch.no_grad (ZeRO-3 gathers in the forward
        as in training); no backward, so DeepSpeed's micro-step count is not advanced."""
        with torch.no_grad():
            return self.loss_fn(self.engine(inputs), targets)

    # ---- optimizer step --------------------------------------------------------------------
    def step(self, lr: float) -> StepStats:
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(
                f"step() after a number of micro-steps that is not a multiple of grad_accum={self.grad_accum}")
        for group in self.optimizer.param_groups:  # ZeRO's wrapper steps this optimizer's groups
            group["lr"] = lr
        norm = self._replicated_grad_norm() if self.stage == 0 else None
        self.engine.step()
        if norm is None:
            ds_norm = self.engine.get_global_grad_norm()
            assert ds_norm is not None, "ZeRO computes the norm unless zero_optimization.compute_grad_norm=false"
            norm = float(ds_norm)
        self.step_count += 1
        return StepStats(grad_norm=norm)

    def _replicated_grad_norm(self) -> float:
        """Stage 0: DeepSpeed only records the norm inside its ZeRO/bf16 optimizers. The gradients
        were averaged over the ranks in the boundary backward, so every rank computes the same."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()

    def take_comm(self) -> List[dict]:
        """Always empty: DeepSpeed issues its collectives itself, outside tierzero's byte ledger,
        so telemetry has no per-level traffic for this engine (DeepSpeed's own comms_logger can
        be enabled through its config for that)."""
        return []

    # ---- global tensors (checkpoints, tests) -----------------------------------------------
    def _relink_optimizer_state(self) -> None:
        """Work around DeepSpeed 0.19.8 (ZeRO-1/2 and its bf16 optimizer): each parameter's view of
        the optimizer state is linked once, right after the *first param group's* first step, when
        the other groups have no state yet -- so safe_get_full_optimizer_state raises "exp_avg not
        found" for every parameter outside group 0 (here: the undecayed norms). Linking again
        once all groups have stepped fixes the views; training itself is not affected."""
        opt = self.engine.optimizer
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state") and not getattr(self, "_relinked", False):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()
            self._relinked = True

    def global_tensors(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """name -> {'param', 'exp_avg', 'exp_avg_sq'} as full fp32 tensors, on every rank.

        A collective at stages 1-3 (DeepSpeed gathers the shards): call it on every rank."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if self.stage == 0 and "bf16" in self.config:
            raise RuntimeError(  # a DeepSpeed limitation, named in docs/deepspeed.md
                "global_tensors() at ZeRO stage 0 with bf16: DeepSpeed's bf16 DDP optimizer keeps its fp32 "
                "master copies without a per-parameter mapping to read them by")
        if self.step_count:
            self._relink_optimizer_state()
        out: Dict[str, Dict[str, torch.Tensor]] = {}
        for name, p in self.model.named_parameters():
            shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape  # stage 3 leaves p empty
            full = safe_get_full_fp32_param(p)
            entry = {"param": (full if full is not None else p.detach()).float().reshape(shape).clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                state = None
                if self.step_count:  # the moments exist from the first step on
                    state = safe_get_full_optimizer_state(p, key)
                    if state is None:  # stage 0: the torch optimizer holds them per parameter
                        state = self.optimizer.state[p][key]
                entry[key] = (state.float().reshape(shape).clone() if state is not None
                              else torch.zeros(shape, dtype=torch.float32, device=entry["param"].device))
            out[name] = entry
        return out

    # ---- checkpoints (the Checkpointable contract) -------------------------------------------
    def checkpoint_slices(self) -> List[CheckpointSlice]:
        """The global tensors (gathered by DeepSpeed: a collective), each rank saving an equal
        contiguous share of every one; names and layout as the native engine's."""
        world, rank = self.world_size, self.rank
        out = []
        for name, states in self.global_tensors().items():
            for key, prefix in (("param", "model"), ("exp_avg", "optim.exp_avg"), ("exp_avg_sq", "optim.exp_avg_sq")):
                flat = states[key].reshape(-1)
                lo, hi = flat.numel() * rank // world, flat.numel() * (rank + 1) // world
                if hi > lo:
                    out.append(CheckpointSlice(f"{prefix}/{name}", tuple(states[key].shape), "float32", lo,
                                               flat[lo:hi].cpu().numpy().copy()))
        return out

    def load_checkpoint(self, read, step_count: int) -> None:
        """Read every full tensor this rank needs (local only); after_load hands them to DeepSpeed."""
        self._loaded = {}
        for name, p in self.model.named_parameters():
            shape = tuple(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
            n = int(torch.Size(shape).numel())
            self._loaded[name] = {key: torch.from_numpy(read(f"{prefix}/{name}", 0, n)).view(shape)
                                  for key, prefix in (("param", "model"), ("exp_avg", "optim.exp_avg"),
                                                      ("exp_avg_sq", "optim.exp_avg_sq"))}
        self._loaded_step = step_count

    def after_load(self) -> None:
        """Set DeepSpeed's fp32 masters and AdamW moments from the full tensors (each rank keeps
        its own fragment), the module's working weights, and AdamW's step count."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if self.stage not in (1, 2):
            raise RuntimeError(f"resuming the DeepSpeed engine is implemented for ZeRO stages 1 and 2, not "
                               f"{self.stage}; resume with parallel.plan=zero1 or zero2 (or parallel.engine=native)")
        opt = self.engine.optimizer
        inner = opt.optimizer  # the torch AdamW ZeRO steps on its flat fp32 partitions
        for group in inner.param_groups:  # AdamW creates its state lazily: create it now to fill it
            for flat in group["params"]:
                state = inner.state[flat]
                state.setdefault("exp_avg", torch.zeros_like(flat))
                state.setdefault("exp_avg_sq", torch.zeros_like(flat))
                state["step"] = torch.tensor(float(self._loaded_step))
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
        self._relinked = True
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                full = self._loaded[name]
                safe_set_full_fp32_param(p, full["param"].to(p.device))
                safe_set_full_optimizer_state(p, full["exp_avg"].to(p.device), "exp_avg")
                safe_set_full_optimizer_state(p, full["exp_avg_sq"].to(p.device), "exp_avg_sq")
                p.data.copy_(full["param"].to(p.dtype))  # stages 1-2 keep the full working weights
        self.step_count = self._loaded_step
        self._loaded = None
