"""The coordinator: admission, the round lifecycle, deadlines and quorum, and the aggregation jobs.

    admitting   clients join with their device profile and sample count; cuts are planned (or taken from the config)
    training    round r runs; clients report `round_done`, the server `server_round_done`, clustering its result
    closing     the round deadline passed: `round_close` went out, waiting for the server's report
    aggregating weights computed (KLD-weighted, per cluster and global) and one job per cluster (+ global) queued
    -> evaluate, checkpoint, next round (or `run_end`)

Every transition is also a compare-and-set in the ledger, so a standby coordinator can never double-drive a round.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import DeviceProfile
from ..federation import aggregation_weights
from ..model import CutBits
from ..protocol import (
    AggregateDone,
    AggregateJob,
    ClusterResult,
    Join,
    Message,
    RoundClose,
    RoundDone,
    RoundEvent,
    RoundStart,
    RunEnd,
    ServerRoundDone,
)
from ..transport import AGGREGATE, COORDINATOR, SERVER, client_address
from . import checkpoint as ckpt
from .aggregator import job_document
from .host import Reject, Role, RoleContext


@dataclass
class Member:
    client: int
    domain: int
    n_samples: int
    profile: DeviceProfile | None


@dataclass
class RoundReport:
    """Everything known about a finished round (for outputs, evaluation and tests)."""

    round: int
    wall_s: float
    participants: list[int]
    arrived: list[int]
    dropped: dict[int, str]
    late: dict[int, int]
    assignment: dict[int, int]
    kld_intra: dict[int, float]
    kld_global: dict[int, float]
    weights: dict[int, dict[int, float]]
    global_weights: dict[int, float]
    digests: dict[int, str]
    cluster_models: dict[int, dict[str, torch.Tensor]]
    global_model: dict[str, torch.Tensor] | None
    cuts: dict[int, CutBits]
    client_metrics: dict[int, dict[str, float]]
    server_metrics: dict[str, float]
    aggregated: bool
    extra: dict[str, Any] = field(default_factory=dict)


class CoordinatorRole(Role):
    name = "coordinator"
    accepts = (Join, RoundDone, ServerRoundDone, ClusterResult, AggregateDone)
    no_grad = True

    def __init__(self, ctx: RoleContext, *, run_dir: str | Path | None = None,
                 on_round_end: Callable[[RoundReport], dict[str, Any] | None] | None = None,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 planner: Callable[[list[DeviceProfile]], list[CutBits]] | None = None,
                 replanner: Callable[[dict[int, float], dict[int, CutBits], list[DeviceProfile]], list[CutBits]]
                 | None = None):
        super().__init__(ctx)
        cfg = ctx.cfg
        self.run_dir = Path(run_dir) if run_dir else None
        self.expected = cfg.scenario.total_clients
        self.on_round_end = on_round_end
        self.on_event = on_event
        self.planner = planner
        self.replanner = replanner
        self.members: dict[int, Member] = {}
        self.cuts: dict[int, CutBits] = {}
        self.assignment: dict[int, int] = {}
        self.round = 0
        self.phase = "admitting"
        self.finished = False
        self.admit_started = ctx.clock()
        self.history: list[dict[str, Any]] = []
        self._restored = False
        self._reset_round_state()

    def addresses(self) -> list[str]:
        return [COORDINATOR]

    def start(self) -> None:
        ctx = self.ctx
        created = ctx.store.init_run(ctx.run, ctx.cfg.digest(), json.dumps(ctx.cfg.to_dict(include_runtime=False)))
        if created:
            # The update log is shared by runs: this run's first round starts reading at today's end of it.
            ctx.store.set_log_offset(ctx.run, 1, ctx.transport.log_length())
        ctx.store.set_status(ctx.run, "running")
        self.admit_started = ctx.clock()
        self._event("admitting", expected=self.expected)

    def _reset_round_state(self) -> None:
        self.round_started = 0.0
        self.round_wall0 = 0.0
        self.deadline = math.inf
        self.participants: list[int] = []
        self.done: dict[int, RoundDone] = {}
        self.server_done: ServerRoundDone | None = None
        self.cluster_result: ClusterResult | None = None
        self.cluster_wait_until = math.inf
        self.jobs: dict[int, AggregateJob] = {}
        self.results: dict[int, AggregateDone] = {}
        self.weights = None

    def _event(self, event: str, **detail: Any) -> None:
        if self.on_event is not None:
            self.on_event(event, {"round": self.round, **detail})
        self.send(f"events.round.{event}", RoundEvent(**self.envelope(self.round), event=event,
                                                      detail={k: str(v) for k, v in detail.items()}))

    # ------------------------------------------------------------------------------------------------ restore
    def restore(self, blob: dict[str, Any]) -> None:
        extra = blob["extra"]
        self.round = int(blob["round"])
        self.cuts = {int(c): CutBits.parse(b) for c, b in extra["cuts"].items()}
        self.assignment = {int(c): int(k) for c, k in extra["assignment"].items()}
        self.history = list(extra.get("history", []))
        self._restored = True

    # ---------------------------------------------------------------------------------------------- dispatch
    def on_message(self, msg: Message) -> None:
        if isinstance(msg, Join):
            self._on_join(msg)
        elif isinstance(msg, RoundDone):
            self._on_round_done(msg)
        elif isinstance(msg, ServerRoundDone):
            if msg.round != self.round or self.phase not in ("training", "closing"):
                raise Reject(f"stale: server report for round {msg.round} in {self.phase} of round {self.round}")
            self.server_done = msg
            self._maybe_close()
        elif isinstance(msg, ClusterResult):
            if msg.round != self.round:
                raise Reject(f"stale: cluster result for round {msg.round} in round {self.round}")
            # Rounds that aggregate as one cluster do not wait for it; a result arriving after is simply noted.
            self.cluster_result = msg
            if self.phase in ("training", "closing"):
                self._maybe_close()
        elif isinstance(msg, AggregateDone):
            self._on_aggregate_done(msg)

    def _on_join(self, msg: Join) -> None:
        c = msg.client
        if not 0 <= c < self.expected:
            raise Reject(f"unknown_client: client {c} is outside 0..{self.expected - 1}")
        if msg.sender != client_address(c):
            raise Reject(f"bad_sender: {msg.sender!r} joined as client {c}")
        if not 0 <= msg.domain < len(self.ctx.cfg.scenario.domains) or msg.n_samples <= 0:
            raise Reject(f"malformed: join with domain {msg.domain} and {msg.n_samples} samples")
        profile = None
        if msg.profile:
            try:
                profile = DeviceProfile(msg.profile["cpu_mhz"], msg.profile["flops_per_cycle"],
                                        msg.profile["data_rate"])
            except KeyError as exc:
                raise Reject(f"malformed: profile without {exc}") from None
            if min(profile.cpu_mhz, profile.flops_per_cycle, profile.data_rate) <= 0:
                raise Reject("malformed: non-positive device profile")
        rejoin = c in self.members
        self.members[c] = Member(c, msg.domain, msg.n_samples, profile)
        self.ctx.store.heartbeat(self.ctx.run, client_address(c), self.ctx.cfg.runtime.round_deadline_s,
                                 f"joined round {self.round}")
        self._event("joined", client=c, rejoin=rejoin)
        if self.phase == "admitting" and len(self.members) == self.expected:
            self._admit()

    def _admit(self) -> None:
        cfg = self.ctx.cfg
        clients = sorted(self.members)
        if not self.cuts or any(c not in self.cuts for c in clients):
            if cfg.train.cuts == "plan":
                if self.planner is None:
                    raise RuntimeError("cuts = 'plan' needs a planner")
                profiles = self._profiles(clients)
                planned = self.planner(profiles)
                self.cuts = {c: CutBits(*b) for c, b in zip(clients, planned)}
            else:
                table = cfg.train.cuts
                self.cuts = {c: CutBits(*table[c % len(table)]) for c in clients}
        self.ctx.store.set_cuts(self.ctx.run, {c: str(b) for c, b in self.cuts.items()})
        self._event("admitted", clients=len(clients), cuts=" ".join(str(self.cuts[c]) for c in clients))
        self._start_round(self.round + 1)

    def _profiles(self, clients: list[int]) -> list[DeviceProfile]:
        configured = self.ctx.cfg.devices.client_profiles(self.expected)
        return [self.members[c].profile or configured[c] for c in clients]

    # -------------------------------------------------------------------------------------------------- rounds
    def steps_per_round(self) -> int:
        tr = self.ctx.cfg.train
        per_epoch = tr.steps_per_epoch or max(math.ceil(m.n_samples / tr.batch_size) for m in self.members.values())
        return tr.local_epochs * per_epoch

    def _start_round(self, r: int) -> None:
        ctx, cfg = self.ctx, self.ctx.cfg
        prev_round, prev_phase = ctx.store.get_round(ctx.run)
        if not ctx.store.transition(ctx.run, prev_round, prev_phase, r, "training"):
            raise RuntimeError(f"ledger moved under the coordinator (round {prev_round} {prev_phase})")
        self._reset_round_state()
        self.round = r
        self.phase = "training"
        now = ctx.clock()
        self.round_started = now
        self.round_wall0 = time.perf_counter()
        self.deadline = now + cfg.runtime.round_deadline_s
        self.participants = sorted(self.members)
        ctx.store.set_expected(ctx.run, r, self.participants, now)
        steps = self.steps_per_round()
        n = self.expected
        cuts = tuple(tuple(self.cuts.get(c, CutBits(0, 0, 0, 0))) for c in range(n))
        start = RoundStart(**self.envelope(r), participants=tuple(self.participants), cuts=cuts, steps=steps,
                           deadline=self.deadline)
        # The server hears of the round first, so no client activation can reach it before the round exists.
        self.send(SERVER, start)
        for c in self.participants:
            self.send(client_address(c), start)
        self._event("started", participants=len(self.participants), steps=steps)

    def _on_round_done(self, msg: RoundDone) -> None:
        c = msg.client
        if msg.sender != client_address(c):
            raise Reject(f"bad_sender: {msg.sender!r} reported for client {c}")
        if msg.round != self.round or self.phase not in ("training", "closing") or c not in self.participants:
            self.ctx.store.mark_client(self.ctx.run, msg.round, c, "late", "reported after its round closed",
                                       self.ctx.clock())
            raise Reject(f"late: round_done of client {c} for round {msg.round} (coordinator: round {self.round} "
                         f"{self.phase})")
        self.done[c] = msg
        self.ctx.store.mark_client(self.ctx.run, self.round, c, "arrived", "", self.ctx.clock())
        self.ctx.store.record_metrics(self.ctx.run, self.round, client_address(c), msg.metrics)
        self._event("client_done", client=c, arrived=len(self.done), of=len(self.participants))
        self._maybe_close()

    def _need_clusters(self) -> bool:
        tr = self.ctx.cfg.train
        return tr.clustering and self.round >= tr.kld_from_round and self.ctx.cfg.train.n_clusters(
            self.ctx.cfg.scenario) != 1

    def _maybe_close(self) -> None:
        if self.phase not in ("training", "closing") or self.server_done is None:
            return
        if self.phase == "training" and len(self.done) < len(self.participants):
            return
        if self.server_done.metrics.get("windows", 1) > 0 and self._need_clusters() and self.cluster_result is None:
            if self.cluster_wait_until == math.inf:
                self.cluster_wait_until = self.ctx.clock() + self.ctx.cfg.runtime.step_deadline_s * 4
            if self.ctx.clock() < self.cluster_wait_until:
                return
            self.ctx.log.warning("coordinator: no clustering result for round %d; keeping the previous clusters",
                                 self.round)
        self._aggregate()

    def tick(self, now: float) -> None:
        if self.phase == "training" and now >= self.deadline:
            self.phase = "closing"
            missing = [c for c in self.participants if c not in self.done]
            self.ctx.log.warning("coordinator: round %d deadline passed; %d client(s) missing", self.round,
                                 len(missing))
            close = RoundClose(**self.envelope(self.round), reason="round deadline passed")
            self.send(SERVER, close)
            for c in missing:
                self.send(client_address(c), close)
            self._event("closing", missing=len(missing))
            self._maybe_close()
        elif self.phase in ("training", "closing") and self.cluster_wait_until < math.inf:
            self._maybe_close()

    # ------------------------------------------------------------------------------------------- aggregation
    def _aggregate(self) -> None:
        ctx, cfg = self.ctx, self.ctx.cfg
        tr = cfg.train
        now = ctx.clock()
        arrived = sorted(self.done)
        dropped = {c: "missed the round deadline" for c in self.participants if c not in self.done}
        for c, reason in dropped.items():
            ctx.store.mark_client(ctx.run, self.round, c, "dropped", reason, now)
        late = {int(c): n for c, n in (self.server_done.late if self.server_done else {}).items()}
        for c, n in late.items():
            if c in self.done and n:
                ctx.store.mark_client(ctx.run, self.round, c, "late", f"late for {n} step(s); served later or "
                                      "dropped from those steps", now)
        if self.server_done is not None:
            ctx.store.record_metrics(ctx.run, self.round, "server", self.server_done.metrics)

        kld_intra: dict[int, float] = {}
        kld_global: dict[int, float] = {}
        if self.cluster_result is not None and self._need_clusters():
            res = self.cluster_result
            for key, k in res.assignment.items():
                self.assignment[int(key)] = int(k)
            kld_intra = {int(k): v for k, v in res.kld_intra.items()}
            kld_global = {int(k): v for k, v in res.kld_global.items()}
        elif self.round < tr.kld_from_round or not tr.clustering:
            self.assignment = {c: 0 for c in self.members}
            if self.cluster_result is not None:
                kld_global = {int(k): v for k, v in self.cluster_result.kld_global.items()}
        for c in self.members:
            self.assignment.setdefault(c, 0)
        ctx.store.set_clusters(ctx.run, self.round, self.assignment, kld_intra, kld_global)

        quorum_ok = len(arrived) >= max(1, math.ceil(cfg.runtime.quorum * len(self.participants)))
        if not quorum_ok or self.server_done is None or self.server_done.steps_done == 0:
            reason = "quorum not met" if not quorum_ok else "no training happened"
            ctx.log.warning("coordinator: round %d not aggregated (%s: %d of %d arrived)", self.round, reason,
                            len(arrived), len(self.participants))
            self._event("skipped", reason=reason)
            self.phase = "aggregating"
            ctx.store.transition(ctx.run, self.round, "training", self.round, "aggregating")
            self._finish_round(arrived, dropped, late, {}, aggregated=False)
            return

        n_samples = {c: self.done[c].n_samples for c in arrived}
        w = aggregation_weights(
            round=self.round, clients=arrived, n_samples=n_samples, assignment=self.assignment,
            kld_intra=kld_intra, kld_global=kld_global, alpha=tr.alpha, kld_from_round=tr.kld_from_round,
            kld_weighting=tr.kld_weighting, clustering=tr.clustering,
        )
        self.weights = w
        next_cuts = self._next_cuts(arrived)
        update_ids = {str(c): self.done[c].update_digest for c in arrived}
        update_ids["server"] = self.server_done.update_digest
        env = self.envelope(self.round)
        offset = ctx.store.get_log_offset(ctx.run, self.round) or 0
        jobs: dict[int, AggregateJob] = {}
        # Clusters in rounds 1-2 (or without clustering) are the single cluster 0.
        effective = {c: (self.assignment[c] if (tr.clustering and self.round >= tr.kld_from_round) else 0)
                     for c in self.members}
        for k, cw in sorted(w.clusters.items()):
            members = sorted(cw)
            recipients = sorted(c for c in self.members if effective[c] == k)
            jobs[k] = AggregateJob(**env, cluster=k, members=tuple(members),
                                   weights=tuple(cw[c] for c in members), recipients=tuple(recipients),
                                   cuts=tuple(tuple(next_cuts[c]) for c in recipients),
                                   update_ids={str(c): update_ids[str(c)] for c in members} | {
                                       "server": update_ids["server"]}, log_offset=offset)
        orphans = sorted(c for c in self.members if effective[c] not in w.clusters)
        if orphans:  # clients whose whole cluster missed the round keep their local models
            ctx.log.info("coordinator: clients %s belong to clusters with no update this round", orphans)
        gmembers = sorted(w.global_)
        jobs[-1] = AggregateJob(**env, cluster=-1, members=tuple(gmembers),
                                weights=tuple(w.global_[c] for c in gmembers), recipients=(), cuts=(),
                                update_ids=update_ids, log_offset=offset)
        if not ctx.store.transition(ctx.run, self.round, "training", self.round, "aggregating"):
            raise RuntimeError("ledger moved under the coordinator while closing the round")
        self.phase = "aggregating"
        self.jobs = jobs
        self.cuts = next_cuts
        ctx.store.set_cuts(ctx.run, {c: str(b) for c, b in self.cuts.items()})
        for k, job in jobs.items():
            ctx.store.set_weights(ctx.run, self.round, k, dict(zip(job.members, job.weights)))
            ctx.store.put_doc(ctx.run, self.round, f"job.{k}", job_document(job))
            self.send(AGGREGATE, job)
        self._late, self._dropped = late, dropped
        self._event("aggregating", jobs=len(jobs), arrived=len(arrived))

    def _next_cuts(self, arrived: list[int]) -> dict[int, CutBits]:
        tr = self.ctx.cfg.train
        if not (tr.adaptive_cuts and tr.cuts == "plan" and self.replanner is not None):
            return dict(self.cuts)
        measured = {c: self.done[c].metrics["step_s"] for c in arrived if "step_s" in self.done[c].metrics}
        if not measured:
            return dict(self.cuts)
        clients = sorted(self.members)
        new = self.replanner(measured, self.cuts, self._profiles(clients))
        out = {c: CutBits(*b) for c, b in zip(clients, new)}
        changed = [c for c in clients if out[c] != self.cuts.get(c)]
        if changed:
            self._event("replanned", clients=" ".join(f"{c}:{self.cuts.get(c)}->{out[c]}" for c in changed))
        return out

    def _on_aggregate_done(self, msg: AggregateDone) -> None:
        if msg.round != self.round or self.phase != "aggregating" or msg.cluster not in self.jobs:
            raise Reject(f"stale: aggregate_done for round {msg.round} cluster {msg.cluster}")
        recorded = self.ctx.store.get_model_digests(self.ctx.run, self.round).get(msg.cluster)
        if recorded is not None and recorded != msg.digest:
            raise Reject(f"digest_mismatch: cluster {msg.cluster}: {msg.digest} != ledger {recorded}")
        self.results[msg.cluster] = msg
        if len(self.results) == len(self.jobs):
            self._finish_round(sorted(self.done), self._dropped, self._late,
                               {k: r.state for k, r in self.results.items()}, aggregated=True)

    def _finish_round(self, arrived, dropped, late, models, aggregated: bool) -> None:
        ctx = self.ctx
        global_model = models.pop(-1, None)
        w = self.weights
        report = RoundReport(
            round=self.round, wall_s=time.perf_counter() - self.round_wall0, participants=list(self.participants),
            arrived=list(arrived), dropped=dict(dropped), late=dict(late), assignment=dict(self.assignment),
            kld_intra={int(k): v for k, v in (self.cluster_result.kld_intra.items() if self.cluster_result else [])},
            kld_global={int(k): v for k, v in (self.cluster_result.kld_global.items() if self.cluster_result else [])},
            weights={k: dict(v) for k, v in (w.clusters.items() if w else [])},
            global_weights=dict(w.global_) if w else {},
            digests=ctx.store.get_model_digests(ctx.run, self.round), cluster_models=models,
            global_model=global_model, cuts=dict(self.cuts),
            client_metrics={c: dict(d.metrics) for c, d in self.done.items()},
            server_metrics=dict(self.server_done.metrics) if self.server_done else {}, aggregated=aggregated,
        )
        extra = self.on_round_end(report) if self.on_round_end else None
        entry = {"round": self.round, "wall_s": report.wall_s, "clusters": {str(c): k for c, k in
                                                                             self.assignment.items()}}
        if extra:
            entry.update(extra)
        self.history.append(entry)
        self._save_checkpoint(report)
        ctx.store.transition(ctx.run, self.round, "aggregating", self.round, "done")
        self._event("done", wall_s=f"{report.wall_s:.2f}", aggregated=aggregated)
        if self.round >= ctx.cfg.train.rounds:
            self.phase = "finished"
            self.finished = True
            ctx.store.set_status(ctx.run, "finished")
            end = RunEnd(**self.envelope(self.round), reason="all rounds done")
            self.send(SERVER, end)
            for c in sorted(self.members):
                self.send(client_address(c), end)
            self._event("finished", rounds=self.round)
        else:
            self._start_round(self.round + 1)

    def _save_checkpoint(self, report: RoundReport) -> None:
        if self.run_dir is None:
            return
        cfg = self.ctx.cfg
        d = ckpt.round_dir(self.run_dir, self.round)
        state: dict[str, torch.Tensor] = {}
        for k, model in report.cluster_models.items():
            state.update({f"cluster{k}/{name}": t for name, t in model.items()})
        if report.global_model is not None:
            state.update({f"global/{name}": t for name, t in report.global_model.items()})
        ckpt.save_checkpoint(d / "coordinator.pt", role="coordinator", round=self.round,
                             config=cfg.to_dict(include_runtime=False), state=state,
                             extra={"cuts": {str(c): str(b) for c, b in self.cuts.items()},
                                    "assignment": {str(c): k for c, k in self.assignment.items()},
                                    "members": {str(c): [m.domain, m.n_samples] for c, m in self.members.items()},
                                    "history": self.history, "aggregated": report.aggregated})
        files = ["coordinator.pt", "server.pt"] + [f"client_{c}.pt" for c in sorted(self.members)]
        ckpt.write_manifest(self.run_dir, self.round, cfg.to_dict(), files)
        self.ctx.store.set_checkpoint(self.ctx.run, self.round, str(d))
