"""The distributed runtime computes exactly what the embedded one does, through the real RabbitMQ and Redis.

- Same seeds, same config: every role in one process over memory:// vs over amqp:// + redis:// gives bit-identical
  model digests per round (and the same clusters). No tolerance is needed: the algorithm does not depend on
  delivery order across queues (the server batches a step's clients in sorted order, aggregation sums members in
  sorted order, clustering is seeded), so floating-point operations happen in the same order.
- A coordinator that crashes (mid-training, and mid-aggregation after one result was acknowledged) and is replaced
  by a new one that resumes from the ledger and its queue ends with the same digests as the uninterrupted run.
- Aggregation jobs that wait in their queue while no aggregator runs complete when one starts, with the same models.

Each test uses its own AMQP namespace (queues, exchanges, update log) and run id, and deletes them afterwards.
"""

from __future__ import annotations

import time
import uuid

import pytest

from hfgan_core.config import DomainConfig, RunConfig, RuntimeConfig, ScenarioConfig, TrainConfig
from hfgan_core.data import TensorClientData
from hfgan_core.runtime.aggregator import AggregatorRole
from hfgan_core.runtime.coordinator import CoordinatorRole
from hfgan_core.runtime.embedded import EmbeddedRunner
from hfgan_core.runtime.host import RoleContext, RoleHost
from hfgan_core.state import MemoryRoundStore, open_store
from hfgan_core.transport import COORDINATOR, SERVER, MemoryTransport, open_transport

from .conftest import new_namespace

CUTS = ((0, 0, 0, 0), (1, 1, 1, 1), (1, 0, 1, 0), (0, 1, 0, 1))
N_CLIENTS = 4
ROUNDS = 2


def make_cfg() -> RunConfig:
    # kld_from_round = 2 with 2 clusters: round 2 runs the clustering service and the KLD-weighted, per-cluster jobs.
    return RunConfig(
        scenario=ScenarioConfig(name="eq", domains=(DomainConfig("synthetic", N_CLIENTS),)),
        train=TrainConfig(
            rounds=ROUNDS, local_epochs=1, steps_per_epoch=2, batch_size=16, cuts=CUTS, kld_from_round=2, clusters=2
        ),
        runtime=RuntimeConfig(step_deadline_s=60.0, round_deadline_s=300.0),
    ).validate()


def datas() -> list[TensorClientData]:
    return [TensorClientData.random(96, 100 + i) for i in range(N_CLIENTS)]


def ledger_outcome(store, run: str) -> dict[int, tuple[dict[int, str], dict[int, int]]]:
    return {r: (store.get_model_digests(run, r), store.get_clusters(run, r)[0]) for r in range(1, ROUNDS + 1)}


@pytest.fixture(scope="module")
def baseline() -> dict:
    """The embedded run over memory://: the reference every distributed variant must reproduce."""
    store = MemoryRoundStore()
    runner = EmbeddedRunner(
        make_cfg(), datas(), [0] * N_CLIENTS, run_id="eq-memory", transport=MemoryTransport(), store=store
    )
    result = runner.run()
    assert len(result.reports) == ROUNDS
    outcome = ledger_outcome(store, "eq-memory")
    assert all(len(d) >= 2 for d, _ in outcome.values())  # cluster(s) and the global model, every round
    assert set(outcome[2][1].values()) == {0, 1}  # round 2 really has two clusters
    return outcome


@pytest.fixture
def backends(amqp_url, redis_url):
    namespace = new_namespace()
    transport = open_transport(amqp_url, namespace=namespace)
    store = open_store(redis_url)
    run = f"eq-{uuid.uuid4().hex[:12]}"
    yield transport, store, run
    try:
        transport.delete_topology(range(N_CLIENTS))
    finally:
        transport.close()
        store.delete_run(run)
        store.close()


class SimulatedCrash(BaseException):
    """Raised inside a delivery: the role dies with that message unacknowledged (the broker delivers it again)."""


def crash_after(role: CoordinatorRole, predicate) -> dict:
    """Make `role` die at the first message after `predicate(role)` became true."""
    state = {"armed": False, "crashed": False}
    original = role.on_message

    def on_message(msg):
        if state["armed"]:
            state["crashed"] = True
            raise SimulatedCrash()
        original(msg)
        if predicate(role):
            state["armed"] = True

    role.on_message = on_message
    return state


