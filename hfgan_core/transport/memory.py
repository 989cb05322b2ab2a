"""In-process transport: real bytes through real queues, delivered in publish order by `process()`.

Used by the embedded runner (every role in one process) and the unit tests. Deterministic: deliveries happen only
inside `process()`, one at a time, oldest message first across all queues, so a run is reproducible from its seed.
All state lives on the instance.
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass

from .base import (
    EVENTS_PREFIX,
    DeadLetter,
    Delivery,
    Handler,
    LogRecord,
    Transport,
    TransportError,
    is_valid_address,
    run_handler,
)

log = logging.getLogger(__name__)


@dataclass
class _Queued:
    seq: int
    body: bytes
    redelivered: bool = False
    user: str | None = None


def _topic_match(pattern: str, key: str) -> bool:
    """AMQP topic matching: `*` is one dot-separated word, `#` zero or more."""
    p, k = pattern.split("."), key.split(".")

    def match(i: int, j: int) -> bool:
        if i == len(p):
            return j == len(k)
        if p[i] == "#":
            return any(match(i + 1, jj) for jj in range(j, len(k) + 1))
        if j == len(k):
            return False
        return (p[i] == "*" or fnmatch.fnmatchcase(k[j], p[i])) and match(i + 1, j + 1)

    return match(0, 0)


class MemoryTransport(Transport):
    def __init__(self, url: str = "memory://", *, max_queue: int = 1_000_000):
        self.url = url
        self.max_queue = max_queue
        self.user: str | None = None  # the publisher of its log records (tests); embedded runs have no users
        self._seq = itertools.count()
        self._queues: dict[str, deque[_Queued]] = {}
        self._handlers: dict[str, Handler] = {}
        self._event_bindings: dict[str, str] = {}  # pattern -> queue name
        self._unsettled: dict[str, list[_Queued]] = {}
        self._dead: list[DeadLetter] = []
        self._log: list[LogRecord] = []
        self._closed = False
        self.published_bytes = 0
        self.published_messages = 0
        # Optional observer of every publish (address, body): the privacy test's spy.
        self.spy = None
        self.user: str | None = None  # the publishing user of this view (as_user)

    def as_user(self, user: str) -> MemoryTransport:
        """A view of the same queues whose publishes carry `user_id=user`, as those of a broker connection logged
        in as `user` do (RabbitMQ validates the property): how tests speak as a client or a role user."""
        view = copy.copy(self)  # shares every queue, handler and list; only `user` differs
        view.user = user
        return view

    # ---------------------------------------------------------------------------------------------- topology
    def declare(self) -> None:
        self._check_open()

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("transport is closed")

    def _queue(self, name: str) -> deque[_Queued]:
        return self._queues.setdefault(name, deque())

    # ------------------------------------------------------------------------------------------------ publish
    def publish(self, address: str, body: bytes, *, persistent: bool = True) -> None:
        self._check_open()
        if not is_valid_address(address):
            raise TransportError(f"unknown address {address!r}")
        if not isinstance(body, bytes | bytearray):
            raise TransportError("message bodies are bytes")
        body = bytes(body)
        self.published_bytes += len(body)
        self.published_messages += 1
        if self.spy is not None:
            self.spy(address, body)
        if address.startswith(EVENTS_PREFIX):
            key = address[len(EVENTS_PREFIX) :]
            targets = [q for pat, q in self._event_bindings.items() if _topic_match(pat, key)]
        else:
            targets = [address]
        for name in targets:
            q = self._queue(name)
            if len(q) >= self.max_queue:
                self._dead.append(DeadLetter(name, body, "queue_full"))
                continue
            q.append(_Queued(next(self._seq), body, user=self.user))

    # ------------------------------------------------------------------------------------------------ consume
    def consume(self, address: str, handler: Handler, *, prefetch: int = 1) -> None:
        self._check_open()
        if not is_valid_address(address):
            raise TransportError(f"unknown address {address!r}")
        if address.startswith(EVENTS_PREFIX):
            pattern = address[len(EVENTS_PREFIX) :]
            name = f"{address}#sub{len(self._event_bindings)}"
            self._event_bindings[pattern] = name
            self._handlers[name] = handler
            return
        if address in self._handlers:
            raise TransportError(f"{address} already has a consumer in this transport")
        self._handlers[address] = handler
        self._queue(address)

    def cancel(self, address: str) -> None:
        names = [n for n in self._handlers if n == address or n.startswith(address + "#sub")]
        for name in names:
            self._handlers.pop(name, None)
            self._requeue_unsettled(name)
        if address.startswith(EVENTS_PREFIX):
            pattern = address[len(EVENTS_PREFIX) :]
            self._event_bindings.pop(pattern, None)

    def _requeue_unsettled(self, name: str) -> None:
        pending = self._unsettled.pop(name, [])
        q = self._queue(name)
        for item in sorted(pending, key=lambda x: x.seq, reverse=True):
            item.redelivered = True
            q.appendleft(item)

    def process(self, timeout: float = 0.0) -> int:
        self._check_open()
        handled = 0
        deadline = time.monotonic() + timeout
        while True:
            name = self._next_ready()
            if name is None:
                if handled or time.monotonic() >= deadline:
                    return handled
                time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
                continue
            self._deliver(name)
            handled += 1

    def process_one(self) -> bool:
        """Deliver exactly one message if any is ready (the embedded runner's pump)."""
        name = self._next_ready()
        if name is None:
            return False
        self._deliver(name)
        return True

    def pending(self) -> int:
        return sum(len(q) for name, q in self._queues.items() if name in self._handlers)

    def _next_ready(self) -> str | None:
        best, best_seq = None, None
        for name, q in self._queues.items():
            if q and name in self._handlers and (best_seq is None or q[0].seq < best_seq):
                best, best_seq = name, q[0].seq
        return best

    def _deliver(self, name: str) -> None:
        item = self._queues[name].popleft()
        unsettled = self._unsettled.setdefault(name, [])
        unsettled.append(item)
        address = name.split("#sub")[0]

        def settle(how: str, reason: str | None) -> None:
            if item in unsettled:
                unsettled.remove(item)
            if how == "reject":
                self._dead.append(DeadLetter(address, item.body, reason or "rejected"))
            elif how == "requeue":
                item.redelivered = True
                self._queue(name).appendleft(item)

        headers = {"user_id": item.user} if item.user else {}
        delivery = Delivery(item.body, address, redelivered=item.redelivered, headers=headers, _settle=settle)
        run_handler(self._handlers[name], delivery, log)

    # ---------------------------------------------------------------------------------------------------- log
    def append_log(self, body: bytes, *, round: int) -> None:
        self._check_open()
        self._log.append(LogRecord(len(self._log), round, bytes(body), self.user))
        self.published_bytes += len(body)

    def read_log(self, *, from_offset: int = 0, round: int | None = None, timeout: float = 2.0) -> list[LogRecord]:
        return [r for r in self._log[from_offset:] if round is None or r.round == round]

    def log_length(self) -> int:
        return len(self._log)

    # ------------------------------------------------------------------------------------------- dead letters
    def dead_letters(self, *, limit: int = 1000) -> list[DeadLetter]:
        return list(self._dead[:limit])

    def close(self) -> None:
        if self._closed:
            return
        for name in list(self._unsettled):
            self._requeue_unsettled(name)
        self._handlers.clear()
        self._closed = True
