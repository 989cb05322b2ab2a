"""Broker entity names and queue arguments of one namespace, and the permission regexes of every user."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ... import roles
from ..base import (
    AGGREGATE,
    CLUSTERING,
    COORDINATOR,
    SERVER,
    TransportError,
)

MIB = 1024 * 1024
DEFAULT_NAMESPACE = "hfgan"
DEFAULT_MAX_FRAME_BODY = 8 * MIB
DEFAULT_HEARTBEAT_S = 30
DEFAULT_BLOCKED_TIMEOUT_S = 60
STREAM_MAX_AGE = "7D"
STREAM_MAX_BYTES = 20_000_000_000
STREAM_SEGMENT_BYTES = 100_000_000
DEAD_MAX_LENGTH = 100_000
STREAM_PREFETCH = 32  # update-log reads: records in flight per reader

H_ADDRESS = "x-hfgan-address"
H_REASON = "x-hfgan-reason"
H_REJECTED_BY = "x-hfgan-rejected-by"
H_ROUND = "x-hfgan-round"
H_CHUNK_ID = "x-hfgan-chunk-id"
H_CHUNK_INDEX = "x-hfgan-chunk-index"
H_CHUNK_COUNT = "x-hfgan-chunk-count"
_CHUNK_HEADERS = (H_CHUNK_ID, H_CHUNK_INDEX, H_CHUNK_COUNT)

GIB = 1024 * MIB


@dataclass(frozen=True)
class QueueLimits:
    """Broker-side bounds (docs/wire.md): bytes of ready messages per queue, and the limits of each client user.

    A full work or client queue refuses new publishes (`x-overflow: reject-publish`: the publisher's confirm is a
    nack, a TransportError), so nothing queued is dropped; the dead-letter queue drops its oldest instead
    (`drop-head`), so rejecting a message never fails. Client users are limited in connections and channels
    (RabbitMQ user limits); infrastructure users are not (trusted, and aggregators share one user)."""

    server_bytes: int = 2 * GIB
    coordinator_bytes: int = 512 * MIB
    clustering_bytes: int = 1 * GIB
    aggregate_bytes: int = 64 * MIB
    client_bytes: int = 256 * MIB
    dead_bytes: int = 1 * GIB
    other_bytes: int = 512 * MIB  # the queue of a role added to the registry (roles.py)
    client_max_connections: int = 4  # one transport, plus reconnects the broker has not noticed yet
    client_max_channels: int = 64  # a transport opens one per consumer, plus publishing and declaring

    def queue_bytes(self, address: str) -> int:
        if address.startswith("client."):
            return self.client_bytes
        return {
            SERVER: self.server_bytes,
            COORDINATOR: self.coordinator_bytes,
            CLUSTERING: self.clustering_bytes,
            AGGREGATE: self.aggregate_bytes,
        }.get(address, self.other_bytes)

    def client_user_limits(self) -> dict[str, int]:
        """The `limits` of a client user in a definitions document (rabbitmqctl set_user_limits' keys)."""
        return {"max-connections": self.client_max_connections, "max-channels": self.client_max_channels}


DEFAULT_QUEUE_LIMITS = QueueLimits()


def single_consumer(address: str) -> bool:
    """Whether `address`'s queue has one active consumer (`x-single-active-consumer`) rather than competing ones:
    the consumer mode of the role that consumes it (role registry, roles.py)."""
    return not any(address in s.addresses and s.consumer == "competing" for s in roles.specs())


# Addresses whose queue has competing consumers: a chunked message could be split between them.
NO_CHUNK_ADDRESSES = frozenset(a for s in roles.BUILTIN if s.consumer == "competing" for a in s.addresses)
_SINGLE_CONSUMER = (SERVER, COORDINATOR, CLUSTERING)
_WORK_KEYS = (COORDINATOR, CLUSTERING, AGGREGATE)


@dataclass(frozen=True)
class Names:
    """Broker entity names for one namespace (tests use throw-away namespaces so they never collide)."""

    namespace: str = DEFAULT_NAMESPACE
    limits: QueueLimits = DEFAULT_QUEUE_LIMITS

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_-]{0,40}", self.namespace):
            raise TransportError(f"bad AMQP namespace {self.namespace!r} (lowercase letters, digits, _ and -)")

    def x(self, what: str) -> str:
        return f"{self.namespace}.{what}"

    @property
    def split(self) -> str:
        return self.x("split")

    @property
    def work(self) -> str:
        return self.x("work")

    @property
    def events(self) -> str:
        return self.x("events")

    @property
    def log(self) -> str:
        return self.x("log")

    @property
    def dlx(self) -> str:
        return self.x("dlx")

    @property
    def updates(self) -> str:
        return self.x("updates")

    @property
    def dead(self) -> str:
        return self.x("dead")

    def queue(self, address: str) -> str:
        """The queue of a point-to-point address (`server`, `client.3`, `aggregate`, ...)."""
        return self.x(address)

    def exchanges(self) -> list[tuple[str, str]]:
        return [
            (self.split, "direct"),
            (self.work, "direct"),
            (self.events, "topic"),
            (self.log, "direct"),
            (self.dlx, "fanout"),
        ]

    def work_queue_args(self, address: str) -> dict[str, Any]:
        """Arguments of the queue of a point-to-point address: dead letters to the DLX, bounded in bytes (a full
        queue refuses publishes), a single active consumer unless its role's consumers compete (`aggregate`)."""
        args: dict[str, Any] = {
            "x-queue-type": "classic",
            "x-dead-letter-exchange": self.dlx,
            "x-max-length-bytes": self.limits.queue_bytes(address),
            "x-overflow": "reject-publish",
        }
        if single_consumer(address):
            args["x-single-active-consumer"] = True
        return args

    def stream_args(self) -> dict[str, Any]:
        return {
            "x-queue-type": "stream",
            "x-max-age": STREAM_MAX_AGE,
            "x-max-length-bytes": STREAM_MAX_BYTES,
            "x-stream-max-segment-size-bytes": STREAM_SEGMENT_BYTES,
        }

    def dead_args(self) -> dict[str, Any]:
        return {
            "x-queue-type": "classic",
            "x-max-length": DEAD_MAX_LENGTH,
            "x-max-length-bytes": self.limits.dead_bytes,
            "x-overflow": "drop-head",
        }

    def queues(self) -> list[tuple[str, dict[str, Any]]]:
        """The static queues with their arguments (client queues are per client, see `client_queue`)."""
        out = [(self.queue(a), self.work_queue_args(a)) for a in (SERVER, *_WORK_KEYS)]
        out.append((self.updates, self.stream_args()))
        out.append((self.dead, self.dead_args()))
        return out

    def bindings(self) -> list[tuple[str, str, str]]:
        """(exchange, queue, routing key) of the static queues."""
        out = [(self.split, self.queue(SERVER), SERVER)]
        out += [(self.work, self.queue(k), k) for k in _WORK_KEYS]
        out.append((self.log, self.updates, "updates"))
        out.append((self.dlx, self.dead, ""))
        return out

    def client_queue(self, client: int) -> tuple[str, dict[str, Any], tuple[str, str, str]]:
        name = self.queue(f"client.{int(client)}")
        return name, self.work_queue_args(f"client.{int(client)}"), (self.split, name, f"client.{int(client)}")