def pump(transport, roles, until, timeout: float = 180.0) -> None:
    """Deliver messages (ticking the roles when idle) until `until()`; SimulatedCrash propagates."""
    end = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < end, "the run stalled"
        if not transport.process(timeout=0.05):
            now = time.time()
            for role in roles():
                role.tick(now)


def test_amqp_and_redis_give_the_memory_digests(backends, baseline):
    transport, store, run = backends
    runner = EmbeddedRunner(make_cfg(), datas(), [0] * N_CLIENTS, run_id=run, transport=transport, store=store)
    result = runner.run()
    assert len(result.reports) == ROUNDS
    assert ledger_outcome(store, run) == baseline
    assert [r.digests for r in result.reports] == [baseline[r][0] for r in range(1, ROUNDS + 1)]
    assert transport.dead_letters() == []
    assert store.run_info(run)["status"] == "finished"


def test_a_restarted_coordinator_resumes_from_the_ledger(backends, baseline):
    transport, store, run = backends
    cfg = make_cfg()
    runner = EmbeddedRunner(cfg, datas(), [0] * N_CLIENTS, run_id=run, transport=transport, store=store)
    coordinators = [runner.coordinator]
    # First crash: round 1, two clients' reports recorded and acknowledged.
    crashes = [crash_after(runner.coordinator, lambda c: c.round == 1 and len(c.done) == 2)]

    def roles():
        return [coordinators[-1], runner.server, runner.clustering, *runner.aggregators, *runner.clients]

    transport.declare()
    for h in runner.hosts:
        h.bind()
    for expected_round in (1, 2):
        with pytest.raises(SimulatedCrash):
            pump(transport, roles, lambda: False)
        # The crashed coordinator's consumer goes away; its unacknowledged message is delivered again.
        transport.cancel(COORDINATOR)
        ctx = RoleContext(run=run, cfg=cfg, transport=transport, store=store)
        fresh = CoordinatorRole(ctx)
        fresh.resume_from_ledger()
        coordinators.append(fresh)
        if expected_round == 1:
            # Second crash: round 2, one aggregation result recorded; the others are redone or still queued.
            crashes.append(
                crash_after(fresh, lambda c: c.round == 2 and c.phase == "aggregating" and len(c.results) == 1)
            )
        RoleHost(fresh, strict=True).bind()
        assert fresh.round == expected_round
        if expected_round == 1:  # rebuilt from the ledger: the two acknowledged reports, still collecting
            assert fresh.phase == "training" and sorted(fresh.done) == sorted(coordinators[-2].done)
            assert len(fresh.done) == 2
        else:  # the acknowledged result recomputed from the update log, the others re-queued
            assert fresh.phase == "aggregating" and len(fresh.results) == 1 and len(fresh.jobs) == 3
    pump(transport, roles, lambda: coordinators[-1].finished)
    assert all(c["crashed"] for c in crashes)
    assert ledger_outcome(store, run) == baseline
    assert store.run_info(run)["status"] == "finished"


def test_a_coordinator_that_dies_while_sending_a_round_start_is_replaced_and_the_round_runs(backends, baseline):
    """The ledger says round 2 is training (its start is recorded), but the coordinator died after sending the start
    to the server and before any client had it: the new coordinator sends it again, the server takes the copy as a
    duplicate, the clients train, and the run ends with the uninterrupted run's models."""
    from hfgan_core.protocol import RoundStart

    transport, store, run = backends
    cfg = make_cfg()
    runner = EmbeddedRunner(cfg, datas(), [0] * N_CLIENTS, run_id=run, transport=transport, store=store)
    coordinators = [runner.coordinator]
    original_send = runner.coordinator.send

    def send(address, msg):
        if isinstance(msg, RoundStart) and msg.round == 2 and address != SERVER:
            raise SimulatedCrash()
        original_send(address, msg)

    runner.coordinator.send = send

    def roles():
        return [coordinators[-1], runner.server, runner.clustering, *runner.aggregators, *runner.clients]

    transport.declare()
    for h in runner.hosts:
        h.bind()
    with pytest.raises(SimulatedCrash):
        pump(transport, roles, lambda: False)
    assert store.get_round(run) == (2, "training")
    assert all(c.round == 1 for c in runner.clients)
    transport.cancel(COORDINATOR)
    fresh = CoordinatorRole(RoleContext(run=run, cfg=cfg, transport=transport, store=store))
    fresh.resume_from_ledger()
    coordinators.append(fresh)
    RoleHost(fresh, strict=True).bind()
    assert (fresh.round, fresh.phase) == (2, "training")
    pump(transport, roles, lambda: fresh.finished)
    assert sorted(fresh.done) == list(range(N_CLIENTS))
    assert ledger_outcome(store, run) == baseline
    assert transport.dead_letters() == []


