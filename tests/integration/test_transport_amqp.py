"""The transport contract against the real RabbitMQ, then what only a broker can show: reconnects, broker-side
consumer cancellation, redelivery to another connection, chunk reassembly under prefetch 1, publisher checks."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid

import pika
import pytest

from hfgan_core.transport import open_transport
from hfgan_core.transport.amqp import H_ADDRESS, H_CHUNK_COUNT, H_CHUNK_ID, H_CHUNK_INDEX, AmqpTransport, Names
from hfgan_core.transport.base import Delivery, TransportError
from tests.contract.transport_contract import TransportContract, collect, drain
from tests.integration.conftest import new_namespace


class TestAmqpTransport(TransportContract):
    @pytest.fixture(autouse=True)
    def _broker(self, amqp_url: str) -> None:
        self.url = amqp_url

    def make(self) -> AmqpTransport:
        return AmqpTransport(self.url, namespace=new_namespace())

    def dispose(self, t: AmqpTransport) -> None:  # type: ignore[override]
        t.delete_topology(clients=range(20))
        t.close()

    def after_close(self, t: AmqpTransport) -> None:  # type: ignore[override]
        with AmqpTransport(self.url, namespace=t.names.namespace) as cleaner:
            cleaner.delete_topology(clients=range(20))


@pytest.fixture
def ns(amqp_url: str):
    """A throw-away namespace, deleted after the test (with every client queue the tests may have made)."""
    name = new_namespace()
    yield name
    with AmqpTransport(amqp_url, namespace=name) as t:
        t.delete_topology(clients=range(8))


def raw(amqp_url: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(amqp_url))


def test_open_transport_picks_amqp_by_scheme(amqp_url: str, ns: str) -> None:
    with open_transport(amqp_url, namespace=ns, max_frame_body=4096) as t:
        assert isinstance(t, AmqpTransport) and t.max_frame_body == 4096
        handler, got = collect()
        t.consume("server", handler)
        t.publish("server", b"z" * 10_000)  # three chunks of 4 KiB
        drain(t, got, 1)
        assert got[0].body == b"z" * 10_000


def test_reconnects_after_the_connection_is_cut(amqp_url: str, ns: str, proxy) -> None:
    t = AmqpTransport(proxy.url(amqp_url), namespace=ns, reconnect_timeout=20)
    try:
        handler, got = collect(acks=False)
        t.consume("server", handler, prefetch=5)  # room for the redelivery and the next message, both unsettled
        t.publish("server", b"one")
        drain(t, got, 1)
        stale = got[0]
        assert proxy.cut() == 1
        t.publish("server", b"two")  # publish notices the loss, reconnects, re-declares, re-consumes
        drain(t, got, 3)
        stale.ack()  # its channel died with the connection: ignored, not an error
        fresh = got[1:]
        assert sorted(d.body for d in fresh) == [b"one", b"two"]
        assert [d.redelivered for d in fresh if d.body == b"one"] == [True]
        for d in fresh:
            d.ack()
        assert t.reconnects >= 1
        # process() recovers too: cut while idle, then a message from elsewhere still arrives. Acks sent just
        # before the cut may not have reached the broker: those messages come back, flagged (at-least-once).
        proxy.cut()
        with AmqpTransport(amqp_url, namespace=ns) as other:
            other.publish("server", b"three")
        deadline = time.monotonic() + 60  # a bound on a wait, not a speed: as long as a busy host needs
        while b"three" not in [d.body for d in got[3:]] and time.monotonic() < deadline:
            t.process(0.2)
        later = got[3:]
        assert b"three" in [d.body for d in later] and t.reconnects >= 2
        assert all(d.redelivered and d.body in (b"one", b"two") for d in later if d.body != b"three")
        for d in later:
            d.ack()
        assert t.process(0.3) == 0  # nothing else is outstanding
    finally:
        t.close()


def test_consumer_comes_back_when_its_queue_is_deleted(amqp_url: str, ns: str) -> None:
    with AmqpTransport(amqp_url, namespace=ns) as t:
        handler, got = collect()
        t.consume("clustering", handler)
        conn = raw(amqp_url)
        conn.channel().queue_delete(Names(ns).queue("clustering"))  # the broker cancels our consumer
        conn.close()
        t.process(0.5)  # notices the cancellation: re-declares and re-consumes
        t.publish("clustering", b"after the deletion")
        drain(t, got, 1)
        assert [d.body for d in got] == [b"after the deletion"]


def test_unsettled_deliveries_go_to_the_next_consumer_after_close(amqp_url: str, ns: str) -> None:
    a = AmqpTransport(amqp_url, namespace=ns)
    handler, got = collect(acks=False)
    a.consume("coordinator", handler, prefetch=5)
    for i in range(3):
        a.publish("coordinator", b"m%d" % i)
    drain(a, got, 3)
    a.close()
    got[0].ack()  # after close: ignored with a log
    with AmqpTransport(amqp_url, namespace=ns) as b:
        handler2, got2 = collect()
        b.consume("coordinator", handler2)
        drain(b, got2, 3)
        assert [d.body for d in got2] == [b"m0", b"m1", b"m2"]
        assert all(d.redelivered for d in got2)


def test_single_active_consumer_standby_takes_over(amqp_url: str, ns: str) -> None:
    active, standby = AmqpTransport(amqp_url, namespace=ns), AmqpTransport(amqp_url, namespace=ns)
    try:
        h1, got1 = collect()
        h2, got2 = collect()
        active.consume("coordinator", h1)
        standby.consume("coordinator", h2)
        active.publish("coordinator", b"for the active one")
        drain(active, got1, 1)
        assert standby.process(0.3) == 0
        active.close()
        standby.publish("coordinator", b"for the standby")
        drain(standby, got2, 1)
        assert [d.body for d in got1] == [b"for the active one"] and [d.body for d in got2] == [b"for the standby"]
    finally:
        active.close()
        standby.close()


def test_unroutable_publish_is_an_error(amqp_url: str, ns: str) -> None:
    with AmqpTransport(amqp_url, namespace=ns) as t:
        t.declare()
        conn = raw(amqp_url)
        conn.channel().queue_delete(Names(ns).queue("aggregate"))
        conn.close()
        with pytest.raises(TransportError, match="unroutable"):
            t.publish("aggregate", b"job")
        t.publish("server", b"the publisher channel still works")


def test_the_connection_reads_one_broker_frame_at_a_time(amqp_url: str, ns: str) -> None:
    # pika's 4 KiB reads cost most of the split traffic's receive CPU (docs/benchmarks.md); the transport raises
    # them on its own connection, and a large message still arrives whole.
    from hfgan_core.transport.amqp import connection

    with AmqpTransport(amqp_url, namespace=ns) as t:
        t.declare()
        stream = t._conn._impl._transport
        assert stream._MAX_RECV_BYTES == connection.RECV_BYTES >= 128 * 1024
        assert stream._MAX_CONSUME_BYTES >= connection.CONSUME_BYTES_PER_WAKEUP
        big = os.urandom(3 * 1024 * 1024 + 5)
        handler, got = collect()
        t.consume("client.4", handler)
        t.publish("client.4", big, persistent=False)
        drain(t, got, 1)
        assert got[0].body == big


def test_oversized_message_to_competing_consumers_is_refused(amqp_url: str, ns: str) -> None:
    with AmqpTransport(amqp_url, namespace=ns, max_frame_body=4096) as t:
        with pytest.raises(TransportError, match="competing consumers"):
            t.publish("aggregate", b"x" * 5000)
        t.publish("aggregate", b"x" * 4096)


def _frames(t: AmqpTransport, body: bytes, address: str):
    return t._frames(body, {H_ADDRESS: address})


def test_interleaved_chunks_reassemble_with_prefetch_one(amqp_url: str, ns: str) -> None:
    with AmqpTransport(amqp_url, namespace=ns, max_frame_body=1024) as t:
        t.declare()
        a, b = os.urandom(3000), os.urandom(2500)
        fa, fb = _frames(t, a, "server"), _frames(t, b, "server")
        assert (len(fa), len(fb)) == (3, 3)
        # Two publishers' chunks interleaved in the queue, with a small message in between.
        for frame in (fa[0], fb[0], fa[1], fb[1], fb[2]):
            t._send(t.names.split, "server", [frame], True, True)
        t.publish("server", b"small")
        t._send(t.names.split, "server", [fa[2]], True, True)
        handler, got = collect()
        t.consume("server", handler, prefetch=1)
        drain(t, got, 3)
        assert [d.body for d in got] == [b, b"small", a]
        assert t.process(0.3) == 0


def test_duplicate_chunks_are_delivered_once(amqp_url: str, ns: str) -> None:
    with AmqpTransport(amqp_url, namespace=ns, max_frame_body=1024) as t:
        t.declare()
        body = os.urandom(2500)
        frames = _frames(t, body, "client.3")
        t._ensure_client_queue("client.3")
        # A publish that failed after its first chunk and was retried whole, then retried once more.
        for frame in [frames[0], *frames, *frames]:
            t._send(t.names.split, "client.3", [frame], True, True)
        handler, got = collect()
        t.consume("client.3", handler)
        drain(t, got, 1)
        assert t.process(0.5) == 0
        assert [d.body for d in got] == [body]
        t.cancel("client.3")
        again, got2 = collect()
        t.consume("client.3", again)
        assert t.process(0.3) == 0 and got2 == []  # every chunk, duplicates included, was settled


def test_incomplete_chunked_message_is_dead_lettered(amqp_url: str, ns: str) -> None:
    with AmqpTransport(amqp_url, namespace=ns, max_frame_body=1024, chunk_timeout=0.3) as t:
        t.declare()
        frames = _frames(t, os.urandom(3000), "server")
        t._send(t.names.split, "server", frames[:2], True, True)  # the publisher died after two chunks
        t.publish("server", b"next")
        handler, got = collect()
        t.consume("server", handler)
        drain(t, got, 1)
        deadline = time.monotonic() + 60  # a bound on a wait, not a speed: as long as a busy host needs
        dead = []
        while not dead and time.monotonic() < deadline:
            t.process(0.2)
            dead = [d for d in t.dead_letters() if d.reason.startswith("incomplete_chunked_message")]
        assert [d.body for d in got] == [b"next"]
        assert len(dead) == 1 and dead[0].address == "server" and len(dead[0].body) == 2048


def test_prefetch_bounds_unsettled_deliveries(amqp_url: str, ns: str) -> None:
    with AmqpTransport(amqp_url, namespace=ns) as t:
        for i in range(5):
            t.publish("clustering", b"%d" % i)
        handler, got = collect(acks=False)
        t.consume("clustering", handler, prefetch=2)
        drain(t, got, 2, timeout=60.0)  # the two the prefetch allows, however busy the host
        drain(t, got, 5, timeout=1.0)  # and no more: a third would have to come without an acknowledgement
        assert len(got) == 2
        got[0].ack()
        drain(t, got, 3, timeout=60.0)
        assert [d.body for d in got] == [b"0", b"1", b"2"]


def test_publisher_identity_is_validated_by_the_broker(amqp_url: str, ns: str) -> None:
    with AmqpTransport(amqp_url, namespace=ns) as t:
        handler, got = collect()
        t.consume("server", handler)
        t.publish("server", b"x")
        drain(t, got, 1)
        assert got[0].headers["user_id"] == "guest"
        conn = raw(amqp_url)
        ch = conn.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
            ch.basic_publish(t.names.split, "server", b"spoof", pika.BasicProperties(user_id="client-0"))
            ch.queue_declare(t.names.queue("server"), passive=True)  # a round trip, to see the channel close
        assert exc.value.reply_code == 406
        conn.close()


def test_broker_side_dead_letters_report_x_death(amqp_url: str, ns: str) -> None:
    with AmqpTransport(amqp_url, namespace=ns) as t:
        t.publish("coordinator", b"nacked by a foreign consumer")
        conn = raw(amqp_url)
        ch = conn.channel()
        method = None
        deadline = time.monotonic() + 60  # a bound on a wait, not a speed: as long as a busy host needs
        while method is None and time.monotonic() < deadline:
            method, _, _ = ch.basic_get(t.names.queue("coordinator"))
        ch.basic_reject(method.delivery_tag, requeue=False)  # the queue's x-dead-letter-exchange takes it
        conn.close()
        deadline = time.monotonic() + 60  # a bound on a wait, not a speed: as long as a busy host needs
        dead = []
        while not dead and time.monotonic() < deadline:
            dead = t.dead_letters()
        assert [(d.address, d.body, d.reason) for d in dead] == [
            ("coordinator", b"nacked by a foreign consumer", "broker:rejected")
        ]
        assert len(t.dead_letters()) == 1  # reading the dead letters does not consume them


def test_a_chunked_message_whose_handler_fails_is_reassembled_again(amqp_url: str, ns: str) -> None:
    """The requeued chunks of a failed message come back and are reassembled (not taken for duplicates)."""
    with AmqpTransport(amqp_url, namespace=ns, max_frame_body=1024) as t:
        body = os.urandom(3000)
        t.publish("server", body)
        seen: list[bool] = []

        def failing(d: Delivery) -> None:
            seen.append(d.redelivered)
            assert d.body == body
            raise RuntimeError("handler bug")

        t.consume("server", failing)
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            t.process(0.1)
        assert seen == [False, True]
        dead = []
        while not dead and time.monotonic() < deadline:
            t.process(0.1)
            dead = [d for d in t.dead_letters() if d.reason.startswith("failed_twice")]
        assert len(dead) == 1 and dead[0].body == body


def test_connect_failure_is_a_clear_transport_error() -> None:
    t = AmqpTransport(
        "amqp://guest:guest@127.0.0.1:1/", namespace="hfgant" + uuid.uuid4().hex[:6], reconnect_timeout=0.5
    )
    began = time.monotonic()
    with pytest.raises(TransportError, match="unreachable"):
        t.declare()
    assert time.monotonic() - began < 10
    t.close()


def test_bad_credentials_fail_fast(amqp_url: str) -> None:
    p = amqp_url.replace("guest:guest@", "guest:wrong-password@")
    began = time.monotonic()
    with pytest.raises(TransportError, match="refused"):
        AmqpTransport(p, namespace="hfgantnever").declare()
    assert time.monotonic() - began < 10


def test_update_log_reads_never_reject_stream_deliveries(amqp_url: str, ns: str, caplog) -> None:
    """Regression: pika's basic_cancel rejects the deliveries a consumer holds or receives until cancel-ok, and
    RabbitMQ answers a reject on a stream with 540 NOT_IMPLEMENTED, closing the whole connection (every consumer
    of the transport with it). Reads that stop while the broker is still sending (a zero wait on a long log;
    reads bounded by the tail while records are being appended) must leave the connection alone."""
    writer = AmqpTransport(amqp_url, namespace=ns)
    t = AmqpTransport(amqp_url, namespace=ns)
    stop = threading.Event()
    appended: list[int] = []

    errors: list[BaseException] = []

    def append() -> None:  # the writer transport is used by this thread only from now on
        try:
            while not stop.is_set() and len(appended) < 20_000:
                writer.append_log(b"late" + b"y" * 2000, round=2)
                appended.append(1)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    th = threading.Thread(target=append, daemon=True)
    try:
        for i in range(300):
            writer.append_log(b"r%03d" % i + b"x" * 4000, round=1)
        handler, got = collect(acks=False)
        t.consume("server", handler)
        t.publish("server", b"held")
        drain(t, got, 1)
        conn = t._conn

        def refused() -> list[str]:
            return [r.getMessage() for r in caplog.records if "NOT_IMPLEMENTED" in r.getMessage()]

        with caplog.at_level(logging.WARNING, logger="pika"):
            for _ in range(10):
                t.read_log(from_offset=0, timeout=0.0)  # gives up while the broker is still sending
            assert refused() == []
            assert t._conn is conn and conn.is_open
            th.start()
            while len(appended) < 20 and not errors:
                time.sleep(0.01)
            began = time.monotonic()
            for _ in range(5):  # bounded by the tail it measured, although the log keeps growing
                recs = t.read_log(from_offset=250, round=1, timeout=2.0)
                assert [r.body[:4] for r in recs] == [b"r%03d" % i for i in range(250, 300)]
            reads_s = time.monotonic() - began
            assert not errors and th.is_alive(), f"the writer stopped before the reads ended: {errors}"
        stop.set()
        th.join(timeout=30)
        assert refused() == []
        assert t._conn is conn and conn.is_open and t.reconnects == 0
        assert reads_s < 30  # a liveness bound: before the fix a read followed the growing log to its end
        # The delivery held across the reads is settled on its live channel: acknowledged, never redelivered.
        got[0].ack()
        t.process(0.5)
        assert [d.body for d in got] == [b"held"]
        full = t.read_log(from_offset=0, round=1, timeout=2.0)
        assert [r.body[:4] for r in full] == [b"r%03d" % i for i in range(300)]
    finally:
        stop.set()
        if th.is_alive():
            th.join(timeout=30)
        writer.close()
        t.close()


def _raw_chunk(ch, t: AmqpTransport, cid: str, index, count, body: bytes = b"c" * 100) -> None:
    headers = {H_ADDRESS: "server", H_CHUNK_ID: cid, H_CHUNK_INDEX: index, H_CHUNK_COUNT: count}
    ch.basic_publish(t.names.split, "server", body, pika.BasicProperties(headers=headers, user_id="guest"))


def test_chunk_poisons_are_dead_lettered_and_the_prefetch_stays_bounded(amqp_url: str, ns: str) -> None:
    """The audit's chunk-count poison (count=100000 made basic.qos raise struct.error) and 150 incomplete chunked
    messages of one sender (prefetch grew to 151): each is dead-lettered with its reason, the prefetch stays within
    ChunkLimits, and the honest message behind them is delivered."""
    from hfgan_core.transport.amqp import ChunkLimits

    limits = ChunkLimits(max_partials_per_sender=4)
    with AmqpTransport(amqp_url, namespace=ns, max_frame_body=1024, chunk_limits=limits) as t:
        t.declare()
        conn = raw(amqp_url)
        ch = conn.channel()
        _raw_chunk(ch, t, "poison", 0, 100_000)
        _raw_chunk(ch, t, "junk", "zero", [2])
        for i in range(150):
            _raw_chunk(ch, t, f"open-{i}", 0, 2)
        conn.close()
        t.publish("server", b"honest")
        handler, got = collect()
        t.consume("server", handler, prefetch=1)
        drain(t, got, 1, timeout=30)
        assert [d.body for d in got] == [b"honest"]
        assert t._consumers["server"].qos <= 1 + 4, t._consumers["server"].qos
        dead: list = []
        deadline = time.monotonic() + 10
        while len(dead) < 148 and time.monotonic() < deadline:
            t.process(0.1)
            dead = [d for d in t.dead_letters(limit=500) if d.address == "server"]
        reasons = [d.reason.split(":")[0] for d in dead]
        assert reasons.count("bad_chunk") == 2 and reasons.count("chunk_flood") == 146, reasons


def test_a_queue_declared_earlier_with_other_arguments_is_used_as_it_is(amqp_url: str, ns: str) -> None:
    """A broker that kept a queue from an earlier release (say, before the byte limits) must not stop a role: the
    queue's arguments cannot change in place, so the transport checks it passively and carries on."""
    names = Names(ns)
    conn = raw(amqp_url)
    ch = conn.channel()
    ch.queue_declare(names.queue("clustering"), durable=True, arguments={"x-dead-letter-exchange": names.dlx})
    conn.close()
    with AmqpTransport(amqp_url, namespace=ns) as t:
        handler, got = collect()
        t.consume("clustering", handler)
        t.publish("clustering", b"still served")
        drain(t, got, 1, timeout=60.0)
        assert [d.body for d in got] == [b"still served"]
