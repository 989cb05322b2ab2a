"""Transports, chosen by URL scheme: `memory://` (in process) or `amqp://` (RabbitMQ through pika)."""

from __future__ import annotations

from urllib.parse import urlparse

from ..settings import redact_url
from .base import (
    AGGREGATE,
    CLUSTERING,
    COORDINATOR,
    SERVER,
    DeadLetter,
    Delivery,
    LogRecord,
    Transport,
    TransportError,
    client_address,
)
from .memory import MemoryTransport


def open_transport(url: str, **options: object) -> Transport:
    """A transport for `url`; raises ValueError for an unknown scheme."""
    scheme = urlparse(url).scheme
    if scheme == "memory":
        return MemoryTransport(url, **options)  # type: ignore[arg-type]
    if scheme in ("amqp", "amqps"):
        from .amqp import AmqpTransport  # pika is imported only when a broker is used

        return AmqpTransport(url, **options)  # type: ignore[arg-type]
    raise ValueError(f"unknown broker URL scheme {scheme!r} in {redact_url(url)!r} (memory://, amqp://)")


__all__ = [
    "AGGREGATE",
    "CLUSTERING",
    "COORDINATOR",
    "SERVER",
    "DeadLetter",
    "Delivery",
    "LogRecord",
    "MemoryTransport",
    "Transport",
    "TransportError",
    "client_address",
    "open_transport",
]
