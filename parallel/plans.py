"""Partition plans and their names (pure: no torch, no processes).

A plan names, for each training state, the topology level it is sharded over:

    param_level      the persistent working copy of the parameters; a block's forward
                     (and, without a secondary level, backward) all-gathers inside it
    secondary_level  ZeRO++ hpZ: the backward all-gather comes from a secondary shard at
                     this (faster) level, cut from the forward gather at no extra traffic
    grad_level       gradients are reduce-scattered inside it every micro-step (or, with
                     grad_sync=step, once per optimizer step)
    optim_level      fp32 master weights and AdamW moments are sharded inside it

Levels are indices into Topology.levels (0 = innermost); REPLICATED (-1) means "a group of
one rank". param <= grad <= optim must hold. States are replicated across the units of the
optimizer level (HSDP / MiCS), so gradients are all-reduced across those replicas once per
optimizer step.

How a plan lays its shards out and which groups it talks over: parallel.layout. What it
costs: parallel.cost. Which one a run uses: parallel.choose.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import List, Optional

from tierzero.parallel.config import PLAN_NAMES, ParallelConfig
from tierzero.parallel.quant import BITS, NO_QUANT, SCALE_BYTES, Quant
from tierzero.parallel.topology import Topology

REPLICATED = -1


@dataclass(frozen=True)
class PartitionPlan:
    name: str
    param_level: int
    grad_level: int
    optim_level: int
    secondary_level: Optional[int] = None
    quant: Quant = NO_QUANT
    """Which collectives go block-quantized, on which levels (parallel.quant)."""
    grad_sync: str = "micro"
    """When gradients are reduce-scattered inside grad_level (parallel.grad_sync): every micro-step,
    or once per optimizer step ("step": each rank sums its micro-steps' full-size gradients first)."""

    def describe(self, topo: Topology) -> str:
        def nm(level):
            return "rep" if level == REPLICATED else topo.levels[level].name

        parts = [f"P={nm(self.param_level)}"]
        if self.secondary_level is not None:
            parts.append(f"S={nm(self.secondary_level)}")
        parts += [f"G={nm(self.grad_level)}", f"O={nm(self.optim_level)}"]
        if self.quant.active:
            parts.append(self.quant.describe())
        if self.grad_sync != "micro":
            parts.append(f"sync={self.grad_sync}")
        return f"{self.name}({','.join(parts)})"

    @property
    def bwd_level(self) -> int:
        return self.param_level if self.secondary_level is None else self.secondary_level


class PlanError(ValueError):
    pass


def _level_by_name(topo: Topology, name: str, key: str) -> int:
    if name in ("none", "replicated", "rep"):
        return REPLICATED
    if name not in topo.names:
        raise PlanError(
            f"{key}={name!r} is not a level of this topology {list(topo.names)}; "
            f"use one of them or 'none' (replicated)."
        )
    return topo.level_index(name)


def _node_level(topo: Topology) -> int:
    return topo.level_index("node") if "node" in topo.names else 0


def quant_options(topo: Topology, cfg: ParallelConfig) -> List[Quant]:
    """Every quantization parallel.quant_* allows: one, or with `auto` each width of that kind
    (none first, so that a tie keeps full precision)."""
    weights = list(BITS) if cfg.quant_weights == "auto" else [cfg.quant_weights]
    grads = list(BITS) if cfg.quant_grads == "auto" else [cfg.quant_grads]
    return [quant_of(topo, dataclasses.replace(cfg, quant_weights=w, quant_grads=g)) for w in weights for g in grads]


def quant_of(topo: Topology, cfg: ParallelConfig) -> Quant:
    """parallel.quant_* on this topology (auto read as none: quant_options lists the choices):
    the levels by name, the slowest one by default."""
    if cfg.quant_levels:
        unknown = [n for n in cfg.quant_levels if n not in topo.names]
        if unknown:
            raise PlanError(f"parallel.quant_levels={list(cfg.quant_levels)} names {unknown}, not a level of this "
                            f"topology {list(topo.names)}; name some of those, e.g. [{topo.names[-1]}].")
        levels = tuple(cfg.quant_levels)
    else:
        levels = (topo.names[-1],)
    w, g = BITS.get(cfg.quant_weights, 0), BITS.get(cfg.quant_grads, 0)
    return Quant(weight_bits=w, grad_bits=g, weight_levels=levels if w else (), grad_levels=levels if g else (),
                 block_size=cfg.quant_block_size, scale_bytes=SCALE_BYTES.get(cfg.quant_scale_dtype, 4),
                 stochastic=cfg.quant_stochastic, error_feedback=cfg.quant_error_feedback)


def named_plan(name: str, topo: Topology, cfg: Optional[ParallelConfig] = None) -> PartitionPlan:
    """The plan `name` on this topology, as parallel.* configures it (parallel.quant_*=auto read
    as none, parallel.grad_sync=auto as micro: parallel.choose tries the choices)."""
    cfg = cfg or ParallelConfig()
    if name == "zeropp":
        plan = _zeropp(topo, cfg)
    else:
        plan, quant = _named_levels(name, topo, cfg), quant_of(topo, cfg)
        plan = dataclasses.replace(plan, quant=quant) if quant.active else plan
    return dataclasses.replace(plan, grad_sync="step") if cfg.grad_sync == "step" and _grads_sharded(plan, topo) \
        else plan


def _grads_sharded(plan: PartitionPlan, topo: Topology) -> bool:
    """Gradients are reduce-scattered in backward (over more than one rank): what grad_sync times."""
    return plan.grad_level != REPLICATED and topo.span(topo.levels[plan.grad_level].name) > 1


def grad_sync_options(plan: PartitionPlan, topo: Topology, cfg: ParallelConfig, grad_accum: int) -> List[str]:
    """The gradient syncs parallel.grad_sync allows for this plan where they differ (gradients
    sharded and accumulated; else micro, what both then do): the one configured, or with auto
    both, micro first so that a tie keeps the smaller memory (step only on the native engine,
    the one that runs it)."""
    if grad_accum == 1 or not _grads_sharded(plan, topo):
        return ["micro"]
    if cfg.grad_sync != "auto":
        return [cfg.grad_sync]
    return ["micro", "step"] if cfg.engine == "native" else ["micro"]


def _zeropp(topo: Topology, cfg: ParallelConfig) -> PartitionPlan:
    """ZeRO++ as its paper describes it: hpZ (a secondary parameter copy inside each node),
    qwZ (the forward all-gather across nodes in int8) and qgZ (gradients reduced by an int4
    all-to-all, hierarchically: every hop up to the cluster quantized)."""
    mine = [f"parallel.{k}={getattr(cfg, k)}" for k in ("quant_weights", "quant_grads") if getattr(cfg, k) != "none"]
    if cfg.quant_levels:
        mine.append(f"parallel.quant_levels={list(cfg.quant_levels)}")
    if mine:
        raise PlanError(
            f"parallel.plan=zeropp fixes what is quantized where (int8 weights across nodes, int4 gradients on every "
            f"level, as the ZeRO++ paper), but {' and '.join(mine)} asks otherwise; drop {' and '.join(mine)}, or use "
            "parallel.plan=hpz (or any plan) with parallel.quant_* to choose your own.")
    if len(topo.levels) < 2:
        raise PlanError(
            f"parallel.plan=zeropp keeps hpZ's secondary parameter copy inside a level faster than the cluster, but "
            f"the topology {topo.describe()} has one level; use parallel.plan=zero3 with parallel.quant_weights=int8 "
            "parallel.quant_grads=int4, or describe the nodes (e.g. topology.emulate=[2,2]).")
    hpz = _named_levels("hpz", topo, cfg)
    c = len(topo.levels) - 1
    quant = Quant(weight_bits=8, grad_bits=4, weight_levels=(topo.names[c],), grad_levels=topo.names,
                  block_size=cfg.quant_block_size, scale_bytes=SCALE_BYTES.get(cfg.quant_scale_dtype, 4),
                  stochastic=cfg.quant_stochastic, error_feedback=cfg.quant_error_feedback)
    return dataclasses.replace(hpz, name="zeropp", quant=quant)


def _named_levels(name: str, topo: Topology, cfg: ParallelConfig) -> PartitionPlan:
    c = len(topo.levels) - 1
    node = _node_level(topo)
    if name == "ddp":
        return PartitionPlan("ddp", REPLICATED, REPLICATED, REPLICATED)
    if name == "zero1":
        return PartitionPlan("zero1", REPLICATED, REPLICATED, c)
    if name == "zero2":
        return PartitionPlan("zero2", REPLICATED, c, c)
    if name == "zero3":
        return PartitionPlan("zero3", c, c, c)
    if name == "hpz":
        if c == 0:
            raise PlanError(
                f"parallel.plan=hpz keeps a secondary parameter copy inside a level faster than the cluster, but "
                f"the topology {topo.describe()} has one level; use parallel.plan=zero3 (the same without the "
                "copy), or describe the nodes (e.g. topology.emulate=[2,2])."
            )
        sec = _level_by_name(topo, cfg.secondary_level, "parallel.secondary_level") if cfg.secondary_level else node
        if sec >= c:
            raise PlanError(
                f"parallel.secondary_level={topo.levels[sec].name if sec >= 0 else 'none'} must be a level "
                f"inside the cluster for hpz (one of {list(topo.names[:-1])})."
            )
        return PartitionPlan("hpz", c, c, c, secondary_level=sec)
    if name == "hsdp":
        lv = _level_by_name(topo, cfg.hsdp_level, "parallel.hsdp_level") if cfg.hsdp_level else node
        return PartitionPlan("hsdp", lv, lv, lv)
    if name == "tiered":
        if cfg.levels:
            p, g, o = (_level_by_name(topo, n, "parallel.levels") for n in cfg.levels)
            if not p <= g <= o:
                raise PlanError(
                    f"parallel.levels={list(cfg.levels)} breaks param <= grad <= optimizer: a state cannot be "
                    f"sharded over a wider group than the state derived from it. Order them innermost first, "
                    f"e.g. {[topo.names[0], topo.names[node], topo.names[c]]}."
                )
            return PartitionPlan("tiered", p, g, o)
        return PartitionPlan("tiered", 0, node, c)
    raise PlanError(f"parallel.plan={name!r} is not a plan; choose one of {list(PLAN_NAMES)}.")


def named_plans(topo: Topology, cfg: Optional[ParallelConfig] = None) -> List[PartitionPlan]:
    """Every named plan this topology has: hpz and zeropp need a level inside the cluster for
    their copy; zeropp is left out where parallel.quant_* asks for other quantization."""
    cfg = cfg or ParallelConfig()
    own_quant = cfg.quant_weights != "none" or cfg.quant_grads != "none" or bool(cfg.quant_levels)
    return [named_plan(n, topo, cfg) for n in PLAN_NAMES
            if n != "auto" and not (n in ("hpz", "zeropp") and len(topo.levels) < 2)
            and not (n == "zeropp" and own_quant)]


def candidate_plans(topo: Topology, cfg: Optional[ParallelConfig] = None) -> List[PartitionPlan]:
    """The named plans plus every assignment param <= grad <= optimizer (what auto searches).
    zeropp is not among them: auto sends lossy bytes only where parallel.quant_* asks, and
    with parallel.quant_*=auto each shape is tried with every width allowed."""
    cfg = cfg or ParallelConfig()
    named = [p for p in named_plans(topo, cfg) if p.name != "zeropp"]
    seen = {(p.param_level, p.secondary_level, p.grad_level, p.optim_level) for p in named}
    levels = [REPLICATED] + list(range(len(topo.levels)))
    shapes = list(named)
    for p, g, o in itertools.combinations_with_replacement(levels, 3):
        if (p, None, g, o) not in seen:
            shapes.append(PartitionPlan("tiered", p, g, o))
            seen.add((p, None, g, o))
    for sec in range(len(topo.levels) - 1):  # hpz-style secondary under any wider param level
        for p, g, o in itertools.combinations_with_replacement(range(sec + 1, len(topo.levels)), 3):
            if (p, sec, g, o) not in seen:
                shapes.append(PartitionPlan("hpz" if (p, g, o) == (len(topo.levels) - 1,) * 3 else "tiered", p, g, o,
                                            sec))
                seen.add((p, sec, g, o))
    return [dataclasses.replace(plan, quant=q) for q in quant_options(topo, cfg) for plan in shapes]
