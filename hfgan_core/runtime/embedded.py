"""Every role in one process: the embedded runner behind `hfgan train` (and the in-process side of tests).

The roles are exactly the distributed workers' roles; only the transport differs. Over `memory://` deliveries
happen one at a time in publish order, so a run is a deterministic function of its seed (bit for bit with one torch
thread; README, "Reproducibility"). Over `amqp://` the same roles talk through RabbitMQ from one process (the
algorithm does not depend on delivery order across queues, so the models come out the same).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import roles
from ..config import RunConfig
from ..model import CutBits
from ..state import MemoryRoundStore, RoundStore, open_store
from ..transport import MemoryTransport, Transport, open_transport
from . import checkpoint as ckpt
from .aggregator import AggregatorRole
from .client import ClientData, ClientRole
from .clustering import ClusteringRole
from .coordinator import CoordinatorRole, RoundReport
from .emulation import emulator_for
from .host import Role, RoleContext, RoleHost
from .server import ServerRole


class RunStalled(RuntimeError):
    """Nothing can happen any more (no message in flight, no deadline left to wait for)."""


def make_planner(cfg: RunConfig) -> tuple[Callable, Callable]:
    """(planner, replanner) closures over the planning library for the coordinator."""
    from ..planning import effective_profiles, plan_cuts, run_costs

    costs = run_costs(cfg)
    server = cfg.devices.server

    def planner(profiles):
        return [CutBits(*c) for c in plan_cuts(costs, profiles, server).cuts]

    def replanner(measured: dict[int, float], cuts: dict[int, CutBits], profiles):
        clients = sorted(cuts)
        eff = effective_profiles(
            {clients.index(c): s for c, s in measured.items()},
            [tuple(cuts[c]) for c in clients],
            costs,
            profiles,
            server,
        )
        return [CutBits(*c) for c in plan_cuts(costs, eff, server).cuts]

    return planner, replanner


@dataclass
class EmbeddedEnv:
    """What a role's embedded factory (its registry entry's `embedded`) builds its instances from."""

    cfg: RunConfig
    run_id: str
    run_dir: Path | None
    transport: Transport
    store: RoundStore
    log: logging.Logger
    clients: list[ClientData]
    domains: list[int]
    aggregators: int = 1
    on_round_end: Callable[[RoundReport], Any] | None = None
    on_event: Callable[[str, dict[str, Any]], None] | None = None

    def ctx(self) -> RoleContext:
        return RoleContext(run=self.run_id, cfg=self.cfg, transport=self.transport, store=self.store, log=self.log)


def coordinator_roles(env: EmbeddedEnv) -> list[Role]:
    planner, replanner = make_planner(env.cfg) if env.cfg.train.cuts == "plan" else (None, None)
    return [
        CoordinatorRole(
            env.ctx(),
            run_dir=env.run_dir,
            on_round_end=env.on_round_end,
            on_event=env.on_event,
            planner=planner,
            replanner=replanner,
        )
    ]


def server_roles(env: EmbeddedEnv) -> list[Role]:
    return [ServerRole(env.ctx(), run_dir=env.run_dir)]


def clustering_roles(env: EmbeddedEnv) -> list[Role]:
    return [ClusteringRole(env.ctx())]


def aggregator_roles(env: EmbeddedEnv) -> list[Role]:
    return [AggregatorRole(env.ctx(), i) for i in range(env.aggregators)]


def client_roles(env: EmbeddedEnv) -> list[Role]:
    cfg = env.cfg
    profiles = cfg.devices.client_profiles(len(env.clients))
    costs = None
    if cfg.runtime.emulate_devices:  # device emulation (emulation.py): one cost table for every client
        from ..planning import run_costs

        costs = run_costs(cfg)
    return [
        ClientRole(
            env.ctx(),
            client=i,
            domain=env.domains[i],
            data=d,
            profile=profiles[i],
            run_dir=env.run_dir,
            delay=emulator_for(cfg, i, profiles[i], costs),
        )
        for i, d in enumerate(env.clients)
    ]


@dataclass
class EmbeddedResult:
    reports: list[RoundReport]
    wall_s: float
    bytes_sent: int
    messages_sent: int
    roles: dict[str, Role] = field(default_factory=dict)
    transport: Transport | None = None
    store: RoundStore | None = None


class Progress:
    """A one-line progress bar on stderr (a line per round when stderr is not a terminal)."""

    def __init__(self, rounds: int, stream=None, enabled: bool = True):
        self.rounds = rounds
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.round = 0
        self.steps = 0
        self.t0 = time.perf_counter()
        self._last = 0.0

    def event(self, name: str, detail: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if name == "started":
            self.round = detail["round"]
            self.steps = int(detail.get("steps", 0))
        elif name == "done" and not self.tty:
            print(
                f"round {detail['round']}/{self.rounds} done in {detail.get('wall_s')} s", file=self.stream, flush=True
            )
        elif name == "finished" and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def update(self, windows: int) -> None:
        if not (self.enabled and self.tty) or time.perf_counter() - self._last < 0.2:
            return
        self._last = time.perf_counter()
        width = 30
        frac = min(1.0, windows / self.steps) if self.steps else 0.0
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        self.stream.write(
            f"\rround {self.round}/{self.rounds} [{bar}] step {windows}/{self.steps} "
            f"{time.perf_counter() - self.t0:7.1f} s"
        )
        self.stream.flush()


class EmbeddedRunner:
    def __init__(
        self,
        cfg: RunConfig,
        clients: list[ClientData],
        domains: list[int],
        *,
        run_id: str,
        run_dir: str | Path | None = None,
        transport: Transport | None = None,
        store: RoundStore | None = None,
        on_round_end: Callable[[RoundReport], Any] | None = None,
        progress: Progress | None = None,
        aggregators: int = 1,
        strict: bool = True,
        resume_round: int | None = None,
        log: logging.Logger | None = None,
    ):
        self.cfg = cfg
        self.run_id = run_id
        self.run_dir = Path(run_dir) if run_dir else None
        self.transport = transport or open_transport(cfg.runtime.broker_url)
        self.store = store or open_store(cfg.runtime.state_url)
        self.progress = progress
        self.log = log or logging.getLogger("hfgan")

        env = EmbeddedEnv(
            cfg=cfg,
            run_id=run_id,
            run_dir=self.run_dir,
            transport=self.transport,
            store=self.store,
            log=self.log,
            clients=clients,
            domains=domains,
            aggregators=aggregators,
            on_round_end=on_round_end,
            on_event=progress.event if progress else None,
        )
        # Every registered role, in registry order (the order they bind and start in, which a memory run's
        # determinism depends on).
        self.by_role: dict[str, list[Role]] = {spec.name: spec.load("embedded")(env) for spec in roles.specs()}
        self.coordinator: CoordinatorRole = self.by_role["coordinator"][0]
        self.server: ServerRole = self.by_role["server"][0]
        self.clustering: ClusteringRole = self.by_role["clustering"][0]
        self.aggregators: list[AggregatorRole] = self.by_role["aggregator"]
        self.clients: list[ClientRole] = self.by_role["client"]
        if resume_round:
            self._restore(resume_round)
        self.roles: list[Role] = [r for built in self.by_role.values() for r in built]
        self.hosts = [RoleHost(r, strict=strict) for r in self.roles]

    def _restore(self, round: int) -> None:
        d = ckpt.round_dir(self.run_dir, round)
        self.coordinator.restore(ckpt.load_checkpoint(d / "coordinator.pt", role="coordinator"))
        self.server.restore(ckpt.load_checkpoint(d / "server.pt", role="server"))
        for c in self.clients:
            c.restore(ckpt.load_checkpoint(d / c.checkpoint_name(), role="client"))

    def run(self) -> EmbeddedResult:
        reports: list[RoundReport] = []
        hook = self.coordinator.on_round_end

        def capture(report: RoundReport):
            reports.append(report)
            return hook(report) if hook else None

        self.coordinator.on_round_end = capture
        t0 = time.perf_counter()
        self.transport.declare()
        for h in self.hosts:
            h.bind()
        memory = isinstance(self.transport, MemoryTransport)
        rt = self.cfg.runtime
        stall_limit = max(rt.step_deadline_s, rt.round_deadline_s) + 5.0
        idle_since = None
        while not self.coordinator.finished:
            if memory:
                progressed = self.transport.process_one()
            else:
                progressed = self.transport.process(timeout=0.05) > 0
            now = time.time()
            if progressed:
                idle_since = None
                if self.progress:
                    self.progress.update(self.server.windows_run)
                continue
            for role in self.roles:
                role.tick(now)
            if memory and self.transport.pending():
                continue
            if idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > stall_limit:
                raise RunStalled(
                    f"nothing happened for {stall_limit:.0f} s in round {self.coordinator.round} "
                    f"({self.coordinator.phase})"
                )
            if memory:
                time.sleep(0.01)
        # Let the last messages (run_end, late checkpoints) land.
        if memory:
            while self.transport.process_one():
                pass
        else:
            self.transport.process(timeout=0.2)
        wall = time.perf_counter() - t0
        bytes_sent = sum(sum(r.bytes_sent.values()) for r in self.roles)
        msgs = sum(sum(r.messages_sent.values()) for r in self.roles)
        roles = {r.name: r for r in self.roles}
        return EmbeddedResult(reports, wall, bytes_sent, msgs, roles, self.transport, self.store)


def new_memory_backends() -> tuple[MemoryTransport, MemoryRoundStore]:
    return MemoryTransport(), MemoryRoundStore()
