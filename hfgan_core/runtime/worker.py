"""The worker loop every role shares when it runs as a process of its own (`python -m workers.<role>`).

    open transport and store (the config's URLs)  ->  transport.declare()  ->  RoleHost(role, strict=False).bind()
    loop: transport.process(timeout=0.1); role.tick(now); every few seconds a heartbeat to the ledger
    until the role is done (coordinator: all rounds; others: run_end, or the ledger says the run is over)
    or SIGTERM / SIGINT (the message being handled is finished first), then close transport and store.

Exit codes (`EXIT_*`, the same for every role):

| code | meaning                                                                                       |
|------|-----------------------------------------------------------------------------------------------|
| 0    | finished: the run ended, or the worker was stopped by SIGTERM / SIGINT                         |
| 1    | internal error (a bug, a lost coordinator lease, a ledger that moved under the coordinator)    |
| 2    | bad configuration (config file, run id, URLs, credentials refused, run directory in use, ...) |
| 3    | the broker or the state store stayed unreachable for the whole retry period                   |

Settings beyond the run config come from the environment (`WorkerSettings.from_env`; settings.py reads it):
`HFGAN_HEARTBEAT_S` (2), `HFGAN_HEARTBEAT_TTL_S` (10), `HFGAN_LEASE_TTL_S` (15, the coordinator lease),
`HFGAN_CONNECT_TIMEOUT_S` (60, how long the broker and Redis are retried before exit code 3),
`HFGAN_BROKER_NAMESPACE` (the AMQP namespace, `hfgan`; tests use throw-away ones) and `HFGAN_HEALTH_FILE` (a file
rewritten with every heartbeat, for container health checks: runtime/health.py). Metrics (metrics.py), off unless
a port is set: `HFGAN_METRICS_PORT` (serve Prometheus metrics there), `HFGAN_METRICS_ADDR` (127.0.0.1; compose
binds 0.0.0.0) and `HFGAN_METRICS_LINGER_S` (0: how long a finished worker keeps serving its final numbers, so
that the last scrape sees them).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from ..config import ConfigError
from ..settings import Settings, redact_url
from ..state import RoundStore, StateError, open_store
from ..transport import Delivery, Transport, TransportError, open_transport
from .health import write_beat
from .host import Role, RoleHost, observe_role

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_CONFIG = 2
EXIT_UNREACHABLE = 3

FINISHED_STATUSES = ("finished", "failed")
log = logging.getLogger("hfgan.worker")


class WorkerExit(Exception):
    """Leave the worker with `code` (EXIT_*) and a one-line reason."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class WorkerSettings:
    heartbeat_s: float = 2.0
    heartbeat_ttl_s: float = 10.0
    lease_ttl_s: float = 15.0
    connect_timeout_s: float = 60.0
    chunk_timeout_s: float = 120.0  # an incomplete chunked message older than this is dead-lettered (AMQP)
    poll_s: float = 0.1
    namespace: str | None = None
    health_file: str | None = None  # rewritten with every heartbeat (HFGAN_HEALTH_FILE, see runtime/health.py)
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    metrics_linger_s: float = 0.0

    @staticmethod
    def from_env(environ: Mapping[str, str] | None = None) -> WorkerSettings:
        """The loop's settings from the environment (settings.py reads the variables)."""
        env = Settings.from_env(environ)
        names = ("heartbeat_s", "heartbeat_ttl_s", "lease_ttl_s", "connect_timeout_s", "namespace")
        names += ("metrics_port", "metrics_addr", "metrics_linger_s", "health_file", "chunk_timeout_s")
        values: dict[str, Any] = {name: getattr(env, name) for name in names if getattr(env, name) is not None}
        s = WorkerSettings(**values)
        if s.heartbeat_ttl_s <= s.heartbeat_s or s.lease_ttl_s <= s.heartbeat_s:
            raise ConfigError("the heartbeat and lease TTLs must be longer than the heartbeat interval")
        return s


