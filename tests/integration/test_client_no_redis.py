"""A client process never reaches Redis: started with the documented environment (and even handed a state URL), it
gets its slot from the coordinator over the real RabbitMQ, joins, and never opens a connection to the state URL
(a listening socket here counts every connection attempt)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from hfgan_core.config import load_config
from hfgan_core.runtime.coordinator import CoordinatorRole
from hfgan_core.runtime.host import RoleContext, RoleHost
from hfgan_core.state import MemoryRoundStore
from hfgan_core.transport import open_transport
from tests.integration.conftest import new_namespace, worker_env

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """
[scenario]
name = "no-redis"
synthetic_train_per_class = 20
[[scenario.domains]]
dataset = "synthetic"
clients = 2
samples_per_client = 16
[train]
rounds = 1
steps_per_epoch = 1
batch_size = 8
cuts = [[0, 0, 0, 0]]
"""


class Sentinel:
    """A TCP listener that counts the connections made to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.stop = True
        self.thread.join(timeout=5)
        self.sock.close()


def test_a_client_gets_its_slot_over_the_broker_and_never_connects_to_redis(amqp_url, tmp_path):
    ns, run = new_namespace(), f"noredis-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "c.toml"
    config.write_text(CONFIG)
    cfg = load_config(str(config))
    transport = open_transport(amqp_url, namespace=ns)
    sentinel = Sentinel()
    proc = None
    try:
        transport.declare()
        coordinator = CoordinatorRole(
            RoleContext(run=run, cfg=cfg, transport=transport, store=MemoryRoundStore()), slot_ttl_s=30.0
        )
        RoleHost(coordinator).bind()
        env = worker_env(
            config=config,
            run_id=run,
            amqp=amqp_url,
            namespace=ns,
            run_dir=tmp_path / "run",
            state=f"redis://127.0.0.1:{sentinel.port}/0",  # handed a URL anyway: it must not use it
            HFGAN_HEARTBEAT_S="0.5",
            PYTHONPATH=str(ROOT),
        )
        log = tmp_path / "client.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "workers.client"], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )
        end = time.monotonic() + 180
        while not coordinator.members and time.monotonic() < end and proc.poll() is None:
            transport.process(timeout=0.2)
        assert coordinator.members, log.read_text(errors="replace")[-3000:]
        (slot,) = coordinator.members
        assert coordinator.slots.holder(slot, coordinator.ctx.clock()) is not None
        beats = coordinator.ctx.store.alive(run)
        assert f"client.{slot}" in beats and beats[f"client.{slot}"].startswith(f"slot {slot} owner ")
        proc.send_signal(signal.SIGTERM)
        while proc.poll() is None and time.monotonic() < end:
            transport.process(timeout=0.2)
        assert proc.wait(timeout=60) == 0, log.read_text(errors="replace")[-3000:]
        assert f"claimed slot {slot} of run {run}" in log.read_text(errors="replace")
        assert sentinel.connections == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        sentinel.close()
        try:
            transport.delete_topology(range(cfg.scenario.total_clients))
        finally:
            transport.close()
