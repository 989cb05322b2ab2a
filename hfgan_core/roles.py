"""The role registry: everything the system knows about a role, in one entry (docs/roles.md).

A `RoleSpec` names a role's class, the identity its messages carry (`sender`), the addresses it consumes and how
(one active consumer or competing ones), the message kinds it may send and to whom (the authorization table), its
broker user and what that user may read, its worker entry point, how the worker process and the embedded runner
build it, and how many processes `hfgan up` starts. The embedded runner, `hfgan up`, the workers
(`runtime/services.py`), the broker definitions and permissions (`transport/amqp`), the receiving host's
authorization check (`runtime/host.py`) and the compose check read it. Adding a role is one `register(RoleSpec(...))`
plus the role's own module.

Authorization (enforced by `RoleHost` before any handler runs; `authorize`): a message of kind K that claims sender S
is accepted by a role R only if S is the identity of a registered role, the broker vouches for S (a role-bound broker
user may speak only as its own identity), S's role may send K to R (or to every role), and, for an untrusted role
(a client), every identity field of the payload (`client`) names the sender itself. Users the registry does not know
(guest, administrators, tests) are infrastructure credentials: their messages are checked against the table under
the sender they claim.

This module is plain data with no third-party imports (the broker definitions generator reads it); classes and
functions are named by `module:attribute` and loaded when used.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

DEFAULT_NAMESPACE = "hfgan"
ANY = "*"  # a destination meaning every role (round events are a broadcast)
UPDATE_LOG = "update_log"  # a destination that is not a role: the durable update log
INSTANCES = ("one", "coordinator", "aggregators", "clients")  # how many processes `hfgan up` starts
_PLACEHOLDERS = {"{n}": r"(?P<index>\d+)", "{id}": r"(?P<index>[A-Za-z0-9_.:-]{1,128})"}


@functools.lru_cache(maxsize=256)
def _pattern(template: str) -> re.Pattern[str]:
    out = re.escape(template)
    for placeholder, group in _PLACEHOLDERS.items():
        out = out.replace(re.escape(placeholder), group)
    return re.compile(out)


@dataclass(frozen=True)
class RoleSpec:
    """One role. Templates may hold `{n}` (a number, e.g. a client's index) or `{id}` (any instance name)."""

    name: str
    role_class: str  # "module:Class" of the Role subclass
    identity: str  # the `sender` its messages carry: "server", "aggregator.{id}", "client.{n}"
    addresses: tuple[str, ...]  # what it consumes: "server", "client.{n}", "events.round.#"
    sends: tuple[tuple[str, tuple[str, ...]], ...]  # (message kind, receiving roles | ANY | UPDATE_LOG)
    serve: str  # "module:function" run by its worker process: (opts, cfg, run_id, settings, stop) -> exit code
    embedded: str  # "module:function" building its instances in the embedded runner: (EmbeddedEnv) -> [Role]
    worker: str = ""  # the module `python -m` runs (default: workers.<name>)
    consumer: str = "single"  # "single": one active consumer per queue; "competing": any number share the queue
    trusted: bool = True  # infrastructure roles trust each other; clients are untrusted
    binds: tuple[str, ...] = ()  # payload fields that must equal the sender's own index (untrusted roles)
    broker_user: str | None = None  # its broker user ("server", "client-{n}"); None: no user of its own
    broker_reads: tuple[str, ...] = ()  # streams/queues it reads besides its addresses: "updates", "dead"
    instances: str = "one"  # INSTANCES: one process, or as many as `hfgan up` is told

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,30}", self.name):
            raise ValueError(f"role name {self.name!r}: lowercase letters, digits and _")
        if self.consumer not in ("single", "competing"):
            raise ValueError(f"role {self.name}: consumer must be 'single' or 'competing'")
        if self.instances not in INSTANCES:
            raise ValueError(f"role {self.name}: instances must be one of {INSTANCES}")
        if self.binds and "{" not in self.identity:
            raise ValueError(f"role {self.name}: binds fields need an indexed identity")

    @property
    def worker_module(self) -> str:
        return self.worker or f"workers.{self.name}"

    def may_send(self, kind: str) -> tuple[str, ...]:
        """The receivers this role may send `kind` to (empty: it may not send it)."""
        for k, receivers in self.sends:
            if k == kind:
                return receivers
        return ()

    def identity_index(self, sender: str) -> str | None:
        """The index in `sender` if it is this role's identity ("" for an unindexed one), else None."""
        m = _pattern(self.identity).fullmatch(sender)
        if m is None:
            return None
        return m.groupdict().get("index") or ""

    def user_index(self, user: str, namespace: str = DEFAULT_NAMESPACE) -> str | None:
        """The index in a broker user name if it is this role's user in `namespace` ("" unindexed), else None."""
        if self.broker_user is None:
            return None
        template = self.broker_user if namespace == DEFAULT_NAMESPACE else f"{namespace}-{self.broker_user}"
        m = _pattern(template).fullmatch(user)
        if m is None:
            return None
        return m.groupdict().get("index") or ""

    def address(self, index: int | str | None = None) -> str:
        """Its first address with the index filled in."""
        return self.addresses[0].replace("{n}", str(index)).replace("{id}", str(index))

    def load(self, what: str) -> Any:
        """The object a "module:attribute" field names (`role_class`, `serve` or `embedded`)."""
        module, _, attr = getattr(self, what).partition(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, RoleSpec] = {}


