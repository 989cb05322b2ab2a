"""Least privilege on the real broker: one client's credentials cannot consume another client's queue (the broker
answers ACCESS_REFUSED), cannot bind its queue to another client's routing key, cannot read the update log; what it
publishes carries its validated identity; each infrastructure role reads only its own queues.

Users live in the fixed test namespace `hfgantest` (`hfgantest-client-0`, `hfgantest-server`, ...): re-provisioned
by every run, never piled up, and without rights on the real `hfgan.*` entities. They are created with
`rabbitmqctl` (this machine's broker), or the management API given in HFGAN_TEST_RABBIT_ADMIN_URL.
"""

from __future__ import annotations

import os

import pika
import pytest

from hfgan_core.transport.amqp import (
    ROLES,
    AmqpTransport,
    ClientCredentials,
    Names,
    _wait_usable,
    import_definitions,
    provision_client_users,
    role_username,
    topology_definitions,
)
from hfgan_core.transport.base import TransportError
from tests.contract.transport_contract import collect, drain

NS = "hfgantest"
ADMIN_URL = os.environ.get("HFGAN_TEST_RABBIT_ADMIN_URL", "rabbitmqctl")
ROLE_PASSWORDS = {role: f"{role}-test-pw" for role in ROLES}


@pytest.fixture(scope="module")
def creds(amqp_url: str):
    with AmqpTransport(amqp_url, namespace=NS) as admin:
        admin.delete_topology(clients=range(2))  # leftovers of an aborted run
        admin.declare()
    import_definitions(topology_definitions(namespace=NS, role_passwords=ROLE_PASSWORDS), ADMIN_URL)
    names = Names(NS)
    for role, queue in (("server", "server"), ("aggregator", "aggregate")):
        _wait_usable(role_url(amqp_url, role), names.queue(queue), 30)
    out = provision_client_users(
        2, ADMIN_URL, namespace=NS, passwords={0: "c0-test-pw", 1: "c1-test-pw"}, verify_url=amqp_url
    )
    yield out
    with AmqpTransport(amqp_url, namespace=NS) as admin:
        admin.delete_topology(clients=range(2))


def role_url(amqp_url: str, role: str) -> str:
    return ClientCredentials(-1, role_username(role, NS), ROLE_PASSWORDS[role]).url(amqp_url)


def as_client(creds: dict[int, ClientCredentials], k: int, amqp_url: str) -> AmqpTransport:
    return AmqpTransport(creds[k].url(amqp_url), namespace=NS)


def test_provisioning_names_users_per_client(creds: dict[int, ClientCredentials]) -> None:
    assert [(c.client, c.username) for c in creds.values()] == [(0, "hfgantest-client-0"), (1, "hfgantest-client-1")]


def test_a_client_cannot_consume_another_clients_queue(creds, amqp_url: str) -> None:
    with as_client(creds, 1, amqp_url) as t:
        handler, _ = collect()
        with pytest.raises(TransportError, match="ACCESS_REFUSED"):
            t.consume("client.0", handler)
    conn = pika.BlockingConnection(pika.URLParameters(creds[1].url(amqp_url)))
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
        conn.channel().basic_consume(Names(NS).queue("client.0"), lambda *a: None)
    assert exc.value.reply_code == 403 and "ACCESS_REFUSED" in exc.value.reply_text
    conn.close()


def test_a_client_consumes_its_own_queue(creds, amqp_url: str) -> None:
    with AmqpTransport(amqp_url, namespace=NS) as server, as_client(creds, 1, amqp_url) as client:
        server.publish("client.1", b"G tail input for client 1")
        handler, got = collect()
        client.consume("client.1", handler)
        drain(client, got, 1)
        assert [d.body for d in got] == [b"G tail input for client 1"]
        assert got[0].headers["user_id"] == "guest"


def test_a_client_cannot_bind_its_queue_to_another_clients_key(creds, amqp_url: str) -> None:
    names = Names(NS)
    conn = pika.BlockingConnection(pika.URLParameters(creds[1].url(amqp_url)))
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
        conn.channel().queue_bind(names.queue("client.1"), names.split, routing_key="client.0")
    assert exc.value.reply_code == 403
    conn.close()


def test_a_client_cannot_read_the_update_log_or_the_dead_letters(creds, amqp_url: str) -> None:
    with as_client(creds, 1, amqp_url) as t:
        with pytest.raises(TransportError, match="ACCESS_REFUSED"):
            t.read_log(from_offset=0, timeout=0.5)
        with pytest.raises(TransportError, match="ACCESS_REFUSED"):
            t.dead_letters()


def test_what_a_client_publishes_carries_its_identity(creds, amqp_url: str) -> None:
    with AmqpTransport(amqp_url, namespace=NS) as server, as_client(creds, 1, amqp_url) as client:
        h_server, at_server = collect()
        server.consume("server", h_server)
        h_c0, at_c0 = collect()
        server.consume("client.0", h_c0)
        client.publish("server", b"G head output")
        client.publish("client.0", b"forged gradient")  # the exchange lets it through, but not anonymously
        drain(server, at_server, 1)
        drain(server, at_c0, 1)
        assert at_server[0].headers["user_id"] == "hfgantest-client-1"
        assert at_c0[0].headers["user_id"] == "hfgantest-client-1"  # client 0 can tell it is not from the server


def test_clients_may_subscribe_to_events(creds, amqp_url: str) -> None:
    with AmqpTransport(amqp_url, namespace=NS) as coordinator, as_client(creds, 0, amqp_url) as client:
        handler, got = collect()
        client.consume("events.round.#", handler)
        coordinator.publish("events.round.start", b"round 1", persistent=False)
        drain(client, got, 1)
        assert [(d.address, d.body) for d in got] == [("events.round.start", b"round 1")]


def test_roles_read_only_their_own_queues(creds, amqp_url: str) -> None:
    with AmqpTransport(role_url(amqp_url, "server"), namespace=NS, topology="declare") as server:
        server.declare()  # a role may declare (re-assert) the whole static topology
        handler, _ = collect()
        server.consume("server", handler)
        server.publish("client.0", b"reply")  # and publish to a provisioned client queue
        for other in ("coordinator", "client.0"):
            with pytest.raises(TransportError, match="ACCESS_REFUSED"):
                server.consume(other, handler)
    with AmqpTransport(role_url(amqp_url, "aggregator"), namespace=NS) as aggregator:
        aggregator.read_log(from_offset=0, timeout=0.3)  # aggregators read the update log
        handler, _ = collect()
        aggregator.consume("aggregate", handler)
        with pytest.raises(TransportError, match="ACCESS_REFUSED"):
            aggregator.consume("server", handler)
