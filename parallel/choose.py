"""Which plan a run uses: the named one, checked against memory, or auto's choice -- the
fastest predicted plan that fits (pure: no torch, no processes).

auto ranks every candidate plan (parallel.plans.candidate_plans) by the cost model's
predicted communication time plus the optimizer update (parallel.cost.Cost.predicted_s);
times within TIE_REL are a tie, won by the plan that needs less memory. An engine that
runs only some plans narrows auto's choice with restrict_choice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence

from tierzero.parallel.config import ParallelConfig
from tierzero.parallel.cost import Cost, MoETraffic, PlanInputs, Unit, predict
from tierzero.parallel.plans import (PartitionPlan, PlanError, candidate_plans, grad_sync_options, named_plan,
                                     named_plans, quant_options)
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
    if not cost.update_s and not cost.codec_s:
        return f"least predicted communication per optimizer step, {cost.comm_time_s * 1e3:.3g} ms"
    parts = [("communication", cost.comm_time_s), ("optimizer update", cost.update_s),
             ("quantization", cost.codec_s)]
    parts = [(name, t) for name, t in parts if t or name == "communication"]
    return (f"least predicted {' + '.join(name for name, _ in parts)} per step, {cost.predicted_s * 1e3:.3g} ms "
            f"({' + '.join(f'{t * 1e3:.3g}' for _, t in parts)})")


def choose_plan(
    topo: Topology,
    units: Sequence[Unit],
    *,
    dtype_bytes: int,
    grad_accum: int,
    memory_budget_bytes: Optional[float],
    cfg: Optional[ParallelConfig] = None,
    moe: Optional[MoETraffic] = None,
    reduce_bytes: Optional[int] = None,
    activation_bytes: float = 0.0,
) -> Choice:
    """auto: the least predicted communication time (plus the optimizer update, where its rate
    was measured) that fits memory; ties (within 0.1 %) go to the plan that needs less memory."""
    cfg = cfg or ParallelConfig()
    costs = [
        predict(p, topo, units, dtype_bytes=dtype_bytes, grad_accum=grad_accum,
                memory_budget_bytes=memory_budget_bytes, ep=cfg.ep, moe=moe, reduce_bytes=reduce_bytes,
                activation_bytes=activation_bytes)
        for p in with_grad_syncs(candidate_plans(topo, cfg), topo, cfg, grad_accum)
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


def with_grad_syncs(plans: Sequence[PartitionPlan], topo: Topology, cfg: ParallelConfig,
                    grad_accum: int) -> List[PartitionPlan]:
    """Each plan with each gradient sync parallel.grad_sync allows it (parallel.plans.grad_sync_options)."""
    return [dataclasses.replace(p, grad_sync=s) for p in plans for s in grad_sync_options(p, topo, cfg, grad_accum)]


def named_costs(cfg: ParallelConfig, topo: Topology, inputs: PlanInputs, *,
                memory_budget_bytes: Optional[float]) -> List[Cost]:
    """One Cost per named plan (what `tierzero plan` lists): with parallel.grad_sync=auto the
    plan's fastest gradient sync that fits (the first where none fits)."""
    out = []
    for plan in named_plans(topo, cfg):
        costs = [_predict_named(p, cfg, topo, inputs, memory_budget_bytes)
                 for p in with_grad_syncs([plan], topo, cfg, inputs.grad_accum)]
        fitting = [c for c in costs if c.fits]
        out.append(_fastest(fitting) if fitting else costs[0])
    return out


def _gb(nbytes: Optional[float]) -> str:
    return "unlimited" if nbytes is None else f"{nbytes / 1e9:.3g}"