def owner_id() -> str:
    """This process, as lease and slot owners name it: `<hostname>-<pid>`."""
    return f"{socket.gethostname()}-{os.getpid()}"


# ------------------------------------------------------------------------------------------------- signals
class StopFlag:
    """SIGTERM and SIGINT set `requested` (the loop finishes the message in hand, then leaves)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def install(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def sleep(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking early on a stop request; True if stopped."""
        end = time.monotonic() + seconds
        while not self.requested and time.monotonic() < end:
            time.sleep(min(0.1, end - time.monotonic()))
        return self.requested


# ----------------------------------------------------------------------------------------------- backends
def classify(exc: BaseException) -> int:
    """The exit code an exception stands for."""
    if isinstance(exc, WorkerExit):
        return exc.code
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG
    text = str(exc)
    if isinstance(exc, TransportError):
        if "unreachable" in text:
            return EXIT_UNREACHABLE
        if "refused" in text or "bad broker URL" in text or "namespace" in text or "topology incomplete" in text:
            return EXIT_CONFIG
        return EXIT_UNREACHABLE
    if isinstance(exc, StateError):
        if "unreachable" in text:
            return EXIT_UNREACHABLE
        config = ("bad Redis URL", "bad run id", "different configuration", "refused the credentials")
        if any(s in text for s in config):
            return EXIT_CONFIG
        return EXIT_INTERNAL
    return EXIT_INTERNAL


def check_shared(what: str, url: str) -> None:
    """WorkerExit(EXIT_CONFIG) for an in-process (`memory://`) URL: a worker process needs a shared one."""
    if urlparse(url).scheme == "memory":
        raise WorkerExit(
            EXIT_CONFIG,
            f"a worker process needs a shared {what}: {redact_url(url)} is in-process only "
            f"(use amqp:// and redis://, or `hfgan train` for one process)",
        )


def open_state(state_url: str, settings: WorkerSettings) -> RoundStore:
    """The run's ledger, answering (retried for `connect_timeout_s`, then StateError: exit code 3)."""
    check_shared("state", state_url)
    try:
        store = open_store(state_url, retry_timeout=settings.connect_timeout_s)
    except (ValueError, StateError) as exc:
        raise WorkerExit(EXIT_CONFIG, str(exc)) from exc
    try:
        store.get_round("hfgan-ping")  # a read of a key nobody has: checks that Redis answers
    except Exception:
        store.close()
        raise
    return store


def open_broker(broker_url: str, settings: WorkerSettings, name: str) -> Transport:
    """The broker, connected and its topology declared (retried for `connect_timeout_s`: exit code 3)."""
    check_shared("broker", broker_url)
    t_opts: dict[str, Any] = {"reconnect_timeout": settings.connect_timeout_s, "name": name}
    if broker_url.startswith(("amqp://", "amqps://")):
        t_opts["chunk_timeout"] = settings.chunk_timeout_s
    if settings.namespace:
        t_opts["namespace"] = settings.namespace
    try:
        transport = open_transport(broker_url, **t_opts)
    except (ValueError, TransportError) as exc:
        raise WorkerExit(EXIT_CONFIG, str(exc)) from exc
    try:
        transport.declare()
    except Exception:
        transport.close()
        raise
    return transport


def open_backends(broker_url: str, state_url: str, settings: WorkerSettings, name: str) -> tuple[Transport, RoundStore]:
    """Transport and store of a worker, connected (broker topology declared, Redis answering), or WorkerExit."""
    check_shared("broker", broker_url)
    store = open_state(state_url, settings)
    try:
        return open_broker(broker_url, settings, name), store
    except BaseException:
        store.close()
        raise


def role_done(role: Role) -> bool:
    """A role says it is done: the coordinator after the last round, client and server after run_end."""
    return bool(getattr(role, "finished", False) or getattr(role, "finished_run", False))


