"""The engines that execute a partition plan, and what each can run (pure: no torch here).

    parallel.engine  module                         class            plans               MoE  compile  checkpoints
    native           parallel/engines/native.py     NativeEngine     every plan          yes  yes      yes
    deepspeed        parallel/engines/deepspeed.py  DeepSpeedEngine  ddp, zero1-3, hpz   no   no       yes (resume: ZeRO-1/2)
    fsdp2            parallel/engines/fsdp2.py      FSDP2Engine      zero2, zero3, hsdp  no   yes      no
    reference        parallel/engines/reference.py  ReferenceEngine  ddp                 yes  yes      no

Every engine is built as `Engine(model, EngineSetup)` and keeps the contract of
parallel/engines/base.py (Engine; Checkpointable where checkpoints are "yes"). The launcher asks
`engine_errors` and `plan_errors` before any rank starts, so a capability problem is a config
error (exit 2) and never a crash the supervisor would restart. To add an engine: a module here
with its class and one EngineSpec in ENGINES (docs/architecture.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from tierzero.parallel.choose import Choice, restrict_choice

from tierzero.parallel.layout import span

from tierzero.parallel.plans import REPLICATED, PartitionPlan, PlanError, named_plan, quant_of
from tierzero.parallel.topology import Topology


@dataclass(frozen=True)
class Optim:
    """AdamW as every engine applies it (decoupled decay on matrices only, global-norm clipping)."""
    lr: float
    betas: Tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    """Clip the global gradient norm to this; 0 = off."""
    eps: float = 1e-8


@dataclass(frozen=True)
class EngineSetup:
    """Everything an engine is built from besides the model."""
    plan: PartitionPlan
    topology: Topology
    rank: int
    optim: Optim
    loss_fn: Callable[[Any, Any], Any]
    local_rank: int = 0
    device: str = "cpu"
    ep: int = 1
    """Expert-parallel size (MoE)."""
    micro_batch_size: int = 1
    grad_accum: int = 1
    dtype: str = "float32"
    """Compute dtype of the parameters (train.dtype); master weights and buffers stay float32."""
    reduce_dtype: str = "float32"
    """Dtype gradients are reduced in (parallel.reduce_dtype)."""
    comm_timing: str = "issue"
    """How the byte ledger times collectives (parallel.comm_timing)."""
    init: Optional[Callable[[str, int, int], Any]] = None
    """For a model built on the meta device: (parameter name, first element, elements) -> that
    slice of its global initial value (recipes.model.Transformer.init_slice). An engine that
    shards materialises only its shards from it; None: the model's parameters hold the values."""


# ---- which plans each engine runs (pure; the engines use the same mappings) ------------------

def _full_precision(plan: PartitionPlan, topo: Topology, engine: str) -> None:
    if plan.quant.active:
        raise PlanError(f"parallel.engine={engine} cannot run {plan.describe(topo)}: its collectives are "
                        "block-quantized (parallel.quant_*), which only parallel.engine=native runs.")


def deepspeed_stage(plan: PartitionPlan, topo: Topology) -> int:
    """The ZeRO stage whose partition is exactly `plan`; PlanError if there is none."""
    _full_precision(plan, topo, "deepspeed")
    c = len(topo.levels) - 1
    levels = (plan.param_level, plan.grad_level, plan.optim_level)
    if all(lv in (REPLICATED, c) for lv in levels):
        stage = {(REPLICATED,) * 3: 0, (REPLICATED, REPLICATED, c): 1,
                 (REPLICATED, c, c): 2, (c, c, c): 3}.get(levels)
        # hpZ is a secondary copy of ZeRO-3's parameter partition; DeepSpeed has it only there.
        if stage is not None and (plan.secondary_level is None or (stage == 3 and plan.secondary_level < c)):
            return stage
    names = ", ".join(f"{lv.name}={span(topo, i)} ranks" for i, lv in enumerate(topo.levels))
    inner = [lv for lv in levels if lv not in (REPLICATED, c)]
    where = f"over the ranks of each '{topo.levels[min(inner)].name}' only" if inner else "in this combination"
    raise PlanError(
        f"parallel.plan={plan.name} is {plan.describe(topo)} on this topology ({names}), which "
        f"parallel.engine=deepspeed cannot run: DeepSpeed's ZeRO stages shard a state over all "
        f"{topo.world_size} ranks or not at all (stage 0: nothing, 1: optimizer, 2: + gradients, 3: + "
        f"parameters, ZeRO++ hpZ: stage 3 with a secondary parameter copy inside a smaller level), so "
        f"it cannot shard a state {where} (MiCS, DeepSpeed's hsdp, was removed in 0.19.7). Use "
        f"parallel.engine=native, which runs this plan, or choose parallel.plan=ddp, zero1, zero2, "
        f"zero3 or hpz for DeepSpeed."
    )


