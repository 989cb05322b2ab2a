"""Round ledgers, chosen by URL scheme: `memory://` (in process) or `redis://` (shared)."""

from __future__ import annotations

from urllib.parse import urlparse

from ..settings import redact_url
from .base import CLIENT_STATES, PHASES, RUN_STATUSES, ClientRecord, RoundStore, SlotClaim, StateError
from .memory import MemoryRoundStore


def open_store(url: str, **options: object) -> RoundStore:
    """A RoundStore for `url`; raises ValueError for an unknown scheme."""
    scheme = urlparse(url).scheme
    if scheme == "memory":
        return MemoryRoundStore(url, **options)  # type: ignore[arg-type]
    if scheme in ("redis", "rediss", "unix"):
        from .redis import RedisRoundStore  # redis-py is imported only when Redis is used

        return RedisRoundStore(url, **options)  # type: ignore[arg-type]
    raise ValueError(f"unknown state URL scheme {scheme!r} in {redact_url(url)!r} (memory://, redis://)")


__all__ = [
    "CLIENT_STATES",
    "PHASES",
    "RUN_STATUSES",
    "ClientRecord",
    "MemoryRoundStore",
    "RoundStore",
    "SlotClaim",
    "StateError",
    "open_store",
]
