"""The coordinator: admission, the round lifecycle, deadlines and quorum, and the aggregation jobs.

    admitting   clients join with their device profile and sample count; cuts are planned (or taken from the config)
    training    round r runs; clients report `round_done`, the server `server_round_done`, clustering its result
    closing     the round deadline passed: `round_close` went out, waiting for the server's report
    aggregating weights computed (KLD-weighted, per cluster and global) and one job per cluster (+ global) queued
    -> evaluate, checkpoint, next round (or `run_end`)

Every transition is also a compare-and-set in the ledger, so a standby coordinator can never double-drive a round.

Durability: whatever the coordinator learns from a message (a join, a client's or the server's round report, the
clustering result, an aggregation result) is written to the ledger as a document (ledger.py) before the message is
acknowledged, and a round's jobs are recorded before the round moves to `aggregating`. `resume_from_ledger()` makes
a restarted coordinator (or a standby that won the lease) carry on from those documents: a round in `training`
sends its recorded start again (the dead coordinator may have recorded it and died before sending it; receivers
that have it drop the copy by its msg_id) and keeps collecting (its deadline continues), one in `aggregating`
re-queues its jobs that have no result yet (an aggregator recomputes them bit for bit) and recomputes the models of
those that have, one that is `done` is followed by the next.

What it accepts: a round report only for a round that has started (a report for a later one is refused without a
mark in the ledger); a clustering result from the clustering service about members of the run, with cluster ids
below its k; an aggregation result only when its model is the one whose digest the aggregator recorded in the
ledger. An arrived client without a KLD score (none of its real-data passes reached the server) is weighted like
the least similar client that has one, rather than failing the round.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..config import DeviceProfile
from ..federation import aggregation_weights, state_digest
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
from . import ledger
from .aggregator import compute_job, job_document, read_round_updates
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

    def __init__(
        self,
        ctx: RoleContext,
        *,
        run_dir: str | Path | None = None,
        on_round_end: Callable[[RoundReport], dict[str, Any] | None] | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        planner: Callable[[list[DeviceProfile]], list[CutBits]] | None = None,
        replanner: Callable[[dict[int, float], dict[int, CutBits], list[DeviceProfile]], list[CutBits]] | None = None,
    ):
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
        self._resume: tuple[int, str] | None = None
        self._restart_deadline = False
        self._late: dict[int, int] = {}
        self._dropped: dict[int, str] = {}
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
        if self._resume is not None:
            self._resume_round()
            return
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
        self._requeue_after = self._requeue_first()
        self._requeue_at = math.inf

    def _requeue_first(self) -> float:
        return max(10.0, 4 * self.ctx.cfg.runtime.step_deadline_s)

    def _jobs_queued(self) -> None:
        """Jobs without a result are queued again after a while (then less and less often): a job dead-lettered
        by an aggregator's transient failure must not stall the round. Duplicates are harmless (same msg_id, the
        same model; late answers are ignored). Without any aggregator running the jobs simply wait."""
        self._requeue_at = self.ctx.clock() + self._requeue_after

    def _event(self, event: str, **detail: Any) -> None:
        if event == "aggregating":
            self.ctx.metrics.aggregation_job("queued", len(self.jobs))
        if self.on_event is not None:
            self.on_event(event, {"round": self.round, **detail})
        self.send(
            f"events.round.{event}",
            RoundEvent(**self.envelope(self.round), event=event, detail={k: str(v) for k, v in detail.items()}),
        )

    # ------------------------------------------------------------------------------------------------ restore
    def restore(self, blob: dict[str, Any]) -> None:
        extra = blob["extra"]
        self.round = int(blob["round"])
        self.cuts = {int(c): CutBits.parse(b) for c, b in extra["cuts"].items()}
        self.assignment = {int(c): int(k) for c, k in extra["assignment"].items()}
        self.history = list(extra.get("history", []))
        self._restored = True

    def resume_from_ledger(self, blob: dict[str, Any] | None = None, *, restart_deadline: bool = False) -> None:
        """Carry on the run the ledger records (call before the role is bound; `start()` then acts on it).

        `blob`: the last coordinator checkpoint of the run, if any (its history; the rest comes from the ledger).
        `restart_deadline`: a round in training gets a full round deadline again (a run that was stopped on
        purpose); otherwise its deadline continues (a coordinator that crashed and was replaced)."""
        ctx = self.ctx
        self._restart_deadline = restart_deadline
        run = ctx.run
        if blob is not None:
            self.history = list(blob["extra"].get("history", []))
        for c, (domain, n, profile) in ledger.parse_members(ctx.store.get_docs(run, 0).get(ledger.MEMBERS)).items():
            self.members[c] = Member(c, domain, n, profile)
        self.cuts = {c: CutBits.parse(b) for c, b in ctx.store.get_cuts(run).items()}
        r, phase = ctx.store.get_round(run)
        self.round = r
        # The assignment in force: the last round that recorded one (this round's only once it aggregated).
        for past in range(r if phase in ("aggregating", "done") else r - 1, 0, -1):
            assignment = ctx.store.get_clusters(run, past)[0]
            if assignment:
                self.assignment = dict(assignment)
                break
        self._resume = (r, phase)
        self._restored = True

    def _resume_round(self) -> None:
        ctx, run = self.ctx, self.ctx.run
        r, phase = self._resume
        self._resume = None
        ctx.log.info(
            "coordinator: resuming run %s at round %d (%s) with %d member(s)", run, r, phase, len(self.members)
        )
        self._event("resumed", phase=phase)
        if phase == "admitting":
            self.phase = "admitting"
            if len(self.members) == self.expected:
                self._admit()
            return
        if phase == "done":
            self.phase = "aggregating"  # _finish_round's successor logic, without redoing the round
            self._after_round()
            return
        docs = ledger.RoundDocs.read(ctx.store, run, r)
        if docs.start is None:
            # The round was entered but its start was never recorded: start it again.
            ctx.log.warning("coordinator: round %d has no start record; starting it again", r)
            self._start_round(r, transition=False)
            return
        self._reset_round_state()
        start = ledger.round_start_from_doc(run, r, docs.start)
        self.phase = "training"
        self.participants = list(start.participants)
        self.deadline = start.deadline
        if self._restart_deadline and phase == "training":
            self.deadline = ctx.clock() + ctx.cfg.runtime.round_deadline_s
            ctx.store.put_doc(
                run,
                r,
                ledger.START,
                ledger.start_doc(replace(start, deadline=self.deadline), float(docs.start.get("started", 0.0))),
            )
        self.round_started = float(docs.start.get("started", ctx.clock()))
        self.round_wall0 = time.perf_counter() - max(0.0, ctx.clock() - self.round_started)
        self.cuts = {c: CutBits(*b) for c, b in enumerate(start.cuts) if c in self.members} or self.cuts
        for c, doc in docs.done.items():
            if c in self.participants:
                self.done[c] = ledger.round_done_from_doc(run, r, c, doc)
        if docs.server_done is not None:
            self.server_done = ledger.server_done_from_doc(run, r, docs.server_done)
        if docs.cluster_result is not None:
            self.cluster_result = ledger.cluster_result_from_doc(run, r, docs.cluster_result)
        if phase == "training":
            # The coordinator that recorded this start may have died before sending it to everyone: send it again
            # (same msg_id, so a server or client that has it already takes the copy as a duplicate).
            ctx.store.set_expected(run, r, self.participants, self.round_started)
            waiting = [c for c in self.participants if c not in self.done]
            self._send_start(replace(start, deadline=self.deadline), waiting)
            self._maybe_close()
            return
        # aggregating: the jobs are recorded; results that were acknowledged are recomputed, the rest re-queued.
        self.phase = "aggregating"
        self._dropped = {c: "missed the round deadline" for c in self.participants if c not in self.done}
        self._late = {int(c): n for c, n in (self.server_done.late if self.server_done else {}).items()}
        if not docs.jobs:
            self._finish_round(sorted(self.done), self._dropped, self._late, {}, aggregated=False)
            return
        self.cuts = {c: CutBits.parse(b) for c, b in ctx.store.get_cuts(run).items()}
        offset = ctx.store.get_log_offset(run, r) or 0
        self.jobs = {k: ledger.job_from_doc(run, r, doc, offset) for k, doc in docs.jobs.items()}
        self._restore_weights()
        recorded = ctx.store.get_model_digests(run, r)
        updates = None
        for k, job in sorted(self.jobs.items()):
            agg = docs.aggs.get(k)
            if agg is None:
                self.send(AGGREGATE, job)  # same msg_id: an aggregator that already did it answers the same
                continue
            if updates is None:
                updates = read_round_updates(ctx, r)
            model = compute_job(ctx, job, updates)
            digest = state_digest(model)
            if digest != agg["digest"] or recorded.get(k, digest) != digest:
                raise RuntimeError(
                    f"round {r} cluster {k}: recomputed model {digest[:12]} differs from the "
                    f"recorded {agg['digest'][:12]}"
                )
            self.results[k] = AggregateDone(
                **self.envelope(r), cluster=k, members=job.members, digest=digest, state=model
            )
        self._jobs_queued()
        self._event("aggregating", jobs=len(self.jobs), arrived=len(self.done), resumed=True)
        if len(self.results) == len(self.jobs):
            self._finish_round(
                sorted(self.done),
                self._dropped,
                self._late,
                {k: res.state for k, res in self.results.items()},
                aggregated=True,
            )

    def _restore_weights(self) -> None:
        """The round's aggregation weights, for the round report (rebuilt from the recorded jobs)."""
        from ..federation.weights import Weights

        clusters = {k: dict(zip(j.members, j.weights)) for k, j in self.jobs.items() if k >= 0}
        glob = self.jobs.get(-1)
        self.weights = Weights(clusters=clusters, global_=dict(zip(glob.members, glob.weights)) if glob else {})

    # ---------------------------------------------------------------------------------------------- dispatch
    def on_message(self, msg: Message) -> None:
        if isinstance(msg, Join):
            self._on_join(msg)
        elif isinstance(msg, RoundDone):
            self._on_round_done(msg)
        elif isinstance(msg, ServerRoundDone):
            if msg.round != self.round or self.phase not in ("training", "closing"):
                if self.server_done is not None and msg.msg_id == self.server_done.msg_id:
                    return  # redelivered after a restart that had already recorded it
                raise Reject(f"stale: server report for round {msg.round} in {self.phase} of round {self.round}")
            self.ctx.store.put_doc(self.ctx.run, self.round, ledger.SERVER_DONE, ledger.server_done_doc(msg))
            self.server_done = msg
            self._maybe_close()
        elif isinstance(msg, ClusterResult):
            if msg.round != self.round:
                raise Reject(f"stale: cluster result for round {msg.round} in round {self.round}")
            self._check_cluster_result(msg)
            # Rounds that aggregate as one cluster do not wait for it; a result arriving after is simply noted.
            self.ctx.store.put_doc(self.ctx.run, self.round, ledger.CLUSTER_RESULT, ledger.cluster_result_doc(msg))
            self.cluster_result = msg
            if self.phase in ("training", "closing"):
                self._maybe_close()
        elif isinstance(msg, AggregateDone):
            self._on_aggregate_done(msg)

    def _check_cluster_result(self, msg: ClusterResult) -> None:
        """A result the aggregation may use: from the clustering service, about members of the run only, with
        cluster ids below k (anything else would reassign clients to clusters that do not exist)."""
        if msg.sender != "clustering":
            raise Reject(f"bad_sender: cluster results come from the clustering service, not {msg.sender!r}")
        if not 1 <= msg.k <= max(1, len(self.members)):
            raise Reject(f"malformed: cluster result with k = {msg.k} for {len(self.members)} member(s)")
        for name, mapping in (
            ("assignment", msg.assignment),
            ("kld_intra", msg.kld_intra),
            ("kld_global", msg.kld_global),
        ):
            unknown = [c for c in mapping if not c.isdigit() or int(c) not in self.members]
            if unknown:
                raise Reject(f"malformed: cluster result {name} names clients {unknown[:5]} that are not members")
        bad = {c: k for c, k in msg.assignment.items() if not 0 <= k < msg.k}
        if bad:
            raise Reject(f"malformed: cluster ids {bad} outside 0..{msg.k - 1}")

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
                profile = DeviceProfile(
                    msg.profile["cpu_mhz"], msg.profile["flops_per_cycle"], msg.profile["data_rate"]
                )
            except KeyError as exc:
                raise Reject(f"malformed: profile without {exc}") from None
            if min(profile.cpu_mhz, profile.flops_per_cycle, profile.data_rate) <= 0:
                raise Reject("malformed: non-positive device profile")
        rejoin = c in self.members
        self.members[c] = Member(c, msg.domain, msg.n_samples, profile)
        # The join is recorded in the members document; heartbeats are the workers' own (liveness, not joins).
        self.ctx.store.put_doc(self.ctx.run, 0, ledger.MEMBERS, ledger.members_doc(self.members))
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

    def _start_round(self, r: int, transition: bool = True) -> None:
        ctx, cfg = self.ctx, self.ctx.cfg
        self._reset_round_state()
        now = ctx.clock()
        deadline = now + cfg.runtime.round_deadline_s
        participants = sorted(self.members)
        steps = self.steps_per_round()
        n = self.expected
        cuts = tuple(tuple(self.cuts.get(c, CutBits(0, 0, 0, 0))) for c in range(n))
        start = RoundStart(
            **self.envelope(r), participants=tuple(participants), cuts=cuts, steps=steps, deadline=deadline
        )
        # Recorded before the round exists in the ledger, so a restart in `training` always finds its start.
        ctx.store.put_doc(ctx.run, r, ledger.START, ledger.start_doc(start, now))
        if transition:
            prev_round, prev_phase = ctx.store.get_round(ctx.run)
            if not ctx.store.transition(ctx.run, prev_round, prev_phase, r, "training"):
                raise RuntimeError(f"ledger moved under the coordinator (round {prev_round} {prev_phase})")
        self.round = r
        self.phase = "training"
        self.round_started = now
        self.round_wall0 = time.perf_counter()
        self.deadline = deadline
        self.participants = participants
        ctx.store.set_expected(ctx.run, r, self.participants, now)
        self._send_start(start, self.participants)
        self._event("started", participants=len(self.participants), steps=steps)

    def _send_start(self, start: RoundStart, clients: list[int]) -> None:
        # The server hears of the round first, so no client activation can reach it before the round exists.
        self.send(SERVER, start)
        for c in clients:
            self.send(client_address(c), start)

    def _on_round_done(self, msg: RoundDone) -> None:
        c = msg.client
        if msg.sender != client_address(c):
            raise Reject(f"bad_sender: {msg.sender!r} reported for client {c}")
        if msg.round == self.round and c in self.done and self.done[c].msg_id == msg.msg_id:
            return  # redelivered after a restart that had already recorded it
        if msg.round > self.round:
            # Nothing can be reported for a round that has not started: no mark in that round's ledger record.
            raise Reject(
                f"stale: round_done of client {c} for round {msg.round}, which has not started (coordinator: "
                f"round {self.round} {self.phase})"
            )
        if msg.round != self.round or self.phase not in ("training", "closing") or c not in self.participants:
            self.ctx.store.mark_client(
                self.ctx.run, msg.round, c, "late", "reported after its round closed", self.ctx.clock()
            )
            raise Reject(
                f"late: round_done of client {c} for round {msg.round} (coordinator: round {self.round} {self.phase})"
            )
        self.ctx.store.put_doc(self.ctx.run, self.round, ledger.done_name(c), ledger.done_doc(msg))
        self.done[c] = msg
        self.ctx.store.mark_client(self.ctx.run, self.round, c, "arrived", "", self.ctx.clock())
        self.ctx.store.record_metrics(self.ctx.run, self.round, client_address(c), msg.metrics)
        self._event("client_done", client=c, arrived=len(self.done), of=len(self.participants))
        self._maybe_close()

    def _need_clusters(self) -> bool:
        tr = self.ctx.cfg.train
        if self.round < tr.kld_from_round:
            return False
        # KLD weights need the clustering service's scores even with one cluster or with clustering off.
        return tr.kld_weighting or (tr.clustering and tr.n_clusters(self.ctx.cfg.scenario) != 1)

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
            self.ctx.log.warning(
                "coordinator: no clustering result for round %d; keeping the previous clusters", self.round
            )
        self._aggregate()

    def tick(self, now: float) -> None:
        if (
            self.phase == "admitting"
            and self.members
            and now >= self.admit_started + self.ctx.cfg.runtime.round_deadline_s
        ):
            # Admission has the round deadline too: with a quorum of the expected clients the run starts; the
            # others join a later round when they come.
            need = max(1, math.ceil(self.ctx.cfg.runtime.quorum * self.expected))
            if len(self.members) >= need:
                self.ctx.log.warning(
                    "coordinator: admission deadline passed; starting with %d of %d clients",
                    len(self.members),
                    self.expected,
                )
                self._admit()
            return
        if self.phase == "training" and now >= self.deadline:
            self.phase = "closing"
            missing = [c for c in self.participants if c not in self.done]
            self.ctx.log.warning(
                "coordinator: round %d deadline passed; %d client(s) missing", self.round, len(missing)
            )
            close = RoundClose(**self.envelope(self.round), reason="round deadline passed")
            self.send(SERVER, close)
            for c in missing:
                self.send(client_address(c), close)
            self._event("closing", missing=len(missing))
            self._maybe_close()
        elif self.phase in ("training", "closing") and self.cluster_wait_until < math.inf:
            self._maybe_close()
        elif self.phase == "aggregating" and now >= self._requeue_at:
            missing = [k for k in sorted(self.jobs) if k not in self.results]
            if missing:
                self.ctx.log.warning(
                    "coordinator: round %d: no result for job(s) %s after %.0f s; queueing them again",
                    self.round,
                    missing,
                    self._requeue_after,
                )
                for k in missing:
                    self.send(AGGREGATE, self.jobs[k])
            self._requeue_after = min(
                2 * self._requeue_after, max(self.ctx.cfg.runtime.round_deadline_s, self._requeue_first())
            )
            self._jobs_queued()

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
                ctx.store.mark_client(
                    ctx.run,
                    self.round,
                    c,
                    "late",
                    f"late for {n} step(s); served later or dropped from those steps",
                    now,
                )
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

        # A client whose every step was dropped reports an unchanged model: it is not averaged in.
        untrained = [c for c in arrived if self.done[c].steps_done == 0]
        for c in untrained:
            ctx.store.mark_client(ctx.run, self.round, c, "late", "no completed step this round: not aggregated", now)
        ledger.add_discarded(
            ctx.store,
            ctx.run,
            self.round,
            {self.done[c].update_digest: f"client {c} completed no step in round {self.round}" for c in untrained},
        )
        arrived = [c for c in arrived if c not in untrained]
        quorum_ok = len(arrived) >= max(1, math.ceil(cfg.runtime.quorum * len(self.participants)))
        if not quorum_ok or self.server_done is None or self.server_done.steps_done == 0:
            reason = "quorum not met" if not quorum_ok else "no training happened"
            ctx.log.warning(
                "coordinator: round %d not aggregated (%s: %d of %d arrived)",
                self.round,
                reason,
                len(arrived),
                len(self.participants),
            )
            why = f"round {self.round} not aggregated: {reason}"
            discarded = {self.done[c].update_digest: why for c in arrived}
            if self.server_done is not None:
                discarded[self.server_done.update_digest] = why
            # Updates logged by clients whose report never came are in the log only: no aggregator will read this
            # round, so the coordinator does.
            logged = read_round_updates(ctx, self.round)
            discarded.update({uid: why for uid in [*logged.clients, *logged.server] if uid not in discarded})
            ledger.add_discarded(ctx.store, ctx.run, self.round, discarded)
            self._event("skipped", reason=reason)
            self.phase = "aggregating"
            ctx.store.transition(ctx.run, self.round, "training", self.round, "aggregating")
            self._finish_round(arrived, dropped, late, {}, aggregated=False)
            return

        n_samples = {c: self.done[c].n_samples for c in arrived}
        if tr.kld_weighting and self.round >= tr.kld_from_round:
            kld_intra = self._fill_missing_kld(arrived, kld_intra, "intra-cluster")
            kld_global = self._fill_missing_kld(arrived, kld_global, "global")
        w = aggregation_weights(
            round=self.round,
            clients=arrived,
            n_samples=n_samples,
            assignment=self.assignment,
            kld_intra=kld_intra,
            kld_global=kld_global,
            alpha=tr.alpha,
            kld_from_round=tr.kld_from_round,
            kld_weighting=tr.kld_weighting,
            clustering=tr.clustering,
        )
        self.weights = w
        next_cuts = self._next_cuts(arrived)
        update_ids = {str(c): self.done[c].update_digest for c in arrived}
        update_ids["server"] = self.server_done.update_digest
        env = self.envelope(self.round)
        offset = ctx.store.get_log_offset(ctx.run, self.round) or 0
        jobs: dict[int, AggregateJob] = {}
        # Clusters in rounds 1-2 (or without clustering) are the single cluster 0.
        effective = {
            c: (self.assignment[c] if (tr.clustering and self.round >= tr.kld_from_round) else 0) for c in self.members
        }
        for k, cw in sorted(w.clusters.items()):
            members = sorted(cw)
            recipients = sorted(c for c in self.members if effective[c] == k)
            jobs[k] = AggregateJob(
                **env,
                cluster=k,
                members=tuple(members),
                weights=tuple(cw[c] for c in members),
                recipients=tuple(recipients),
                cuts=tuple(tuple(next_cuts[c]) for c in recipients),
                update_ids={str(c): update_ids[str(c)] for c in members} | {"server": update_ids["server"]},
                log_offset=offset,
            )
        orphans = sorted(c for c in self.members if effective[c] not in w.clusters)
        if orphans:  # clients whose whole cluster missed the round keep their local models
            ctx.log.info("coordinator: clients %s belong to clusters with no update this round", orphans)
        gmembers = sorted(w.global_)
        jobs[-1] = AggregateJob(
            **env,
            cluster=-1,
            members=tuple(gmembers),
            weights=tuple(w.global_[c] for c in gmembers),
            recipients=(),
            cuts=(),
            update_ids=update_ids,
            log_offset=offset,
        )
        # Every job is recorded (and the next cuts) before the round moves on, so a restart finds all of them.
        for k, job in jobs.items():
            ctx.store.set_weights(ctx.run, self.round, k, dict(zip(job.members, job.weights)))
            ctx.store.put_doc(ctx.run, self.round, ledger.job_name(k), job_document(job))
        ctx.store.set_cuts(ctx.run, {c: str(b) for c, b in next_cuts.items()})
        if not ctx.store.transition(ctx.run, self.round, "training", self.round, "aggregating"):
            raise RuntimeError("ledger moved under the coordinator while closing the round")
        self.phase = "aggregating"
        self.jobs = jobs
        self.cuts = next_cuts
        for job in jobs.values():
            self.send(AGGREGATE, job)
        self._jobs_queued()
        self._late, self._dropped = late, dropped
        self._event("aggregating", jobs=len(jobs), arrived=len(arrived))

    def _fill_missing_kld(self, arrived: list[int], scores: dict[int, float], what: str) -> dict[int, float]:
        """KLD scores for every arrived client. A client that arrived without one (none of its real-data passes
        reached the server this round: every step dropped; or no clustering result came at all) is weighted like
        the least similar client that has one (plain n_k weights when none has), instead of failing the round."""
        missing = [c for c in arrived if c not in scores]
        if not missing:
            return scores
        fill = max((scores[c] for c in arrived if c in scores), default=0.0)
        self.ctx.log.warning(
            "coordinator: round %d: no %s KLD score for client(s) %s; weighting them with %.4g",
            self.round,
            what,
            missing,
            fill,
        )
        return {**scores, **{c: fill for c in missing}}

    def _next_cuts(self, arrived: list[int]) -> dict[int, CutBits]:
        tr = self.ctx.cfg.train
        if not (tr.adaptive_cuts and tr.cuts == "plan" and self.replanner is not None):
            return dict(self.cuts)
        # A client's own compute per step (median), not its step's wall time, which includes waiting for the others.
        measured = {c: self.done[c].metrics["compute_s"] for c in arrived if "compute_s" in self.done[c].metrics}
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
            recorded = self.ctx.store.get_model_digests(self.ctx.run, msg.round).get(msg.cluster)
            if msg.round <= self.round and recorded == msg.digest:
                return  # a re-queued job done twice: the same model, already applied
            raise Reject(f"stale: aggregate_done for round {msg.round} cluster {msg.cluster}")
        recorded = self.ctx.store.get_model_digests(self.ctx.run, self.round).get(msg.cluster)
        # An aggregator records the digest before it answers: the model must be the one the ledger records (its
        # state is evaluated and checkpointed; nothing unrecorded or altered may take a job's place).
        if recorded is None:
            raise Reject(f"unrecorded: aggregate_done for cluster {msg.cluster} without a digest in the ledger")
        if recorded != msg.digest:
            raise Reject(f"digest_mismatch: cluster {msg.cluster}: {msg.digest} != ledger {recorded}")
        if msg.cluster in self.results:
            return  # the same job's second answer (it was re-queued after a restart)
        if state_digest(msg.state) != msg.digest:
            raise Reject(f"digest_mismatch: the model of cluster {msg.cluster} does not have the digest it claims")
        self.ctx.store.put_doc(
            self.ctx.run,
            self.round,
            ledger.agg_name(msg.cluster),
            ledger.agg_doc(msg.cluster, msg.digest, msg.members, msg.msg_id),
        )
        self.results[msg.cluster] = msg
        if len(self.results) == len(self.jobs):
            self._discard_unused_updates()
            self._finish_round(
                sorted(self.done),
                self._dropped,
                self._late,
                {k: r.state for k, r in self.results.items()},
                aggregated=True,
            )

    def _discard_unused_updates(self) -> None:
        """Updates of this round that are in the log but in no job (a client that logged its update and died
        before its report arrived, a report that came too late) are recorded as discarded, with why."""
        used = {uid for job in self.jobs.values() for uid in job.update_ids.values()}
        known = {self.done[c].update_digest: c for c in self.done}
        seen = {uid for r in self.results.values() for uid in r.seen_updates}
        unused = {}
        for uid in sorted(seen - used):
            if uid in known:
                continue  # already recorded (e.g. a client that completed no step)
            unused[uid] = f"no round report reached the coordinator before round {self.round} closed"
        ledger.add_discarded(self.ctx.store, self.ctx.run, self.round, unused)

    def _finish_round(self, arrived, dropped, late, models, aggregated: bool) -> None:
        ctx = self.ctx
        global_model = models.pop(-1, None)
        w = self.weights
        report = RoundReport(
            round=self.round,
            wall_s=time.perf_counter() - self.round_wall0,
            participants=list(self.participants),
            arrived=list(arrived),
            dropped=dict(dropped),
            late=dict(late),
            assignment=dict(self.assignment),
            kld_intra={int(k): v for k, v in (self.cluster_result.kld_intra.items() if self.cluster_result else [])},
            kld_global={int(k): v for k, v in (self.cluster_result.kld_global.items() if self.cluster_result else [])},
            weights={k: dict(v) for k, v in (w.clusters.items() if w else [])},
            global_weights=dict(w.global_) if w else {},
            digests=ctx.store.get_model_digests(ctx.run, self.round),
            cluster_models=models,
            global_model=global_model,
            cuts=dict(self.cuts),
            client_metrics={c: dict(d.metrics) for c, d in self.done.items()},
            server_metrics=dict(self.server_done.metrics) if self.server_done else {},
            aggregated=aggregated,
        )
        extra = self.on_round_end(report) if self.on_round_end else None
        entry = {
            "round": self.round,
            "wall_s": report.wall_s,
            "clusters": {str(c): k for c, k in self.assignment.items()},
        }
        if extra:
            entry.update(extra)
        self.history.append(entry)
        self._save_checkpoint(report)
        ctx.store.transition(ctx.run, self.round, "aggregating", self.round, "done")
        ctx.metrics.round_finished(ctx.store.round_clients(ctx.run, self.round) if ctx.metrics.enabled else None)
        self._event("done", wall_s=f"{report.wall_s:.2f}", aggregated=aggregated)
        self._after_round()

    def _after_round(self) -> None:
        """After round `self.round` is done: the next round, or the end of the run."""
        ctx = self.ctx
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
        ckpt.save_checkpoint(
            d / "coordinator.pt",
            role="coordinator",
            round=self.round,
            config=cfg.to_dict(include_runtime=False),
            state=state,
            extra={
                "cuts": {str(c): str(b) for c, b in self.cuts.items()},
                "assignment": {str(c): k for c, k in self.assignment.items()},
                "members": {str(c): [m.domain, m.n_samples] for c, m in self.members.items()},
                "history": self.history,
                "aggregated": report.aggregated,
            },
        )
        files = ["coordinator.pt", "server.pt"] + [f"client_{c}.pt" for c in sorted(self.members)]
        ckpt.write_manifest(self.run_dir, self.round, cfg.redacted().to_dict(), files)
        self.ctx.store.set_checkpoint(self.ctx.run, self.round, str(d))
        ckpt.prune(self.run_dir, keep=cfg.runtime.keep_checkpoints)
