"""The role registry (hfgan_core/roles.py) and the authorization table the receiving host enforces.

Every message kind of the protocol goes through a real RoleHost over the memory transport, published as a broker
user would publish it (`MemoryTransport.as_user`), from every role to every role: what the table allows is handled,
everything else is dead-lettered with its reason and never reaches the handler. Forged senders (a client speaking as
the server, the coordinator, another client, or for another client's index) are refused the same way. A test-only
sixth role (tests/sixth_role.py), registered through the public API, runs in the embedded runner.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hfgan_core import roles
from hfgan_core.config import DomainConfig, RunConfig, RuntimeConfig, ScenarioConfig, TrainConfig
from hfgan_core.protocol import ALL_KINDS, REGISTRY, Message, decode
from hfgan_core.runtime.host import Role, RoleContext, RoleHost
from hfgan_core.state import MemoryRoundStore
from hfgan_core.transport import MemoryTransport
from tests import sixth_role

ROOT = Path(__file__).resolve().parents[2]
RUN = "roles-test"
# One instance identity per built-in role (the client is client 1; its broker user is client-1).
IDENTITY = {"coordinator": "coordinator", "server": "server", "clustering": "clustering"}
IDENTITY |= {"aggregator": "aggregator.0", "client": "client.1"}
USER = {"coordinator": "coordinator", "server": "server", "clustering": "clustering", "aggregator": "aggregator"}
USER |= {"client": "client-1"}

_SAMPLE = {
    "int": 1,
    "float": 1.0,
    "str": "x",
    "bool": False,
    "ints": (1,),
    "floats": (1.0,),
    "strs": ("x",),
    "cuts": ((0, 0, 0, 0),),
    "metrics": {"a": 1.0},
    "floatmap": {"a": 1.0},
    "intmap": {"1": 1},
    "strmap": {"a": "b"},
}


def sample(cls: type[Message], sender: str, **values) -> Message:
    """A valid message of kind `cls` (every required payload field filled in) claiming `sender`."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("spec")
        if spec is None or spec.optional:
            continue
        if spec.kind == "tensor":
            kwargs[f.name] = torch.zeros(2)
        elif spec.kind == "tensors":
            kwargs[f.name] = {"1": torch.zeros(2)}
        else:
            kwargs[f.name] = _SAMPLE[spec.kind]
    kwargs.update(values)
    return cls(run=RUN, round=1, sender=sender, **kwargs)


def _cfg() -> RunConfig:
    return RunConfig(
        scenario=ScenarioConfig(domains=(DomainConfig("synthetic", 2),)),
        train=TrainConfig(rounds=1, local_epochs=1, steps_per_epoch=1, batch_size=4, cuts=((0, 0, 0, 0),) * 2),
        runtime=RuntimeConfig(),
    ).validate()


class Probe(Role):
    """Stands in for any role: accepts every kind under a given identity and records what reaches its handler."""

    accepts = ALL_KINDS

    def __init__(self, ctx: RoleContext, name: str):
        super().__init__(ctx)
        self.name = name
        self.handled: list[Message] = []

    def addresses(self) -> list[str]:
        return ["server"]  # the queue does not matter: authorization goes by the receiving role

    def on_message(self, msg: Message) -> None:
        self.handled.append(msg)


def deliver(msg: Message, receiver: str, user: str | None, namespace: str | None = None) -> tuple[bool, str]:
    """Publish `msg` as `user` to a Probe named `receiver`; (handled, dead-letter reason)."""
    transport = MemoryTransport()
    if namespace is not None:
        transport.names = type("Names", (), {"namespace": namespace})()  # as an AMQP transport carries it
    probe = Probe(RoleContext(run=RUN, cfg=_cfg(), transport=transport, store=MemoryRoundStore()), receiver)
    RoleHost(probe).bind()
    (transport.as_user(user) if user else transport).publish("server", msg.encode())
    transport.process()
    dead = transport.dead_letters()
    assert bool(probe.handled) != bool(dead), "exactly one of handled or dead-lettered"
    return bool(probe.handled), dead[0].reason if dead else ""


# ------------------------------------------------------------------------------------------------- registry
def test_every_protocol_kind_is_in_the_table_and_every_table_kind_exists() -> None:
    table = roles.table()
    assert set(table) == set(REGISTRY), "each message kind needs a sender in the registry"
    for kind, by in table.items():
        for sender, receivers in by.items():
            assert receivers, f"{sender} sends {kind} to nobody"
            for r in receivers:
                assert r in roles.names() or r in (roles.ANY, roles.UPDATE_LOG), (kind, r)


def test_role_classes_accept_exactly_what_the_table_sends_them() -> None:
    broadcast = {k for k, by in roles.table().items() if any(roles.ANY in r for r in by.values())}
    for spec in roles.specs():
        accepts = {cls.KIND for cls in spec.load("role_class").accepts}
        received = roles.receives(spec.name)
        assert accepts <= received, f"{spec.name} accepts kinds nobody may send it: {accepts - received}"
        assert received - accepts <= broadcast, f"{spec.name} is sent kinds it does not accept"


