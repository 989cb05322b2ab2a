"""The connection of an AMQP transport: reconnects with backoff, pika's errors translated, and the topology
declared (or checked passively) on every new connection."""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import pika
import pika.exceptions as pex
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from ...settings import redact_url
from ..base import (
    TransportError,
)
from .tls import tls_options
from .topology import (
    DEFAULT_BLOCKED_TIMEOUT_S,
    DEFAULT_HEARTBEAT_S,
)

log = logging.getLogger(__name__)


T = TypeVar("T")


# Errors after which the connection is unusable and worth re-opening. Authentication and access errors are not:
# retrying them for a minute would only hide a configuration mistake.
_FATAL_CONN = (
    pex.ProbableAuthenticationError,
    pex.ProbableAccessDeniedError,
    pex.AuthenticationError,
    pex.IncompatibleProtocolError,
)
_LOST_CONN = (pex.AMQPConnectionError, pex.ConnectionWrongStateError, ConnectionError, OSError)

# pika reads its socket 4 KiB at a time and appends every read to its frame buffer (`bytes +=`), so a 128 KiB body
# frame costs 32 reads and about 2 MiB of buffer copies: for split traffic (megabytes a message) that was most of
# the transport's CPU and, through TCP flow control, the broker's too (docs/benchmarks.md). One frame per read (the
# broker's frame_max, 128 KiB) cuts both; a wakeup may read several frames before the loop turns to writing.
RECV_BYTES = 128 * 1024
CONSUME_BYTES_PER_WAKEUP = 1024 * 1024


def _tune_reads(conn: Any) -> None:
    """Raise a BlockingConnection's socket read size (pika's defaults are class attributes of its stream transport;
    these instance attributes override them for this connection only). Skipped if pika's internals differ."""
    stream = getattr(getattr(conn, "_impl", None), "_transport", None)
    if stream is not None and hasattr(stream, "_MAX_RECV_BYTES") and hasattr(stream, "_MAX_CONSUME_BYTES"):
        stream._MAX_RECV_BYTES = RECV_BYTES
        stream._MAX_CONSUME_BYTES = max(int(stream._MAX_CONSUME_BYTES), CONSUME_BYTES_PER_WAKEUP)


class _ConnectionLost(Exception):
    """Internal: the connection died; the operation is retried after a reconnect."""


class AccessRefused(TransportError):
    """The broker refused an operation to this user (AMQP 403 ACCESS_REFUSED): a permissions problem, not a
    transient one, so it is never retried."""


def _amqp_error(exc: BaseException) -> TransportError:
    code = getattr(exc, "reply_code", None)
    text = getattr(exc, "reply_text", str(exc))
    if code == 403:
        return AccessRefused(f"access refused by the broker: {text}")
    return TransportError(f"broker error {code}: {text}" if code else f"broker error: {exc!r}")