def test_queued_jobs_complete_when_an_aggregator_starts(backends, baseline):
    transport, store, run = backends
    cfg = make_cfg()
    runner = EmbeddedRunner(cfg, datas(), [0] * N_CLIENTS, run_id=run, transport=transport, store=store, aggregators=0)
    roles_list = [runner.coordinator, runner.server, runner.clustering, *runner.clients]
    transport.declare()
    for h in runner.hosts:
        h.bind()
    coord = runner.coordinator
    pump(transport, lambda: roles_list, lambda: coord.round == 1 and coord.phase == "aggregating")
    waited_until = time.monotonic() + 2.0
    pump(transport, lambda: roles_list, lambda: time.monotonic() > waited_until)
    assert (coord.round, coord.phase) == (1, "aggregating")
    assert store.get_round(run) == (1, "aggregating") and store.get_model_digests(run, 1) == {}
    aggregator = AggregatorRole(RoleContext(run=run, cfg=cfg, transport=transport, store=store), 0)
    RoleHost(aggregator, strict=True).bind()
    roles_list.append(aggregator)
    pump(transport, lambda: roles_list, lambda: coord.finished)
    assert aggregator.jobs_done >= 2 + 3  # round 1: one cluster + global; round 2: two clusters + global
    assert ledger_outcome(store, run) == baseline


def test_device_emulation_sleeps_the_modelled_client_time_and_changes_nothing_else(baseline):
    """Emulated devices: each client sleeps its segments' FLOPs over its profile's speed plus the bytes it sends
    over its link (x its slowdown factor); the models are the memory baseline's, bit for bit."""
    import dataclasses

    from hfgan_core.model import CutBits
    from hfgan_core.planning import client_gflops, run_costs
    from hfgan_core.protocol import decode

    base = make_cfg()
    cfg = base.replace(
        runtime=dataclasses.replace(base.runtime, emulate_devices=True, emulate_slowdown=((1, 3.0),))
    ).validate()
    transport, store = MemoryTransport(), MemoryRoundStore()
    sent_bytes = {c: 0 for c in range(N_CLIENTS)}

    def spy(address: str, body: bytes) -> None:
        msg = decode(body)
        if msg.sender.startswith("client.") and address == "server":
            sent_bytes[int(msg.sender[7:])] += sum(t.numel() * t.element_size() for t in msg.tensors().values())

    transport.spy = spy
    runner = EmbeddedRunner(cfg, datas(), [0] * N_CLIENTS, run_id="eq-emulated", transport=transport, store=store)
    slept = {c: 0.0 for c in range(N_CLIENTS)}
    for role in runner.clients:
        assert role.delay is not None
        role.delay.sleep = lambda s, c=role.client: slept.__setitem__(c, slept[c] + s)
    runner.run()
    assert ledger_outcome(store, "eq-emulated") == baseline

    costs = run_costs(cfg)
    profiles = cfg.devices.client_profiles(N_CLIENTS)
    steps = ROUNDS * cfg.train.steps_per_epoch
    for c in range(N_CLIENTS):
        factor = 3.0 if c == 1 else 1.0
        compute = steps * client_gflops(costs, CutBits(*CUTS[c])) / profiles[c].gflops
        link = sent_bytes[c] / profiles[c].data_rate  # the modelled bytes are exactly the tensors it sent
        assert slept[c] == pytest.approx(factor * (compute + link), rel=1e-9), c
        assert slept[c] > 0
