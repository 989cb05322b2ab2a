"""The aggregator: one job = one cluster's weighted average (or the global one for the server's layers).

Jobs come from a work queue that any number of aggregators share. The updates a job names are read from the
update log (the stream that replay reads too), so a job can be redone at any time with the same result: the
aggregator's output is a pure function of the logged updates and the job's weights, and its digest goes to the
ledger. Receivers get only what is theirs: each member client exactly the layers it holds, the server its layers.

Only jobs the coordinator recorded in the ledger (`job.<cluster>` of the round, ledger.py) are done: anyone who may
publish to the work exchange could otherwise queue a job of their own and, its digest recorded first, block the
round's real one. `hold_s` (0) is a test hook (`HFGAN_TEST_AGGREGATOR_HOLD`, services.py): the aggregator pauses
that long after recording a job's digest and before answering, so a test can kill it with a job in hand.
"""

from __future__ import annotations

import json
import time
from typing import Any

import msgpack
import torch

from .. import roles
from ..federation import (
    StateLayout,
    client_layers,
    member_full_state,
    server_layers,
    state_digest,
    weighted_average,
)
from ..federation.robust import CLIP_MULTIPLE, Screened, screen_members
from ..model import CutBits, architecture
from ..protocol import AggregateDone, AggregateJob, ClientUpdate, Message, ModelAssignment, ServerModel, ServerUpdate
from ..protocol import decode as decode_message
from ..transport import AGGREGATE, COORDINATOR, SERVER, client_address
from ..transport.base import LogRecord
from . import ledger
from .host import Reject, Role, RoleContext
from .ledger import job_name


class UpdateSet:
    """The updates of one round read from the log, indexed by msg_id; the records skipped (by offset) and the
    msg_ids whose record is in the log but unusable (malformed, non-finite, ...), each with why."""

    def __init__(
        self,
        clients: dict[str, ClientUpdate],
        server: dict[str, ServerUpdate],
        last_offset: int,
        skipped: dict[int, str] | None = None,
        unusable: dict[str, str] | None = None,
    ):
        self.clients = clients
        self.server = server
        self.last_offset = last_offset
        self.skipped = skipped or {}
        self.unusable = unusable or {}


def forged_sender(user: str | None, sender: str, namespace: str = roles.DEFAULT_NAMESPACE) -> str | None:
    """Why `user` (the broker user the broker vouches for; None: none) may not speak as `sender`, or None: the rule
    the receiving host applies to messages (roles.authorize), for records and answers no host receives."""
    principal = roles.user_principal(user, namespace) if user else None
    if principal is None:
        return None  # no broker identity, or one no role owns (guest, administrators): infrastructure credentials
    found = roles.identify(sender)
    index = found[1] if found else None
    same = found is not None and found[0] is principal[0]
    if same and principal[1] and index != principal[1]:
        same = index.isdigit() and principal[1].isdigit() and int(index) == int(principal[1])
    return None if same else f"forged_sender: broker user {user!r} published as {sender!r}"


def _namespace(ctx: RoleContext) -> str:
    return getattr(getattr(ctx.transport, "names", None), "namespace", roles.DEFAULT_NAMESPACE)


def _unusable_record(rec: LogRecord, msg: Message, seen: UpdateSet, namespace: str) -> str | None:
    """Why a decoded log record of the round may not be used (None: it may). The broker vouches for who appended
    it: a record is used only if that user may speak for the update's sender, and a client update only if its
    sender is the client it is the update of. The first record of a msg_id wins: a copy never replaces it."""
    if isinstance(msg, ClientUpdate) and msg.sender != client_address(msg.client):
        return f"forged_sender: {msg.sender!r} logged an update of client {msg.client}"
    if isinstance(msg, ServerUpdate) and msg.sender != SERVER:
        return f"forged_sender: {msg.sender!r} logged a server update"
    forged = forged_sender(rec.publisher, msg.sender, namespace)
    if forged is not None:
        return forged
    if msg.msg_id in seen.clients or msg.msg_id in seen.server:
        return f"duplicate: msg_id {msg.msg_id} is already in the log"
    return None


def _peek_own(rec: LogRecord, namespace: str) -> str | None:
    """The msg_id of an undecodable record, if its envelope is readable and its publisher may speak for its sender:
    then the update it names is in the log but unusable (not merely not read yet)."""
    try:
        env = msgpack.unpackb(rec.body, raw=False, strict_map_key=True)
        msg_id, sender = env["msg_id"], env["sender"]
    except Exception:  # junk: nothing to attribute
        return None
    if not isinstance(msg_id, str) or not isinstance(sender, str) or forged_sender(rec.publisher, sender, namespace):
        return None
    return msg_id


