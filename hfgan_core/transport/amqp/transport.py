"""`AmqpTransport`: publish, consume, dispatch and settle over pika's BlockingConnection."""

from __future__ import annotations

import collections
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions as pex

from ...protocol.codec import WireError
from ..base import (
    EVENTS_PREFIX,
    SERVER,
    DeadLetter,
    Delivery,
    Handler,
    Transport,
    TransportError,
    is_valid_address,
    run_handler,
)
from .chunking import DEFAULT_CHUNK_LIMITS, ChunkLimits, Reassembly, _Chunking, chunk_header
from .connection import _amqp_error, _Connection, _ConnectionLost
from .stream import _UpdateLog
from .topology import (
    _CHUNK_HEADERS,
    _WORK_KEYS,
    DEFAULT_MAX_FRAME_BODY,
    DEFAULT_NAMESPACE,
    DEFAULT_QUEUE_LIMITS,
    H_ADDRESS,
    H_CHUNK_ID,
    H_REASON,
    H_REJECTED_BY,
    NO_CHUNK_ADDRESSES,
    Names,
    QueueLimits,
)

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Consumer:
    address: str
    handler: Handler
    prefetch: int
    queue: str = ""
    channel: Any = None
    tag: str | None = None
    epoch: int = 0
    broken: bool = False
    qos: int = 0
    chunks: Reassembly = field(default_factory=Reassembly)
    unsettled_extra: dict[int, int] = field(default_factory=dict)  # chunked deliveries in flight -> extra chunks


