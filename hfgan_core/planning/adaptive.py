"""Planning inside a run: cuts for a run config at admission, and effective profiles for re-planning between rounds.

The coordinator plans at admission with `plan_for_run` (or compute_costs + plan_cuts). Claimed device profiles can
be wrong, or a device can be loaded by other work; between rounds the coordinator measures how long each client
really computes per step and calls `effective_profiles`, then plans again with the result.

Estimator. The model predicts client i's own compute time per iteration as W_i / s_i, where W_i is the client-side
GFLOPs of one iteration under its cuts (G head and tail, forward and backward, plus three times the same for D) and
s_i its claimed speed. Given a measured time t_i (seconds of client-side compute per training step, all segments of
G and D, forward and backward, excluding waits for the server and transfers), the effective speed is the ratio
estimator s_i' = W_i / t_i: the claimed clock is scaled by (W_i / s_i) / t_i and flops_per_cycle is kept, so the
model's predicted compute time for the current cuts equals the measurement exactly. Several measurements of one
client may be given; their median is used (robust to one step slowed by a pause). The link rate stays as claimed
(transfers are not part of the measured compute time). Clients without a measurement keep their claimed profile.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence

from ..config import ConfigError, DeviceProfile, RunConfig, ServerProfile
from ..model import CutBits
from .costs import CostTable, compute_costs
from .latency import D_PASSES, as_cut_array, iteration_latency
from .planner import Plan, plan_cuts

WIRE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def client_gflops(costs: CostTable, cuts: Iterable[int] | str) -> float:
    """GFLOPs a client with these cut bits computes in one iteration (D counted D_PASSES times)."""
    hg, tg, hd, td = CutBits.parse(cuts)
    g, d = costs.generator, costs.discriminator
    g_work = g.head_fwd(hg) + g.tail_fwd(tg) + g.tail_bwd(tg) + g.head_bwd(hg)
    d_work = d.head_fwd(hd) + d.tail_fwd(td) + d.tail_bwd(td) + d.head_bwd(hd)
    return g_work + D_PASSES * d_work


def predicted_compute_seconds(costs: CostTable, profile: DeviceProfile, cuts: Iterable[int] | str) -> float:
    """The model's client-side compute seconds of one iteration for this device and these cuts."""
    return client_gflops(costs, cuts) / profile.gflops


def effective_profiles(
    measured_step_seconds: Mapping[int, float | Sequence[float]],
    cuts: Sequence[Iterable[int] | str],
    costs: CostTable,
    claimed_profiles: Sequence[DeviceProfile],
    server: ServerProfile | None = None,
) -> list[DeviceProfile]:
    """Claimed profiles with the compute speed of each measured client rescaled to match its measurement.

    `measured_step_seconds` maps a client index to its measured client-side compute seconds per step (or a list of
    such measurements, whose median is used). `server` is accepted so that callers can pass the arguments they
    pass to plan_cuts; the estimator does not use it. Raises ValueError for an unknown index or a measurement that
    is not a positive finite number.
    """
    del server  # the server's speed is not re-estimated
    bits = as_cut_array(cuts, len(claimed_profiles))
    out = list(claimed_profiles)
    for idx, raw in measured_step_seconds.items():
        if not (isinstance(idx, int) and 0 <= idx < len(out)):
            raise ValueError(f"measured client index {idx!r} is not one of the {len(out)} clients")
        samples = [raw] if isinstance(raw, int | float) else list(raw)
        if not samples or not all(_positive(x) for x in samples):
            raise ValueError(f"client {idx}: measured seconds must be positive finite numbers, got {raw!r}")
        measured = statistics.median(samples)
        claimed = out[idx]
        predicted = predicted_compute_seconds(costs, claimed, bits[idx])
        out[idx] = dataclasses.replace(claimed, cpu_mhz=claimed.cpu_mhz * predicted / measured)
    return out


def run_costs(cfg: RunConfig) -> CostTable:
    """The cost table of a run: its model, batch size, cost model and wire precision."""
    return compute_costs(cfg.model, cfg.train.batch_size, cfg.train.cost_model, WIRE_BYTES[cfg.train.wire_dtype])


def plan_for_run(cfg: RunConfig, n_clients: int | None = None, costs: CostTable | None = None) -> Plan:
    """The cuts of a run at admission: planned when `train.cuts` is "plan", else the configured list cycled over
    the clients (with its modelled latency; `seconds` is then 0). Clients get `devices.client_profiles`."""
    n = cfg.scenario.total_clients if n_clients is None else n_clients
    if n <= 0:
        raise ConfigError("the run has no clients to plan for")
    table = costs if costs is not None else run_costs(cfg)
    clients = cfg.devices.client_profiles(n)
    if cfg.train.cuts == "plan":
        return plan_cuts(table, clients, cfg.devices.server)
    given = [CutBits(*cfg.train.cuts[i % len(cfg.train.cuts)]) for i in range(n)]
    return Plan(tuple(given), iteration_latency(table, clients, cfg.devices.server, given), 0.0)


__all__ = [
    "WIRE_BYTES",
    "client_gflops",
    "effective_profiles",
    "plan_for_run",
    "predicted_compute_seconds",
    "run_costs",
]
