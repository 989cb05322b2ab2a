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

import torch

from ..federation import client_layers, member_full_state, server_layers, state_digest, weighted_average
from ..model import CutBits, architecture
from ..protocol import AggregateDone, AggregateJob, ClientUpdate, Message, ModelAssignment, ServerModel, ServerUpdate
from ..protocol import decode as decode_message
from ..transport import AGGREGATE, COORDINATOR, SERVER, client_address
from .host import Reject, Role, RoleContext
from .ledger import job_name


class UpdateSet:
    """The updates of one round read from the log, indexed by msg_id."""

    def __init__(self, clients: dict[str, ClientUpdate], server: dict[str, ServerUpdate], last_offset: int):
        self.clients = clients
        self.server = server
        self.last_offset = last_offset


def read_round_updates(ctx: RoleContext, round: int) -> UpdateSet:
    offset = ctx.store.get_log_offset(ctx.run, round) or 0
    clients: dict[str, ClientUpdate] = {}
    server: dict[str, ServerUpdate] = {}
    last = offset - 1
    for rec in ctx.transport.read_log(from_offset=offset, round=round):
        last = max(last, rec.offset)
        try:
            msg = decode_message(rec.body, ctx.limits, kinds=(ClientUpdate, ServerUpdate))
        except Exception as exc:  # a bad record in the log cannot be used; it is skipped, not fatal
            ctx.log.warning("update log offset %d: unusable record (%s)", rec.offset, exc)
            continue
        if msg.run != ctx.run or msg.round != round:
            continue
        (clients if isinstance(msg, ClientUpdate) else server)[msg.msg_id] = msg
    return UpdateSet(clients, server, last)


def compute_job(ctx: RoleContext, job: AggregateJob, updates: UpdateSet) -> dict[str, torch.Tensor]:
    """The job's weighted average of the full G and D (canonical names), from the logged updates."""
    arch = architecture(ctx.cfg.model)
    server_id = job.update_ids.get("server")
    if server_id is None or server_id not in updates.server:
        raise Reject(f"missing_update: the server's update {server_id} of round {job.round} is not in the log")
    server_state = updates.server[server_id].state
    if len(job.members) != len(job.weights) or not job.members:
        raise Reject("malformed: members and weights differ in length or are empty")
    states = []
    for c in job.members:
        uid = job.update_ids.get(str(c))
        upd = updates.clients.get(uid) if uid else None
        if upd is None:
            raise Reject(f"missing_update: client {c}'s update {uid} of round {job.round} is not in the log")
        if upd.client != c:
            raise Reject(f"bad_update: update {uid} is from client {upd.client}, not {c}")
        try:
            states.append(member_full_state(arch, CutBits.parse(upd.cuts[0]), upd.state, server_state))
        except ValueError as exc:
            raise Reject(f"bad_update: client {c}: {exc}") from None
    return weighted_average(states, list(job.weights))


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
        model = compute_job(self.ctx, msg, updates)
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
        if msg.cluster < 0:
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
                members=msg.members,
                digest=digest,
                state=model,
                seen_updates=tuple(sorted(updates.clients) + sorted(updates.server)),
            ),
        )
        self.jobs_done += 1
        self.ctx.metrics.aggregation_job("done")


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
