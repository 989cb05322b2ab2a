"""Cut planning: per-block costs from the model, the paper's iteration-latency model, and the exact planner.

Typical use (the coordinator at admission):

    costs = compute_costs(model_cfg, batch_size=64, cost_model="paper")
    plan = plan_cuts(costs, clients, server)            # Plan(cuts, latency_s, seconds)
    iteration_latency(costs, clients, server, plan.cuts)  # == plan.latency_s

and between rounds, `effective_profiles(measured, plan.cuts, costs, clients, server)` then `plan_cuts` again.
"""

from .adaptive import client_gflops, effective_profiles, plan_for_run, predicted_compute_seconds, run_costs
from .costs import CostTable, LayerCost, NetCosts, compute_costs
from .latency import (
    COLUMNS,
    STAGES,
    LatencyBreakdown,
    PhaseTimes,
    StageTimes,
    batch_latency,
    iteration_latency,
    latency_breakdown,
    latency_terms,
)
from .planner import Plan, optimise_column, plan_cuts
from .profiles import ProfileSet, load_profiles, parse_profiles, profile_presets

__all__ = [
    "COLUMNS",
    "STAGES",
    "CostTable",
    "LatencyBreakdown",
    "LayerCost",
    "NetCosts",
    "PhaseTimes",
    "Plan",
    "ProfileSet",
    "StageTimes",
    "batch_latency",
    "client_gflops",
    "compute_costs",
    "effective_profiles",
    "iteration_latency",
    "latency_breakdown",
    "latency_terms",
    "load_profiles",
    "optimise_column",
    "parse_profiles",
    "plan_cuts",
    "plan_for_run",
    "predicted_compute_seconds",
    "profile_presets",
    "run_costs",
]
