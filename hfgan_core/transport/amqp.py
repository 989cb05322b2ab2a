"""RabbitMQ transport over pika's BlockingConnection, plus the broker topology and the client-user provisioning.

Topology (namespace `hfgan` by default; `broker_config/definitions.json` is generated from `topology_definitions`,
so what the broker loads at boot and what `declare()` declares are equal, argument for argument):

| entity                 | kind                              | what                                                  |
|------------------------|-----------------------------------|-------------------------------------------------------|
| `hfgan.split`          | direct exchange                   | split traffic: key `server` -> `hfgan.server`,         |
|                        |                                   | key `client.<k>` -> `hfgan.client.<k>`                |
| `hfgan.work`           | direct exchange                   | keys `coordinator`, `clustering`, `aggregate`          |
| `hfgan.events`         | topic exchange                    | `events.<key>`; each subscriber gets an exclusive,     |
|                        |                                   | auto-delete, server-named queue bound with its pattern |
| `hfgan.log`            | direct exchange                   | key `updates` -> the stream `hfgan.updates`            |
| `hfgan.dlx`            | fanout exchange                   | dead letters -> `hfgan.dead`                           |
| `hfgan.server`, `hfgan.coordinator`, `hfgan.clustering`, `hfgan.client.<k>` | durable classic queues, single  |
|                        | active consumer, `x-dead-letter-exchange=hfgan.dlx`                                        |
| `hfgan.aggregate`      | durable classic queue, competing consumers, `x-dead-letter-exchange=hfgan.dlx`             |
| `hfgan.updates`        | durable stream (`x-max-age`, `x-max-length-bytes`): the update log, round in a header      |
| `hfgan.dead`           | durable classic queue (bounded by `x-max-length`): every rejected message with its reason  |

Work queues are reached through `hfgan.work` rather than the default exchange, so no user ever needs write access
to `amq.default` (which would let it publish into any queue, another client's included).

Guarantees: publisher confirms on every publish (and `mandatory` where a queue must exist, so an unroutable message
is a `TransportError`, never a silent drop); persistent messages unless `persistent=False`; manual acknowledgements
only; an explicit prefetch per consumer (each consumer has its own channel); heartbeats (`heartbeat=30` unless the
URL says otherwise) and `blocked_connection_timeout`. `Delivery.reject(reason)` publishes the message (confirmed)
to `hfgan.dlx` with headers `x-hfgan-reason` and `x-hfgan-address`, then acknowledges the original: nothing is lost
and the reason is kept (a plain `basic.reject` would drop it). Every published message carries the AMQP `user_id`
property, which RabbitMQ validates against the connection's user: `Delivery.headers["user_id"]` is therefore the
authenticated publisher, and roles may check it against the `sender` a message claims.

Connection loss (broker restart, network cut): `publish()` and `process()` reconnect with capped exponential
backoff (tenacity), re-declare the topology and re-register every consumer; a publish that failed midway is sent
again (at-least-once, receivers deduplicate by `msg_id`). Deliveries left unsettled on the dead channel are
redelivered by the broker with `redelivered` set; settling the stale `Delivery` afterwards is ignored with a log.
A consumer cancelled by the broker (its queue was deleted) is re-declared and re-registered.

Large bodies: anything above `max_frame_body` bytes (default 8 MiB, far under RabbitMQ's 128 MiB default
`max_message_size`, which we do not assume) travels as chunk messages with headers `x-hfgan-chunk-id`,
`x-hfgan-chunk-index`, `x-hfgan-chunk-count`. The consumer reassembles them into one `Delivery`; acknowledging or
rejecting it settles every chunk. Reassembly needs every chunk of a message at one consumer:
- the queues that receive large bodies (`server`, `client.<k>`, `coordinator`, `clustering`, event subscriptions)
  have exactly one active consumer (`x-single-active-consumer`; a standby consumer takes over when the active one
  goes away), so chunks are never split between consumers;
- while a message is incomplete the consumer raises its channel prefetch (`basic.qos`, global) by the chunks it
  still needs, so a prefetch of 1 cannot deadlock a 3-chunk message, and lowers it again when the message settles;
- `aggregate` has competing consumers, so bodies above `max_frame_body` are refused there with a TransportError:
  aggregation jobs are small, the model updates they refer to travel in the update log;
- the update log is a stream: chunk records are reassembled by `read_log`, a record's offset is its first chunk's;
- a chunked message that stays incomplete for `chunk_timeout` seconds (its publisher died midway and never retried)
  is dead-lettered with the reason `incomplete_chunked_message`; duplicate chunks (a publish retried after a
  reconnect) are deduplicated and settled with the message.

Beyond the interface: `log_length()` (the next offset of the update log, as in the memory transport; stream offsets
are not dense: a chunked record takes one offset per chunk), `delete_topology()` (tests, teardown), the counters
`reconnects`, `published_messages`, `published_bytes`. Events are delivered with their concrete address
(`events.round.start`), not the subscription pattern. Persistent publishes wait for the broker's disk (a few ms
each here, against ~0.3 ms for `persistent=False`): per-step split traffic, useless after its step, is cheaper
sent transient. Chunk reassembly raises a channel-wide (global) prefetch, which RabbitMQ 3.x supports for classic
queues; RabbitMQ 4.x deprecates global QoS.

Update-log reads (`read_log`, `log_length`) consume the stream on a channel of their own with manual acks as
credit: they stop acknowledging once they have what they need (the tail they measured first), so a read is bounded
while records keep being appended, and they close that channel without `basic.reject` (pika's `basic_cancel`
rejects buffered deliveries, and RabbitMQ answers a reject on a stream by closing the whole connection with 540
NOT_IMPLEMENTED; see `_close_stream_channel`).

Threading: one instance is used by one thread; handlers run inside `process()`. pika sends heartbeats only while
the connection is serviced, so a role busy for longer than about twice the heartbeat must call `process(0)` now and
then (or use a longer `heartbeat` in the URL).

Least privilege: RabbitMQ matches permission regexes against resource names and (verified in 3.10's
`rabbit_auth_backend_internal`) expands `{username}`-style variables only in *topic* permissions, so one shared
client user could always read every client's queue. Each client therefore has its own user `client-<k>`, created
with its queue and binding by `provision_client_users` (management HTTP API or local `rabbitmqctl`); a client user
may read only its own queue and cannot bind queues to `hfgan.split` (the broker answers ACCESS_REFUSED).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pika
import pika.exceptions as pex
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from .base import (
    AGGREGATE,
    CLUSTERING,
    COORDINATOR,
    EVENTS_PREFIX,
    SERVER,
    DeadLetter,
    Delivery,
    Handler,
    LogRecord,
    Transport,
    TransportError,
    is_valid_address,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

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
MAX_LOG_CHUNKS = 1024  # chunks of one update-log record (8 GiB at the default frame size): more is junk

H_ADDRESS = "x-hfgan-address"
H_REASON = "x-hfgan-reason"
H_REJECTED_BY = "x-hfgan-rejected-by"
H_ROUND = "x-hfgan-round"
H_CHUNK_ID = "x-hfgan-chunk-id"
H_CHUNK_INDEX = "x-hfgan-chunk-index"
H_CHUNK_COUNT = "x-hfgan-chunk-count"
_CHUNK_HEADERS = (H_CHUNK_ID, H_CHUNK_INDEX, H_CHUNK_COUNT)

# Addresses whose queue has competing consumers: a chunked message could be split between them.
NO_CHUNK_ADDRESSES = frozenset({AGGREGATE})
_SINGLE_CONSUMER = (SERVER, COORDINATOR, CLUSTERING)
_WORK_KEYS = (COORDINATOR, CLUSTERING, AGGREGATE)

# Errors after which the connection is unusable and worth re-opening. Authentication and access errors are not:
# retrying them for a minute would only hide a configuration mistake.
_FATAL_CONN = (
    pex.ProbableAuthenticationError,
    pex.ProbableAccessDeniedError,
    pex.AuthenticationError,
    pex.IncompatibleProtocolError,
)
_LOST_CONN = (pex.AMQPConnectionError, pex.ConnectionWrongStateError, ConnectionError, OSError)


class _ConnectionLost(Exception):
    """Internal: the connection died; the operation is retried after a reconnect."""


class AccessRefused(TransportError):
    """The broker refused an operation to this user (AMQP 403 ACCESS_REFUSED): a permissions problem, not a
    transient one, so it is never retried."""


# ================================================================================================= topology
@dataclass(frozen=True)
class Names:
    """Broker entity names for one namespace (tests use throw-away namespaces so they never collide)."""

    namespace: str = DEFAULT_NAMESPACE

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

    def work_queue_args(self, single_consumer: bool) -> dict[str, Any]:
        args: dict[str, Any] = {"x-queue-type": "classic", "x-dead-letter-exchange": self.dlx}
        if single_consumer:
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
        return {"x-queue-type": "classic", "x-max-length": DEAD_MAX_LENGTH}

    def queues(self) -> list[tuple[str, dict[str, Any]]]:
        """The static queues with their arguments (client queues are per client, see `client_queue`)."""
        out = [(self.queue(a), self.work_queue_args(a != AGGREGATE)) for a in (SERVER, *_WORK_KEYS)]
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
        return name, self.work_queue_args(True), (self.split, name, f"client.{int(client)}")


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


# ============================================================================================== permissions
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
    reads = {
        "coordinator": [n.queue(COORDINATOR), n.updates, n.dead],
        "server": [n.queue(SERVER)],
        "clustering": [n.queue(CLUSTERING)],
        "aggregator": [n.queue(AGGREGATE), n.updates],
    }
    return {
        role: {"configure": configure, "write": write, "read": _alt(*ex, *qs) + "|" + _SERVER_NAMED}
        for role, qs in reads.items()
    }


def client_permissions(names: Names, client: int) -> dict[str, str]:
    """A client may configure and read only its own queue (and its event subscriptions), publish to the split,
    work, events, log and dead-letter exchanges, and read (bind from) only the events exchange. Without read on
    `<ns>.split` it cannot bind a queue of its own to another client's routing key."""
    own = names.queue(f"client.{int(client)}")
    return {
        "configure": _alt(own) + "|" + _SERVER_NAMED,
        "write": _alt(names.split, names.work, names.events, names.log, names.dlx) + "|" + _SERVER_NAMED,
        "read": _alt(own, names.events) + "|" + _SERVER_NAMED,
    }


