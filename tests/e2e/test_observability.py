"""Watching a run of worker processes (`hfgan up` through the real RabbitMQ and Redis): every worker's Prometheus
endpoint is scraped while the run goes on, and its counters are checked against the ledger and the dead-letter queue.

A service that is down fails the test (the fixtures of tests/integration/conftest.py).
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hfgan_core.runtime import ledger
from hfgan_core.runtime.metrics import parse_text, total
from hfgan_core.state import open_store
from hfgan_core.transport import open_transport
from tests.e2e.test_workers import e2e  # noqa: F401 - the fixture
from tests.integration.conftest import amqp_url, redis_url  # noqa: F401 - fixtures

pytestmark = pytest.mark.e2e

GARBAGE = [b"\x00 not msgpack", b"\xc1", b"\x81\xa1v\x63"]  # three bodies no decoder accepts


def free_port_base(n: int) -> int:
    """A base port with `n` free ports after it (checked by binding each)."""
    for _ in range(50):
        base = random.randint(20000, 40000)
        ok = True
        for port in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise AssertionError("no free port range")


def try_scrape(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return parse_text(resp.read().decode())
    except (urllib.error.URLError, OSError):
        return None


def worker_name(samples: dict) -> str:
    return next(dict(labels)["role"] for (name, labels) in samples if name == "hfgan_worker_info")


def finished(samples: dict) -> bool:
    return samples.get(("hfgan_worker_state", (("hfgan_worker_state", "finished"),))) == 1


class Scraper:
    """Polls every worker endpoint of `up`'s metrics-targets.json; keeps each worker's scrapes in order."""

    def __init__(self, targets: Path):
        self.targets = targets
        self.series: dict[str, list[dict]] = {}

    def ports(self) -> list[int]:
        if not self.targets.is_file():
            return []
        try:
            return [int(t["targets"][0].rsplit(":", 1)[1]) for t in json.loads(self.targets.read_text())]
        except ValueError:
            return []  # being written

    def poll(self) -> None:
        for port in self.ports():
            s = try_scrape(port)
            if s is not None:
                self.series.setdefault(worker_name(s), []).append(s)

    def last(self, worker: str) -> dict:
        return self.series[worker][-1]


def test_every_worker_serves_metrics_that_agree_with_the_ledger(e2e):  # noqa: F811 - the fixture
    run_dir = e2e["tmp"] / "run"
    n_workers = 1 + 1 + 1 + 1 + 4
    base = free_port_base(n_workers)
    # Long heartbeat TTLs: on a loaded machine a client busy in a step must not lose its slot (what this test
    # checks is the metrics, not the failover).
    env = dict(e2e["env"], HFGAN_METRICS_LINGER_S="20", HFGAN_HEARTBEAT_TTL_S="120", HFGAN_LEASE_TTL_S="120")
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hfgan_core.cli",
            "up",
            "--config",
            str(e2e["config"]),
            "--clients",
            "4",
            "--aggregators",
            "1",
            "--broker",
            e2e["amqp"],
            "--state",
            e2e["redis"],
            "--namespace",
            e2e["namespace"],
            "--run-dir",
            str(run_dir),
            "--run-id",
            e2e["run"],
            "--data-dir",
            str(e2e["tmp"] / "data"),
            "--no-utility",
            "--quiet",
            "--metrics-port",
            str(base),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    e2e["procs"].append(up)
    scraper = Scraper(run_dir / "logs" / "metrics-targets.json")
    injected = False
    deadline = time.monotonic() + 500
    while up.poll() is None and time.monotonic() < deadline:
        scraper.poll()
        if not injected and "client.0" in scraper.series:
            s = scraper.last("client.0")
            if total(s, "hfgan_steps_total") > 0 and not finished(s):
                t = open_transport(e2e["amqp"], namespace=e2e["namespace"])
                try:
                    for body in GARBAGE:
                        t.publish("client.0", body)
                finally:
                    t.close()
                injected = True
        time.sleep(0.3)
    out, err = up.communicate(timeout=60)
    assert up.returncode == 0, err[-3000:]
    assert injected, f"client.0 never served metrics mid-run; seen: {sorted(scraper.series)}"

    targets = json.loads((run_dir / "logs" / "metrics-targets.json").read_text())
    assert len(targets) == n_workers
    workers = {"coordinator", "server", "clustering", "aggregator.0", *(f"client.{c}" for c in range(4))}
    assert set(scraper.series) == workers
    # Each worker's last scrape is its final one (it lingers after finishing): the numbers are complete.
    for w in workers:
        assert finished(scraper.last(w)), f"{w}: no scrape after it finished ({len(scraper.series[w])} scrapes)"

    store = open_store(e2e["redis"])
    try:
        traffic = store.get_metrics(e2e["run"], 0)
        docs = {r: ledger.RoundDocs.read(store, e2e["run"], r) for r in (1, 2)}
        server_windows = sum(store.get_metrics(e2e["run"], r)["server"]["windows"] for r in (1, 2))
    finally:
        store.close()
    t = open_transport(e2e["amqp"], namespace=e2e["namespace"])
    try:
        dead = t.dead_letters(limit=10_000)
    finally:
        t.close()

    for w in workers:
        first, final = scraper.series[w][0], scraper.last(w)
        # Bytes and messages sent: exactly what the worker reported to the ledger (traffic.<role>).
        assert total(final, "hfgan_message_bytes_total", direction="out") == traffic[f"traffic.{w}"]["bytes_sent"], w
        assert total(final, "hfgan_messages_total", direction="out") == traffic[f"traffic.{w}"]["messages_sent"], w
        assert total(final, "hfgan_message_bytes_total", direction="out") > 0
        # Counters only grow, and they moved during the run.
        values = [total(s, "hfgan_message_bytes_total") for s in scraper.series[w]]
        assert values == sorted(values), w
        assert total(final, "hfgan_messages_total", direction="in") > total(
            first, "hfgan_messages_total", direction="in"
        )
        # Dead letters: what the broker's dead-letter queue holds from this worker's queues.
        from_here = [d for d in dead if d.address == w]
        assert total(final, "hfgan_dead_letters_total") == len(from_here), (w, [d.reason for d in from_here])

    c0 = scraper.last("client.0")
    assert total(c0, "hfgan_dead_letters_total") >= len(GARBAGE)
    assert total(c0, "hfgan_messages_total", kind="invalid", direction="in") >= len(GARBAGE)
    for c in range(4):
        final = scraper.last(f"client.{c}")
        # Steps: what the client reported in its round_done of each round, in the ledger.
        assert total(final, "hfgan_steps_total", outcome="done") == sum(docs[r].done[c]["steps_done"] for r in (1, 2))
        assert total(final, "hfgan_rounds_total") == 2
        assert total(final, "hfgan_step_duration_seconds_count") == total(final, "hfgan_steps_total")
        assert total(final, "hfgan_encode_seconds_count") > 0 and total(final, "hfgan_decode_seconds_count") > 0
        mid = [
            s
            for s in scraper.series[f"client.{c}"]
            if 0 < total(s, "hfgan_steps_total") < total(final, "hfgan_steps_total")
        ]
        assert mid, f"client.{c}: its steps never seen moving"
    assert total(scraper.last("server"), "hfgan_steps_total") == server_windows
    coord = scraper.last("coordinator")
    assert total(coord, "hfgan_rounds_total") == 2
    assert total(coord, "hfgan_aggregation_jobs_total", outcome="queued") == sum(len(docs[r].jobs) for r in (1, 2))
    assert total(scraper.last("aggregator.0"), "hfgan_aggregation_jobs_total", outcome="done") >= sum(
        len(docs[r].aggs) for r in (1, 2)
    )
    assert coord[("hfgan_round", ())] == 2
    assert coord[("hfgan_round_phase", (("hfgan_round_phase", "finished"),))] == 1
    phases = {
        p
        for s in scraper.series["coordinator"]
        for (n, ls), v in s.items()
        if n == "hfgan_round_phase" and v == 1
        for _, p in ls
    }
    assert {"training", "finished"} <= phases
