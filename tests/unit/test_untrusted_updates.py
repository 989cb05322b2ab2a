"""Aggregation trusts nothing a client says about itself (docs/security.md):

- the screening rule (federation/robust.py) by hand: a non-finite member is dropped and the others reweighted, an
  outsized tensor is clipped to C times the median of the other members' norms, honest members are untouched;
- in a run (memory transport and store): a client whose update has 1e6 times the median norm moves its cluster's
  model by no more than the documented bound; a NaN update is left out with its reason in the ledger and the round
  finishes; a client that names an update it never logged is planned out of the round after a bounded number of
  refused jobs, the others weighted as if it had not reported; the weight is the admitted sample count, never the
  reported one; a second report is refused;
- the update log: records whose publisher may not speak for their sender, junk records and a repeated msg_id are
  skipped with a reason and never replace a good record.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

import pytest
import torch

from hfgan_core.config import DomainConfig, RunConfig, RuntimeConfig, ScenarioConfig, TrainConfig
from hfgan_core.data import TensorClientData
from hfgan_core.data.partition import shard_cap
from hfgan_core.federation import StateLayout, member_full_state, weighted_average
from hfgan_core.federation.robust import CLIP_MULTIPLE, clip_to_peers, screen_members
from hfgan_core.model import CutBits
from hfgan_core.protocol import (
    ClientUpdate,
    ClusterResult,
    Join,
    RoundDone,
    ServerRoundDone,
    ServerUpdate,
    WireError,
)
from hfgan_core.protocol import decode as decode_message
from hfgan_core.runtime import ledger
from hfgan_core.runtime.aggregator import read_round_updates
from hfgan_core.runtime.coordinator import CoordinatorRole
from hfgan_core.runtime.coordinator_jobs import MAX_MISSING_REFUSALS
from hfgan_core.runtime.embedded import EmbeddedRunner
from hfgan_core.runtime.host import Reject, RoleContext
from hfgan_core.state import MemoryRoundStore
from hfgan_core.transport import MemoryTransport

RUN = "untrusted"


# ------------------------------------------------------------------------------------------ the rule by hand
def test_a_non_finite_member_is_dropped_and_the_others_reweighted():
    a, b, c = ({"w": torch.full((2,), v)} for v in (1.0, 2.0, float("nan")))
    s = screen_members((0, 1, 2), (0.2, 0.3, 0.5), {0: a, 1: b, 2: c})
    assert s.members == (0, 1)
    assert s.weights == pytest.approx((0.4, 0.6), abs=1e-15)
    assert s.dropped == {2: "non_finite: w has NaN or infinite values"}
    assert s.clipped == {}


def test_a_member_with_a_reason_instead_of_a_state_is_dropped_with_it():
    s = screen_members((0, 1), (0.5, 0.5), {0: {"w": torch.ones(2)}, 1: "bad_update: wrong shape"})
    assert s.members == (0,) and s.weights == (1.0,)
    assert s.dropped == {1: "bad_update: wrong shape"}
    none = screen_members((1,), (1.0,), {1: "missing_update: gone"})
    assert none.members == () and none.states == []


def test_an_outsized_tensor_is_clipped_to_c_times_the_median_of_the_others():
    # Norms of "w": 3, 4, 5 (vectors [3,0], [0,4], [5,0]) and 1000 for member 3. Member 3's bound: 10 * median(3, 4, 5)
    # = 40, so it is scaled by 40 / 1000. Members 0-2 are within 10x of their peers' medians: untouched (same objects).
    states = {
        0: {"w": torch.tensor([3.0, 0.0], dtype=torch.float64)},
        1: {"w": torch.tensor([0.0, 4.0], dtype=torch.float64)},
        2: {"w": torch.tensor([5.0, 0.0], dtype=torch.float64)},
        3: {"w": torch.tensor([0.0, 1000.0], dtype=torch.float64)},
    }
    out, clipped = clip_to_peers(states, CLIP_MULTIPLE)
    assert clipped == {3: ["w"]}
    assert torch.equal(out[3]["w"], torch.tensor([0.0, 40.0], dtype=torch.float64))
    assert all(out[c]["w"] is states[c]["w"] for c in range(3))


def test_honest_members_of_similar_norms_are_not_clipped_and_average_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    states = {c: {"w": torch.randn(50, generator=g) * (1 + 0.5 * c)} for c in range(3)}
    s = screen_members((0, 1, 2), (0.25, 0.25, 0.5), states)
    assert s.clipped == {} and s.dropped == {}
    assert s.weights == (0.25, 0.25, 0.5)
    plain = weighted_average([states[c] for c in range(3)], [0.25, 0.25, 0.5])
    assert torch.equal(weighted_average(s.states, list(s.weights))["w"], plain["w"])


def _bound(w_i: float, others: list[float]) -> float:
    """The documented bound on how far member i moves the job's model from the others' weighted average."""
    return w_i * (CLIP_MULTIPLE * statistics.median(others) + max(others))


# ---------------------------------------------------------------------------------------------------- a run
def _cfg(clients: int = 3, rounds: int = 1) -> RunConfig:
    return RunConfig(
        scenario=ScenarioConfig(domains=(DomainConfig("synthetic", clients, samples_per_client=16),)),
        train=TrainConfig(rounds=rounds, local_epochs=1, steps_per_epoch=1, batch_size=8, cuts=((1, 1, 1, 1),)),
        runtime=RuntimeConfig(),
    ).validate()


def _runner(cfg: RunConfig, poison=None, bad: int = 2) -> EmbeddedRunner:
    runner = EmbeddedRunner(
        cfg, [TensorClientData.random(16, i) for i in range(cfg.scenario.total_clients)], [0] * 3, run_id=RUN
    )
    if poison is not None:
        client = runner.clients[bad]
        honest = client.log_update

        def poisoned(body: bytes, round: int, kind: str) -> None:
            upd = decode_message(body, kinds=(ClientUpdate,))
            honest(dataclasses.replace(upd, state={k: poison(v) for k, v in upd.state.items()}).encode(), round, kind)

        client.log_update = poisoned
    return runner


def _logged(runner: EmbeddedRunner, round: int = 1):
    clients, server = {}, None
    for rec in runner.transport.read_log(round=round):
        try:
            msg = decode_message(rec.body, kinds=(ClientUpdate, ServerUpdate))
        except WireError:  # the NaN update: the decoder refuses it
            continue
        if isinstance(msg, ClientUpdate):
            clients[msg.client] = msg
        else:
            server = msg
    return clients, server


def test_a_client_whose_update_has_a_million_times_the_median_norm_moves_its_cluster_by_at_most_the_bound():
    cfg = _cfg()
    runner = _runner(cfg, poison=lambda t: t * 1e6 if t.is_floating_point() else t)
    report = runner.run().reports[-1]
    assert report.aggregated and report.arrived == [0, 1, 2]
    marks = runner.store.round_clients(RUN, 1)
    assert marks[2].state == "clipped" and "clipped to 10x" in marks[2].reason
    assert marks[0].state == "arrived" and marks[1].state == "arrived"

    layout = StateLayout.from_config(cfg.model)
    clients, server = _logged(runner)
    full = {c: member_full_state(layout, CutBits.parse(u.cuts[0]), u.state, server.state) for c, u in clients.items()}
    w = report.weights[0]
    rest = math.fsum(w[c] for c in (0, 1))
    others = weighted_average([full[0], full[1]], [w[0] / rest, w[1] / rest])
    model = report.cluster_models[0]
    moved_some = False
    for key, a in model.items():
        if not a.is_floating_point():
            continue
        norms = [float(torch.linalg.vector_norm(full[c][key].double())) for c in (0, 1)]
        dist = float(torch.linalg.vector_norm(a.double() - others[key].double()))
        assert dist <= _bound(w[2], norms) * (1 + 1e-5) + 1e-6, key
        # Unclipped, the attacker alone would have moved it by w_2 * ||x_2|| (about 1e6 times the others' norms).
        raw = float(torch.linalg.vector_norm(full[2][key].double()))
        if raw > 1e3 * max(norms) > 0:
            moved_some = True
            assert dist < 1e-3 * w[2] * raw
    assert moved_some


def test_a_nan_update_is_left_out_with_its_reason_and_the_round_finishes():
    cfg = _cfg()
    runner = _runner(cfg, poison=lambda t: torch.full_like(t, float("nan")) if t.is_floating_point() else t)
    report = runner.run().reports[-1]
    assert report.aggregated
    marks = runner.store.round_clients(RUN, 1)
    assert marks[2].state == "rejected" and "non_finite" in marks[2].reason
    docs = ledger.RoundDocs.read(runner.store, RUN, 1)
    assert any("non_finite" in why for why in docs.discarded.values())
    # The model is the others' average, their weights renormalised.
    layout = StateLayout.from_config(cfg.model)
    clients, server = _logged(runner)
    full = {
        c: member_full_state(layout, CutBits.parse(clients[c].cuts[0]), clients[c].state, server.state) for c in (0, 1)
    }
    w = report.weights[0]
    rest = math.fsum(w[c] for c in (0, 1))
    expected = weighted_average([full[0], full[1]], [w[0] / rest, w[1] / rest])
    assert all(torch.equal(report.cluster_models[0][k], expected[k]) for k in expected)


def test_a_client_naming_an_update_it_never_logged_is_planned_out_after_bounded_refusals():
    # Before, the aggregators refused the job as `missing_update` and the coordinator queued it again forever.
    cfg = _cfg(rounds=2)
    runner = _runner(cfg)
    runner.clients[2].log_update = lambda body, round, kind: None  # reports an update that never reaches the log
    result = runner.run()
    assert [r.aggregated for r in result.reports] == [True, True]
    for r in (1, 2):
        marks = runner.store.round_clients(RUN, r)
        assert marks[2].state == "rejected" and "missing_update" in marks[2].reason, marks[2]
        assert marks[0].state == marks[1].state == "arrived"
        docs = ledger.RoundDocs.read(runner.store, RUN, r)
        refused = json.loads(docs.raw[ledger.refused_name(0)])
        assert refused["count"] == MAX_MISSING_REFUSALS and set(refused["missing"]) == {"2"}
        # Planned again as if client 2 had not reported: 0 and 1 with their admitted 16 samples each; client 2
        # still loads its cluster's model; its named update is discarded with the reason.
        assert docs.jobs[0]["members"] == [0, 1] and docs.jobs[0]["weights"] == [0.5, 0.5]
        assert docs.jobs[0]["recipients"] == [0, 1, 2] and docs.jobs[-1]["members"] == [0, 1]
        assert set(docs.aggs) == set(docs.jobs)
        assert "missing_update" in docs.discarded[docs.done[2]["update_digest"]]
        clients, server = _logged(runner, r)
        assert sorted(clients) == [0, 1]
        layout = StateLayout.from_config(cfg.model)
        full = [
            member_full_state(layout, CutBits.parse(clients[c].cuts[0]), clients[c].state, server.state) for c in (0, 1)
        ]
        expected = weighted_average(full, [0.5, 0.5])
        model = result.reports[r - 1].cluster_models[0]
        assert all(torch.equal(model[k], expected[k]) for k in expected)


def _coordinator(cfg: RunConfig) -> CoordinatorRole:
    ctx = RoleContext(run=RUN, cfg=cfg, transport=MemoryTransport(), store=MemoryRoundStore())
    role = CoordinatorRole(ctx, planner=lambda profiles: [(1, 1, 1, 1)] * len(profiles))
    role.start()
    return role


def test_the_replan_keeps_unchanged_jobs_and_removes_the_job_of_a_cluster_left_empty():
    # Client 2 is alone in cluster 1 and its named update never reaches the log: after 3 refusals of its jobs the
    # round is planned again without it. Cluster 0's job (already done) stands, cluster 1's job is withdrawn from the
    # ledger (client 2 keeps its model), the global job is recorded again under a new msg_id without client 2.
    cfg = _cfg()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, kld_from_round=1))
    role = _coordinator(cfg)
    run, store = RUN, role.ctx.store
    for c in range(3):
        role.on_message(Join(run=run, round=0, sender=f"client.{c}", client=c, domain=0, n_samples=16, profile={}))
    for c in range(3):
        role.on_message(
            RoundDone(
                run=run, round=1, sender=f"client.{c}", client=c, n_samples=16, steps_done=1,
                update_digest=f"u{c}", metrics={},
            )
        )  # fmt: skip
    scores = {"0": 0.0, "1": 0.0, "2": 0.0}
    role.on_message(
        ClusterResult(
            run=run, round=1, sender="clustering", assignment={"0": 0, "1": 0, "2": 1}, kld_intra=scores,
            kld_global=scores, k=2,
        )
    )  # fmt: skip
    role.on_message(ServerRoundDone(run=run, round=1, sender="server", steps_done=1, update_digest="s", metrics={}))
    assert role.phase == "aggregating" and set(role.jobs) == {0, 1, -1}
    before = dict(role.jobs)
    role.results[0] = object()  # cluster 0's job is done already
    for k in (1, -1):
        doc = {"job": role.jobs[k].msg_id, "missing": {"2": "u2"}, "count": MAX_MISSING_REFUSALS, "reason": "x"}
        store.put_doc(run, 1, ledger.refused_name(k), json.dumps(doc))
    role.tick(role.ctx.clock() + 1.0)
    assert set(role.jobs) == {0, -1} and role.jobs[0] is before[0]
    assert role.jobs[-1].msg_id != before[-1].msg_id and role.jobs[-1].members == (0, 1)
    assert role.jobs[-1].weights == (0.5, 0.5)
    docs = ledger.RoundDocs.read(store, run, 1)
    assert set(docs.jobs) == {0, -1} and docs.jobs[-1]["msg_id"] == role.jobs[-1].msg_id
    assert store.round_clients(run, 1)[2].state == "rejected"
    assert "missing_update" in docs.discarded["u2"]


def test_a_refused_job_is_queued_again_at_once_until_the_bound():
    role = _coordinator(_cfg())
    for c in range(3):
        role.on_message(Join(run=RUN, round=0, sender=f"client.{c}", client=c, domain=0, n_samples=16, profile={}))
    for c in range(3):
        role.on_message(
            RoundDone(
                run=RUN, round=1, sender=f"client.{c}", client=c, n_samples=16, steps_done=1,
                update_digest=f"u{c}", metrics={},
            )
        )  # fmt: skip
    role.on_message(ServerRoundDone(run=RUN, round=1, sender="server", steps_done=1, update_digest="s", metrics={}))
    job = role.jobs[0]
    sent: list = []
    role.send = lambda address, msg: sent.append((address, msg))
    now = role.ctx.clock()
    for count in range(1, MAX_MISSING_REFUSALS):
        doc = {"job": job.msg_id, "missing": {"1": "u1"}, "count": count, "reason": "x"}
        role.ctx.store.put_doc(RUN, 1, ledger.refused_name(0), json.dumps(doc))
        now += 2.0  # past the next read of the refusal records (REFUSALS_POLL_S)
        role.tick(now)
        assert [m.msg_id for _, m in sent] == [job.msg_id] * count, count  # queued again at once, the same job
        role.tick(now + 0.6)
        assert len(sent) == count  # a refusal already seen is not counted twice
    assert role.jobs[0] is job and not role._excluded
    # A refusal naming a member whose update the job does not name is not believed.
    doc = {"job": job.msg_id, "missing": {"2": "other"}, "count": MAX_MISSING_REFUSALS, "reason": "x"}
    role.ctx.store.put_doc(RUN, 1, ledger.refused_name(0), json.dumps(doc))
    role.tick(now + 4.0)
    assert role.jobs[0] is job and not role._excluded


def test_the_weight_is_the_admitted_sample_count_never_the_reported_one():
    cfg = _cfg()
    role = _coordinator(cfg)
    claims = {0: 2**62, 1: 10, 2: 0}
    role.on_message(Join(run=RUN, round=0, sender="client.0", client=0, domain=0, n_samples=claims[0], profile={}))
    role.on_message(Join(run=RUN, round=0, sender="client.1", client=1, domain=0, n_samples=claims[1], profile={}))
    with pytest.raises(Reject, match="^malformed"):
        role.on_message(Join(run=RUN, round=0, sender="client.2", client=2, domain=0, n_samples=0, profile={}))
    with pytest.raises(Reject, match="^malformed"):  # the scenario puts client 2 in domain 0
        role.on_message(Join(run=RUN, round=0, sender="client.2", client=2, domain=1, n_samples=8, profile={}))
    role.on_message(Join(run=RUN, round=0, sender="client.2", client=2, domain=0, n_samples=6, profile={}))
    assert shard_cap(cfg.scenario, 0) == 16
    assert {c: m.n_samples for c, m in role.members.items()} == {0: 16, 1: 10, 2: 6}
    # Reports that lie about the count change nothing: the jobs weight 16 : 10 : 6.
    for c in range(3):
        role.on_message(
            RoundDone(
                run=RUN,
                round=1,
                sender=f"client.{c}",
                client=c,
                n_samples=[2**62, 0, 1][c],
                steps_done=1,
                update_digest=f"u{c}",
                metrics={},
            )
        )
    role.on_message(ServerRoundDone(run=RUN, round=1, sender="server", steps_done=1, update_digest="s", metrics={}))
    assert role.jobs[0].weights == (16 / 32, 10 / 32, 6 / 32)


def test_a_second_report_for_the_same_round_is_refused():
    role = _coordinator(_cfg())
    for c in range(3):
        role.on_message(Join(run=RUN, round=0, sender=f"client.{c}", client=c, domain=0, n_samples=16, profile={}))
    first = RoundDone(
        run=RUN, round=1, sender="client.0", client=0, n_samples=16, steps_done=1, update_digest="a", metrics={}
    )
    role.on_message(first)
    role.on_message(first)  # the same message redelivered: taken as the duplicate it is
    with pytest.raises(Reject, match="^duplicate"):
        role.on_message(dataclasses.replace(first, msg_id="other", update_digest="b"))
    assert role.done[0].update_digest == "a"
    assert role.ctx.store.round_clients(RUN, 1)[0].state == "arrived"


# ------------------------------------------------------------------------------------------------ update log
def _update(client: int, sender: str | None = None, value: float = 1.0, msg_id: str | None = None) -> ClientUpdate:
    kw = {"msg_id": msg_id} if msg_id else {}
    return ClientUpdate(
        run=RUN,
        round=1,
        sender=sender or f"client.{client}",
        client=client,
        cuts=((0, 0, 0, 0),),
        n_samples=16,
        state={"G.0.w": torch.full((2,), value)},
        **kw,
    )


def test_the_update_log_uses_only_records_their_publisher_may_speak_for():
    ctx = RoleContext(run=RUN, cfg=_cfg(), transport=MemoryTransport(), store=MemoryRoundStore())
    log = ctx.transport

    def append(publisher, body):
        log.user = publisher
        log.append_log(body, round=1)

    good = _update(0)
    append("client-0", good.encode())
    append("client-1", _update(0).encode())  # client 1 logs an update in client 0's name
    append("client-1", _update(0, sender="client.1").encode())  # ... or claims to be client 0 in the body only
    append("client-0", dataclasses.replace(good, state={"G.0.w": torch.zeros(2)}).encode())  # same msg_id again
    append("client-1", b"\x00junk")
    append("client-1", _update(1).encode())
    updates = read_round_updates(ctx, 1)
    assert set(updates.clients) == {good.msg_id, *(u for u in updates.clients if updates.clients[u].client == 1)}
    assert torch.equal(updates.clients[good.msg_id].state["G.0.w"], torch.ones(2))  # the first one stays
    reasons = [r.split(":", 1)[0] for _, r in sorted(updates.skipped.items())]
    assert reasons == ["forged_sender", "forged_sender", "duplicate", "malformed"]
