"""The coordinator's aggregation jobs: queue them, queue them again, plan the round again without a member.

A job without a result is queued again after a while (then less and less often): a job dead-lettered by an
aggregator's transient failure must not stall the round.

A job an aggregator refuses because a member's update is not in the update log (`missing_update`: a client that
named an update it never logged, or another round's) is recorded by the aggregator in the ledger (`refused.<k>`,
with the members whose update is missing and how many times that job was refused). The coordinator reads those
records while it waits for results: each new refusal queues the job again at once (a stream read can end early on a
busy broker or host, so one refusal is no proof that the record is absent; an honest client's update is in the log
before its report is sent, publisher confirms). After `MAX_MISSING_REFUSALS` refusals of the same job the round is
planned again without those members (`plan_round_jobs(excluded=...)`, federation/planning.py): they are marked
`rejected` in the ledger with the reason (`hfgan status` shows it), their named updates are `discarded`, and the
other members are weighted exactly as if those clients had not reported. Jobs the re-plan leaves unchanged keep their
msg_id and any result they have; changed ones are recorded again and queued under a new msg_id (an aggregator refuses
the old one: it is no longer the job the ledger records); a job the re-plan removes (its cluster had no other member)
is deleted from the ledger and its clients keep their models.
"""

from __future__ import annotations

import json
from typing import Any

from ..federation.planning import RoundPlan, WeightRule, plan_round_jobs
from ..model import CutBits
from ..protocol import AggregateJob
from ..transport import AGGREGATE
from . import ledger
from .aggregator import job_document

MAX_MISSING_REFUSALS = 3  # refusals of one job for a missing update before the round is planned without its members
REFUSALS_POLL_S = 0.5  # how often the coordinator reads the refusal records while it waits for results


class JobsMixin:
    """Needs the coordinator's round state (jobs, results, done, members, the ledger through ctx)."""

    ctx: Any
    jobs: dict[int, AggregateJob]

    def _plan(self) -> RoundPlan:
        """The round's jobs from what the coordinator knows (a pure function, federation/planning.py)."""
        cfg = self.ctx.cfg
        return plan_round_jobs(
            self.round,
            members={c: m.n_samples for c, m in self.members.items()},
            participants=self.participants,
            steps_done={c: d.steps_done for c, d in self.done.items()},
            server_steps=None if self.server_done is None else self.server_done.steps_done,
            quorum=cfg.runtime.quorum,
            clusters=self._clusters,
            rule=WeightRule.from_train(cfg.train),
            excluded=tuple(self._excluded),
        )

    def _build_jobs(self, plan: RoundPlan, next_cuts: dict[int, CutBits]) -> dict[int, AggregateJob]:
        assert self.server_done is not None
        update_ids = {str(c): self.done[c].update_digest for c in plan.averaged}
        update_ids["server"] = self.server_done.update_digest
        env = self.envelope(self.round)
        offset = self.ctx.store.get_log_offset(self.ctx.run, self.round) or 0
        return {
            k: AggregateJob(
                **env,
                cluster=k,
                members=spec.members,
                weights=spec.weights,
                recipients=spec.recipients,
                cuts=tuple(tuple(next_cuts[c]) for c in spec.recipients),
                update_ids={str(c): update_ids[str(c)] for c in spec.members} | {"server": update_ids["server"]},
                log_offset=offset,
            )
            for k, spec in plan.jobs.items()
        }

    def _record_job(self, k: int, job: AggregateJob) -> None:
        ctx = self.ctx
        ctx.store.set_weights(ctx.run, self.round, k, dict(zip(job.members, job.weights)))
        ctx.store.put_doc(ctx.run, self.round, ledger.job_name(k), job_document(job))

    def _queue_jobs(self, plan: RoundPlan, dropped: dict[int, str], late: dict[int, int]) -> None:
        ctx = self.ctx
        assert self.server_done is not None and plan.weights is not None
        self.weights = plan.weights
        next_cuts = self._next_cuts(list(plan.averaged))
        jobs = self._build_jobs(plan, next_cuts)
        # Every job is recorded (and the next cuts) before the round moves on, so a restart finds all of them.
        for k, job in jobs.items():
            self._record_job(k, job)
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
        self._event("aggregating", jobs=len(jobs), arrived=len(plan.averaged))

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

    # ------------------------------------------------------------------------------------- waiting for results
    def _tick_jobs(self, now: float) -> None:
        if now >= self._refusals_read_at:
            self._refusals_read_at = now + REFUSALS_POLL_S
            self._read_refusals()
        if self.phase != "aggregating" or now < self._requeue_at:
            return
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

    def _read_refusals(self) -> None:
        """New `missing_update` refusals of the round's jobs (module docstring)."""
        if not self.jobs or all(k in self.results for k in self.jobs):
            return
        docs = self.ctx.store.get_docs(self.ctx.run, self.round)
        drop: dict[int, str] = {}
        for k, job in sorted(self.jobs.items()):
            raw = docs.get(ledger.refused_name(k))
            if k in self.results or not raw:
                continue
            try:
                doc = json.loads(raw)
                count, missing = int(doc["count"]), {int(c): str(u) for c, u in doc["missing"].items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            if doc.get("job") != job.msg_id or count <= self._refusals.get(k, 0):
                continue
            self._refusals[k] = count
            named = {c: u for c, u in missing.items() if c in job.members and job.update_ids.get(str(c)) == u}
            if count >= MAX_MISSING_REFUSALS and named:
                for c, uid in named.items():
                    drop[c] = f"missing_update: its update {uid} was not in the log ({count} refusals of job {k})"
            else:
                self.send(AGGREGATE, job)  # read the log again now, not after the re-queue interval
        if drop:
            self._replan_without(drop)

    def _replan_without(self, drop: dict[int, str]) -> None:
        ctx, now = self.ctx, self.ctx.clock()
        for c, why in sorted(drop.items()):
            ctx.log.warning("coordinator: round %d: client %d left out of the round: %s", self.round, c, why)
            ctx.store.mark_client(ctx.run, self.round, c, "rejected", f"update not averaged: {why}", now)
            self._excluded[c] = why
            self._dropped[c] = why
        named = {self.done[c].update_digest: f"client {c}: {why}" for c, why in drop.items() if c in self.done}
        ledger.add_discarded(ctx.store, ctx.run, self.round, named)
        plan = self._plan()
        if plan.skip is not None:
            self._skip_round(list(plan.averaged), self._dropped, self._late, plan.skip)
            return
        self.weights = plan.weights
        jobs: dict[int, AggregateJob] = {}
        for k, job in self._build_jobs(plan, self.cuts).items():
            old = self.jobs.get(k)
            if old is not None and (k in self.results or _same_job(old, job)):
                jobs[k] = old  # unchanged (or already done: its recorded model stands)
                continue
            self._record_job(k, job)
            self._refusals.pop(k, None)
            jobs[k] = job
            self.send(AGGREGATE, job)
        for k in set(self.jobs) - set(jobs):
            ctx.store.delete_doc(ctx.run, self.round, ledger.job_name(k))
            self.results.pop(k, None)
        self.jobs = jobs
        self._event("replanned_jobs", left_out=" ".join(str(c) for c in sorted(drop)), jobs=len(jobs))
        self._jobs_queued()
        self._maybe_finish_aggregation()


def _same_job(a: AggregateJob, b: AggregateJob) -> bool:
    return (a.members, a.weights, a.recipients, a.cuts, dict(a.update_ids)) == (
        b.members,
        b.weights,
        b.recipients,
        b.cuts,
        dict(b.update_ids),
    )
