"""Temporary re-exports of the planner's old single module.

This file exists only until launcher/ and recipes/ import the new modules; then it goes.
Everything else imports from where each name now lives:

    parallel.config   ParallelConfig, PLAN_NAMES, ENGINE_NAMES (the `parallel.*` config section)
    parallel.plans    PartitionPlan, REPLICATED, PlanError, named_plan, candidate_plans
    parallel.layout   span, chunk_index, level_of_group, padded_numel, PlanGroups, plan_groups
    parallel.cost     Unit, MoETraffic, PlanInputs, Cost, predict, uniform_units, KIND_OP,
                      DEFAULT_BANDWIDTH_GBPS and the byte constants
    parallel.choose   Choice, choose_plan, restrict_choice, resolve_plan, TIE_REL

resolve_plan takes both its forms (a PlanInputs, or units with dtype_bytes= and grad_accum=),
so the callers here keep working unchanged.
"""

from tierzero.parallel.choose import TIE_REL, Choice, choose_plan, resolve_plan, restrict_choice  # noqa: F401
from tierzero.parallel.config import ENGINE_NAMES, PLAN_NAMES, ParallelConfig  # noqa: F401
from tierzero.parallel.cost import (  # noqa: F401
    DEFAULT_BANDWIDTH_GBPS, GRAD_ACC_BYTES, KIND_OP, MASTER_BYTES, OPTIM_BYTES_PER_PARAM, Cost, MoETraffic, PlanInputs,
    Unit, predict, uniform_units,
)
from tierzero.parallel.layout import (  # noqa: F401
    PlanGroups, chunk_index, level_of_group, padded_numel, plan_groups, span,
)
from tierzero.parallel.plans import REPLICATED, PartitionPlan, PlanError, candidate_plans, named_plan  # noqa: F401