def register(spec: RoleSpec) -> RoleSpec:
    """Add a role. Registering an equal spec again is a no-op (a module imported twice); a different spec under a
    registered name is a ValueError."""
    known = _REGISTRY.get(spec.name)
    if known is not None and known != spec:
        raise ValueError(f"role {spec.name!r} is already registered with a different spec")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a role (tests that register one of their own)."""
    if name in BUILTIN_ROLES:
        raise ValueError(f"role {name!r} is built in")
    _REGISTRY.pop(name, None)


def get(name: str) -> RoleSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown role {name!r} (known: {', '.join(_REGISTRY)})") from None


def specs() -> tuple[RoleSpec, ...]:
    """Every registered role, built-in ones first, in registration order (the embedded runner's order)."""
    return tuple(_REGISTRY.values())


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def identify(sender: str) -> tuple[RoleSpec, str] | None:
    """(spec, index) of the role whose identity `sender` is, or None."""
    for spec in _REGISTRY.values():
        index = spec.identity_index(sender)
        if index is not None:
            return spec, index
    return None


def user_principal(user: str, namespace: str = DEFAULT_NAMESPACE) -> tuple[RoleSpec, str] | None:
    """(spec, index) of the role a broker user belongs to, or None for users no role owns (guest, admins)."""
    for spec in _REGISTRY.values():
        index = spec.user_index(user, namespace)
        if index is not None:
            return spec, index
    return None


def _same_index(a: str, b: str) -> bool:
    if a.isdigit() and b.isdigit():
        return int(a) == int(b)
    return a == b


def authorize(msg: Any, receiver: str, user: str | None, namespace: str = DEFAULT_NAMESPACE) -> str | None:
    """Why role instance `receiver` must not handle `msg` (a Message: KIND, sender, payload) published by broker
    user `user` (None: not vouched for), or None when the table allows it (module docstring)."""
    kind, sender = msg.KIND, msg.sender
    found = identify(sender)
    if found is None:
        return f"unknown_sender: {sender!r} is no role's identity"
    spec, index = found
    if user:
        principal = user_principal(user, namespace)
        if principal is not None:
            p_spec, p_index = principal
            if p_spec is not spec or (p_index and not _same_index(p_index, index)):
                return f"forged_sender: broker user {user!r} sent a message as {sender!r}"
    target = identify(receiver)
    if target is None:
        return f"unauthorized: {receiver!r} is no role's identity"
    allowed = spec.may_send(kind)
    if target[0].name not in allowed and ANY not in allowed:
        return f"unauthorized: a {spec.name} may not send {kind} to the {target[0].name}"
    for field in spec.binds:
        value = getattr(msg, field, None)
        if value is not None and not _same_index(str(value), index):
            return f"forged_{field}: {sender!r} sent a {kind} for {field} {value!r}"
    return None


def table() -> dict[str, dict[str, tuple[str, ...]]]:
    """The authorization table: message kind -> sending role -> receivers (roles, ANY or UPDATE_LOG)."""
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for spec in _REGISTRY.values():
        for kind, receivers in spec.sends:
            out.setdefault(kind, {})[spec.name] = receivers
    return out


def receives(role: str) -> set[str]:
    """The kinds some role may send to `role` (broadcasts included)."""
    return {k for k, by in table().items() for receivers in by.values() if role in receivers or ANY in receivers}


def iter_broker_roles() -> Iterator[RoleSpec]:
    """Trusted roles with a broker user of their own (one user per role)."""
    return (s for s in _REGISTRY.values() if s.trusted and s.broker_user and "{" not in s.broker_user)


# ----------------------------------------------------------------------------------------- the built-in roles
_SPLIT_UP = ("g_head_out", "d_head_out", "d_tail_grad", "g_tail_grad")  # client -> server, per step
_SPLIT_DOWN = ("g_mid_out", "d_mid_out", "d_mid_grad", "g_mid_grad", "step_dropped", "steps_lost")  # server -> client
_S = "hfgan_core.runtime.services"
_E = "hfgan_core.runtime.embedded"

BUILTIN = (
    RoleSpec(
        name="coordinator",
        role_class="hfgan_core.runtime.coordinator:CoordinatorRole",
        identity="coordinator",
        addresses=("coordinator",),
        sends=(
            ("round_start", ("server", "client")),
            ("round_close", ("server", "client")),
            ("run_end", ("server", "client")),
            ("aggregate_job", ("aggregator",)),
            ("round_event", (ANY,)),
            ("slot_grant", (ANY,)),  # an event: on `events.slot.<owner>`, for a client process (runtime/slots.py)
        ),
        serve="hfgan_core.runtime.serve_coordinator:serve_coordinator",
        embedded=f"{_E}:coordinator_roles",
        broker_user="coordinator",
        broker_reads=("updates", "dead"),
        instances="coordinator",
    ),
    RoleSpec(
        name="server",
        role_class="hfgan_core.runtime.server:ServerRole",
        identity="server",
        addresses=("server",),
        sends=(
            *((k, ("client",)) for k in _SPLIT_DOWN),
            ("activation_summaries", ("clustering",)),
            ("server_round_done", ("coordinator",)),
            ("server_update", (UPDATE_LOG,)),
        ),
        serve=f"{_S}:_serve_server",
        embedded=f"{_E}:server_roles",
        broker_user="server",
    ),
    RoleSpec(
        name="clustering",
        role_class="hfgan_core.runtime.clustering:ClusteringRole",
        identity="clustering",
        addresses=("clustering",),
        sends=(("cluster_result", ("coordinator",)),),
        serve=f"{_S}:_serve_clustering",
        embedded=f"{_E}:clustering_roles",
        broker_user="clustering",
    ),
    RoleSpec(
        name="aggregator",
        role_class="hfgan_core.runtime.aggregator:AggregatorRole",
        identity="aggregator.{id}",
        addresses=("aggregate",),
        consumer="competing",
        sends=(
            ("model_assignment", ("client",)),
            ("server_model", ("server",)),
            ("aggregate_done", ("coordinator",)),
        ),
        serve=f"{_S}:_serve_aggregator",
        embedded=f"{_E}:aggregator_roles",
        broker_user="aggregator",
        broker_reads=("updates",),
        instances="aggregators",
    ),
    RoleSpec(
        name="client",
        role_class="hfgan_core.runtime.client:ClientRole",
        identity="client.{n}",
        addresses=("client.{n}",),
        sends=(
            ("join", ("coordinator",)),
            ("client_heartbeat", ("coordinator",)),
            *((k, ("server",)) for k in _SPLIT_UP),
            ("round_done", ("coordinator",)),
            ("client_update", (UPDATE_LOG,)),
        ),
        serve=f"{_S}:_serve_client",
        embedded=f"{_E}:client_roles",
        trusted=False,
        binds=("client",),
        broker_user="client-{n}",
        instances="clients",
    ),
)
BUILTIN_ROLES = tuple(s.name for s in BUILTIN)
for _spec in BUILTIN:
    register(_spec)
