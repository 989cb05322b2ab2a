"""Client slots kept by the coordinator (runtime/slots.py, admission.py): grants, renewals, refusals, take-over of
an expired slot, the free-slot hint; a client may ask only for the slot its sender names; the coordinator answers
on the owner's event key and records the holder's heartbeat for `hfgan status`."""

from __future__ import annotations

import pytest

from hfgan_core.config import DomainConfig, RunConfig, RuntimeConfig, ScenarioConfig, TrainConfig
from hfgan_core.protocol import ClientHeartbeat, SlotGrant, decode
from hfgan_core.runtime.client_worker import NoLedger, _fixed_slot, client_owner
from hfgan_core.runtime.coordinator import CoordinatorRole
from hfgan_core.runtime.host import Reject, RoleContext
from hfgan_core.runtime.slots import OWNER, SlotTable
from hfgan_core.state import MemoryRoundStore, StateError
from hfgan_core.transport import MemoryTransport

RUN = "slots"


def test_grant_renew_refuse_and_take_over_after_the_ttl():
    t = SlotTable(3, ttl_s=10.0)
    assert t.beat(0, "a", now=0.0) == "granted"
    assert t.beat(0, "a", now=5.0) == "renewed"
    assert t.beat(0, "b", now=14.0) == "refused"  # a renewed at 5: holds until 15
    assert t.holder(0, 14.0) == "a"
    assert t.beat(0, "b", now=15.0) == "granted"  # a stopped renewing: b takes the slot over
    assert t.beat(0, "a", now=16.0) == "refused"  # ... and a, back from a freeze, has lost it


def test_the_free_slot_hint_counts_unused_slots_then_the_first_expired_holder():
    t = SlotTable(3, ttl_s=10.0)
    assert t.free_slot(0.0) == 0
    t.beat(0, "a", 0.0)
    t.beat(2, "c", 1.0)  # taken out of order
    assert t.free_slot(1.0) == 1
    t.beat(1, "b", 2.0)
    assert t.free_slot(2.0) == -1  # every slot held: wait as a spare
    t.beat(0, "a", 5.0)  # a renews: c (renewed at 1) is now the first to expire, at 11
    assert t.free_slot(10.9) == -1
    assert t.free_slot(11.0) == 2
    t.release(1, "b")
    assert t.free_slot(3.0) == 1
    t.release(0, "not-a")  # only the holder may give a slot back
    assert t.holder(0, 6.0) == "a"


def _coordinator(clients: int = 3) -> CoordinatorRole:
    cfg = RunConfig(
        scenario=ScenarioConfig(domains=(DomainConfig("synthetic", clients),)),
        train=TrainConfig(rounds=1, steps_per_epoch=1, batch_size=8, cuts=((0, 0, 0, 0),)),
        runtime=RuntimeConfig(),
    ).validate()
    t = MemoryTransport()
    now = [100.0]
    role = CoordinatorRole(
        RoleContext(run=RUN, cfg=cfg, transport=t, store=MemoryRoundStore(), clock=lambda: now[0]), slot_ttl_s=10.0
    )
    role.start()
    role.now = now
    return role


def _grants(role, owner: str) -> list[SlotGrant]:
    out = []
    role.ctx.transport.consume(f"events.slot.{owner}", lambda d: (out.append(decode(d.body)), d.ack()))
    return out


def _beat(role, slot: int, owner: str, sender: str | None = None, info: str = "") -> None:
    role.on_message(
        ClientHeartbeat(run=RUN, round=0, sender=sender or f"client.{slot}", client=slot, owner=owner, info=info)
    )


def test_the_coordinator_grants_refuses_with_a_hint_and_records_heartbeats():
    role = _coordinator()
    t = role.ctx.transport
    a, b = _grants(role, "proc-a"), _grants(role, "proc-b")
    _beat(role, 0, "proc-a", info="slot 0 owner proc-a round 0 idle step 0")
    _beat(role, 0, "proc-b")
    t.process()
    assert [(g.client, g.granted) for g in a] == [(0, True)]
    assert [(g.client, g.granted, g.free_slot) for g in b] == [(0, False, 1)]
    assert role.ctx.store.alive(RUN)["client.0"] == "slot 0 owner proc-a round 0 idle step 0"
    _beat(role, 0, "proc-a")  # a renewal: no answer
    t.process()
    assert len(a) == 1
    role.now[0] += 11.0  # proc-a stopped renewing
    _beat(role, 0, "proc-b")
    t.process()
    assert b[-1].granted and b[-1].client == 0


