"""Which plan a run uses: the named one, checked against memory, or auto's choice -- the
fastest predicted plan that fits (pure: no torch, no processes).

auto ranks every candidate plan (parallel.plans.candidate_plans) by the cost model's
predicted communication time plus the optimizer update (parallel.cost.Cost.predicted_s);
times within TIE_REL are a tie, won by the plan that needs less memory. An engine that
runs only some plans narrows auto's choice with restrict_choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

from tierzero.parallel.config import PLAN_NAMES, ParallelConfig
from tierzero.parallel.cost import Cost, MoETraffic, PlanInputs, Unit, predict
from tierzero.parallel.plans import PartitionPlan, PlanError, candidate_plans, named_plan
from tierzero.parallel.topology import Topology, expert_data_topology


@dataclass
class Choice:
    plan: PartitionPlan
    cost: Cost
    reason: str
    costs: List[Cost]


TIE_REL = 1e-3
"""Predicted times this close are a tie (a few bytes of grad-norm all-reduce must not decide)."""


def _fastest(costs: Sequence[Cost]) -> Cost:
    """Least predicted time (communication + update); among ties, the least memory."""
    fastest = min(c.predicted_s for c in costs)
    ties = [c for c in costs if c.predicted_s <= fastest * (1 + TIE_REL)]
    return min(ties, key=lambda c: (c.memory_total, c.predicted_s))


def _time_words(cost: Cost) -> str:
    if not cost.update_s:
        return f"least predicted communication per optimizer step, {cost.comm_time_s * 1e3:.3g} ms"
    return (f"least predicted communication + optimizer update per step, {cost.predicted_s * 1e3:.3g} ms "
            f"({cost.comm_time_s * 1e3:.3g} + {cost.update_s * 1e3:.3g})")


def choose_plan(
    topo: Topology,
    units: Sequence[Unit],
    *,
    dtype_bytes: int,
    grad_accum: int,
    memory_budget_bytes: Optional[float],
    cfg: Optional[ParallelConfig] = None,
    moe: Optional[MoETraffic] = None,
) -> Choice:
    """auto: the least predicted communication time (plus the optimizer update, where its rate
    was measured) that fits memory; ties (within 0.1 %) go to the plan that needs less memory."""
    ep = cfg.ep if cfg is not None else 1
    costs = [
        predict(p, topo, units, dtype_bytes=dtype_bytes, grad_accum=grad_accum,
                memory_budget_bytes=memory_budget_bytes, ep=ep, moe=moe)
        for p in candidate_plans(topo, cfg)
    ]
    fitting = [c for c in costs if c.fits]
    if not fitting:
        smallest = min(costs, key=lambda c: c.memory_total)
        raise PlanError(
            f"no plan fits parallel.memory_budget_gb={_gb(memory_budget_bytes)} per rank: the smallest, "
            f"{smallest.plan.describe(topo)}, needs {_gb(smallest.memory_total)} GB. Raise the budget, add "
            f"ranks, or shrink the model."
        )
    best = _fastest(fitting)
    others = sorted((c for c in fitting if c is not best), key=lambda c: c.predicted_s)
    runner = others[0] if others else None
    reason = (
        _time_words(best)
        + (f" (next: {runner.plan.describe(topo)} at {runner.predicted_s * 1e3:.3g} ms)" if runner else "")
        + f", among {len(fitting)} of {len(costs)} candidate plans that fit "
        + (f"{_gb(memory_budget_bytes)} GB/rank" if memory_budget_bytes else "(no memory budget)")
        + f"; needs {_gb(best.memory_total)} GB/rank"
    )
    return Choice(best.plan, best, reason, costs)


def _gb(nbytes: Optional[float]) -> str:
    return "unlimited" if nbytes is None else f"{nbytes / 1e9:.3g}"


def restrict_choice(choice: Choice, topo: Topology, can_run, engine_label: str) -> Choice:
    """auto on an engine that runs only some plans: the fastest fitting plan it can run
    (auto's ranking, choose_plan, applied to that subset). A named plan is left alone: the
    engine refuses it with its own message."""
    fitting = [c for c in choice.costs if c.fits and can_run(c.plan)]
    if not fitting or choice.plan in [c.plan for c in fitting]:
        return choice
    best = _fastest(fitting)
    reason = (f"{_time_words(best)}, among the "
              f"{len(fitting)} fitting plans {engine_label} can run (auto's overall pick, "
              f"{choice.plan.describe(topo)}, needs parallel.engine=native)")
    return Choice(best.plan, best, reason, choice.costs)


def resolve_plan(
    cfg: ParallelConfig,
    topo: Topology,
    inputs: Union[PlanInputs, Sequence[Unit]],
    *,
    memory_budget_bytes: Optional[float],
    dtype_bytes: Optional[int] = None,
    grad_accum: Optional[int] = None,
    moe: Optional[MoETraffic] = None,
) -> Choice:
    """The plan a run uses for these inputs (recipes.planning.planning_inputs): the named one
    (checked against memory) or auto's choice.

    The older form -- units with dtype_bytes=, grad_accum= (and moe=) -- is accepted until its
    callers (`tierzero plan`, the trainer, benchmarks/hierarchy.py) pass a PlanInputs."""
    inputs = _as_inputs(inputs, dtype_bytes=dtype_bytes, grad_accum=grad_accum, moe=moe)
    units = inputs.units
    if any(u.expert for u in units):
        try:
            expert_data_topology(topo, cfg.ep)
        except ValueError as e:
            raise PlanError(str(e)) from e
    if cfg.plan == "auto" and not cfg.levels:
        return choose_plan(topo, units, dtype_bytes=inputs.dtype_bytes, grad_accum=inputs.grad_accum,
                           memory_budget_bytes=memory_budget_bytes, cfg=cfg, moe=inputs.moe)
    plan = named_plan("tiered" if cfg.levels else cfg.plan, topo, cfg)
    cost = _predict_named(plan, cfg, topo, inputs, memory_budget_bytes)
    if not cost.fits:
        fitting = []
        for name in PLAN_NAMES[1:]:
            other = _predict_named(named_plan(name, topo, cfg), cfg, topo, inputs, memory_budget_bytes)
            if other.fits:
                fitting.append(f"{name} ({_gb(other.memory_total)} GB)")
        raise PlanError(
            f"parallel.plan={cfg.plan} needs {_gb(cost.memory_total)} GB per rank for parameters, gradients and "
            f"optimizer states, more than parallel.memory_budget_gb={_gb(memory_budget_bytes)}. Plans that fit: "
            + (", ".join(fitting) if fitting else "none -- add ranks or raise the budget")
            + ". parallel.plan=auto picks the fastest of them."
        )
    return Choice(plan, cost, f"parallel.plan={cfg.plan} as configured", [cost])


def _predict_named(plan: PartitionPlan, cfg: ParallelConfig, topo: Topology, inputs: PlanInputs,
                   memory_budget_bytes: Optional[float]) -> Cost:
    return predict(plan, topo, inputs.units, dtype_bytes=inputs.dtype_bytes, grad_accum=inputs.grad_accum,
                   memory_budget_bytes=memory_budget_bytes, ep=cfg.ep, moe=inputs.moe)


def _as_inputs(inputs: Union[PlanInputs, Sequence[Unit]], *, dtype_bytes: Optional[int], grad_accum: Optional[int],
               moe: Optional[MoETraffic]) -> PlanInputs:
    """resolve_plan's two forms as one PlanInputs (mixing them is a caller's bug)."""
    if isinstance(inputs, PlanInputs):
        if dtype_bytes is not None or grad_accum is not None or moe is not None:
            raise TypeError("resolve_plan: a PlanInputs carries dtype_bytes, grad_accum and moe; do not pass them too")
        return inputs
    if dtype_bytes is None or grad_accum is None:
        raise TypeError("resolve_plan(cfg, topo, units, ...) needs dtype_bytes= and grad_accum= (or a PlanInputs)")
    return PlanInputs(tuple(inputs), dtype_bytes, grad_accum, moe)