def _definition_entities(names: Names, vhost: str) -> dict[str, list[dict[str, Any]]]:
    exchanges = [
        {
            "name": n,
            "vhost": vhost,
            "type": t,
            "durable": True,
            "auto_delete": False,
            "internal": False,
            "arguments": {},
        }
        for n, t in names.exchanges()
    ]
    queues = [
        {"name": n, "vhost": vhost, "durable": True, "auto_delete": False, "arguments": a} for n, a in names.queues()
    ]
    bindings = [
        {
            "source": ex,
            "vhost": vhost,
            "destination": q,
            "destination_type": "queue",
            "routing_key": rk,
            "arguments": {},
        }
        for ex, q, rk in names.bindings()
    ]
    return {"exchanges": exchanges, "queues": queues, "bindings": bindings}


def _alt(*names: str, patterns: tuple[str, ...] = ()) -> str:
    """`^(a|b|...)$` of exact names (escaped) and extra regex patterns."""
    return "^(" + "|".join([*(re.escape(n) for n in names), *patterns]) + ")$"


_SERVER_NAMED = r"^amq\.gen-.*$"


def role_permissions(names: Names) -> dict[str, dict[str, str]]:
    """configure / write / read regexes of the infrastructure roles.

    Every infrastructure role may declare the whole static topology (whichever starts first declares it), so it
    has configure on every static entity, write on every exchange and queue (queue.bind needs write on the queue
    and read on the exchange) and read on every exchange. Reading *queues* (consuming) is per role. They may create
    and publish to client queues (configure + write on `<ns>.client.N`) but never read them. Server-named queues
    (`amq.gen-*`) are event subscriptions: exclusive to their connection, so nobody else can consume them.
    """
    n = names
    ex = [e for e, _ in n.exchanges()]
    static_q = [q for q, _ in n.queues()]
    client_q = re.escape(n.namespace) + r"\.client\.\d+"
    configure = _alt(*ex, *static_q, patterns=(client_q,)) + "|" + _SERVER_NAMED
    write = configure
    # What each role consumes, and the streams and queues it reads besides: its role registry entry (roles.py).
    reads = {
        spec.name: [n.queue(a) for a in spec.addresses] + [getattr(n, extra) for extra in spec.broker_reads]
        for spec in roles.iter_broker_roles()
    }
    return {
        role: {"configure": configure, "write": write, "read": _alt(*ex, *qs) + "|" + _SERVER_NAMED}
        for role, qs in reads.items()
    }


def client_permissions(names: Names, client: int) -> dict[str, str]:
    """A client may configure and read only its own queue (and its event subscriptions), publish to the split,
    work, events, log and dead-letter exchanges, and read (bind from) only the events exchange. Without read on
    `<ns>.split` it cannot bind a queue of its own to another client's routing key."""
    own = names.queue(roles.get("client").address(int(client)))
    return {
        "configure": _alt(own) + "|" + _SERVER_NAMED,
        "write": _alt(names.split, names.work, names.events, names.log, names.dlx) + "|" + _SERVER_NAMED,
        "read": _alt(own, names.events) + "|" + _SERVER_NAMED,
    }


ADMIN_PERMISSIONS = {"configure": ".*", "write": ".*", "read": ".*"}


ROLES = tuple(s.name for s in roles.iter_broker_roles())  # the built-in roles with broker users of their own


def broker_roles() -> tuple[str, ...]:
    """Every registered role with a broker user of its own (roles.py), now."""
    return tuple(s.name for s in roles.iter_broker_roles())


def role_username(role: str, namespace: str = DEFAULT_NAMESPACE) -> str:
    """The broker user of a role: the role's name in the default namespace, `<namespace>-<role>` in others."""
    return role if namespace == DEFAULT_NAMESPACE else f"{namespace}-{role}"


def client_username(client: int, namespace: str = DEFAULT_NAMESPACE) -> str:
    """`client-<k>` in the default namespace, `<namespace>-client-<k>` in any other (test) namespace."""
    return f"client-{int(client)}" if namespace == DEFAULT_NAMESPACE else f"{namespace}-client-{int(client)}"