def test_builtin_registry_entries() -> None:
    assert roles.BUILTIN_ROLES == ("coordinator", "server", "clustering", "aggregator", "client")
    assert roles.get("aggregator").consumer == "competing"
    assert [s.name for s in roles.iter_broker_roles()] == ["coordinator", "server", "clustering", "aggregator"]
    assert not roles.get("client").trusted and roles.get("client").address(3) == "client.3"
    for spec in roles.specs():
        assert callable(spec.load("serve")) and callable(spec.load("embedded")), spec.name
        assert (ROOT / (spec.worker_module.replace(".", "/") + ".py")).is_file(), spec.worker_module
    with pytest.raises(ValueError, match="different spec"):
        roles.register(dataclasses.replace(roles.get("server"), consumer="competing"))
    with pytest.raises(ValueError, match="built in"):
        roles.unregister("server")
    with pytest.raises(KeyError, match="unknown role"):
        roles.get("nobody")


# --------------------------------------------------------------------------------------- the table, enforced
@pytest.mark.parametrize("cls", ALL_KINDS, ids=lambda c: c.KIND)
def test_every_kind_from_every_role_to_every_role(cls: type[Message]) -> None:
    """Published by each role's own broker user (and by guest, an unbound user, claiming the same sender)."""
    table = roles.table().get(cls.KIND, {})
    for sender_role, sender in IDENTITY.items():
        for receiver_role, receiver in IDENTITY.items():
            allowed = receiver_role in table.get(sender_role, ()) or roles.ANY in table.get(sender_role, ())
            for user in (USER[sender_role], "guest", None):
                handled, reason = deliver(sample(cls, sender), receiver, user)
                assert handled == allowed, (cls.KIND, sender, receiver, user, reason)
                if not allowed:
                    assert reason.startswith("unauthorized:"), reason


def test_what_a_client_may_not_send() -> None:
    """The audit's forged control messages, sent with a client's own credentials."""
    refused = [
        ("server_model", "server"),
        ("run_end", "server"),
        ("run_end", "client.0"),
        ("round_start", "server"),
        ("model_assignment", "client.0"),
        ("g_mid_out", "client.0"),  # anything to another client
        ("aggregate_job", "aggregator.0"),
        ("cluster_result", "coordinator"),
        ("aggregate_done", "coordinator"),
    ]
    for kind, receiver in refused:
        handled, reason = deliver(sample(REGISTRY[kind], "client.1"), receiver, "client-1")
        assert not handled and reason.startswith("unauthorized: a client may not send"), (kind, reason)


@pytest.mark.parametrize("claimed", ["server", "coordinator", "client.0", "client.01x", "aggregator.0", "clustering"])
def test_a_client_cannot_speak_as_anyone_else(claimed: str) -> None:
    msg = sample(REGISTRY["g_head_out"] if claimed != "coordinator" else REGISTRY["join"], claimed)
    handled, reason = deliver(msg, "server", "client-1")
    assert not handled
    assert reason.startswith(("forged_sender:", "unknown_sender:")), reason


def test_a_client_cannot_send_for_another_client_index() -> None:
    for kind, receiver in (("g_head_out", "server"), ("join", "coordinator"), ("round_done", "coordinator")):
        handled, reason = deliver(sample(REGISTRY[kind], "client.1", client=0), receiver, "client-1")
        assert not handled and reason.startswith("forged_client:"), reason
        assert deliver(sample(REGISTRY[kind], "client.1", client=1), receiver, "client-1")[0]


def test_role_users_are_bound_to_their_identity() -> None:
    assert deliver(sample(REGISTRY["server_model"], "aggregator.7"), "server", "aggregator")[0]
    assert deliver(sample(REGISTRY["server_model"], "aggregator.host-12.3"), "server", "aggregator")[0]
    handled, reason = deliver(sample(REGISTRY["run_end"], "coordinator"), "server", "aggregator")
    assert not handled and reason.startswith("forged_sender:")
    handled, reason = deliver(sample(REGISTRY["server_model"], "aggregator.0"), "server", "server")
    assert not handled and reason.startswith("forged_sender:")
    handled, reason = deliver(sample(REGISTRY["g_head_out"], "mallory"), "server", None)
    assert not handled and reason.startswith("unknown_sender:")


def test_namespaced_users() -> None:
    """In a test namespace the role users are `<namespace>-<user>`; the unprefixed names are not role-bound there."""
    msg = sample(REGISTRY["g_head_out"], "client.1")
    assert deliver(msg, "server", "ns1-client-1", namespace="ns1")[0]
    handled, reason = deliver(sample(REGISTRY["run_end"], "coordinator"), "server", "ns1-client-1", namespace="ns1")
    assert not handled and reason.startswith("forged_sender:")
    assert deliver(sample(REGISTRY["run_end"], "coordinator"), "server", "client-1", namespace="ns1")[0]