def fsdp2_mesh_shape(plan: PartitionPlan, topo: Topology):
    """(mesh shape, dim names, reshard_after_forward) for a plan FSDP2 can run; PlanError otherwise.

    zero3: 1-D mesh over all ranks, parameters resharded after forward; zero2: 1-D mesh, parameters
    kept gathered between forward and backward; hsdp: 2-D mesh (replicate x shard), shard = the
    ranks of one unit of the plan's level."""
    _full_precision(plan, topo, "fsdp2")
    c = len(topo.levels) - 1
    levels = (plan.param_level, plan.grad_level, plan.optim_level)
    if plan.secondary_level is None and levels == (c, c, c):
        return (topo.world_size,), ("shard",), True
    if plan.secondary_level is None and levels == (-1, c, c):
        return (topo.world_size,), ("shard",), False
    lv = plan.param_level
    if plan.secondary_level is None and lv >= 0 and levels == (lv, lv, lv):
        shard = span(topo, lv)
        return (topo.world_size // shard, shard), ("replicate", "shard"), True
    raise PlanError(
        f"parallel.engine=fsdp2 cannot run {plan.describe(topo)}: FSDP2 shards parameters, gradients and "
        "optimizer states over one group (zero3, zero2) or shards inside a level and replicates across it "
        "(hsdp). Use parallel.engine=native, which runs every plan."
    )


def _reference_check(plan: PartitionPlan, topo: Topology) -> None:
    _full_precision(plan, topo, "reference")
    if (plan.param_level, plan.grad_level, plan.optim_level, plan.secondary_level) != (REPLICATED,) * 3 + (None,):
        raise PlanError(
            f"parallel.engine=reference cannot run {plan.describe(topo)}: it is plain data parallelism with "
            "torch.optim.AdamW (every state replicated, gradients all-reduced once per optimizer step), the "
            "single-process reference the other engines are tested against. Use parallel.plan=ddp (or auto), "
            "or parallel.engine=native for this plan.")


def _any_plan(plan: PartitionPlan, topo: Topology) -> None:
    return None


@dataclass(frozen=True)
class EngineSpec:
    name: str
    """The parallel.engine value, the module parallel/engines/<name>.py."""
    cls: str
    """The class in that module."""
    plans: str
    """The plans it runs, in words (messages, docs)."""
    check_plan: Callable[[PartitionPlan, Topology], Any]
    """Raises PlanError (naming the fix) for a plan the engine cannot run."""
    moe: bool
    """Runs tierzero's MoE layer (expert parallelism needs the native engine)."""
    checkpoints: bool
    """Saves and loads tierzero checkpoints (the Checkpointable contract)."""
    shards_from_meta: bool = False
    """Takes a model on the meta device and materialises only its own shards (EngineSetup.init)."""
    compiles: bool = False
    """Runs train.compile=true: the model's blocks compiled in place (recipes.compiling.compile_model)
    are called as they are, with nothing of the engine's inside them that dynamo would trace."""
    compile_note: str = ""
    """Why it does not run train.compile=true (the error's reason), where compiles is False."""

    def load(self) -> type:
        """The engine class (imports the engine's module, and with it torch or deepspeed)."""
        return getattr(importlib.import_module(f"tierzero.parallel.engines.{self.name}"), self.cls)

    def can_run(self, plan: PartitionPlan, topo: Topology) -> bool:
        try:
            self.check_plan(plan, topo)
        except PlanError:
            return False
        return True

    def restrict(self, choice: Choice, topo: Topology) -> Choice:
        """auto's choice narrowed to the plans this engine runs (auto's ranking over them); a
        named plan it cannot run raises PlanError."""
        choice = restrict_choice(choice, topo, lambda plan: self.can_run(plan, topo), self.name)
        self.check_plan(choice.plan, topo)
        return choice


ENGINES: Dict[str, EngineSpec] = {spec.name: spec for spec in (
    EngineSpec("native", "NativeEngine", "every plan", _any_plan, moe=True, checkpoints=True, shards_from_meta=True,
               compiles=True),
    EngineSpec("deepspeed", "DeepSpeedEngine", "ddp, zero1, zero2, zero3, hpz",
               lambda plan, topo: deepspeed_stage(plan, topo), moe=False, checkpoints=True,
               compile_note="DeepSpeed calls the model through its own engine, and at ZeRO-3 its parameter fetch and "
                            "release hooks run on every submodule inside a block, where dynamo traces them piece by "
                            "piece (a graph break and recompiles at each submodule) instead of compiling the block; "
                            "DeepSpeed's own compile path is not driven by tierzero"),
    EngineSpec("fsdp2", "FSDP2Engine", "zero2, zero3, hsdp", lambda plan, topo: fsdp2_mesh_shape(plan, topo),
               moe=False, checkpoints=False, compiles=True),
    EngineSpec("reference", "ReferenceEngine", "ddp", _reference_check, moe=True, checkpoints=False, compiles=True),
)}


def engine_errors(*, parallel, moe, checkpoint, train) -> List[str]:
    """What the chosen engine cannot do that the config asks of it, and settings that need each
    other (the config sections as keyword arguments; pure, no topology needed)."""
    spec = ENGINES.get(parallel.engine)
    if spec is None:
        return [f"parallel.engine={parallel.engine!r} is not an engine; choose one of {list(ENGINES)}."]
    errs = []
    experts = moe.num_experts if moe is not None else 0
    if experts and not spec.moe:
        errs.append(f"parallel.engine={spec.name} cannot run tierzero's MoE layer (moe.num_experts={experts}); use "
                    "parallel.engine=native, or moe.num_experts=0 for a dense model")
    if experts and spec.name == "reference" and parallel.ep > 1:
        errs.append(f"parallel.engine=reference replicates every expert on every rank, but parallel.ep={parallel.ep} "
                    "splits them; use parallel.ep=1 with the reference, or parallel.engine=native")
    if experts and getattr(train, "activation_checkpointing", "none") != "none":
        errs.append(f"train.activation_checkpointing={train.activation_checkpointing} recomputes each block in the "
                    f"backward, and an MoE block (moe.num_experts={experts}) would route and count its tokens twice; "
                    "use train.activation_checkpointing=none with MoE, or moe.num_experts=0")
    quantized = [f"parallel.{k}={getattr(parallel, k)}" for k in ("quant_weights", "quant_grads")
                 if getattr(parallel, k, "none") != "none"] + (["parallel.plan=zeropp"] if parallel.plan == "zeropp" else [])
    if quantized and spec.name != "native":
        why = {"deepspeed": "DeepSpeed's ZeRO++ quantization kernels (zero_quantized_weights, zero_quantized_gradients) "
                            "need CUDA, and its CPU path has none",
               "fsdp2": "FSDP2 has no quantized collectives",
               "reference": "the reference is the full-precision baseline the others are compared against"}[spec.name]
        errs.append(f"{' and '.join(quantized)} asks for block-quantized collectives, which parallel.engine={spec.name} "
                    f"cannot run: {why}. Use parallel.engine=native, or drop {' and '.join(quantized)}")
    if getattr(train, "compile", False) and not spec.compiles:
        able = ", ".join(f"parallel.engine={n}" for n, s in ENGINES.items() if s.compiles)
        errs.append(f"train.compile=true compiles each transformer block in place, which parallel.engine={spec.name} "
                    f"cannot run: {spec.compile_note}. Use {able}, or train.compile=false")
    wanted = _checkpoints_wanted(checkpoint)
    if wanted and not spec.checkpoints:
        errs.append(f"parallel.engine={spec.name} cannot save or load tierzero checkpoints, but {wanted}; use "
                    "parallel.engine=native (which saves and resumes every plan), or drop the checkpoint setting "
                    "(checkpoint.every_steps=0 checkpoint.resume=auto)")
    if train.on_nonfinite == "rollback" and (checkpoint is None or checkpoint.every_steps < 1):
        every = checkpoint.every_steps if checkpoint is not None else 0
        errs.append(f"train.on_nonfinite=rollback reloads the newest checkpoint after a non-finite step, but "
                    f"checkpoint.every_steps={every} saves none; set checkpoint.every_steps (e.g. 50), or "
                    "train.on_nonfinite=skip")
    return errs


def _checkpoints_wanted(checkpoint) -> Optional[str]:
    if checkpoint is None:
        return None
    asked = []
    if checkpoint.every_steps > 0:
        asked.append(f"checkpoint.every_steps={checkpoint.every_steps}")
    if checkpoint.resume not in ("auto", "none"):
        asked.append(f"checkpoint.resume={checkpoint.resume}")
    return " and ".join(asked) + (" asks" if len(asked) == 1 else " ask") + " for them" if asked else None


def expert_errors(parallel, moe, topo: Topology) -> List[str]:
    """moe.dispatch and moe.max_nodes_per_token against the nodes the first EP group spans on
    this topology (every group spans the same number: they are consecutive ranks)."""
    from tierzero.parallel.moe_config import expert_parallel_errors

    if parallel.ep < 2 or not moe.num_experts or topo.world_size % parallel.ep:
        return []  # no EP group, or check_world already refused the size
    try:
        return expert_parallel_errors(moe, [topo.node_of(r) for r in range(parallel.ep)])
    except ValueError as e:  # members not node by node: the engine's placement rules say why
        return [f"parallel.ep={parallel.ep}: {e}"]


def plan_errors(parallel, topo: Topology) -> List[str]:
    """A named plan the topology or the engine refuses (auto is narrowed to what the engine runs
    when the plan is chosen); [] when it can run."""
    spec = ENGINES.get(parallel.engine)
    try:
        quant_of(topo, parallel)  # level names every plan's quantization uses
    except PlanError as e:
        return [str(e)]
    if spec is None or (parallel.plan == "auto" and not parallel.levels):
        return []
    try:
        spec.check_plan(named_plan("tiered" if parallel.levels else parallel.plan, topo, parallel), topo)
    except PlanError as e:
        return [str(e)]
    return []