ADMIN_PERMISSIONS = {"configure": ".*", "write": ".*", "read": ".*"}


def hash_password(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt(4) + sha256(salt + password))."""
    salt = secrets.token_bytes(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def check_password_hash(password: str, password_hash: str) -> bool:
    raw = base64.b64decode(password_hash)
    return hmac.compare_digest(raw, base64.b64decode(hash_password(password, raw[:4])))


def _user(name: str, password: str, tags: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "password_hash": hash_password(password),
        "hashing_algorithm": "rabbit_password_hashing_sha256",
        "tags": tags,
        "limits": {},
    }


def topology_definitions(
    *,
    namespace: str = DEFAULT_NAMESPACE,
    vhost: str = "/",
    role_passwords: Mapping[str, str] | None = None,
    admin: tuple[str, str] | None = None,
    clients: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """A RabbitMQ definitions document: the topology, and optionally the role users (`role_passwords`: role ->
    password), an administrator (`admin`: (user, password)) and per-client users (`clients`: k -> password)."""
    names = Names(namespace)
    users: list[dict[str, Any]] = []
    perms: list[dict[str, Any]] = []
    if admin is not None:
        users.append(_user(admin[0], admin[1], ["administrator"]))
        perms.append({"user": admin[0], "vhost": vhost, **ADMIN_PERMISSIONS})
    for role, regexes in role_permissions(names).items():
        if role_passwords and role in role_passwords:
            user = role_username(role, namespace)
            users.append(_user(user, role_passwords[role], []))
            perms.append({"user": user, "vhost": vhost, **regexes})
    doc = {
        "users": users,
        "vhosts": [{"name": vhost}],
        "permissions": perms,
        "topic_permissions": [],
        "parameters": [],
        "global_parameters": [],
        "policies": [],
        **_definition_entities(names, vhost),
    }
    if clients:
        extra = client_definitions(clients, namespace=namespace, vhost=vhost)
        for key in ("users", "permissions", "queues", "bindings"):
            doc[key] += extra[key]
    return doc


ROLES = ("coordinator", "server", "clustering", "aggregator")


def role_username(role: str, namespace: str = DEFAULT_NAMESPACE) -> str:
    """The broker user of a role: the role's name in the default namespace, `<namespace>-<role>` in others."""
    return role if namespace == DEFAULT_NAMESPACE else f"{namespace}-{role}"