def restrict_choice(choice: Choice, topo: Topology, can_run, engine_label: str) -> Choice:
    """auto on an engine that runs only some plans: the fastest fitting plan it can run
    (auto's ranking, choose_plan, applied to that subset, and its reason naming only plans of
    that subset). A named plan is left alone: the engine refuses it with its own message."""
    fitting_all = [c for c in choice.costs if c.fits]
    fitting = [c for c in fitting_all if can_run(c.plan)]
    if not fitting or len(fitting) == len(fitting_all):
        return choice
    best = _fastest(fitting)
    others = sorted((c for c in fitting if c is not best), key=lambda c: c.predicted_s)
    reason = (_time_words(best)
              + (f" (next: {others[0].plan.describe(topo)} at {others[0].predicted_s * 1e3:.3g} ms)" if others else "")
              + f", among the {len(fitting)} of {len(fitting_all)} fitting plans parallel.engine={engine_label} can run")
    if not can_run(choice.plan):
        reason += f" (auto's overall pick, {choice.plan.describe(topo)}, needs parallel.engine=native)"
    return Choice(best.plan, best, reason, choice.costs)


def resolve_plan(cfg: ParallelConfig, topo: Topology, inputs: PlanInputs, *,
                 memory_budget_bytes: Optional[float]) -> Choice:
    """The plan a run uses for these inputs (recipes.planning.planning_inputs): the named one
    (checked against memory) or auto's choice."""
    units = inputs.units
    if any(u.expert for u in units):
        try:
            expert_data_topology(topo, cfg.ep)
        except ValueError as e:
            raise PlanError(str(e)) from e
    if cfg.plan == "auto" and not cfg.levels:
        return choose_plan(topo, units, dtype_bytes=inputs.dtype_bytes, grad_accum=inputs.grad_accum,
                           reduce_bytes=inputs.reduce_bytes, activation_bytes=inputs.activation_bytes,
                           memory_budget_bytes=memory_budget_bytes, cfg=cfg, moe=inputs.moe)
    plan = named_plan("tiered" if cfg.levels else cfg.plan, topo, cfg)
    quants = quant_options(topo, cfg) if plan.name != "zeropp" else [plan.quant]
    options = with_grad_syncs([dataclasses.replace(plan, quant=q) for q in quants], topo, cfg, inputs.grad_accum)
    if len(options) > 1:  # parallel.quant_*=auto or grad_sync=auto on a named plan: its fastest choice that fits
        costs = [_predict_named(p, cfg, topo, inputs, memory_budget_bytes) for p in options]
        fitting = [c for c in costs if c.fits]
        if fitting:
            best = _fastest(fitting)
            chosen = [what for what, n in (("quantization (parallel.quant_*=auto)", len(quants)),
                                           ("gradient sync (parallel.grad_sync=auto)", len(options) // len(quants)))
                      if n > 1]
            return Choice(best.plan, best, f"parallel.plan={cfg.plan} as configured, its {' and '.join(chosen)} "
                          f"chosen: {_time_words(best)} among {len(options)} choices", costs)
    plan = options[0]
    cost = _predict_named(plan, cfg, topo, inputs, memory_budget_bytes)
    if not cost.fits:
        fitting = []
        for named in named_plans(topo, cfg):
            other = _predict_named(named, cfg, topo, inputs, memory_budget_bytes)
            if other.fits:
                fitting.append(f"{named.name} ({_gb(other.memory_total)} GB)")
        raise PlanError(
            f"parallel.plan={cfg.plan} needs {_gb(cost.memory_total)} GB per rank for parameters, gradients and "
            f"optimizer states, more than parallel.memory_budget_gb={_gb(memory_budget_bytes)}. Plans that fit: "
            + (", ".join(fitting) if fitting else "none -- add ranks or raise the budget")
            + ". parallel.plan=auto picks the fastest of them."
            + (f" parallel.grad_sync=step holds {_gb(cost.memory['unreduced_grads'])} GB of it (unreduced gradients); "
               "parallel.grad_sync=micro does not." if cost.memory.get("unreduced_grads") else "")
        )
    return Choice(plan, cost, f"parallel.plan={cfg.plan} as configured", [cost])


def _predict_named(plan: PartitionPlan, cfg: ParallelConfig, topo: Topology, inputs: PlanInputs,
                   memory_budget_bytes: Optional[float]) -> Cost:
    return predict(plan, topo, inputs.units, dtype_bytes=inputs.dtype_bytes, grad_accum=inputs.grad_accum,
                   reduce_bytes=inputs.reduce_bytes, activation_bytes=inputs.activation_bytes,
                   memory_budget_bytes=memory_budget_bytes, ep=cfg.ep, moe=inputs.moe)