class _Connection:
    """Connection, reconnect and declaration methods of `AmqpTransport`."""

    # ------------------------------------------------------------------------------------------ connection
    @staticmethod
    def _parameters(url: str, name: str | None) -> pika.URLParameters:
        parts = urllib.parse.urlsplit(url)
        query = dict(urllib.parse.parse_qsl(parts.query))
        ssl_options = tls_options(parts.scheme, parts.hostname, query)
        query.setdefault("heartbeat", str(DEFAULT_HEARTBEAT_S))
        query.setdefault("blocked_connection_timeout", str(DEFAULT_BLOCKED_TIMEOUT_S))
        query.setdefault("connection_attempts", "1")  # retries are ours (tenacity), with backoff
        query.setdefault("socket_timeout", "10")
        try:
            params = pika.URLParameters(urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query))))
        except (ValueError, TypeError) as exc:
            raise TransportError(f"bad broker URL {redact_url(url)!r}: {exc}") from exc
        params.ssl_options = ssl_options
        params.client_properties = {"connection_name": name or f"hfgan-{os.getpid()}", "product": "hfgan"}
        return params

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("transport is closed")

    def _connect(self) -> None:
        with self._guard():
            conn = pika.BlockingConnection(self._params)
        _tune_reads(conn)
        self._conn = conn
        self._client_queues.clear()
        try:
            with self._guard():
                self._open_publisher()
                self._declare_topology()
                for cons in self._consumers.values():
                    self._start_consumer(cons)
        except BaseException:
            self._drop_connection()  # a half-set-up connection would skip the declarations next time
            raise

    def _open_publisher(self) -> None:
        self._pub = self._conn.channel()
        self._pub.confirm_delivery()

    def _ensure(self) -> None:
        self._check_open()
        if self._conn is None or not self._conn.is_open:
            self._drop_connection()
            self._connect()
        elif self._pub is None or not self._pub.is_open:
            with self._guard():
                self._open_publisher()

    def _drop_connection(self) -> None:
        """Forget a dead (or dying) connection: its unsettled deliveries go back to their queues broker-side."""
        conn, self._conn, self._pub, self._decl = self._conn, None, None, None
        for cons in self._consumers.values():
            self._reset_consumer(cons)
        self._inbox.clear()
        if conn is not None and conn.is_open:
            with contextlib.suppress(Exception):
                conn.close()

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Translate pika's errors, at connect and after: connection loss -> _ConnectionLost (retried), broker
        refusals (login, access, certificate) -> TransportError."""
        try:
            yield
        except _FATAL_CONN as exc:
            raise TransportError(f"broker refused the login of {self._username!r}: {exc!r}") from exc
        except pex.ConnectionClosedByBroker as exc:
            if exc.reply_code in (403, 530):
                raise TransportError(f"broker closed the connection: {exc.reply_text}") from exc
            raise _ConnectionLost(repr(exc)) from exc
        except ssl.SSLCertVerificationError as exc:  # at connect: a wrong CA or host name does not heal by retrying
            raise TransportError(f"broker certificate rejected: {exc.verify_message or exc}") from exc
        except _LOST_CONN as exc:
            raise _ConnectionLost(repr(exc)) from exc
        except pex.ChannelClosedByBroker as exc:  # ACCESS_REFUSED, NOT_FOUND, ...: the operation's channel is gone
            raise _amqp_error(exc) from exc
        except pex.AMQPChannelError as exc:
            raise TransportError(f"channel error: {exc!r}") from exc

    def _retrying(self, fn: Callable[[], T], what: str) -> T:
        """Run `fn` on a live connection; on connection loss reconnect with capped exponential backoff and retry."""

        def attempt() -> T:
            self._ensure()
            with self._guard():
                return fn()

        def before_sleep(state: Any) -> None:
            self.reconnects += 1
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "broker connection lost during %s (%s); reconnecting (attempt %d)", what, exc, state.attempt_number
            )
            self._drop_connection()

        retrying = Retrying(
            retry=retry_if_exception_type(_ConnectionLost),
            wait=wait_exponential(multiplier=0.1, min=0.05, max=self.reconnect_max_wait),
            stop=stop_after_delay(self.reconnect_timeout),
            before_sleep=before_sleep,
            reraise=False,
        )
        try:
            return retrying(attempt)
        except RetryError as exc:
            self._drop_connection()
            cause = exc.last_attempt.exception()
            raise TransportError(
                f"broker unreachable at {self._params.host}:{self._params.port} "
                f"for {self.reconnect_timeout:.0f} s during {what}: {cause}"
            ) from cause

    # -------------------------------------------------------------------------------------------- topology
    def declare(self) -> None:
        """Connect if needed and declare (or, for least-privileged users, check) the topology."""
        self._check_open()
        if self._conn is not None and self._conn.is_open:
            self._retrying(self._declare_topology, "declare")
        else:
            self._retrying(lambda: None, "connect")

    def _decl_channel(self) -> Any:
        if self._decl is None or not self._decl.is_open:
            self._decl = self._conn.channel()
        return self._decl

    def _declare_op(self, active: Callable[[Any], None], passive: Callable[[Any], None] | None) -> None:
        """One declaration, active unless the transport is passive; in "auto" mode an ACCESS_REFUSED switches the
        transport to passive checks (the topology then comes from definitions.json or a privileged role)."""
        if not self._passive:
            try:
                active(self._decl_channel())
                return
            except pex.ChannelClosedByBroker as exc:
                self._decl = None
                if exc.reply_code == 406 and passive is not None:
                    # An entity declared by an earlier release with other arguments (e.g. before the queue byte
                    # limits): RabbitMQ cannot change a queue's arguments in place, so use it as it is rather
                    # than refusing to start; deleting it (or a policy) applies the new arguments.
                    log.warning("%s; using the existing entity as it is", exc.reply_text)
                    passive(self._decl_channel())
                    return
                if exc.reply_code != 403 or self.topology != "auto":
                    raise _amqp_error(exc) from exc
                log.info("user %r may not declare the topology; checking it passively instead", self._username)
                self._passive = True
        if passive is None:
            return
        try:
            passive(self._decl_channel())
        except pex.ChannelClosedByBroker as exc:
            self._decl = None
            if exc.reply_code == 404:
                raise TransportError(
                    f"broker topology incomplete: {exc.reply_text}; import "
                    f"broker_config/definitions.json or start a role that may declare it"
                ) from exc
            raise _amqp_error(exc) from exc

    def _declare_exchange(self, name: str, kind: str) -> None:
        self._declare_op(
            lambda ch: ch.exchange_declare(name, exchange_type=kind, durable=True),
            lambda ch: ch.exchange_declare(name, passive=True),
        )

    def _declare_queue(self, name: str, args: dict[str, Any]) -> None:
        self._declare_op(
            lambda ch: ch.queue_declare(name, durable=True, arguments=args),
            lambda ch: ch.queue_declare(name, passive=True),
        )

    def _bind(self, exchange: str, queue: str, key: str) -> None:
        self._declare_op(lambda ch: ch.queue_bind(queue, exchange, routing_key=key), None)

    def _declare_topology(self) -> None:
        for name, kind in self.names.exchanges():
            self._declare_exchange(name, kind)
        for name, args in self.names.queues():
            self._declare_queue(name, args)
        for ex, q, rk in self.names.bindings():
            self._bind(ex, q, rk)

    def _ensure_client_queue(self, address: str) -> None:
        """Client queues exist per client; declared (and bound) on first use by publisher or consumer, so a message
        sent before its client consumes waits in the queue instead of being unroutable."""
        if address in self._client_queues:
            return
        name, args, (ex, q, rk) = self.names.client_queue(int(address[7:]))
        self._declare_queue(name, args)
        self._bind(ex, q, rk)
        self._client_queues.add(address)

    def delete_topology(self, clients: Iterable[int] = ()) -> None:
        """Delete every exchange and queue of this namespace: the static ones, the client queues this transport
        used and those of `clients` (tests, teardown)."""
        self._check_open()
        client_queues = {self.names.queue(a) for a in self._client_queues}
        client_queues |= {self.names.queue(f"client.{int(k)}") for k in clients}

        def run() -> None:
            ch = self._decl_channel()
            for name, _ in self.names.queues():
                ch.queue_delete(name)
            for name in sorted(client_queues | {self.names.queue(a) for a in self._client_queues}):
                ch.queue_delete(name)
            for name, _ in self.names.exchanges():
                ch.exchange_delete(name)

        self._retrying(run, "delete_topology")
        self._client_queues.clear()