def client_username(client: int, namespace: str = DEFAULT_NAMESPACE) -> str:
    """`client-<k>` in the default namespace, `<namespace>-client-<k>` in any other (test) namespace."""
    return f"client-{int(client)}" if namespace == DEFAULT_NAMESPACE else f"{namespace}-client-{int(client)}"


def derive_client_password(secret: str, username: str) -> str:
    """A per-client password derived from a provisioning secret (HMAC-SHA256), for deployments that cannot store
    generated passwords. Whoever knows the secret can derive every client's password: give it only to the
    provisioner and hand each client its own password, never the secret."""
    mac = hmac.new(secret.encode(), username.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:24]).decode()


def client_definitions(
    clients: Mapping[int, str], *, namespace: str = DEFAULT_NAMESPACE, vhost: str = "/"
) -> dict[str, list[dict[str, Any]]]:
    """Users, permissions, queues and bindings of the given clients (k -> password)."""
    names = Names(namespace)
    out: dict[str, list[dict[str, Any]]] = {"users": [], "permissions": [], "queues": [], "bindings": []}
    for k, password in sorted(clients.items()):
        user = client_username(k, namespace)
        out["users"].append(_user(user, password, []))
        out["permissions"].append({"user": user, "vhost": vhost, **client_permissions(names, k)})
        qname, qargs, (ex, _, rk) = names.client_queue(k)
        out["queues"].append({"name": qname, "vhost": vhost, "durable": True, "auto_delete": False, "arguments": qargs})
        out["bindings"].append(
            {
                "source": ex,
                "vhost": vhost,
                "destination": qname,
                "destination_type": "queue",
                "routing_key": rk,
                "arguments": {},
            }
        )
    return out


