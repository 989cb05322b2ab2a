"""Instrumentation for bench/system.py: a transport subclass and a round-store wrapper that tally bytes, messages
and time spent, and the CPU time of the local broker and Redis."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfgan_core.state import RoundStore
from hfgan_core.transport import Transport


@dataclass
class Tally:
    """What one transport did: bytes and messages by kind of traffic, and the time spent in the transport."""

    split_bytes: int = 0
    split_messages: int = 0
    first_split: float | None = None
    last_split: float = 0.0
    publish_s: float = 0.0
    process_s: float = 0.0
    handler_s: float = 0.0
    store_s: float = 0.0
    store_calls: int = 0
    store_by_call: dict[str, float] = field(default_factory=dict)


def instrumented(base: type[Transport]) -> type[Transport]:
    """A subclass of a transport that tallies publishes (transient ones are split traffic) and the time spent in
    `publish`, in `process` / `process_one`, and in the handlers those run (the difference is receive overhead)."""

    class Instrumented(base):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **kw: Any):
            super().__init__(*a, **kw)
            self.tally = Tally()
            # A handler may pump the transport itself (process(0) during long work): only the outermost process
            # call and the outermost handler are timed, so nothing is counted twice.
            self._process_depth = 0
            self._handler_depth = 0

        def publish(self, address: str, body: bytes, *, persistent: bool = True) -> None:
            t0 = time.perf_counter()
            super().publish(address, body, persistent=persistent)
            t1 = time.perf_counter()
            t = self.tally
            t.publish_s += t1 - t0
            if not persistent:
                t.split_bytes += len(body)
                t.split_messages += 1
                if t.first_split is None:
                    t.first_split = t0
                t.last_split = t1

        def consume(self, address: str, handler: Any, *, prefetch: int = 1) -> None:
            def timed(delivery: Any) -> None:
                t0 = time.perf_counter()
                self._handler_depth += 1
                try:
                    handler(delivery)
                finally:
                    self._handler_depth -= 1
                    if self._handler_depth == 0:
                        self.tally.handler_s += time.perf_counter() - t0

            super().consume(address, timed, prefetch=prefetch)

        def _timed(self, fn: Any, *a: Any) -> Any:
            t0 = time.perf_counter()
            self._process_depth += 1
            try:
                return fn(*a)
            finally:
                self._process_depth -= 1
                if self._process_depth == 0:
                    self.tally.process_s += time.perf_counter() - t0

        def process(self, timeout: float = 0.0) -> int:
            return self._timed(super().process, timeout)

        if hasattr(base, "process_one"):

            def process_one(self) -> bool:
                return self._timed(super().process_one)

    Instrumented.__name__ = f"Instrumented{base.__name__}"
    return Instrumented


STORE_CALLS = (
    "init_run",
    "run_info",
    "set_status",
    "get_round",
    "transition",
    "set_expected",
    "mark_client",
    "round_clients",
    "claim_slot",
    "release_slot",
    "heartbeat",
    "alive",
    "acquire_leader",
    "release_leader",
    "set_cuts",
    "get_cuts",
    "set_clusters",
    "get_clusters",
    "set_weights",
    "get_weights",
    "set_model_digest",
    "get_model_digests",
    "set_log_offset",
    "get_log_offset",
    "set_checkpoint",
    "get_checkpoints",
    "record_metrics",
    "get_metrics",
    "put_doc",
    "get_docs",
)


def time_store(store: RoundStore, tally: Tally) -> None:
    """Time every ledger call of `store` (instance attributes shadow the methods)."""
    for name in STORE_CALLS:
        fn = getattr(store, name, None)
        if fn is None:
            continue

        def timed(*a: Any, _fn: Any = fn, _name: str = name, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                dt = time.perf_counter() - t0
                tally.store_s += dt
                tally.store_calls += 1
                tally.store_by_call[_name] = tally.store_by_call.get(_name, 0.0) + dt

        setattr(store, name, timed)


def service_cpu_s(names: tuple[str, ...] = ("beam.smp", "redis-server")) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the local broker and Redis processes, read from /proc (Linux; an
    empty dict elsewhere or when they run on another host). CPU time, unlike wall time, barely depends on what else
    the machine is doing: the noise-robust measure of what the broker costs."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.find("(") + 1 : text.rfind(")")]
        if comm in names:
            fields = text[text.rfind(")") + 2 :].split()
            out[comm] = out.get(comm, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out
