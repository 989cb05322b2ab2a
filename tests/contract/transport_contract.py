"""What every Transport must do (hfgan_core/transport/base.py), whatever carries the bytes.

Subclasses implement `make()` (a fresh, isolated transport: its own queues, its own update log position) and may
override `dispose(t)`. Offsets in the update log are relative to `t.log_length()` taken at the start of a test, so
a shared log (a RabbitMQ stream) works as well as a fresh one.
"""

from __future__ import annotations

import os
import time

import pytest

from hfgan_core.transport.base import Delivery, Transport, TransportError


def drain(t: Transport, got: list, want: int, timeout: float = 10.0) -> list:
    """Process until `got` holds `want` deliveries or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        t.process(min(0.2, max(0.0, deadline - time.monotonic())))
    return got


def collect(acks: bool = True):
    """A handler that records deliveries (acking them unless told not to) and its list."""
    got: list[Delivery] = []

    def handler(d: Delivery) -> None:
        got.append(d)
        if acks:
            d.ack()

    return handler, got


class TransportContract:
    large_size = 20 * 1024 * 1024  # above the AMQP transport's 8 MiB chunk size: three chunks

    def make(self) -> Transport:
        raise NotImplementedError

    def dispose(self, t: Transport) -> None:
        t.close()

    @pytest.fixture
    def t(self):
        t = self.make()
        t.declare()
        yield t
        self.dispose(t)

    # ------------------------------------------------------------------------------------------ point to point
    def test_round_trip_bytes_in_order(self, t: Transport) -> None:
        bodies = [bytes([i]) * (i + 1) + b"\x00\xff" for i in range(6)]
        for b in bodies:
            t.publish("server", b)
        handler, got = collect()
        t.consume("server", handler)
        drain(t, got, len(bodies))
        assert [d.body for d in got] == bodies
        assert all(d.address == "server" and not d.redelivered for d in got)

    def test_every_point_to_point_address_delivers(self, t: Transport) -> None:
        for address in ("coordinator", "clustering", "aggregate", "client.0", "client.17"):
            handler, got = collect()
            t.consume(address, handler)
            t.publish(address, address.encode())
            drain(t, got, 1)
            assert [(d.address, d.body) for d in got] == [(address, address.encode())]

    def test_client_queue_keeps_messages_sent_before_its_consumer(self, t: Transport) -> None:
        t.publish("client.5", b"early")
        handler, got = collect()
        t.consume("client.5", handler)
        drain(t, got, 1)
        assert [d.body for d in got] == [b"early"]

    def test_ack_removes(self, t: Transport) -> None:
        t.publish("coordinator", b"once")
        handler, got = collect()
        t.consume("coordinator", handler)
        drain(t, got, 1)
        t.cancel("coordinator")
        again, got2 = collect()
        t.consume("coordinator", again)
        assert t.process(0.3) == 0
        assert got2 == [] and [d.settled for d in got] == ["ack"]

    def test_unsettled_is_redelivered_after_cancel(self, t: Transport) -> None:
        t.publish("clustering", b"job")
        handler, got = collect(acks=False)
        t.consume("clustering", handler)
        drain(t, got, 1)
        assert not got[0].redelivered
        t.cancel("clustering")
        handler2, got2 = collect()
        t.consume("clustering", handler2)
        drain(t, got2, 1)
        assert [d.body for d in got2] == [b"job"]
        assert got2[0].redelivered

    def test_reject_dead_letters_with_reason(self, t: Transport) -> None:
        t.publish("coordinator", b"poison")
        got: list[Delivery] = []

        def handler(d: Delivery) -> None:
            got.append(d)
            d.reject("bad_shape: GHeadOut.h is 3x3")

        t.consume("coordinator", handler)
        drain(t, got, 1)
        dead = t.dead_letters()
        assert any(
            x.address == "coordinator" and x.body == b"poison" and x.reason == "bad_shape: GHeadOut.h is 3x3"
            for x in dead
        ), dead
        # A rejected message is settled: it does not come back.
        t.cancel("coordinator")
        handler2, got2 = collect()
        t.consume("coordinator", handler2)
        assert t.process(0.3) == 0 and got2 == []

    def test_a_message_whose_handler_fails_twice_is_dead_lettered(self, t: Transport) -> None:
        """A handler that raises gets the message once more (redelivered); failing again dead-letters it with the
        reason. process() never raises for it, and the next message is handled."""
        t.publish("server", b"crashes its handler")
        t.publish("server", b"fine")
        seen: list[tuple[bytes, bool]] = []
        ok: list[Delivery] = []

        def handler(d: Delivery) -> None:
            seen.append((d.body, d.redelivered))
            if d.body.startswith(b"crashes"):
                raise RuntimeError("handler bug")
            ok.append(d)
            d.ack()

        t.consume("server", handler)
        drain(t, ok, 1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(x.reason.startswith("failed_twice") for x in t.dead_letters()):
            t.process(0.1)
        crashes = [r for b, r in seen if b.startswith(b"crashes")]
        assert crashes == [False, True], seen
        dead = [x for x in t.dead_letters() if x.address == "server" and x.body == b"crashes its handler"]
        assert [x.reason for x in dead] == ["failed_twice: RuntimeError: handler bug"]
        assert [d.body for d in ok] == [b"fine"]
        t.cancel("server")
        handler2, got2 = collect()
        t.consume("server", handler2)
        assert t.process(0.3) == 0 and got2 == []

    def test_a_handler_that_settles_and_raises_propagates(self, t: Transport) -> None:
        """Strict embedded runs reject a message and re-raise, so that bugs fail loudly: that is not swallowed."""
        t.publish("server", b"x")

        def handler(d: Delivery) -> None:
            d.reject("internal: bug")
            raise RuntimeError("bug")

        t.consume("server", handler)
        with pytest.raises(RuntimeError):
            drain(t, [], 1)

    def test_delivery_settles_once(self, t: Transport) -> None:
        t.publish("server", b"x")
        handler, got = collect()
        t.consume("server", handler)
        drain(t, got, 1)
        with pytest.raises(TransportError):
            got[0].ack()
        with pytest.raises(TransportError):
            got[0].reject("again")

    def test_handler_may_publish_while_processing(self, t: Transport) -> None:
        replies, got = collect()

        def server(d: Delivery) -> None:
            t.publish("client.2", d.body[::-1])
            d.ack()

        t.consume("server", server)
        t.consume("client.2", replies)
        t.publish("server", b"abc")
        drain(t, got, 1)
        assert [d.body for d in got] == [b"cba"]

    def test_a_second_consumer_of_one_address_is_refused(self, t: Transport) -> None:
        handler, _ = collect()
        t.consume("aggregate", handler)
        with pytest.raises(TransportError):
            t.consume("aggregate", handler)

    # ------------------------------------------------------------------------------------------------- events
    def test_events_fan_out_with_wildcards(self, t: Transport) -> None:
        h_round, by_round = collect()
        h_done, by_done = collect()
        t.consume("events.round.#", h_round)
        t.consume("events.*.done", h_done)
        t.publish("events.round.start", b"start", persistent=False)
        t.publish("events.round.done", b"done", persistent=False)
        t.publish("events.run.done", b"run-done", persistent=False)
        t.publish("events.round.step.7", b"step", persistent=False)
        deadline = time.monotonic() + 60  # a bound on a wait, not a speed: as long as a busy host needs
        while (len(by_round) < 3 or len(by_done) < 2) and time.monotonic() < deadline:
            t.process(0.2)
        t.process(0.3)  # nothing else may arrive
        assert sorted(d.body for d in by_round) == [b"done", b"start", b"step"]
        assert sorted(d.body for d in by_done) == [b"done", b"run-done"]
        assert all(d.address.startswith("events.") for d in by_round + by_done)

    def test_events_without_subscribers_are_fine(self, t: Transport) -> None:
        t.publish("events.nobody.listens", b"x", persistent=False)

    # ------------------------------------------------------------------------------------------------ addresses
    @pytest.mark.parametrize("address", ["nowhere", "client.x", "client.", "events.", "server.1", ""])
    def test_unknown_address_is_rejected(self, t: Transport, address: str) -> None:
        with pytest.raises(TransportError):
            t.publish(address, b"x")
        handler, _ = collect()
        with pytest.raises(TransportError):
            t.consume(address, handler)

    def test_bodies_must_be_bytes(self, t: Transport) -> None:
        with pytest.raises(TransportError):
            t.publish("server", "text")  # type: ignore[arg-type]

    # ---------------------------------------------------------------------------------------------- update log
    def test_update_log_by_offset_and_round(self, t: Transport) -> None:
        start = t.log_length()  # type: ignore[attr-defined]
        entries = [(b"u-a", 3), (b"u-b", 3), (b"u-c", 4), (b"u-d", 5)]
        for body, rnd in entries:
            t.append_log(body, round=rnd)
        recs = t.read_log(from_offset=start)
        assert [(r.body, r.round) for r in recs] == entries
        offsets = [r.offset for r in recs]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets) and offsets[0] >= start
        assert [r.body for r in t.read_log(from_offset=start, round=3)] == [b"u-a", b"u-b"]
        assert [r.body for r in t.read_log(from_offset=start, round=99)] == []
        assert [r.body for r in t.read_log(from_offset=offsets[2])] == [b"u-c", b"u-d"]
        assert t.log_length() > offsets[-1]  # type: ignore[attr-defined]

    def test_read_log_past_the_end_is_empty_and_terminates(self, t: Transport) -> None:
        t.append_log(b"last", round=1)
        end = t.log_length()  # type: ignore[attr-defined]
        began = time.monotonic()
        assert t.read_log(from_offset=end, timeout=1.0) == []
        assert time.monotonic() - began < 5.0

    # ------------------------------------------------------------------------------------------ large messages
    def test_large_message_round_trip(self, t: Transport) -> None:
        big = os.urandom(self.large_size)
        t.publish("client.1", big)
        t.publish("client.1", b"small after")
        handler, got = collect()
        t.consume("client.1", handler, prefetch=1)
        drain(t, got, 2, timeout=30)
        assert len(got) == 2 and got[0].body == big and got[1].body == b"small after"

    def test_large_reject_keeps_the_whole_body(self, t: Transport) -> None:
        big = os.urandom(self.large_size)
        t.publish("server", big)
        got: list[Delivery] = []

        def handler(d: Delivery) -> None:
            got.append(d)
            d.reject("too_big_to_handle")

        t.consume("server", handler)
        drain(t, got, 1, timeout=30)
        dead = [x for x in t.dead_letters() if x.reason == "too_big_to_handle"]
        assert len(dead) == 1 and dead[0].body == big and dead[0].address == "server"

    def test_large_update_log_record(self, t: Transport) -> None:
        start = t.log_length()  # type: ignore[attr-defined]
        big = os.urandom(self.large_size)
        t.append_log(b"before", round=1)
        t.append_log(big, round=2)
        t.append_log(b"after", round=2)
        recs = t.read_log(from_offset=start)
        assert [len(r.body) for r in recs] == [6, len(big), 5]
        assert recs[1].body == big and recs[1].round == 2
        assert [r.body for r in t.read_log(from_offset=recs[1].offset, round=2)] == [big, b"after"]

    # --------------------------------------------------------------------------------------------------- close
    def test_close_semantics(self) -> None:
        t = self.make()
        t.declare()
        with t:
            t.publish("server", b"x")
        with pytest.raises(TransportError):
            t.publish("server", b"y")
        with pytest.raises(TransportError):
            t.process(0)
        handler, _ = collect()
        with pytest.raises(TransportError):
            t.consume("server", handler)
        t.close()  # idempotent
        self.after_close(t)

    def after_close(self, t: Transport) -> None:
        """Hook for a backend's cleanup of a closed transport's resources."""