# ---------------------------------------------------------------------------------------------------- loop
class _WorkerHost(RoleHost):
    """A RoleHost that lets the loop keep its rhythm between deliveries: `transport.process()` may go on
    dispatching for a long time while messages keep coming (publisher confirms pull in new deliveries), and
    heartbeats, deadlines and stop requests must not wait for it to return."""

    def __init__(self, role: Role, loop: WorkerLoop):
        super().__init__(role, strict=False)
        self.loop = loop

    def on_delivery(self, delivery: Delivery) -> None:
        super().on_delivery(delivery)
        self.loop.between_deliveries()


class WorkerLoop:
    """Runs one bound role until it is done or stopped. `beat()` hooks run with every heartbeat (the coordinator
    renews its lease there and raises WorkerExit when it lost it)."""

    def __init__(
        self,
        role: Role,
        settings: WorkerSettings,
        stop: StopFlag,
        *,
        beat_names: tuple[str, ...] | None = None,
        info: Callable[[], str] | None = None,
        on_beat: Callable[[], None] | None = None,
        after_bind: Callable[[], None] | None = None,
        watch_run_status: bool = True,
        send_beat: Callable[[str, bool], None] | None = None,
    ):
        self.role = role
        self.ctx = role.ctx
        self.settings = settings
        self.stop = stop
        self.beat_names = beat_names or (role.name,)
        self.info = info or (lambda: "")
        self.on_beat = on_beat
        self.after_bind = after_bind
        self.watch_run_status = watch_run_status
        # A client beats over the broker (send_beat(info, leaving)): it has no ledger access at all.
        self.send_beat = send_beat
        self.host = _WorkerHost(role, self)
        self.reason = ""
        self._traffic: tuple[int, int] = (-1, -1)
        self._next_beat = 0.0
        self._next_tick = 0.0
        self._consuming = False

    def beat(self) -> None:
        ctx, s = self.ctx, self.settings
        info = self.info()
        if self.send_beat is not None:
            self.send_beat(info, False)
            if s.health_file:  # only after the broker took the beat: the probe must not pass for a hung client
                write_beat(s.health_file)
            if self.on_beat is not None:
                self.on_beat()
            return
        for name in self.beat_names:
            ctx.store.heartbeat(ctx.run, name, s.heartbeat_ttl_s, info)
        if s.health_file:  # only after the ledger took the beat: the probe must not pass for a worker Redis lost
            write_beat(s.health_file)
        self.report_traffic()
        if self.on_beat is not None:
            self.on_beat()

    def report_traffic(self) -> None:
        """What this worker sent so far, in the ledger (round 0 metrics `traffic.<role>`), when it changed."""
        traffic = (sum(self.role.bytes_sent.values()), sum(self.role.messages_sent.values()))
        if traffic != self._traffic:
            self.ctx.store.record_metrics(
                self.ctx.run,
                0,
                f"traffic.{self.role.name}",
                {"bytes_sent": float(traffic[0]), "messages_sent": float(traffic[1])},
            )
            self._traffic = traffic

    def run_over(self) -> bool:
        info = self.ctx.store.run_info(self.ctx.run)
        return info is not None and info.get("status") in FINISHED_STATUSES

    def between_deliveries(self) -> None:
        """After each delivery: stop consuming once a stop was requested (so `process()` returns), tick the role
        and beat when they are due."""
        if not self._consuming:
            return
        if self.stop.requested:
            self._stop_consuming()
            return
        now = time.monotonic()
        if now >= self._next_tick:
            self._next_tick = now + self.settings.poll_s
            self.role.tick(time.time())
        if now >= self._next_beat:
            self._next_beat = now + self.settings.heartbeat_s
            self.beat()

    def keepalive(self) -> None:
        """Beat if one is due: for a role that is busy inside a handler for long (an emulated slow device)."""
        if self._consuming and time.monotonic() >= self._next_beat:
            self._next_beat = time.monotonic() + self.settings.heartbeat_s
            self.beat()

    def sliced_sleep(self, seconds: float) -> None:
        """Sleep `seconds` in slices, beating in between; cut short by a stop request."""
        end = time.monotonic() + seconds
        while not self.stop.requested:
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.5))
            self.keepalive()

    def _stop_consuming(self) -> None:
        self._consuming = False
        for address in self.role.addresses():
            # Unacknowledged deliveries go back to their queues (for whoever takes this worker's place).
            self.ctx.transport.cancel(address)

    def run(self) -> str:
        """Bind the role and loop; returns "finished" or "stopped"."""
        self.start_metrics()
        try:
            return self._run()
        finally:
            self.ctx.metrics.close()  # after a failure too (stop_metrics closed it already otherwise)

    def _run(self) -> str:
        ctx, s = self.ctx, self.settings
        self.beat()
        self.host.bind()
        self._consuming = True
        if self.after_bind is not None:
            self.after_bind()
        log.info("%s: serving run %s", self.role.name, ctx.run)
        self._next_beat = time.monotonic() + s.heartbeat_s
        while True:
            if self.stop.requested:
                self.reason = "stopped"
                log.info("%s: %s received; stopping", self.role.name, self.stop.signal_name)
                break
            ctx.transport.process(timeout=s.poll_s)
            if role_done(self.role):
                self.reason = "finished"
                break
            now = time.monotonic()
            if now >= self._next_tick:
                self._next_tick = now + s.poll_s
                self.role.tick(time.time())
                observe_role(self.role)
                if role_done(self.role):
                    self.reason = "finished"
                    break
            if now >= self._next_beat:
                self._next_beat = now + s.heartbeat_s
                self.beat()
                if self.watch_run_status and self.run_over():
                    self.reason = "finished"
                    log.info("%s: the run is over (ledger status)", self.role.name)
                    break
        self._consuming = False
        self.farewell()
        self.stop_metrics()
        return self.reason

    def start_metrics(self) -> None:
        """Serve this worker's Prometheus metrics when a port is set (off by default)."""
        s = self.settings
        if s.metrics_port is None or self.ctx.metrics.enabled:
            return
        from .metrics import PromMetrics

        metrics = PromMetrics(self.role.name, self.ctx.run)
        try:
            port = metrics.serve(s.metrics_port, s.metrics_addr)
        except OSError as exc:
            raise WorkerExit(EXIT_CONFIG, f"cannot serve metrics on {s.metrics_addr}:{s.metrics_port}: {exc}") from exc
        self.ctx.metrics = metrics
        observe_role(self.role)
        log.info("%s: metrics on http://%s:%d/metrics", self.role.name, s.metrics_addr, port)

    def stop_metrics(self) -> None:
        """The final numbers stay up for `metrics_linger_s` (cut short by a stop request), then the endpoint goes."""
        metrics = self.ctx.metrics
        if not metrics.enabled:
            return
        observe_role(self.role)
        metrics.finished()
        if self.reason == "finished" and self.settings.metrics_linger_s > 0:
            self.stop.sleep(self.settings.metrics_linger_s)
        metrics.close()

    def farewell(self) -> None:
        """Last traffic numbers; the heartbeat expires at once (the worker is gone, not silent)."""
        ctx = self.ctx
        try:
            if self.send_beat is not None:
                self.send_beat("exited", True)
                return
            self.report_traffic()
            for name in self.beat_names:
                ctx.store.heartbeat(ctx.run, name, 0.001, "exited")
        except Exception as exc:  # leaving anyway: the TTL removes the heartbeat soon
            log.warning("%s: could not sign off in the ledger: %s", self.role.name, exc)


def close_quietly(*things: Any) -> None:
    for thing in things:
        if thing is None:
            continue
        try:
            thing.close()
        except Exception as exc:  # closing after a failure: nothing more to do about it
            log.debug("close: %s", exc)
