"""Integration tests run against the real RabbitMQ and Redis. A service that does not answer is a test FAILURE
with a clear message, never a skip: `scripts/ci-services.sh` starts them (CI runs it before the tests).

URLs: HFGAN_TEST_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/) and HFGAN_TEST_REDIS_URL (default
redis://127.0.0.1:6379/15, a database of its own). Tests isolate themselves further: AMQP tests use throw-away
namespaces (their own exchanges and queues, deleted afterwards), Redis tests use unique run ids.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import uuid
from pathlib import Path

import pika
import pytest
import redis

AMQP_URL = os.environ.get("HFGAN_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("HFGAN_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def amqp_url() -> str:
    try:
        params = pika.URLParameters(AMQP_URL)
        params.connection_attempts = 1
        params.socket_timeout = 5
        pika.BlockingConnection(params).close()
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing here
        pytest.fail(
            f"RabbitMQ is not reachable at {AMQP_URL} ({exc!r}); start it with scripts/ci-services.sh", pytrace=False
        )
    return AMQP_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        r = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3, socket_timeout=3)
        r.ping()
        r.close()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(
            f"Redis is not reachable at {REDIS_URL} ({exc!r}); start it with scripts/ci-services.sh", pytrace=False
        )
    return REDIS_URL


def new_namespace() -> str:
    return f"hfgant{uuid.uuid4().hex[:10]}"


def worker_env(
    *, config: Path, run_id: str, amqp: str, namespace: str, run_dir: Path, state: str | None = None, **more: str
) -> dict[str, str]:
    """The environment of a worker process a test starts: the caller's environment without any HFGAN_* setting of
    the shell (a developer's own HFGAN_BROKER_URL must not leak into a test run), the run's own settings, one torch
    thread and unbuffered output (the test reads the logs). `more` adds or overrides variables by full name."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HFGAN_")}
    env.update(
        HFGAN_CONFIG=str(config),
        HFGAN_RUN_ID=run_id,
        HFGAN_BROKER_URL=amqp,
        HFGAN_BROKER_NAMESPACE=namespace,
        HFGAN_RUN_DIR=str(run_dir),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    if state is not None:
        env["HFGAN_STATE_URL"] = state
    env.update(more)
    return env


class TcpProxy:
    """A TCP relay in front of RabbitMQ whose connections a test can cut, like a broker restart or a network
    failure would, without touching the shared broker."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, base: str) -> str:
        p = urllib.parse.urlsplit(base)
        netloc = f"{p.username}:{p.password}@127.0.0.1:{self.port}"
        return urllib.parse.urlunsplit((p.scheme, netloc, p.path, p.query, p.fragment))

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> int:
        """Drop every relayed connection; returns how many there were."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        return len(pairs)

    def close(self) -> None:
        self._stop = True
        self.cut()
        self.server.close()


@pytest.fixture
def proxy(amqp_url: str):
    p = urllib.parse.urlsplit(amqp_url)
    relay = TcpProxy((p.hostname or "127.0.0.1", p.port or 5672))
    yield relay
    relay.close()
