"""What every role shares: its context, the message dispatch loop around it, and its error policy.

A role is message-driven logic (`on_message`, `tick`); `RoleHost` binds it to a transport: it decodes each delivery
against the kinds the role accepts, checks that the sender may send that kind to this role (the authorization table
of the role registry, roles.py: a client cannot send a server model, end the run or speak for another client), drops
duplicates by msg_id, calls the role, then acknowledges. A message that cannot be used (undecodable, wrong run,
unauthorized, wrong shape, unexpected in the role's state) is rejected with its reason, which dead-letters it; the
worker keeps running.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import roles
from ..config import RunConfig
from ..protocol import DEFAULT_LIMITS, Limits, Message, WireError, decode
from ..state import RoundStore
from ..transport import Delivery, Transport
from .metrics import Metrics


class Reject(Exception):
    """Raised by a role for a message it must not use; the host dead-letters the message with this reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class RoleContext:
    run: str
    cfg: RunConfig
    transport: Transport
    store: RoundStore
    clock: Callable[[], float] = time.time
    limits: Limits = DEFAULT_LIMITS
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("hfgan"))
    metrics: Metrics = field(default_factory=Metrics)  # no-op unless the worker serves metrics (metrics.py)

    @property
    def wire_dtype(self) -> str:
        return self.cfg.train.wire_dtype


class Role:
    """Base class of the five roles."""

    name: str = "role"
    accepts: tuple[type[Message], ...] = ()

    def __init__(self, ctx: RoleContext):
        self.ctx = ctx
        self.bytes_sent: Counter[str] = Counter()
        self.messages_sent: Counter[str] = Counter()

    def addresses(self) -> list[str]:
        raise NotImplementedError

    def on_message(self, msg: Message) -> None:
        raise NotImplementedError

    def tick(self, now: float) -> None:
        """Called periodically (and whenever the embedded runner is idle): deadlines live here."""

    def start(self) -> None:
        """Called once after the role's consumers are bound."""

    def send(self, address: str, msg: Message) -> None:
        t0 = time.perf_counter()
        body = msg.encode(self.ctx.wire_dtype)
        encode_s = time.perf_counter() - t0
        self.ctx.transport.publish(address, body, persistent=msg.PERSISTENT)
        self.bytes_sent[msg.KIND] += len(body)
        self.messages_sent[msg.KIND] += 1
        self.ctx.metrics.message("out", msg.KIND, len(body), encode_s)

    def log_update(self, body: bytes, round: int, kind: str) -> None:
        self.ctx.transport.append_log(body, round=round)
        self.bytes_sent[kind] += len(body)
        self.messages_sent[kind] += 1
        self.ctx.metrics.message("out", kind, len(body))

    def envelope(self, round: int, step: int = -1) -> dict:
        return {"run": self.ctx.run, "round": round, "step": step, "sender": self.name}


class RoleHost:
    """Binds a role to its transport: decode, dedupe, dispatch, ack or dead-letter."""

    def __init__(self, role: Role, *, strict: bool = False, dedupe_window: int = 10_000, prefetch: int = 1):
        self.role = role
        self.strict = strict  # embedded runs re-raise internal errors so that bugs fail loudly
        self.prefetch = prefetch
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._dedupe_window = dedupe_window
        self.rejected: Counter[str] = Counter()
        # The AMQP namespace decides the names of role-bound broker users (`<namespace>-client-3` in a test one).
        names = getattr(role.ctx.transport, "names", None)
        self.namespace = getattr(names, "namespace", roles.DEFAULT_NAMESPACE)

    def bind(self) -> None:
        for address in self.role.addresses():
            self.role.ctx.transport.consume(address, self.on_delivery, prefetch=self.prefetch)
        self.role.start()

    def on_delivery(self, delivery: Delivery) -> None:
        ctx = self.role.ctx
        t0 = time.perf_counter()
        try:
            msg = decode(delivery.body, ctx.limits, kinds=self.role.accepts)
        except WireError as exc:
            ctx.metrics.message("in", "invalid", len(delivery.body), time.perf_counter() - t0)
            self._reject(delivery, f"{exc.reason}: {exc.detail}")
            return
        ctx.metrics.message("in", msg.KIND, len(delivery.body), time.perf_counter() - t0)
        if msg.run != ctx.run:
            self._reject(delivery, f"wrong_run: message for run {msg.run!r}, this worker serves {ctx.run!r}")
            return
        # Authorization before any handler runs: may this (broker-vouched) sender send this kind to this role?
        refused = roles.authorize(msg, self.role.name, delivery.headers.get("user_id"), self.namespace)
        if refused:
            self._reject(delivery, refused)
            return
        if msg.msg_id in self._seen:
            delivery.ack()  # a redelivered duplicate of something already handled
            return
        try:
            with torch.no_grad() if getattr(self.role, "no_grad", False) else _null():
                self.role.on_message(msg)
        except Reject as exc:
            self._reject(delivery, exc.reason)
            return
        except WireError as exc:
            self._reject(delivery, f"{exc.reason}: {exc.detail}")
            return
        except Exception as exc:
            ctx.log.exception("%s: error handling %s", self.role.name, msg.KIND)
            self._reject(delivery, f"internal: {type(exc).__name__}: {exc}"[:500])
            if self.strict:
                raise
            return
        self._seen[msg.msg_id] = None
        if len(self._seen) > self._dedupe_window:
            self._seen.popitem(last=False)
        delivery.ack()
        observe_role(self.role)

    def _reject(self, delivery: Delivery, reason: str) -> None:
        self.rejected[reason.split(":", 1)[0]] += 1
        self.role.ctx.metrics.dead_letter(reason)
        self.role.ctx.log.warning("%s: rejected a message on %s: %s", self.role.name, delivery.address, reason)
        delivery.reject(reason)


def observe_role(role: Role) -> None:
    """Where a role is, for its metrics (a role without phases is `training` while in a round, else `idle`)."""
    metrics = role.ctx.metrics
    if metrics.enabled:
        phase = getattr(role, "phase", None) or ("training" if getattr(role, "in_round", False) else "idle")
        metrics.observe(int(getattr(role, "round", 0)), str(phase))


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