class AmqpTransport(_Connection, _Chunking, _UpdateLog, Transport):
    """RabbitMQ transport. Options (keyword arguments, or `open_transport(url, **options)`):

    - `namespace` ("hfgan"): prefix of every exchange and queue;
    - `max_frame_body` (8 MiB): bodies above this travel in chunks;
    - `topology` ("auto"): "declare" declares every entity (needs configure rights), "passive" only checks that
      they exist (least-privileged users, topology loaded from definitions), "auto" declares and falls back to
      passive checks after the first ACCESS_REFUSED;
    - `reconnect_timeout` (60 s) and `reconnect_max_wait` (5 s): how long and how far apart reconnects are tried;
    - `chunk_timeout` (120 s): an incomplete chunked message older than this is dead-lettered;
    - `chunk_limits` (`ChunkLimits()`): chunks per message, incomplete messages and bytes per sender, prefetch;
    - `queue_limits` (`QueueLimits()`): the bytes each queue it declares may hold (must match the broker's);
    - `log_idle` (0.25 s): `read_log` stops when no record arrives for this long;
    - `name`: connection name shown by the broker.
    URL query parameters (`heartbeat`, `blocked_connection_timeout`, `socket_timeout`, ...) are pika's.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        max_frame_body: int = DEFAULT_MAX_FRAME_BODY,
        topology: str = "auto",
        reconnect_timeout: float = 60.0,
        reconnect_max_wait: float = 5.0,
        chunk_timeout: float = 120.0,
        log_idle: float = 0.25,
        name: str | None = None,
        chunk_limits: ChunkLimits = DEFAULT_CHUNK_LIMITS,
        queue_limits: QueueLimits = DEFAULT_QUEUE_LIMITS,
    ):
        if topology not in ("auto", "declare", "passive"):
            raise TransportError(f"topology must be auto, declare or passive, not {topology!r}")
        if int(max_frame_body) < 1024:
            raise TransportError("max_frame_body must be at least 1024 bytes")
        self.url = url
        self.names = Names(namespace, queue_limits)
        self.max_frame_body = int(max_frame_body)
        self.topology = topology
        self.reconnect_timeout = float(reconnect_timeout)
        self.reconnect_max_wait = float(reconnect_max_wait)
        self.chunk_timeout = float(chunk_timeout)
        self.log_idle = float(log_idle)
        self.chunk_limits = chunk_limits
        self._params = self._parameters(url, name)
        self._username = self._params.credentials.username
        self._passive = topology == "passive"
        self._conn: Any = None
        self._pub: Any = None
        self._decl: Any = None
        self._consumers: dict[str, _Consumer] = {}
        self._inbox: collections.deque[tuple[_Consumer, int, Any, Any, bytes]] = collections.deque()
        self._client_queues: set[str] = set()
        self._closed = False
        self.reconnects = 0
        self.published_bytes = 0
        self.published_messages = 0

    # ---------------------------------------------------------------------------------------------- publish
    def _route(self, address: str) -> tuple[str, str, bool]:
        """(exchange, routing key, mandatory) of an address."""
        if address == SERVER or address.startswith("client."):
            return self.names.split, address, True
        if address in _WORK_KEYS:
            return self.names.work, address, True
        if address.startswith(EVENTS_PREFIX):
            return self.names.events, address[len(EVENTS_PREFIX) :], False  # nobody listening is fine for events
        raise TransportError(f"unknown address {address!r}")

    def _props(self, headers: dict[str, Any], persistent: bool) -> pika.BasicProperties:
        return pika.BasicProperties(
            delivery_mode=2 if persistent else 1,
            headers=headers,
            user_id=self._username,
            message_id=uuid.uuid4().hex,
            timestamp=int(time.time()),
            app_id="hfgan",
        )

    def _send(
        self, exchange: str, key: str, frames: list[tuple[dict[str, Any], Any]], persistent: bool, mandatory: bool
    ) -> None:
        for headers, piece in frames:
            try:
                self._pub.basic_publish(
                    exchange, key, bytes(piece), self._props(headers, persistent), mandatory=mandatory
                )
            except pex.UnroutableError as exc:
                raise TransportError(f"message to {exchange}/{key} is unroutable (no queue bound)") from exc
            except pex.NackError as exc:
                raise TransportError(f"broker refused (nacked) the message to {exchange}/{key}") from exc
            except pex.ChannelClosedByBroker as exc:
                self._open_publisher()
                raise _amqp_error(exc) from exc

    def publish(self, address: str, body: bytes, *, persistent: bool = True) -> None:
        self._check_open()
        if not is_valid_address(address):
            raise TransportError(f"unknown address {address!r}")
        if not isinstance(body, bytes | bytearray | memoryview):
            raise TransportError("message bodies are bytes")
        body = bytes(body)
        if address in NO_CHUNK_ADDRESSES and len(body) > self.max_frame_body:
            raise TransportError(
                f"message of {len(body)} bytes to {address!r} exceeds max_frame_body "
                f"({self.max_frame_body}); competing consumers cannot reassemble chunks: send a "
                f"reference to the update log instead"
            )
        exchange, key, mandatory = self._route(address)
        frames = self._frames(body, {H_ADDRESS: address})

        def run() -> None:
            if address.startswith("client."):
                self._ensure_client_queue(address)
            self._send(exchange, key, frames, persistent, mandatory)

        self._retrying(run, f"publish to {address}")
        self.published_bytes += len(body)
        self.published_messages += 1

    # ---------------------------------------------------------------------------------------------- consume
    def consume(self, address: str, handler: Handler, *, prefetch: int = 1) -> None:
        self._check_open()
        if not is_valid_address(address):
            raise TransportError(f"unknown address {address!r}")
        if address in self._consumers:
            raise TransportError(f"{address} already has a consumer in this transport")
        if not 0 <= prefetch <= self.chunk_limits.max_prefetch:
            raise TransportError(f"prefetch must be between 0 and {self.chunk_limits.max_prefetch}")
        cons = _Consumer(address, handler, int(prefetch), chunks=Reassembly(self.chunk_limits))
        self._consumers[address] = cons

        def start() -> None:
            if cons.channel is None or not cons.channel.is_open:  # a (re)connect may have started it already
                self._start_consumer(cons)

        try:
            self._retrying(start, f"consume {address}")
        except BaseException:
            self._consumers.pop(address, None)
            self._reset_consumer(cons)
            raise

    def _start_consumer(self, cons: _Consumer) -> None:
        old = cons.channel
        self._reset_consumer(cons)
        if old is not None and old.is_open:
            with contextlib.suppress(Exception):
                old.close()  # never two live consumers for one address
        address = cons.address
        queue = ""
        if address.startswith("client."):
            self._ensure_client_queue(address)
            queue = self.names.queue(address)
        elif not address.startswith(EVENTS_PREFIX):
            # Declared again here, not only at start-up: a consumer is restarted after its queue was deleted.
            queue = self.names.queue(address)
            exchange, key, _ = self._route(address)
            self._declare_queue(queue, self.names.work_queue_args(address))
            self._bind(exchange, queue, key)
        ch = self._conn.channel()
        try:
            if not queue:
                # A private subscription: lives as long as this consumer's connection.
                queue = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
                ch.queue_bind(queue, self.names.events, routing_key=address[len(EVENTS_PREFIX) :])
            cons.qos = cons.prefetch
            # One consumer per channel, so the channel-wide limit is this consumer's prefetch, and unlike a
            # per-consumer limit it can be raised while a chunked message is being reassembled.
            ch.basic_qos(prefetch_count=cons.prefetch, global_qos=True)
            epoch = cons.epoch

            def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:
                self._inbox.append((cons, epoch, method, props, body))

            def on_cancel(_frame: Any) -> None:
                log.warning("broker cancelled the consumer of %s (queue deleted?); it will be re-registered", address)
                cons.broken = True

            ch.add_on_cancel_callback(on_cancel)
            cons.tag = ch.basic_consume(queue, on_message, auto_ack=False)
        except pex.ChannelClosedByBroker as exc:
            raise _amqp_error(exc) from exc
        cons.channel, cons.queue, cons.broken = ch, queue, False

    def _reset_consumer(self, cons: _Consumer) -> None:
        """Invalidate everything delivered to the consumer's current channel (those deliveries come back)."""
        cons.epoch += 1
        cons.channel, cons.tag = None, None
        cons.chunks.clear()
        cons.unsettled_extra.clear()

    def cancel(self, address: str) -> None:
        cons = self._consumers.pop(address, None)
        if cons is None:
            return
        ch = cons.channel
        self._reset_consumer(cons)
        self._inbox = collections.deque(e for e in self._inbox if e[0] is not cons)
        if ch is not None and ch.is_open:
            # Closing the channel hands its unacknowledged deliveries back to the queue, flagged redelivered.
            with contextlib.suppress(Exception):
                ch.close()

    def process(self, timeout: float = 0.0) -> int:
        self._check_open()
        deadline = time.monotonic() + max(0.0, timeout)
        handled = 0
        while True:
            self._pump(0)
            handled += self._dispatch()
            if self._inbox:
                continue
            if handled:
                return handled
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return 0
            self._pump(min(remaining, 0.2))

    def _pump(self, time_limit: float) -> None:
        def run() -> None:
            self._conn.process_data_events(time_limit=time_limit)
            for cons in list(self._consumers.values()):
                if cons.broken or cons.channel is None or not cons.channel.is_open:
                    self._restart_consumer(cons)

        self._retrying(run, "process")

    def _restart_consumer(self, cons: _Consumer) -> None:
        self._client_queues.discard(cons.address)  # re-declare: the queue may have been deleted
        self._start_consumer(cons)

    # ------------------------------------------------------------------------------------------- dispatching
    def _dispatch(self) -> int:
        handled = 0
        while self._inbox:
            cons, epoch, method, props, body = self._inbox.popleft()
            if epoch != cons.epoch or self._consumers.get(cons.address) is not cons:
                continue  # its channel is gone; the broker delivers it again
            headers = dict(props.headers or {})
            if H_CHUNK_ID in headers:
                delivery = self._add_chunk(cons, method, props, headers, body)
                if delivery is None:
                    continue
            else:
                delivery = self._delivery(
                    cons,
                    [method.delivery_tag],
                    body,
                    headers,
                    props.user_id,
                    bool(method.redelivered),
                    method.routing_key,
                )
            handled += 1
            run_handler(cons.handler, delivery, log)
        for cons in list(self._consumers.values()):
            self._expire_partials(cons)
        return handled

    def _delivery(
        self,
        cons: _Consumer,
        tags: list[int],
        body: bytes,
        headers: dict[str, Any],
        user_id: str | None,
        redelivered: bool,
        routing_key: str,
    ) -> Delivery:
        address = cons.address
        if address.startswith(EVENTS_PREFIX):
            address = EVENTS_PREFIX + routing_key  # the concrete event, not the subscription pattern
        shown = {k: str(v) for k, v in headers.items() if k not in _CHUNK_HEADERS}
        if user_id:
            shown["user_id"] = user_id
        key = tags[0]
        if len(tags) > 1:
            cons.unsettled_extra[key] = len(tags) - 1
        epoch = cons.epoch

        def settle(how: str, reason: str | None) -> None:
            if how == "requeue" and H_CHUNK_ID in headers:
                cons.chunks.reopen(user_id or "", str(headers[H_CHUNK_ID]))  # its chunks come back: reassemble
            self._settle(cons, epoch, key, tags, address, body, headers, how, reason)

        return Delivery(body, address, redelivered=redelivered, headers=shown, _settle=settle)

    def _settle(
        self,
        cons: _Consumer,
        epoch: int,
        key: int,
        tags: list[int],
        address: str,
        body: bytes,
        headers: dict[str, Any],
        how: str,
        reason: str | None,
    ) -> None:
        ch = cons.channel
        if self._closed or epoch != cons.epoch or ch is None or not ch.is_open:
            log.warning(
                "%s of a delivery from %s ignored: its channel is gone, the broker delivers it again", how, address
            )
            return
        try:
            if how == "reject":
                dead_headers = {k: v for k, v in headers.items() if k not in _CHUNK_HEADERS}
                dead_headers.update(
                    {
                        H_ADDRESS: address,
                        H_REASON: (reason or "rejected").splitlines()[0][:1000],
                        H_REJECTED_BY: self._username,
                    }
                )
                # Confirmed before the ack: a crash in between leaves a duplicate dead letter, never a lost one.
                with self._guard():
                    self._send(self.names.dlx, "", self._frames(body, dead_headers), True, True)
            for tag in tags:
                if how == "requeue":
                    ch.basic_nack(tag, requeue=True)  # the broker flags it redelivered
                else:
                    ch.basic_ack(tag)
        except (_ConnectionLost, pex.AMQPError) as exc:
            log.warning("%s of a delivery from %s failed (%s); the broker delivers it again", how, address, exc)
            return
        finally:
            cons.unsettled_extra.pop(key, None)
        self._update_qos(cons)

    # ------------------------------------------------------------------------------------------- dead letters
    def dead_letters(self, *, limit: int = 1000) -> list[DeadLetter]:
        """Reads the dead-letter queue without consuming it (basic.get, then the channel closes and the broker
        puts every message back in place)."""
        self._check_open()

        def run() -> list[DeadLetter]:
            ch = self._conn.channel()
            out: list[DeadLetter] = []
            partials: dict[str, dict[int, bytes]] = {}
            try:
                while len(out) < limit:
                    method, props, body = ch.basic_get(self.names.dead, auto_ack=False)
                    if method is None:
                        break
                    headers = dict(props.headers or {})
                    address, reason = self._dead_origin(headers)
                    if H_CHUNK_ID in headers:
                        try:
                            cid, index, count = chunk_header(headers, self.chunk_limits)
                        except WireError as exc:  # junk on the dead-letter exchange: listed as it is
                            out.append(DeadLetter(address, body, f"{reason} ({exc})"))
                            continue
                        pieces = partials.setdefault(cid, {})
                        pieces.setdefault(index, body)
                        if len(pieces) < count:
                            continue
                        body = b"".join(pieces.get(i, b"") for i in range(count))
                        del partials[cid]
                    out.append(DeadLetter(address, body, reason))
            finally:
                with contextlib.suppress(Exception):
                    ch.close()
            return out

        return self._retrying(run, "dead_letters")

    def _dead_origin(self, headers: dict[str, Any]) -> tuple[str, str]:
        if H_REASON in headers:
            return str(headers.get(H_ADDRESS, "?")), str(headers[H_REASON])
        # Dead-lettered by the broker itself (expiry, overflow, a foreign consumer's reject): x-death says why.
        deaths = headers.get("x-death") or [{}]
        death = deaths[0] if isinstance(deaths, list) and deaths else {}
        queue = str(death.get("queue", "?"))
        prefix = self.names.namespace + "."
        address = queue[len(prefix) :] if queue.startswith(prefix) else queue
        return str(headers.get(H_ADDRESS, address)), f"broker:{death.get('reason', 'unknown')}"

    # ---------------------------------------------------------------------------------------------- closing
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for cons in self._consumers.values():
            self._reset_consumer(cons)
        self._consumers.clear()
        self._inbox.clear()
        conn, self._conn = self._conn, None
        if conn is not None and conn.is_open:
            with contextlib.suppress(Exception):
                conn.close()  # unacknowledged deliveries go back to their queues
