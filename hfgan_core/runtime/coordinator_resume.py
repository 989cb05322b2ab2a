"""The coordinator's checkpoints and its restart: carry on the run the ledger records.

`resume_from_ledger()` makes a restarted coordinator (or a standby that won the lease) carry on from the ledger's
documents: a round in `training` sends its recorded start again (the dead coordinator may have recorded it and died
before sending it; receivers that have it drop the copy by its msg_id) and keeps collecting (its deadline
continues), one in `aggregating` re-queues its jobs that have no result yet (an aggregator recomputes them bit for
bit) and recomputes the models of those that have, one that is `done` is followed by the next.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from ..federation import state_digest
from ..model import CutBits
from ..protocol import AggregateDone
from ..transport import AGGREGATE
from . import checkpoint as ckpt
from . import ledger
from .admission import Member
from .aggregator import compute_job, read_round_updates


class ResumeMixin:
    """Restore and checkpoint methods of `CoordinatorRole` (its state is documented there)."""

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
        self._resume_aggregating(r, docs)

    def _resume_aggregating(self, r: int, docs: ledger.RoundDocs) -> None:
        """The jobs are recorded; results that were acknowledged are recomputed, the rest re-queued."""
        ctx, run = self.ctx, self.ctx.run
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

    def _save_checkpoint(self, report: Any) -> None:  # a RoundReport
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
