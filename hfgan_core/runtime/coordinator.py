"""The coordinator: admission, the round lifecycle, deadlines and quorum, and the aggregation jobs.

    admitting   clients join with their device profile and sample count; cuts are planned (or taken from the config)
    training    round r runs; clients report `round_done`, the server `server_round_done`, clustering its result
    closing     the round deadline passed: `round_close` went out, waiting for the server's report
    aggregating weights computed (KLD-weighted, per cluster and global) and one job per cluster (+ global) queued
    -> evaluate, checkpoint, next round (or `run_end`)

Every transition is also a compare-and-set in the ledger, so a standby coordinator can never double-drive a round.

Durability: whatever the coordinator learns from a message (a join, a client's or the server's round report, the
clustering result, an aggregation result) is written to the ledger as a document (ledger.py) before the message is
acknowledged, and a round's jobs are recorded before the round moves to `aggregating`; a restarted coordinator
carries on from those documents (coordinator_resume.py). Admission is admission.py; which clients are averaged
with which weights in which jobs is a pure function (federation/planning.py); queueing the jobs, queueing them again
and planning a round again without a client whose named update stays missing is coordinator_jobs.py.

What it accepts: a round report only for a round that has started (a report for a later one is refused without a
mark in the ledger), one per client and round (a second, different one is refused); a clustering result from the
clustering service about members of the run, with cluster ids below its k; an aggregation result only when its
model is the one whose digest the aggregator recorded in the ledger.
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
from ..federation import state_digest
from ..federation.planning import Clusters, WeightRule, resolve_clusters
from ..model import CutBits
from ..protocol import (
    AggregateDone,
    AggregateJob,
    ClientHeartbeat,
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
from ..transport import COORDINATOR, SERVER, client_address
from . import ledger
from .admission import AdmissionMixin, Member
from .aggregator import read_round_updates
from .coordinator_jobs import JobsMixin
from .coordinator_resume import ResumeMixin
from .host import Reject, Role, RoleContext
from .slots import SlotTable

__all__ = ["CoordinatorRole", "Member", "RoundReport"]


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


class CoordinatorRole(AdmissionMixin, ResumeMixin, JobsMixin, Role):
    name = "coordinator"
    accepts = (Join, RoundDone, ServerRoundDone, ClusterResult, AggregateDone, ClientHeartbeat)
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
        slot_ttl_s: float = 10.0,
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
        self.slots = SlotTable(self.expected, slot_ttl_s)  # client processes' slots (admission.py)
        self._traffic: dict[int, dict[str, float]] = {}
        # Clients whose last heartbeat said they exited: their final traffic numbers are in the ledger.
        self.clients_exited: set[int] = set()
        self._start_msg: RoundStart | None = None
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
        self.server_told_to_close = False
        self.cluster_result: ClusterResult | None = None
        self.cluster_wait_until = math.inf
        self.jobs: dict[int, AggregateJob] = {}
        self.results: dict[int, AggregateDone] = {}
        self.weights = None
        self._requeue_after = self._requeue_first()
        self._requeue_at = math.inf
        self._clusters: Clusters | None = None
        self._excluded: dict[int, str] = {}  # arrived clients planned out of the round (coordinator_jobs.py)
        self._refusals: dict[int, int] = {}
        self._refusals_read_at = 0.0

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
    # ---------------------------------------------------------------------------------------------- dispatch
    def on_message(self, msg: Message) -> None:
        if isinstance(msg, ClientHeartbeat):
            self._on_heartbeat(msg)
        elif isinstance(msg, Join):
            self._on_join(msg)
        elif isinstance(msg, RoundDone):
            self._on_round_done(msg)
        elif isinstance(msg, ServerRoundDone):
            if msg.round != self.round or self.phase not in ("training", "closing"):
                if self.server_done is not None and msg.msg_id == self.server_done.msg_id:
                    return  # redelivered after a restart that had already recorded it
                raise Reject(f"stale: server report for round {msg.round} in {self.phase} of round {self.round}")
            self.ctx.store.put_doc(self.ctx.run, self.round, ledger.SERVER_DONE, ledger.message_doc(msg))
            self.server_done = msg
            self._maybe_close()
        elif isinstance(msg, ClusterResult):
            if msg.round != self.round:
                raise Reject(f"stale: cluster result for round {msg.round} in round {self.round}")
            self._check_cluster_result(msg)
            # Rounds that aggregate as one cluster do not wait for it; a result arriving after is simply noted.
            self.ctx.store.put_doc(self.ctx.run, self.round, ledger.CLUSTER_RESULT, ledger.message_doc(msg))
            self.cluster_result = msg
            if self.phase in ("training", "closing"):
                self._maybe_close()
        elif isinstance(msg, AggregateDone):
            self._on_aggregate_done(msg)

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
        self._start_msg = start  # sent again to a participant that rejoins the round (admission.py)
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
        if msg.round == self.round and c in self.done:
            # One report per client and round: a second one could swap the update the round averages.
            raise Reject(f"duplicate: client {c} already reported round {msg.round} ({self.done[c].msg_id})")
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
        self.ctx.store.put_doc(self.ctx.run, self.round, ledger.done_name(c), ledger.message_doc(msg))
        self.done[c] = msg
        self.ctx.store.mark_client(self.ctx.run, self.round, c, "arrived", "", self.ctx.clock())
        self.ctx.store.record_metrics(self.ctx.run, self.round, client_address(c), msg.metrics)
        self._event("client_done", client=c, arrived=len(self.done), of=len(self.participants))
        self._maybe_close()

    def _close_the_servers_round_once_everyone_reported(self) -> None:
        """Every client reported the round, so none sends the server anything more; a server that has not finished
        the round then waits for steps it never learned were given up (a restarted server lost them and its
        clients went on, or a client timed its last step out), until the round deadline. It is told to close the
        round instead. In a round without faults the server finishes before its clients can report, and a close
        that reaches a server done with the round is ignored."""
        if self.phase == "training" and len(self.done) == len(self.participants) and not self.server_told_to_close:
            self.server_told_to_close = True
            self.send(SERVER, RoundClose(**self.envelope(self.round), reason="every client reported the round"))

    def _need_clusters(self) -> bool:
        tr = self.ctx.cfg.train
        if self.round < tr.kld_from_round:
            return False
        # KLD weights need the clustering service's scores even with one cluster or with clustering off.
        return tr.kld_weighting or (tr.clustering and tr.n_clusters(self.ctx.cfg.scenario) != 1)

    def _maybe_close(self) -> None:
        if self.phase not in ("training", "closing"):
            return
        if self.server_done is None:
            self._close_the_servers_round_once_everyone_reported()
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
        elif self.phase == "aggregating":
            self._tick_jobs(now)

    # ------------------------------------------------------------------------------------------- aggregation
    def _aggregate(self) -> None:
        """Close the round: record who arrived, was dropped or late, the clusters; plan the jobs (a pure function,
        federation/planning.py) and record them before they are queued."""
        ctx, cfg = self.ctx, self.ctx.cfg
        now = ctx.clock()
        dropped, late = self._mark_arrivals(now)
        rule = WeightRule.from_train(cfg.train)
        res = self.cluster_result
        clusters = resolve_clusters(
            self.round,
            sorted(self.members),
            self.assignment,
            None
            if res is None
            else Clusters(
                {int(c): int(k) for c, k in res.assignment.items()},
                {int(c): v for c, v in res.kld_intra.items()},
                {int(c): v for c, v in res.kld_global.items()},
            ),
            rule,
            self._need_clusters(),
        )
        self.assignment = dict(clusters.assignment)
        ctx.store.set_clusters(ctx.run, self.round, self.assignment, clusters.kld_intra, clusters.kld_global)
        self._clusters = clusters
        plan = self._plan()
        # A client whose every step was dropped reports an unchanged model: it is not averaged in.
        for c in plan.untrained:
            ctx.store.mark_client(ctx.run, self.round, c, "late", "no completed step this round: not aggregated", now)
        why = f"completed no step in round {self.round}"
        ledger.add_discarded(
            ctx.store, ctx.run, self.round, {self.done[c].update_digest: f"client {c} {why}" for c in plan.untrained}
        )
        if plan.skip is not None:
            self._skip_round(list(plan.averaged), dropped, late, plan.skip)
            return
        for what, (clients, value) in plan.filled_kld.items():
            ctx.log.warning(
                "coordinator: round %d: no %s KLD score for client(s) %s; weighting them with %.4g",
                self.round,
                what,
                list(clients),
                value,
            )
        if plan.orphans:  # clients whose whole cluster missed the round keep their local models
            ctx.log.info("coordinator: clients %s belong to clusters with no update this round", list(plan.orphans))
        self._queue_jobs(plan, dropped, late)

    def _mark_arrivals(self, now: float) -> tuple[dict[int, str], dict[int, int]]:
        ctx = self.ctx
        dropped = {c: "missed the round deadline" for c in self.participants if c not in self.done}
        for c, reason in dropped.items():
            ctx.store.mark_client(ctx.run, self.round, c, "dropped", reason, now)
        late = {int(c): n for c, n in (self.server_done.late if self.server_done else {}).items()}
        for c, n in late.items():
            if c in self.done and n:
                why = f"late for {n} step(s); served later or dropped from those steps"
                ctx.store.mark_client(ctx.run, self.round, c, "late", why, now)
        if self.server_done is not None:
            ctx.store.record_metrics(ctx.run, self.round, "server", self.server_done.metrics)
        return dropped, late

    def _skip_round(self, arrived: list[int], dropped: dict[int, str], late: dict[int, int], reason: str) -> None:
        ctx = self.ctx
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
        self._maybe_finish_aggregation()

    def _maybe_finish_aggregation(self) -> None:
        if self.phase == "aggregating" and all(k in self.results for k in self.jobs):
            self._discard_unused_updates()
            self._finish_round(
                sorted(c for c in self.done if c not in self._excluded),
                self._dropped,
                self._late,
                {k: r.state for k, r in self.results.items() if k in self.jobs},
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
        models = {k: m for k, m in models.items() if m}  # a job none of whose members was usable has no model
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
