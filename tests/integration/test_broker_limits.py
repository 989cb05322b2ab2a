"""Per-user and per-queue limits on the real broker (docs/wire.md): a client user over its connection or channel
limit is refused, a full work queue refuses publishes (the publisher gets an error, nothing queued is dropped), and
the dead-letter queue keeps its newest messages within its byte bound."""

from __future__ import annotations

import os
import subprocess
import uuid

import pika
import pytest

from hfgan_core.transport.amqp import DEFAULT_QUEUE_LIMITS, AmqpTransport, QueueLimits, provision_client_users
from hfgan_core.transport.base import TransportError
from tests.contract.transport_contract import drain
from tests.integration.conftest import new_namespace

ADMIN_URL = os.environ.get("HFGAN_TEST_RABBIT_ADMIN_URL", "rabbitmqctl")


@pytest.fixture
def client(amqp_url: str):
    """A provisioned client user of a throw-away namespace: (namespace, credentials)."""
    ns = new_namespace()
    with AmqpTransport(amqp_url, namespace=ns) as t:
        t.declare()
    creds = provision_client_users([0], ADMIN_URL, namespace=ns, passwords={0: uuid.uuid4().hex}, verify_url=amqp_url)
    yield ns, creds[0]
    with AmqpTransport(amqp_url, namespace=ns) as t:
        t.delete_topology(clients=[0])
    subprocess.run(["rabbitmqctl", "-q", "delete_user", creds[0].username], capture_output=True, check=False)


def _connect(url: str) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    return pika.BlockingConnection(params)


def test_a_client_over_its_connection_limit_is_refused(client, amqp_url: str) -> None:
    ns, creds = client
    url = creds.url(amqp_url)
    limit = DEFAULT_QUEUE_LIMITS.client_max_connections
    conns = [_connect(url) for _ in range(limit)]
    try:
        with pytest.raises(pika.exceptions.AMQPConnectionError) as exc:
            _connect(url).close()
        assert "limit" in repr(exc.value).lower() or "530" in repr(exc.value), repr(exc.value)
        with pytest.raises(TransportError, match="refused"), AmqpTransport(url, namespace=ns) as t:
            t.declare()  # the transport reports it at once, without retrying for a minute
        conns.pop().close()
        with AmqpTransport(url, namespace=ns, topology="passive") as t:
            t.declare()  # below the limit again: accepted
    finally:
        for c in conns:
            c.close()


def test_a_client_over_its_channel_limit_is_refused(client, amqp_url: str) -> None:
    _, creds = client
    conn = _connect(creds.url(amqp_url))
    try:
        for _ in range(DEFAULT_QUEUE_LIMITS.client_max_channels):
            conn.channel()
        with pytest.raises(pika.exceptions.AMQPError):
            conn.channel()
    finally:
        if conn.is_open:
            conn.close()


def test_a_full_work_queue_refuses_publishes(amqp_url: str) -> None:
    ns = new_namespace()
    limits = QueueLimits(client_bytes=4000)
    with AmqpTransport(amqp_url, namespace=ns, queue_limits=limits) as t:
        try:
            accepted = 0
            with pytest.raises(TransportError, match="nacked"):
                for _ in range(10):
                    t.publish("client.0", os.urandom(1500))
                    accepted += 1
            assert 1 <= accepted <= 3, accepted  # 4000 bytes hold two; RabbitMQ admits one past the bound
            got: list = []
            t.consume("client.0", lambda d: (got.append(d), d.ack()))
            drain(t, got, accepted)
            assert t.process(0.3) == 0 and len(got) == accepted  # nothing that was accepted is dropped
        finally:
            t.delete_topology(clients=[0])


def test_the_dead_letter_queue_keeps_its_newest_within_its_bound(amqp_url: str) -> None:
    ns = new_namespace()
    limits = QueueLimits(dead_bytes=3500)
    with AmqpTransport(amqp_url, namespace=ns, queue_limits=limits) as t:
        try:
            for i in range(6):
                t.publish("coordinator", bytes([i]) * 1000)
            t.consume("coordinator", lambda d: d.reject("poison"))
            seen = []
            for _ in range(50):
                t.process(0.1)
                seen = [d.body[0] for d in t.dead_letters()]
                if seen and seen[-1] == 5:
                    break
            assert seen and seen[-1] == 5 and len(seen) <= 4 and seen == sorted(seen), seen
        finally:
            t.delete_topology()