@dataclass(frozen=True)
class ClientCredentials:
    client: int
    username: str
    password: str = field(repr=False)

    def url(self, broker_url: str) -> str:
        """`broker_url` (e.g. amqp://guest:guest@rabbitmq:5672/) with this client's user and password."""
        p = urllib.parse.urlsplit(broker_url)
        host = p.hostname or "localhost"
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{urllib.parse.quote(self.username, safe='')}:{urllib.parse.quote(self.password, safe='')}@{host}"
        if p.port:
            netloc += f":{p.port}"
        return urllib.parse.urlunsplit((p.scheme, netloc, p.path, p.query, p.fragment))


def import_definitions(doc: Mapping[str, Any], admin_url: str, *, timeout: float = 60.0) -> None:
    """Merge a definitions document into a running broker. `admin_url` is the management API
    (`http://admin:pass@host:15672`, the rabbitmq_management plugin) or `rabbitmqctl` (the local CLI, run on the
    broker's host with the rights to use it). Existing entities not in `doc` are left alone (guest included)."""
    body = json.dumps(doc).encode()
    if admin_url in ("rabbitmqctl", "rabbitmqctl:"):
        # Through stdin (no file argument): a file would have to be readable by the broker's user, hashes and all.
        try:
            res = subprocess.run(
                ["rabbitmqctl", "-q", "import_definitions", "--format", "json"],
                input=body.decode(),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TransportError(f"rabbitmqctl import_definitions failed: {exc}") from exc
        if res.returncode != 0:
            detail = (res.stderr or res.stdout).strip().splitlines()
            raise TransportError(f"rabbitmqctl import_definitions failed: {detail[-1] if detail else res.returncode}")
        return
    p = urllib.parse.urlsplit(admin_url)
    if p.scheme not in ("http", "https"):
        raise TransportError(f"admin URL must be http(s)://user:pass@host:15672 or 'rabbitmqctl', not {admin_url!r}")
    base = f"{p.scheme}://{p.hostname}:{p.port or (443 if p.scheme == 'https' else 15672)}{p.path.rstrip('/')}"
    req = urllib.request.Request(
        base + "/api/definitions", data=body, method="POST", headers={"content-type": "application/json"}
    )
    token = base64.b64encode(
        f"{urllib.parse.unquote(p.username or '')}:{urllib.parse.unquote(p.password or '')}".encode()
    ).decode()
    req.add_header("authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - an operator-given URL
            resp.read()
    except urllib.error.HTTPError as exc:
        raise TransportError(f"management API refused the definitions: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise TransportError(f"management API unreachable at {base}: {exc}") from exc


def provision_client_users(
    clients: int | Iterable[int],
    admin_url: str,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    vhost: str = "/",
    passwords: Mapping[int, str] | None = None,
    secret: str | None = None,
    verify_url: str | None = None,
    verify_timeout: float = 30.0,
) -> dict[int, ClientCredentials]:
    """Create (or update) one broker user per client with least-privilege permissions, and its queue and binding.

    `clients`: a count n (clients 0..n-1) or explicit ids. Passwords come from `passwords`, else are derived from
    `secret` (`derive_client_password`), else are random (returned; store them where only that client reads them).
    The topology (the `split` exchange) must exist already. Idempotent: running it again updates passwords and
    permissions and keeps queued messages. `rabbitmqctl import_definitions` finishes asynchronously: with
    `verify_url` (any AMQP URL of the broker; its credentials are replaced) this waits until every client can log
    in and sees its queue.
    """
    ids = list(range(clients)) if isinstance(clients, int) else [int(k) for k in clients]
    creds: dict[int, ClientCredentials] = {}
    for k in ids:
        user = client_username(k, namespace)
        if passwords is not None and k in passwords:
            pw = passwords[k]
        elif secret is not None:
            pw = derive_client_password(secret, user)
        else:
            pw = secrets.token_urlsafe(18)
        creds[k] = ClientCredentials(k, user, pw)
    doc = client_definitions({k: c.password for k, c in creds.items()}, namespace=namespace, vhost=vhost)
    import_definitions(doc, admin_url)
    if verify_url is not None:
        names = Names(namespace)
        for c in creds.values():
            _wait_usable(c.url(verify_url), names.queue(f"client.{c.client}"), verify_timeout)
    return creds


def _wait_usable(url: str, queue: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    while True:
        try:
            conn = pika.BlockingConnection(params)
            try:
                conn.channel().queue_declare(queue, passive=True)
                return
            finally:
                with contextlib.suppress(Exception):
                    conn.close()
        except pex.AMQPError as exc:
            if time.monotonic() > deadline:
                raise TransportError(
                    f"provisioned user {params.credentials.username!r} is not usable after {timeout:.0f} s: {exc!r}"
                ) from exc
            time.sleep(0.1)


# ================================================================================================ transport
@dataclass(eq=False)
class _Partial:
    count: int
    started: float
    pieces: dict[int, bytes] = field(default_factory=dict)
    tags: list[int] = field(default_factory=list)
    headers: dict[str, Any] = field(default_factory=dict)
    user_id: str | None = None
    redelivered: bool = False


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
    partials: dict[str, _Partial] = field(default_factory=dict)
    done: collections.OrderedDict[str, None] = field(default_factory=collections.OrderedDict)
    unsettled_extra: dict[int, int] = field(default_factory=dict)  # chunked deliveries in flight -> extra chunks


def _amqp_error(exc: BaseException) -> TransportError:
    code = getattr(exc, "reply_code", None)
    text = getattr(exc, "reply_text", str(exc))
    if code == 403:
        return AccessRefused(f"access refused by the broker: {text}")
    return TransportError(f"broker error {code}: {text}" if code else f"broker error: {exc!r}")


class AmqpTransport(Transport):
    """RabbitMQ transport. Options (keyword arguments, or `open_transport(url, **options)`):

    - `namespace` ("hfgan"): prefix of every exchange and queue;
    - `max_frame_body` (8 MiB): bodies above this travel in chunks;
    - `topology` ("auto"): "declare" declares every entity (needs configure rights), "passive" only checks that
      they exist (least-privileged users, topology loaded from definitions), "auto" declares and falls back to
      passive checks after the first ACCESS_REFUSED;
    - `reconnect_timeout` (60 s) and `reconnect_max_wait` (5 s): how long and how far apart reconnects are tried;
    - `chunk_timeout` (120 s): an incomplete chunked message older than this is dead-lettered;
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
    ):
        if topology not in ("auto", "declare", "passive"):
            raise TransportError(f"topology must be auto, declare or passive, not {topology!r}")
        if int(max_frame_body) < 1024:
            raise TransportError("max_frame_body must be at least 1024 bytes")
        self.url = url
        self.names = Names(namespace)
        self.max_frame_body = int(max_frame_body)
        self.topology = topology
        self.reconnect_timeout = float(reconnect_timeout)
        self.reconnect_max_wait = float(reconnect_max_wait)
        self.chunk_timeout = float(chunk_timeout)
        self.log_idle = float(log_idle)
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

    # ------------------------------------------------------------------------------------------ connection
    @staticmethod
    def _parameters(url: str, name: str | None) -> pika.URLParameters:
        parts = urllib.parse.urlsplit(url)
        query = dict(urllib.parse.parse_qsl(parts.query))
        query.setdefault("heartbeat", str(DEFAULT_HEARTBEAT_S))
        query.setdefault("blocked_connection_timeout", str(DEFAULT_BLOCKED_TIMEOUT_S))
        query.setdefault("connection_attempts", "1")  # retries are ours (tenacity), with backoff
        query.setdefault("socket_timeout", "10")
        try:
            params = pika.URLParameters(urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query))))
        except (ValueError, TypeError) as exc:
            raise TransportError(f"bad broker URL {url!r}: {exc}") from exc
        params.client_properties = {"connection_name": name or f"hfgan-{os.getpid()}", "product": "hfgan"}
        return params

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("transport is closed")

    def _connect(self) -> None:
        try:
            conn = pika.BlockingConnection(self._params)
        except _FATAL_CONN as exc:
            raise TransportError(f"broker refused the login of {self._username!r}: {exc!r}") from exc
        except pex.ConnectionClosedByBroker as exc:
            if exc.reply_code in (403, 530):
                raise TransportError(f"broker refused the connection: {exc.reply_text}") from exc
            raise _ConnectionLost(repr(exc)) from exc
        except _LOST_CONN as exc:
            raise _ConnectionLost(repr(exc)) from exc
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
        """Translate pika's errors: connection loss -> _ConnectionLost (retried), broker refusals -> TransportError."""
        try:
            yield
        except _FATAL_CONN as exc:
            raise TransportError(f"broker refused {self._username!r}: {exc!r}") from exc
        except pex.ConnectionClosedByBroker as exc:
            if exc.reply_code in (403, 530):
                raise TransportError(f"broker closed the connection: {exc.reply_text}") from exc
            raise _ConnectionLost(repr(exc)) from exc
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

    def _frames(self, body: bytes, headers: dict[str, Any]) -> list[tuple[dict[str, Any], bytes | memoryview]]:
        if len(body) <= self.max_frame_body:
            return [(headers, body)]
        view = memoryview(body)
        count = -(-len(body) // self.max_frame_body)
        cid = uuid.uuid4().hex
        return [
            (
                {**headers, H_CHUNK_ID: cid, H_CHUNK_INDEX: i, H_CHUNK_COUNT: count},
                view[i * self.max_frame_body : (i + 1) * self.max_frame_body],
            )
            for i in range(count)
        ]

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
        if prefetch < 0:
            raise TransportError("prefetch must be >= 0")
        cons = _Consumer(address, handler, int(prefetch))
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
            self._declare_queue(queue, self.names.work_queue_args(address != AGGREGATE))
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
        cons.partials.clear()
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
            cons.handler(delivery)
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
                ch.basic_ack(tag)
        except (_ConnectionLost, pex.AMQPError) as exc:
            log.warning("%s of a delivery from %s failed (%s); the broker delivers it again", how, address, exc)
            return
        finally:
            cons.unsettled_extra.pop(key, None)
        self._update_qos(cons)

    def _add_chunk(
        self, cons: _Consumer, method: Any, props: Any, headers: dict[str, Any], body: bytes
    ) -> Delivery | None:
        cid = str(headers[H_CHUNK_ID])
        try:
            index, count = int(headers[H_CHUNK_INDEX]), int(headers[H_CHUNK_COUNT])
        except (TypeError, ValueError):
            index, count = -1, 0
        if cid in cons.done or not 0 <= index < count:
            # A duplicate of a chunk whose message was already delivered (its publish was retried), or garbage.
            with contextlib.suppress(pex.AMQPError):
                cons.channel.basic_ack(method.delivery_tag)
            return None
        part = cons.partials.get(cid)
        if part is None:
            part = cons.partials[cid] = _Partial(count, time.monotonic(), user_id=props.user_id)
        part.tags.append(method.delivery_tag)
        part.redelivered |= bool(method.redelivered)
        part.pieces.setdefault(index, body)
        if index == 0:
            part.headers = headers
        if len(part.pieces) < part.count:
            self._update_qos(cons)
            return None
        del cons.partials[cid]
        cons.done[cid] = None
        while len(cons.done) > 1024:
            cons.done.popitem(last=False)
        full = b"".join(part.pieces[i] for i in range(part.count))
        delivery = self._delivery(
            cons, part.tags, full, part.headers, part.user_id, part.redelivered, method.routing_key
        )
        self._update_qos(cons)
        return delivery

    def _update_qos(self, cons: _Consumer) -> None:
        """Raise the channel prefetch by the chunks that partial and unsettled chunked messages hold or still need,
        so that reassembly can always complete; back to the plain prefetch once they are settled."""
        if cons.prefetch == 0 or cons.channel is None or not cons.channel.is_open:
            return
        extra = sum(len(p.tags) + (p.count - len(p.pieces)) - 1 for p in cons.partials.values())
        extra += sum(cons.unsettled_extra.values())
        want = cons.prefetch + extra
        if want != cons.qos:
            with contextlib.suppress(pex.AMQPError):
                cons.channel.basic_qos(prefetch_count=want, global_qos=True)
                cons.qos = want

    def _expire_partials(self, cons: _Consumer) -> None:
        now = time.monotonic()
        for cid, part in list(cons.partials.items()):
            if now - part.started < self.chunk_timeout:
                continue
            del cons.partials[cid]
            present = sorted(part.pieces)
            reason = f"incomplete_chunked_message: chunks {present} of {part.count} after {self.chunk_timeout:.1f} s"
            log.warning("%s on %s: dead-lettering what arrived", reason, cons.address)
            ch = cons.channel
            # The dead letter holds the chunks that arrived, concatenated in order (the reason says which).
            body = b"".join(part.pieces[i] for i in present)
            hdr = {k: v for k, v in part.headers.items() if k not in _CHUNK_HEADERS}
            hdr.update({H_ADDRESS: cons.address, H_REASON: reason, H_REJECTED_BY: self._username})
            try:
                with self._guard():
                    self._send(self.names.dlx, "", self._frames(body, hdr), True, True)
                for tag in part.tags:
                    ch.basic_ack(tag)
            except (_ConnectionLost, pex.AMQPError) as exc:
                log.warning("could not dead-letter the incomplete message on %s: %s", cons.address, exc)
            self._update_qos(cons)

    # ---------------------------------------------------------------------------------------------------- log
    def append_log(self, body: bytes, *, round: int) -> None:
        self._check_open()
        body = bytes(body)
        frames = self._frames(body, {H_ROUND: int(round)})
        self._retrying(lambda: self._send(self.names.log, "updates", frames, True, True), "append_log")
        self.published_bytes += len(body)

    def _read_stream(
        self, offset: int | str, *, first_wait: float, idle: float, stop_at: int | None, follow_s: float | None = None
    ) -> list[tuple[int, dict[str, Any], bytes]]:
        """(offset, headers, body) of the stream's messages from `offset` (the headers with the publisher's
        `user_id`): waits up to `first_wait` for the first, then stops after `idle` seconds without one, or once
        `stop_at` was reached and nothing followed briefly.

        Acknowledgements are the stream's credit: once `stop_at` is reached (or `follow_s` seconds after the first
        record) nothing more is acknowledged, so the broker stops after the prefetch window even while records keep
        being appended: a read is bounded. The consumer is then torn down by `_close_stream_channel`, never by
        pika's `BlockingChannel.basic_cancel` or `close` (they reject what the consumer holds)."""
        out: list[tuple[int, dict[str, Any], bytes]] = []
        ch = self._conn.channel()
        flow: dict[str, Any] = {"ack": True, "until": None}
        try:
            ch.basic_qos(prefetch_count=STREAM_PREFETCH)  # streams require a prefetch; acks are credit

            def on_message(c: Any, method: Any, props: Any, body: bytes) -> None:
                headers = dict(props.headers or {})
                headers["user_id"] = props.user_id  # the broker checked it against the publishing connection
                off = int(headers.get("x-stream-offset", -1))
                out.append((off, headers, body))
                if stop_at is not None and off >= stop_at:
                    flow["ack"] = False  # everything needed is here: let the credit run out
                if follow_s is not None:
                    now = time.monotonic()
                    if flow["until"] is None:
                        flow["until"] = now + follow_s
                    elif now >= flow["until"]:
                        flow["ack"] = False
                if flow["ack"]:
                    c.basic_ack(method.delivery_tag)

            ch.basic_consume(self.names.updates, on_message, auto_ack=False, arguments={"x-stream-offset": offset})
            start = last = time.monotonic()
            seen = 0
            while True:
                self._conn.process_data_events(time_limit=0.02)
                now = time.monotonic()
                if len(out) != seen:
                    seen, last = len(out), now
                    continue
                if not out:
                    if now - start >= first_wait:
                        break
                elif stop_at is not None and out[-1][0] >= stop_at:
                    if now - last >= min(idle, 0.05):
                        break
                elif now - last >= idle:
                    break
        finally:
            flow["ack"] = False
            self._close_stream_channel(ch)
        return out

    def _close_stream_channel(self, ch: Any) -> None:
        """Close a channel that consumes the stream without rejecting anything.

        pika's `BlockingChannel.basic_cancel` (which `BlockingChannel.close` and `BlockingConnection.close` call for
        every consumer) sends `basic.reject` for each delivery it has buffered but not dispatched yet, and its
        async channel rejects every delivery that arrives between `basic.cancel` and `cancel-ok` while the channel
        is still open (pika 1.x, `adapters/blocking_connection.py` and `channel.py` `_on_deliver`). RabbitMQ does
        not implement reject on stream queues: it closes the whole connection (540 NOT_IMPLEMENTED), taking
        every consumer of this transport with it. So the channel is closed through pika's async channel
        (`_impl.close()`): it sends `basic.cancel` and `channel.close` and is no longer open, so deliveries that
        still arrive are dropped without a reply (a stream never redelivers; nothing is lost)."""
        impl = getattr(ch, "_impl", None)
        try:
            if impl is None:  # a pika without the async channel underneath: nothing safer to fall back to
                ch.close()
                return
            if impl.is_open:
                impl.close()
            deadline = time.monotonic() + 10.0
            while not impl.is_closed and time.monotonic() < deadline and self._conn.is_open:
                self._conn.process_data_events(time_limit=0.01)
        except Exception as exc:  # the read is complete; a connection that died meanwhile is reopened on next use
            log.debug("closing the update-log reader channel: %r", exc)

    def _log_tail(self, wait: float) -> int:
        """The offset after the last record of the stream (0 if it is empty)."""
        # A snapshot: records appended while it reads are followed for a moment only, or it would never end.
        last = self._read_stream("last", first_wait=wait, idle=0.05, stop_at=None, follow_s=0.1)
        return max((o for o, _, _ in last), default=-1) + 1

    def log_length(self) -> int:
        """The next offset of the update log (what memory's `log_length()` is): record offsets stay below it."""
        self._check_open()
        return self._retrying(lambda: self._log_tail(self.log_idle), "log_length")

    def read_log(self, *, from_offset: int = 0, round: int | None = None, timeout: float = 2.0) -> list[LogRecord]:
        self._check_open()
        from_offset = max(0, int(from_offset))

        def run() -> list[tuple[int, dict[str, Any], bytes]]:
            tail = self._log_tail(min(timeout, self.log_idle))
            if tail <= from_offset:
                return []
            return self._read_stream(from_offset, first_wait=timeout, idle=self.log_idle, stop_at=tail - 1)

        raw = self._retrying(run, "read_log")
        records: list[LogRecord] = []
        # Chunks are grouped per publisher: nobody can complete or spoil another user's record with chunks of its own.
        partials: dict[tuple[str | None, str], tuple[int, int, dict[int, bytes]]] = {}
        for offset, headers, body in raw:
            if offset < from_offset:
                continue  # a stream starts delivering at the beginning of the chunk holding from_offset
            user = headers.get("user_id")
            try:
                rnd = int(headers.get(H_ROUND, -1))
                if H_CHUNK_ID not in headers:
                    records.append(LogRecord(offset, rnd, body, user))
                    continue
                key = (user, str(headers[H_CHUNK_ID]))
                count, index = int(headers[H_CHUNK_COUNT]), int(headers[H_CHUNK_INDEX])
                if not 0 <= index < count <= MAX_LOG_CHUNKS:
                    raise ValueError(f"chunk {index} of {count} (at most {MAX_LOG_CHUNKS})")
            except (TypeError, ValueError) as exc:  # junk headers: the record is skipped, never fatal to a reader
                log.warning("update log offset %d: unusable record headers (%s); skipped", offset, exc)
                continue
            first, expected, pieces = partials.setdefault(key, (offset, count, {}))
            if count != expected:
                log.warning("update log offset %d: chunk count %d differs from %d; skipped", offset, count, expected)
                continue
            pieces.setdefault(index, body)
            if len(pieces) == count:
                records.append(LogRecord(first, rnd, b"".join(pieces[i] for i in range(count)), user))
                partials[key] = (first, count, {})  # completed: later duplicates start a new (ignored) partial
        for (_, cid), (first, count, pieces) in partials.items():
            # Without its first chunk the record began before from_offset (expected when a round's offset follows
            # the previous round's last chunk); with it, chunks are missing (retention, or a writer that died).
            if 0 in pieces:
                log.warning(
                    "update log record at %d (chunks %s) is incomplete: %d of %d chunks", first, cid, len(pieces), count
                )
        records.sort(key=lambda r: r.offset)
        return [r for r in records if round is None or r.round == round]

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
                        pieces = partials.setdefault(str(headers[H_CHUNK_ID]), {})
                        pieces.setdefault(int(headers[H_CHUNK_INDEX]), body)
                        if len(pieces) < int(headers[H_CHUNK_COUNT]):
                            continue
                        body = b"".join(pieces[i] for i in range(len(pieces)))
                        del partials[str(headers[H_CHUNK_ID])]
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


# Development credentials of broker_config/definitions.json (documented in broker_config/README.md). Production
# deployments import their own definitions or change these passwords (rabbitmqctl change_password).
DEV_ADMIN = ("hfgan-admin", "admin-dev")
DEV_CLIENTS = 4


def dev_role_passwords() -> dict[str, str]:
    return {role: f"{role}-dev" for role in ROLES}


def dev_client_passwords(n: int = DEV_CLIENTS) -> dict[int, str]:
    return {k: f"client-{k}-dev" for k in range(n)}


def broker_definitions_document(
    role_passwords: Mapping[str, str] | None = None,
    admin: tuple[str, str] = DEV_ADMIN,
    clients: Mapping[int, str] | None = None,
) -> str:
    """The text of broker_config/definitions.json (the development credentials unless told otherwise)."""
    doc = topology_definitions(
        role_passwords=dev_role_passwords() if role_passwords is None else role_passwords,
        admin=admin,
        clients=dev_client_passwords() if clients is None else clients,
    )
    return json.dumps(doc, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m hfgan_core.transport.amqp definitions` prints broker_config/definitions.json;
    `... provision N --admin-url URL [--namespace NS]` creates client users 0..N-1 (passwords derived from the
    secret in $HFGAN_PROVISION_SECRET, else random) and prints `client user password` lines."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m hfgan_core.transport.amqp")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("definitions", help="print the development definitions.json")
    pv = sub.add_parser("provision", help="create per-client broker users with their queues")
    pv.add_argument("clients", type=int)
    pv.add_argument("--admin-url", required=True, help="http://admin:pass@host:15672 or rabbitmqctl")
    pv.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    args = ap.parse_args(argv)
    if args.cmd == "definitions":
        sys.stdout.write(broker_definitions_document())
        return 0
    try:
        creds = provision_client_users(
            args.clients, args.admin_url, namespace=args.namespace, secret=os.environ.get("HFGAN_PROVISION_SECRET")
        )
    except TransportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for c in creds.values():
        print(c.client, c.username, c.password)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