def test_a_refused_message_leaves_the_role_serving() -> None:
    transport = MemoryTransport()
    probe = Probe(RoleContext(run=RUN, cfg=_cfg(), transport=transport, store=MemoryRoundStore()), "server")
    host = RoleHost(probe)
    host.bind()
    mallory = transport.as_user("client-1")
    for kind in ("server_model", "run_end", "round_start"):
        mallory.publish("server", sample(REGISTRY[kind], "client.1").encode())
    mallory.publish("server", sample(REGISTRY["g_head_out"], "client.1").encode())
    transport.process()
    assert [m.KIND for m in probe.handled] == ["g_head_out"]
    assert host.rejected["unauthorized"] == 3
    dead = transport.dead_letters()
    assert [decode(d.body).KIND for d in dead] == ["server_model", "run_end", "round_start"]


# ------------------------------------------------------------------------------------------- a sixth role
@pytest.fixture
def observer():
    spec = sixth_role.register()
    try:
        yield spec
    finally:
        roles.unregister(spec.name)
    assert "observer" not in roles.names()


def test_a_sixth_role_runs_in_the_embedded_runner(observer) -> None:
    from hfgan_core.data import TensorClientData
    from hfgan_core.runtime.embedded import EmbeddedRunner

    cfg = RunConfig(
        scenario=ScenarioConfig(domains=(DomainConfig("synthetic", 2),)),
        train=TrainConfig(rounds=2, local_epochs=1, steps_per_epoch=1, batch_size=8, cuts=((0, 0, 0, 0),) * 2),
        runtime=RuntimeConfig(),
    ).validate()
    clients = [TensorClientData.random(16, 100 + i) for i in range(2)]
    runner = EmbeddedRunner(cfg, clients, [0, 0], run_id="sixth-role")
    result = runner.run()
    (obs,) = runner.by_role["observer"]
    assert isinstance(obs, sixth_role.ObserverRole) and obs in runner.roles
    assert len(result.reports) == 2
    assert obs.events["done"] == 2 and obs.events["finished"] == 1 and obs.rounds >= {1, 2}
    assert not runner.transport.dead_letters()


def test_the_sixth_role_module_is_its_worker_entry_point(observer) -> None:
    res = subprocess.run(
        [sys.executable, "-m", observer.worker_module, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert res.returncode == 0 and "python -m tests.sixth_role" in res.stdout, res.stderr


def test_the_broker_definitions_do_not_change_with_a_registered_test_role(observer) -> None:
    """A role without a broker user of its own adds no user to the generated definitions."""
    assert "observer" not in [s.name for s in roles.iter_broker_roles()]
    assert json.dumps(roles.table()).count("observer") == 0  # it sends nothing


# ----------------------------------------------------------------------------------- broker definitions
def _without_hashes(doc: dict) -> dict:
    doc = json.loads(json.dumps(doc))
    for user in doc["users"]:
        user.pop("password_hash")
    return doc


def test_committed_broker_definitions_are_the_generated_document() -> None:
    """broker_config/definitions.json is generated from the registry (`hfgan broker definitions`)."""
    from hfgan_core.transport.amqp import broker_definitions_document, check_password_hash

    committed = json.loads((ROOT / "broker_config" / "definitions.json").read_text())
    generated = json.loads(broker_definitions_document())
    assert _without_hashes(committed) == _without_hashes(generated), (
        "regenerate: hfgan broker definitions > broker_config/definitions.json"
    )
    for user in committed["users"]:  # the salted hashes differ; each must be the documented dev password's
        if user["name"] != "hfgan-admin":
            assert check_password_hash(f"{user['name']}-dev", user["password_hash"]), user["name"]


def test_broker_permissions_come_from_the_registry() -> None:
    """A trusted role with a broker user of its own gets a user and read access to exactly its queue."""
    from hfgan_core.transport.amqp import Names, broker_definitions_document, role_permissions

    spec = roles.RoleSpec(
        name="auditor",
        role_class="tests.sixth_role:ObserverRole",
        identity="auditor",
        addresses=("clustering",),
        sends=(),
        serve="tests.sixth_role:serve_observer",
        embedded="tests.sixth_role:embedded_roles",
        broker_user="auditor",
        broker_reads=("dead",),
    )
    roles.register(spec)
    try:
        perms = role_permissions(Names())
        assert set(perms) == {"coordinator", "server", "clustering", "aggregator", "auditor"}
        read = re.compile(perms["auditor"]["read"])
        assert read.fullmatch("hfgan.clustering") and read.fullmatch("hfgan.dead")
        assert not read.fullmatch("hfgan.server") and not read.fullmatch("hfgan.updates")
        assert '"name": "auditor"' in broker_definitions_document()
    finally:
        roles.unregister("auditor")
    assert "auditor" not in role_permissions(Names())
