"""Device emulation: make a client as slow as its device profile says (or slower), reproducibly, on any machine.

A `DeviceEmulator` is the client role's `delay` hook (`ClientRole(delay=...)`). After each client-side segment of
a step (client.SEGMENTS) it sleeps

    emulate_devices = true:   factor * (GFLOPs of the segment / profile GFLOP/s + bytes sent / profile data_rate)
    emulate_devices = false:  (factor - 1) * the seconds the segment really took   (clients in emulate_slowdown only)

GFLOP/s = cpu_mhz * 1e-3 * flops_per_cycle. A segment's GFLOPs and bytes come from the planner's cost table for the
run (`planning.run_costs`: the whole batch, the run's wire precision), with the client's current cut bits, so the
emulated time of a step is exactly the client-side compute and upload time of the paper's latency model.
`factor` is the client's entry in `runtime.emulate_slowdown` ((client, factor) pairs), else 1. The first form
reproduces a heterogeneous fleet; the second slows chosen clients down relative to this machine (a straggler).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..config import ConfigError, DeviceProfile, RunConfig
from ..model import CutBits


def segment_work(costs: Any, cuts: CutBits, segment: str) -> tuple[float, int]:
    """(GFLOPs, bytes sent) of one client-side segment of a step (names: client.SEGMENTS)."""
    g, d = costs.generator, costs.discriminator
    hg, tg, hd, td = cuts
    if segment == "g_head_fwd":
        return g.head_fwd(hg), g.head_out_bytes(hg)
    if segment == "g_tail_fwd+d_head_fwd":  # the fakes through the G tail; D head on fakes and reals
        return g.tail_fwd(tg) + 2 * d.head_fwd(hd), 2 * d.head_out_bytes(hd)
    if segment == "d_tail_d":  # D tail forward and backward on fakes and reals
        return 2 * (d.tail_fwd(td) + d.tail_bwd(td)), 2 * d.tail_in_bytes(td)
    if segment == "d_head_bwd+d_head_fwd":  # D head backward (fakes, reals), then forward on the fakes again
        return 2 * d.head_bwd(hd) + d.head_fwd(hd), d.head_out_bytes(hd)
    if segment == "d_tail_g":
        return d.tail_fwd(td) + d.tail_bwd(td), d.tail_in_bytes(td)
    if segment == "d_head_bwd+g_tail_bwd":
        return d.head_bwd(hd) + g.tail_bwd(tg), g.tail_in_bytes(tg)
    if segment == "g_head_bwd":
        return g.head_bwd(hg), 0
    raise ValueError(f"unknown client segment {segment!r}")


def modelled_seconds(costs: Any, profile: DeviceProfile, cuts: CutBits, segment: str) -> float:
    gflops, nbytes = segment_work(costs, cuts, segment)
    return gflops / profile.gflops + nbytes / profile.data_rate


class DeviceEmulator:
    """The `delay` hook of one client (see the module docstring)."""

    def __init__(
        self,
        cfg: RunConfig,
        client: int,
        profile: DeviceProfile | None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        costs: Any = None,
    ):
        from ..planning import run_costs

        rt = cfg.runtime
        self.client = client
        self.factor = float(dict(rt.emulate_slowdown).get(client, 1.0))
        if not self.factor > 0:
            raise ConfigError(f"runtime.emulate_slowdown: client {client}'s factor must be positive")
        self.emulate = rt.emulate_devices
        self.profile = profile or cfg.devices.client_profiles(cfg.scenario.total_clients)[client]
        self.costs = costs if costs is not None else (run_costs(cfg) if self.emulate else None)
        self.sleep = sleep
        self.slept = 0.0

    @staticmethod
    def wanted(cfg: RunConfig, client: int) -> bool:
        """Whether this client needs an emulator at all."""
        rt = cfg.runtime
        return rt.emulate_devices or dict(rt.emulate_slowdown).get(client, 1.0) != 1.0

    def seconds(self, role: Any, segment: str) -> float:
        if self.emulate:
            return self.factor * modelled_seconds(self.costs, self.profile, role.cuts, segment)
        return max(0.0, self.factor - 1.0) * role.segment_seconds()

    def __call__(self, role: Any, segment: str) -> None:
        s = self.seconds(role, segment)
        if s > 0:
            self.sleep(s)
            self.slept += s


def emulator_for(
    cfg: RunConfig, client: int, profile: DeviceProfile | None, costs: Any = None
) -> DeviceEmulator | None:
    """The client's delay hook, or None when nothing is emulated for it."""
    return DeviceEmulator(cfg, client, profile, costs=costs) if DeviceEmulator.wanted(cfg, client) else None
