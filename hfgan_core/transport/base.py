"""The Transport interface: how roles exchange message bytes, whatever carries them.

Addresses are logical names, mapped by each implementation onto its own topology:

| address            | what                                   | AMQP (broker_config/definitions.json)          |
|--------------------|----------------------------------------|------------------------------------------------|
| `server`           | split traffic to the split server      | direct exchange `hfgan.split`, queue           |
| `client.<k>`       | replies to client k (split + models)   | direct exchange `hfgan.split`, one queue each  |
| `coordinator`      | joins, round reports, cluster results  | queue                                           |
| `clustering`       | activation summaries (clustering jobs) | queue                                           |
| `aggregate`        | aggregation jobs (competing consumers) | work queue                                      |
| `events.<topic>`   | round lifecycle events                 | topic exchange `hfgan.events`                   |
| the update log     | every model update, tagged by round    | stream `hfgan.updates`                          |
| dead letters       | rejected messages with their reason    | exchange `hfgan.dlx`, queue `hfgan.dead`        |

Delivery is at-least-once: a handler acknowledges a delivery only after its side effect is durable, or rejects it
with a reason (the message is dead-lettered, never silently dropped). A delivery neither acknowledged nor rejected
when its consumer goes away is delivered again, flagged `redelivered`.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

SERVER = "server"
COORDINATOR = "coordinator"
CLUSTERING = "clustering"
AGGREGATE = "aggregate"
EVENTS_PREFIX = "events."
WORK_QUEUES = (SERVER, COORDINATOR, CLUSTERING, AGGREGATE)


def client_address(client: int) -> str:
    return f"client.{client}"


def is_valid_address(address: str) -> bool:
    if address in WORK_QUEUES:
        return True
    if address.startswith("client."):
        return address[7:].isdigit()
    return address.startswith(EVENTS_PREFIX) and len(address) > len(EVENTS_PREFIX)


class TransportError(RuntimeError):
    """The transport cannot do what was asked (closed, unreachable after retries, bad address)."""


@dataclass
class Delivery:
    """One received message. Exactly one of `ack()` or `reject(reason)` should be called."""

    body: bytes
    address: str
    redelivered: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    _settle: Callable[[str, str | None], None] | None = field(default=None, repr=False)
    settled: str | None = None  # "ack" or "reject"

    def ack(self) -> None:
        self._finish("ack", None)

    def reject(self, reason: str) -> None:
        """Dead-letter this message with a reason (one line, kept in the `x-hfgan-reason` header)."""
        self._finish("reject", reason)

    def requeue(self, reason: str) -> None:
        """Put the message back in its queue; it arrives again flagged `redelivered` (see `run_handler`)."""
        self._finish("requeue", reason)

    def _finish(self, how: str, reason: str | None) -> None:
        if self.settled is not None:
            raise TransportError(f"delivery already settled ({self.settled})")
        self.settled = how
        if self._settle is not None:
            self._settle(how, reason)


@dataclass(frozen=True)
class DeadLetter:
    address: str
    body: bytes
    reason: str


@dataclass(frozen=True)
class LogRecord:
    """One record of the update log. `publisher`: the broker user that appended it, as the broker vouches for it
    (AMQP `user_id`); None where the transport has no users (memory). Readers use a record only if its publisher
    may speak for the update's sender."""

    offset: int
    round: int
    body: bytes
    publisher: str | None = None


Handler = Callable[[Delivery], None]


def run_handler(handler: Handler, delivery: Delivery, log: logging.Logger) -> None:
    """Run `handler` on `delivery`, so that no message can crash its consumer or be retried forever.

    A handler that raises and leaves the delivery unsettled gets it once more (it is requeued and comes back flagged
    `redelivered`); a redelivered message that fails again is dead-lettered with the reason `failed_twice`. The
    exception is logged, not raised. A handler that settled the delivery itself and then raised meant to raise
    (strict embedded runs): its exception propagates."""
    try:
        handler(delivery)
    except Exception as exc:
        if delivery.settled is not None:
            raise
        what = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        if delivery.redelivered:
            log.error("handler failed again on a message to %s; dead-lettering it: %s", delivery.address, what)
            delivery.reject(f"failed_twice: {what}")
        else:
            log.error("handler failed on a message to %s; it is delivered once more: %s", delivery.address, what)
            delivery.requeue(what)


class Transport(abc.ABC):
    """Message transport shared by every role. Implementations: memory (embedded runs, tests) and amqp (pika)."""

    url: str

    @abc.abstractmethod
    def declare(self) -> None:
        """Create the topology (idempotent)."""

    @abc.abstractmethod
    def publish(self, address: str, body: bytes, *, persistent: bool = True) -> None:
        """Send `body` to `address`; returns once the transport has it (broker-confirmed where there is one)."""

    @abc.abstractmethod
    def consume(self, address: str, handler: Handler, *, prefetch: int = 1) -> None:
        """Deliver messages sent to `address` to `handler` (from `process`). For `events.*` addresses the pattern
        may use AMQP topic wildcards (`events.round.#`)."""

    @abc.abstractmethod
    def cancel(self, address: str) -> None:
        """Stop consuming `address`; its unsettled deliveries are delivered again later."""

    @abc.abstractmethod
    def process(self, timeout: float = 0.0) -> int:
        """Run handlers for available deliveries, waiting up to `timeout` seconds for the first; returns how many
        were handled."""

    @abc.abstractmethod
    def append_log(self, body: bytes, *, round: int) -> None:
        """Append a model update to the durable update log (the stream replay reads)."""

    @abc.abstractmethod
    def read_log(self, *, from_offset: int = 0, round: int | None = None, timeout: float = 2.0) -> list[LogRecord]:
        """Records of the update log from `from_offset` on (optionally only one round's)."""

    @abc.abstractmethod
    def log_length(self) -> int:
        """The offset the next update-log record will get (where a new run's round 1 starts reading)."""

    @abc.abstractmethod
    def dead_letters(self, *, limit: int = 1000) -> list[DeadLetter]:
        """Messages rejected so far, with their reasons (oldest first)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
