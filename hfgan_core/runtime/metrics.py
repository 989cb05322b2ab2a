"""Prometheus metrics of one worker: what it counts, and the HTTP endpoint a scraper reads.

Every role reaches its metrics through `RoleContext.metrics`. The default is `Metrics` itself, whose methods do
nothing: the library (and the embedded mode) neither needs `prometheus_client` nor touches a global registry. A worker
started with a metrics port (`HFGAN_METRICS_PORT`, worker.py) gets a `PromMetrics`: its own `CollectorRegistry`,
served over HTTP at `/metrics`. The hooks sit at the few central places: the role host (messages in, decode time,
dead letters), `Role.send` (messages out, encode time), the client's and the server's step, the coordinator's round
end and round events, the aggregator's job.

Metrics (all prefixed `hfgan_`; the table with their meanings is in docs/observability.md): `worker_info`,
`worker_state`, `messages_total` and `message_bytes_total` by kind and direction, `encode_seconds` and
`decode_seconds` by kind, `steps_total` by outcome, `step_duration_seconds`, `rounds_total`, `round`, `round_phase`,
`clients_late_total` and `clients_dropped_total` by reason, `dead_letters_total` by reason,
`aggregation_jobs_total` by outcome.

Label values come from code (message kinds, reason prefixes with digits replaced), never from what a client sends
verbatim, so the number of series stays bounded whatever a hostile client does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

PHASES = ("admitting", "training", "closing", "aggregating", "done", "finished", "idle")
WORKER_STATES = ("serving", "finished")
_SECONDS_FAST = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
_SECONDS_STEP = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_KIND = re.compile(r"[a-z_]{1,40}")


def reason_label(reason: str) -> str:
    """A bounded label for a reason: its first word (before ':'), digits replaced, at most 60 characters."""
    head = reason.split(":", 1)[0].strip().lower()
    return re.sub(r"\d+", "N", re.sub(r"[^a-z0-9_ ();,.-]", "", head))[:60] or "unknown"


def kind_label(kind: str) -> str:
    return kind if _KIND.fullmatch(kind) else "invalid"


class Metrics:
    """The no-op metrics every role has by default (embedded runs, tests): each hook returns at once."""

    enabled = False

    def message(self, direction: str, kind: str, nbytes: int, seconds: float | None = None) -> None:
        """A message received (`in`, decoded in `seconds`) or sent (`out`, encoded in `seconds`)."""

    def dead_letter(self, reason: str) -> None:
        """This worker rejected a message with `reason`."""

    def step(self, seconds: float, dropped: bool = False) -> None:
        """A training step (client) or window (server) ended."""

    def round_finished(self, clients: Mapping[int, Any] | None = None) -> None:
        """This worker finished a round; the coordinator passes the ledger's client records of it."""

    def observe(self, round: int, phase: str) -> None:
        """Where the worker is (sampled after each delivery and tick)."""

    def aggregation_job(self, outcome: str, n: int = 1) -> None:
        """Aggregation jobs queued (coordinator) or answered (aggregator)."""

    def finished(self) -> None:
        """The role is done and its last numbers are in the ledger."""

    def close(self) -> None:
        """Stop serving."""


class PromMetrics(Metrics):
    """Metrics in a registry of this worker's own, optionally served over HTTP (`serve`)."""

    enabled = True

    def __init__(self, role: str, run: str):
        from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram

        self.registry = r = CollectorRegistry(auto_describe=True)
        self._server: Any = None
        self._thread: Any = None
        info = Gauge("hfgan_worker_info", "This worker: its role name and run", ["role", "run"], registry=r)
        info.labels(role=role, run=run).set(1)
        self.state = Enum("hfgan_worker_state", "Worker lifecycle", states=list(WORKER_STATES), registry=r)
        self.messages = Counter(
            "hfgan_messages", "Messages received and sent", ["kind", "direction"], registry=r
        )  # `_total` is appended by the client library
        self.bytes = Counter("hfgan_message_bytes", "Encoded bytes of the messages", ["kind", "direction"], registry=r)
        self.encode = Histogram(
            "hfgan_encode_seconds", "Encoding time of a sent message", ["kind"], buckets=_SECONDS_FAST, registry=r
        )
        self.decode = Histogram(
            "hfgan_decode_seconds", "Decoding time of a delivery", ["kind"], buckets=_SECONDS_FAST, registry=r
        )
        self.steps = Counter("hfgan_steps", "Training steps (server: windows)", ["outcome"], registry=r)
        self.step_seconds = Histogram(
            "hfgan_step_duration_seconds", "Wall time of a step (server: window)", buckets=_SECONDS_STEP, registry=r
        )
        self.rounds = Counter("hfgan_rounds", "Rounds this worker finished", registry=r)
        self.round = Gauge("hfgan_round", "The round the worker is in", registry=r)
        self.phase = Enum("hfgan_round_phase", "The phase of the worker's round", states=list(PHASES), registry=r)
        self.late = Counter("hfgan_clients_late", "Clients marked late in a closed round", ["reason"], registry=r)
        self.dropped = Counter("hfgan_clients_dropped", "Clients dropped from a closed round", ["reason"], registry=r)
        self.dead = Counter("hfgan_dead_letters", "Messages rejected by this worker", ["reason"], registry=r)
        self.jobs = Counter("hfgan_aggregation_jobs", "Aggregation jobs", ["outcome"], registry=r)
        self.state.state("serving")
        self.phase.state("idle")

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve `/metrics` on addr:port (port 0: any free port); returns the port."""
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def message(self, direction: str, kind: str, nbytes: int, seconds: float | None = None) -> None:
        kind = kind_label(kind)
        self.messages.labels(kind=kind, direction=direction).inc()
        self.bytes.labels(kind=kind, direction=direction).inc(nbytes)
        if seconds is not None:
            (self.decode if direction == "in" else self.encode).labels(kind=kind).observe(seconds)

    def dead_letter(self, reason: str) -> None:
        self.dead.labels(reason=reason_label(reason)).inc()

    def step(self, seconds: float, dropped: bool = False) -> None:
        self.steps.labels(outcome="dropped" if dropped else "done").inc()
        self.step_seconds.observe(seconds)

    def round_finished(self, clients: Mapping[int, Any] | None = None) -> None:
        self.rounds.inc()
        for rec in (clients or {}).values():
            if rec.state == "late":
                self.late.labels(reason=reason_label(rec.reason)).inc()
            elif rec.state == "dropped":
                self.dropped.labels(reason=reason_label(rec.reason)).inc()

    def observe(self, round: int, phase: str) -> None:
        self.round.set(round)
        self.phase.state(phase if phase in PHASES else "idle")

    def aggregation_job(self, outcome: str, n: int = 1) -> None:
        self.jobs.labels(outcome=outcome).inc(n)

    def finished(self) -> None:
        self.state.state("finished")


def parse_text(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A scraped exposition as {(name, sorted labels): value} (for tests and tools)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def total(samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))