def read_round_updates(ctx: RoleContext, round: int) -> UpdateSet:
    offset = ctx.store.get_log_offset(ctx.run, round) or 0
    out = UpdateSet({}, {}, offset - 1)
    for rec in ctx.transport.read_log(from_offset=offset, round=round):
        out.last_offset = max(out.last_offset, rec.offset)
        try:
            msg = decode_message(rec.body, ctx.limits, kinds=(ClientUpdate, ServerUpdate))
        except Exception as exc:  # a bad record in the log cannot be used; it is skipped, not fatal
            out.skipped[rec.offset] = f"malformed: {exc}"
            msg_id = _peek_own(rec, _namespace(ctx))
            if msg_id is not None:
                out.unusable.setdefault(msg_id, f"malformed: {exc}"[:300])
            ctx.log.warning("update log offset %d: unusable record (%s)", rec.offset, exc)
            continue
        if msg.run != ctx.run or msg.round != round:
            continue
        why = _unusable_record(rec, msg, out, _namespace(ctx))
        if why is not None:
            out.skipped[rec.offset] = why
            ctx.log.warning("update log offset %d: record skipped (%s)", rec.offset, why)
            continue
        (out.clients if isinstance(msg, ClientUpdate) else out.server)[msg.msg_id] = msg
    return out


class MissingUpdates(Reject):
    """A job refused because updates of members are not in the log; `missing`: member -> the update it named."""

    def __init__(self, reason: str, missing: dict[int, str]):
        super().__init__(reason)
        self.missing = missing


def _member_states(layout: StateLayout, job: AggregateJob, updates: UpdateSet, server_state) -> dict[int, Any]:
    """Each member's full state, or the reason it has none usable."""
    states: dict[int, Any] = {}
    missing: dict[int, str] = {}
    for c in job.members:
        uid = job.update_ids.get(str(c))
        upd = updates.clients.get(uid) if uid else None
        if upd is None and uid in updates.unusable:
            states[c] = f"bad_update: update {uid}: {updates.unusable[uid]}"
        elif upd is None:
            # Not read (yet): a stream read may end early, so this is no proof of absence. The job is refused, the
            # refusal recorded in the ledger, and the coordinator queues the job again; after a few refusals it plans
            # the round again without that member (coordinator_jobs.py; docs/security.md).
            missing[c] = str(uid)
        elif upd.client != c:
            states[c] = f"bad_update: update {uid} is from client {upd.client}, not {c}"
        else:
            try:
                states[c] = member_full_state(layout, CutBits.parse(upd.cuts[0]), upd.state, server_state)
            except (ValueError, IndexError) as exc:
                states[c] = f"bad_update: {exc}"
    if missing:
        raise MissingUpdates(
            "missing_update: "
            + "; ".join(
                f"client {c}'s update {uid} of round {job.round} is not in the log" for c, uid in missing.items()
            ),
            missing,
        )
    return states


def screen_job(ctx: RoleContext, job: AggregateJob, updates: UpdateSet) -> tuple[dict[str, torch.Tensor], Screened]:
    """The job's weighted average of the full G and D (canonical names) from the logged updates, after screening
    the members (federation/robust.py: unusable ones dropped, outsized ones clipped). The model is empty when no
    member is usable (the job's clients keep their models)."""
    layout = StateLayout.from_config(ctx.cfg.model)
    server_id = job.update_ids.get("server")
    if server_id is None or server_id not in updates.server:
        raise Reject(f"missing_update: the server's update {server_id} of round {job.round} is not in the log")
    if len(job.members) != len(job.weights) or not job.members:
        raise Reject("malformed: members and weights differ in length or are empty")
    server_state = updates.server[server_id].state
    screened = screen_members(job.members, job.weights, _member_states(layout, job, updates, server_state))
    if not screened.members:
        return {}, screened
    return weighted_average(screened.states, list(screened.weights)), screened


def compute_job(ctx: RoleContext, job: AggregateJob, updates: UpdateSet) -> dict[str, torch.Tensor]:
    """The model an aggregator computes for `job` (replay and a restarted coordinator recompute it)."""
    return screen_job(ctx, job, updates)[0]