def test_the_coordinator_notes_the_clients_whose_heartbeat_says_they_exited():
    """The end of a run waits for these farewells (serve_coordinator): they carry each client's final traffic."""
    role = _coordinator()
    _beat(role, 0, "proc-a", info="slot 0 owner proc-a round 1 training step 0")
    _beat(role, 1, "proc-b", info="exited")
    assert role.clients_exited == {1}
    _beat(role, 2, "proc-c", sender="client.2", info="exited")
    assert role.clients_exited == {1, 2}


@pytest.mark.parametrize(
    ("slot", "owner", "sender", "reason"),
    [
        (1, "proc", "client.0", "bad_sender"),  # client 0's user asks for slot 1
        (5, "proc", "client.5", "unknown_client"),
        (0, "bad owner!", "client.0", "malformed"),
        (0, "x" * 65, "client.0", "malformed"),
    ],
)
def test_a_client_may_ask_only_for_the_slot_its_user_names(slot, owner, sender, reason):
    role = _coordinator()
    with pytest.raises(Reject, match=f"^{reason}"):
        _beat(role, slot, owner, sender=sender)
    assert role.slots.holders == {}


def test_a_client_has_no_ledger_and_its_slot_follows_its_user():
    with pytest.raises(StateError, match="no ledger access"):
        NoLedger().get_round("r")
    url = "amqp://client-{slot}:client-{slot}-dev@h:5672/%2F"
    assert _fixed_slot(url, 4, None) is None  # the development pool: any slot
    assert _fixed_slot(url, 4, 2) == 2
    assert _fixed_slot("amqp://client-3:pw@h:5672/%2F", 4, None) == 3
    assert _fixed_slot("amqp://guest:guest@h:5672/%2F", 4, None) is None


def test_a_restarted_client_process_is_a_new_slot_owner():
    """Docker restarts a client container with its hostname and pid 1 again: the same `<hostname>-<pid>`. Were that
    the owner, the restarted process's request for its old slot would be a silent renewal (no answer: it waited
    forever); each start is a new owner, refused while the dead holder's slot is fresh and granted after it."""
    process = "3d694b1506b8-1"
    first, restarted = client_owner(process), client_owner(process)
    assert first != restarted and first.startswith(process + "-")
    assert OWNER.fullmatch(client_owner("h" * 64 + "-1")), "hostnames of any length stay a valid owner"
    t = SlotTable(2, ttl_s=10.0)
    assert t.beat(0, first, now=0.0) == "granted"
    assert t.beat(0, first, now=1.0) == "renewed"  # what the same owner would get: no answer
    assert t.beat(0, restarted, now=2.0) == "refused"
    assert t.beat(0, restarted, now=11.0) == "granted"  # the dead holder renewed last at 1: free from 11


def test_a_slot_answer_forged_by_a_client_of_a_namespace_is_refused():
    # Found by the adversarial e2e test: with HFGAN_BROKER_NAMESPACE set, client users are `<namespace>-client-k`,
    # and the slot watch checked them against the default namespace, where they are no role's user: a client that
    # published a `SlotGrant` as "coordinator" to another process's `events.slot.<owner>` was believed (a refusal
    # there makes that client exit: "lost client slot").
    from hfgan_core.runtime.client_worker import SlotWatch
    from hfgan_core.transport.base import Delivery

    grant = SlotGrant(run="r", round=0, sender="coordinator", client=0, owner="o", granted=False).encode()
    for user, believed in (("ns1-client-1", False), ("ns1-coordinator", True), ("guest", True)):
        watch = SlotWatch("r", "o", namespace="ns1")
        d = Delivery(grant, "events.slot.o", headers={"user_id": user})
        watch.on_delivery(d)
        assert (watch.grant is not None) == believed and d.settled == ("ack" if believed else "reject"), user
