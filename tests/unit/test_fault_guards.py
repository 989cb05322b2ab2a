"""What the roles refuse, and what they survive, found by the fault-injection tests (tests/e2e/test_faults.py) and
pinned here without a broker: each check runs a role on the memory transport and store.

- a client rejects a model assignment of wrong shapes before it changes anything it holds;
- a client's emulated delay multiplies the step's compute only, not the set-up that ran before the step;
- the coordinator refuses a round report for a round that has not started without a ledger mark, a clustering
  result about clients the run does not have, and an aggregation result whose model is not the recorded one;
- the coordinator aggregates a round in which an arrived client has no KLD score (instead of failing);
- the clustering service refuses summaries of another round; aggregators refuse jobs the ledger does not record.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from hfgan_core.config import DomainConfig, RunConfig, RuntimeConfig, ScenarioConfig, TrainConfig
from hfgan_core.data import TensorClientData
from hfgan_core.federation import state_digest
from hfgan_core.model import CutBits, architecture, canonical_state
from hfgan_core.protocol import (
    ActivationSummaries,
    AggregateDone,
    AggregateJob,
    ClusterResult,
    Join,
    ModelAssignment,
    RoundDone,
    RoundStart,
    WireError,
)
from hfgan_core.runtime import ledger
from hfgan_core.runtime.aggregator import AggregatorRole, job_document
from hfgan_core.runtime.client import ClientRole
from hfgan_core.runtime.clustering import ClusteringRole
from hfgan_core.runtime.coordinator import CoordinatorRole
from hfgan_core.runtime.embedded import EmbeddedRunner
from hfgan_core.runtime.host import Reject, RoleContext
from hfgan_core.state import MemoryRoundStore
from hfgan_core.transport import MemoryTransport

RUN = "guards"


def _cfg(clients: int = 3, rounds: int = 1, **train) -> RunConfig:
    return RunConfig(
        scenario=ScenarioConfig(domains=(DomainConfig("synthetic", clients),)),
        train=TrainConfig(
            rounds=rounds,
            local_epochs=1,
            steps_per_epoch=1,
            batch_size=8,
            cuts=((0, 0, 0, 0), (1, 1, 1, 1), (1, 0, 1, 0)),
            **train,
        ),
        runtime=RuntimeConfig(),
    ).validate()


def _ctx(cfg: RunConfig | None = None) -> RoleContext:
    return RoleContext(run=RUN, cfg=cfg or _cfg(), transport=MemoryTransport(), store=MemoryRoundStore())


def _client(delay=None) -> ClientRole:
    return ClientRole(_ctx(), client=0, domain=0, data=TensorClientData.random(16, 0), delay=delay)


def _start(participants=(0,)) -> RoundStart:
    return RoundStart(
        run=RUN,
        round=1,
        sender="coordinator",
        participants=participants,
        cuts=((0, 0, 0, 0), (1, 1, 1, 1), (1, 0, 1, 0)),
        steps=1,
        deadline=time.time() + 600,
    )


# ------------------------------------------------------------------------------------------------- client
def test_a_model_assignment_of_wrong_shapes_changes_nothing_the_client_holds():
    client = _client()
    client.on_message(_start(participants=(1,)))  # round 1 without client 0: it now holds its blocks for 0000
    before = {k: v.clone() for k, v in client.holder.state().items()}
    held = client.holder.held()
    # Keys of the blocks a client holds with cut bits 1111, every tensor of the wrong shape.
    arch, full = architecture(client.ctx.cfg.model), client._full
    keys = [
        k
        for spec in arch.nets
        for k in canonical_state(
            spec.name, {i: full[spec.name][i] for i in spec.client_blocks(*CutBits(1, 1, 1, 1).for_net(spec.name))}
        )
    ]
    bad = ModelAssignment(
        run=RUN, round=1, sender="aggregator.0", client=0, cluster=0, state={k: torch.zeros(2, 3) for k in keys}
    )
    with pytest.raises(WireError, match="bad_shape"):
        client.on_message(bad)
    assert client.cuts == CutBits(0, 0, 0, 0) and client.holder.held() == held
    after = client.holder.state()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    # The same keys with the right shapes are a valid assignment: the client then holds the 1111 blocks.
    good = ModelAssignment(
        run=RUN,
        round=1,
        sender="aggregator.0",
        client=0,
        cluster=0,
        state={
            k: torch.ones_like(v)
            for spec in arch.nets
            for k, v in canonical_state(spec.name, {i: full[spec.name][i] for i in spec.client_blocks(1, 1)}).items()
        },
    )
    client.on_message(good)
    assert client.cuts == CutBits(1, 1, 1, 1) and set(client.holder.state()) == set(keys)


def test_the_emulated_delay_measures_the_step_not_what_ran_before_it():
    seen = {}

    def delay(role, segment):
        seen.setdefault(segment, role._seg_t0)

    client = _client(delay=delay)
    ready = time.perf_counter()  # everything before this (building the role) is not the first segment's compute
    client.resume_round(_start())  # a restarted client rejoins its round outside any message handler
    assert seen["g_head_fwd"] >= ready


# ---------------------------------------------------------------------------------------------- coordinator
def _coordinator(clients: int = 3) -> CoordinatorRole:
    role = CoordinatorRole(_ctx(_cfg(clients)))
    role.start()
    for c in range(clients):
        role.on_message(Join(run=RUN, round=0, sender=f"client.{c}", client=c, domain=0, n_samples=16, profile={}))
    assert (role.round, role.phase) == (1, "training")
    return role


def test_a_round_report_for_a_round_not_started_leaves_no_ledger_mark():
    role = _coordinator()
    msg = RoundDone(
        run=RUN, round=9, sender="client.0", client=0, n_samples=16, steps_done=1, update_digest="u", metrics={}
    )
    with pytest.raises(Reject, match="^stale"):
        role.on_message(msg)
    assert role.ctx.store.round_clients(RUN, 9) == {}


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"assignment": {"0": 0, "7": 1}}, "malformed"),  # a client the run does not have
        ({"assignment": {"0": 0, "1": 5}}, "malformed"),  # a cluster id >= k
        ({"kld_global": {"0": 0.1, "x": 0.2}}, "malformed"),
        ({"k": 0}, "malformed"),
        ({"sender": "client.0"}, "bad_sender"),
    ],
)
def test_a_clustering_result_must_describe_the_runs_clients(change, reason):
    role = _coordinator()
    good = ClusterResult(
        run=RUN,
        round=1,
        sender="clustering",
        assignment={"0": 0, "1": 1, "2": 0},
        kld_intra={"0": 0.1, "1": 0.0, "2": 0.2},
        kld_global={"0": 0.1, "1": 0.3, "2": 0.2},
        k=2,
    )
    with pytest.raises(Reject, match=f"^{reason}"):
        role.on_message(dataclasses.replace(good, **change))
    assert role.cluster_result is None
    role.on_message(good)
    assert role.cluster_result == good


def test_an_aggregation_result_must_be_the_recorded_model():
    role = _coordinator()
    store = role.ctx.store
    role.phase = "aggregating"
    role.jobs = {
        0: AggregateJob(
            run=RUN,
            round=1,
            sender="coordinator",
            cluster=0,
            members=(0,),
            weights=(1.0,),
            recipients=(0,),
            cuts=((0, 0, 0, 0),),
            update_ids={"0": "a", "server": "b"},
        ),
        -1: AggregateJob(
            run=RUN,
            round=1,
            sender="coordinator",
            cluster=-1,
            members=(0,),
            weights=(1.0,),
            recipients=(),
            cuts=(),
            update_ids={"0": "a", "server": "b"},
        ),
    }
    model = {"G.0.w": torch.ones(3)}
    done = AggregateDone(
        run=RUN, round=1, sender="aggregator.0", cluster=0, members=(0,), digest=state_digest(model), state=model
    )
    with pytest.raises(Reject, match="^unrecorded"):
        role.on_message(done)  # no aggregator recorded this digest
    store.set_model_digest(RUN, 1, 0, done.digest)
    with pytest.raises(Reject, match="^digest_mismatch"):
        role.on_message(dataclasses.replace(done, state={"G.0.w": torch.zeros(3)}))  # not the model it claims
    role.on_message(done)
    assert 0 in role.results


@pytest.mark.slow
def test_a_round_aggregates_when_an_arrived_client_has_no_kld_score():
    """Client 1's real-data passes never reached the server (all its steps dropped): the clustering result has no
    score for it. The coordinator weights it like the least similar client instead of failing the round."""
    cfg = _cfg(rounds=2, kld_from_round=2, clusters=1)
    runner = EmbeddedRunner(cfg, [TensorClientData.random(16, i) for i in range(3)], [0, 0, 0], run_id=RUN)
    send = runner.clustering.send

    def without_client_1(address, msg):
        if isinstance(msg, ClusterResult):
            msg = dataclasses.replace(
                msg,
                kld_intra={k: v for k, v in msg.kld_intra.items() if k != "1"},
                kld_global={k: v for k, v in msg.kld_global.items() if k != "1"},
            )
        send(address, msg)

    runner.clustering.send = without_client_1
    result = runner.run()
    last = result.reports[-1]
    assert last.round == 2 and last.aggregated and last.arrived == [0, 1, 2]
    w = last.global_weights
    assert set(w) == {0, 1, 2} and w[1] == pytest.approx(min(w[0], w[2]))
    assert last.kld_global and "1" not in {str(c) for c in last.kld_global}


# ------------------------------------------------------------------------------------- clustering, aggregator
def test_the_clustering_service_takes_summaries_of_the_current_round_only():
    role = ClusteringRole(_ctx())
    role.ctx.store.init_run(RUN, "d", "{}")
    msg = ActivationSummaries(run=RUN, round=3, sender="server", summaries={"0": torch.rand(128, 7, 7)})
    with pytest.raises(Reject, match="^stale"):
        role.on_message(msg)
    assert role.results == 0


def test_aggregators_do_only_the_jobs_the_ledger_records():
    role = AggregatorRole(_ctx())
    job = AggregateJob(
        run=RUN,
        round=1,
        sender="coordinator",
        cluster=0,
        members=(0,),
        weights=(1.0,),
        recipients=(0,),
        cuts=((0, 0, 0, 0),),
        update_ids={"0": "a", "server": "b"},
    )
    with pytest.raises(Reject, match="^unknown_job"):
        role.on_message(job)
    role.ctx.store.put_doc(RUN, 1, ledger.job_name(0), job_document(job))
    forged = dataclasses.replace(job, weights=(0.5,))  # same msg_id, other content
    with pytest.raises(Reject, match="^unknown_job"):
        role.on_message(forged)
    with pytest.raises(Reject, match="^missing_update"):  # the recorded job gets to the update log
        role.on_message(job)