class AggregatorRole(Role):
    accepts = (AggregateJob,)
    no_grad = True

    def __init__(self, ctx: RoleContext, index: int = 0):
        super().__init__(ctx)
        self.name = f"aggregator.{index}"
        self.arch = architecture(ctx.cfg.model)
        self.jobs_done = 0
        self.hold: tuple[int, float] | None = None  # test hook: (round, seconds), see the module docstring
        self.sleep = time.sleep

    def addresses(self) -> list[str]:
        return [AGGREGATE]

    def on_message(self, msg: Message) -> None:
        assert isinstance(msg, AggregateJob)
        if msg.sender != "coordinator":
            raise Reject(f"bad_sender: jobs come from the coordinator, not {msg.sender!r}")
        if len(msg.cuts) != len(msg.recipients):
            raise Reject("malformed: one cut assignment per recipient is required")
        store, run = self.ctx.store, self.ctx.run
        recorded_job = store.get_docs(run, msg.round).get(job_name(msg.cluster))
        if recorded_job is None or json.loads(recorded_job) != json.loads(job_document(msg)):
            raise Reject(f"unknown_job: round {msg.round} cluster {msg.cluster} is not a job the coordinator recorded")
        updates = read_round_updates(self.ctx, msg.round)
        known = {*updates.clients, *updates.server, *updates.unusable}
        if any(uid not in known for uid in msg.update_ids.values()):
            # A stream read can end early (a busy broker or host): read once more before refusing the job.
            updates = read_round_updates(self.ctx, msg.round)
        try:
            model, screened = screen_job(self.ctx, msg, updates)
        except MissingUpdates as exc:
            self._record_refusal(msg, exc)
            raise
        self._record_screening(msg, screened)
        digest = state_digest(model)
        if not store.set_model_digest(run, msg.round, msg.cluster, digest):
            recorded = store.get_model_digests(run, msg.round).get(msg.cluster)
            if recorded != digest:  # a redelivered job must reproduce the recorded model exactly
                raise Reject(f"digest_mismatch: round {msg.round} cluster {msg.cluster}: {digest} != {recorded}")
        store.set_log_offset(run, msg.round + 1, updates.last_offset + 1)
        if self.hold is not None and self.hold[0] == msg.round:
            self.ctx.log.warning(
                "%s: test hook: holding job %s (round %d cluster %d) for %.1f s",
                self.name,
                msg.msg_id,
                msg.round,
                msg.cluster,
                self.hold[1],
            )
            self.sleep(self.hold[1])
        env = self.envelope(msg.round)
        if not model:
            self.ctx.log.warning("%s: round %d cluster %d: no usable update", self.name, msg.round, msg.cluster)
        elif msg.cluster < 0:
            self.send(SERVER, ServerModel(**env, state=server_layers(self.arch, model)))
        else:
            for c, bits in zip(msg.recipients, msg.cuts):
                self.send(
                    client_address(c),
                    ModelAssignment(
                        **env, client=c, cluster=msg.cluster, state=client_layers(self.arch, CutBits(*bits), model)
                    ),
                )
        self.send(
            COORDINATOR,
            AggregateDone(
                **env,
                cluster=msg.cluster,
                members=screened.members,
                digest=digest,
                state=model,
                seen_updates=tuple(sorted(updates.clients) + sorted(updates.server)),
            ),
        )
        self.jobs_done += 1
        self.ctx.metrics.aggregation_job("done")

    def _record_refusal(self, job: AggregateJob, exc: MissingUpdates) -> None:
        """The coordinator counts these refusals (ledger `refused.<k>`): after a few it plans the round again without
        the members named here. Competing aggregators may undercount by a race; never overcount a job's refusals."""
        store, run, name = self.ctx.store, self.ctx.run, ledger.refused_name(job.cluster)
        prev = store.get_docs(run, job.round).get(name)
        count = 1
        if prev:
            doc = json.loads(prev)
            count = int(doc.get("count", 0)) + 1 if doc.get("job") == job.msg_id else 1
        missing = {str(c): uid for c, uid in exc.missing.items()}
        doc = {"job": job.msg_id, "missing": missing, "count": count, "reason": exc.reason[:500]}
        store.put_doc(run, job.round, name, json.dumps(doc, sort_keys=True))

    def _record_screening(self, job: AggregateJob, screened: Screened) -> None:
        """Members left out of the job or clipped, with why, in the ledger (`hfgan status` shows them)."""
        store, run, now = self.ctx.store, self.ctx.run, self.ctx.clock()
        for c, why in sorted(screened.dropped.items()):
            self.ctx.log.warning(
                "%s: round %d cluster %d: client %d left out: %s", self.name, job.round, job.cluster, c, why
            )
            store.mark_client(run, job.round, c, "rejected", f"update not averaged: {why}", now)
        discarded = {
            job.update_ids[str(c)]: f"client {c}: {why}"
            for c, why in screened.dropped.items()
            if str(c) in job.update_ids
        }
        ledger.add_discarded(store, run, job.round, discarded)
        for c, keys in sorted(screened.clipped.items()):
            why = (
                f"update clipped to {CLIP_MULTIPLE:g}x its peers' median norm in {len(keys)} tensor(s), e.g. {keys[0]}"
            )
            self.ctx.log.warning("%s: round %d cluster %d: client %d %s", self.name, job.round, job.cluster, c, why)
            store.mark_client(run, job.round, c, "clipped", why, now)


def job_document(job: AggregateJob) -> str:
    """The ledger's record of a job (what replay needs to redo it)."""
    return json.dumps(
        {
            "cluster": job.cluster,
            "members": list(job.members),
            "weights": list(job.weights),
            "recipients": list(job.recipients),
            "cuts": [list(c) for c in job.cuts],
            "update_ids": dict(job.update_ids),
            "msg_id": job.msg_id,
        },
        sort_keys=True,
    )
