"""Watching a run of worker processes (`hfgan up` through the real RabbitMQ and Redis): every worker's Prometheus
endpoint is scraped while the run goes on, and its counters are checked against the ledger and the dead-letter queue.

A service that is down fails the test (the fixtures of tests/integration/conftest.py).
"""

from __future__ import annotations

import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from hfgan_core.runtime import ledger
from hfgan_core.runtime.metrics import parse_text, total
from hfgan_core.state import open_store
from hfgan_core.transport import open_transport
from tests.browser import dump_dom
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


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def worker_name(samples: dict) -> str:
    return next(dict(labels)["role"] for (name, labels) in samples if name == "hfgan_worker_info")


def finished(samples: dict) -> bool:
    return samples.get(("hfgan_worker_state", (("hfgan_worker_state", "finished"),))) == 1


class PageCheck:
    """The dashboard as headless Chromium renders it, loaded once during the run (in a thread: the scraping goes on)."""

    def __init__(self, url: str):
        self.url = url
        self.dom: str | None = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._load, daemon=True)
        self.thread.start()

    def _load(self) -> None:
        try:
            self.dom = dump_dom(self.url)
        except BaseException as exc:  # reported by the test
            self.error = exc


class Table(HTMLParser):
    """The rows of the page's client table, and its images' attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.images: list[dict] = []
        self.head: dict = {}
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-client" in a:
            self.rows.append({"attrs": a, "cells": []})
        elif tag == "td" and self.rows:
            self._cell = []
        elif tag == "img":
            self.images.append(a)
        elif tag == "div" and a.get("id") == "head":
            self.head = a

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[-1]["cells"].append("".join(self._cell).strip())
            self._cell = None


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
    base = free_port_base(n_workers + 1)
    dash_port = base + n_workers
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
    dashboard = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hfgan_core.cli",
            "dashboard",
            "--run",
            e2e["run"],
            "--state",
            e2e["redis"],
            "--run-dir",
            str(run_dir),
            "--port",
            str(dash_port),
            "--wait",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    e2e["procs"].append(dashboard)
    page = PageCheck(f"http://127.0.0.1:{dash_port}/")
    scraper = Scraper(run_dir / "logs" / "metrics-targets.json")
    injected = False
    # Bounded by the run's own deadlines (two rounds of at most round_deadline_s each), plus start-up and evaluation.
    deadline = time.monotonic() + 2 * 240.0 + 600
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
        # The page, once the first round's sample grids exist and while the run goes on.
        if page.thread is None and list((run_dir / "samples").glob("round_001_cluster_*.png")):
            if not finished(scraper.last("coordinator")) and answers(page.url + "api/state"):
                page.start()
        time.sleep(0.3)
    out, err = up.communicate(timeout=120)
    assert up.returncode == 0, err[-3000:]
    if page.thread is None:
        dashboard.terminate()
        raise AssertionError(f"the dashboard was never loaded during the run: {dashboard.communicate()[1][-2000:]!r}")
    page.thread.join(timeout=300)
    dashboard.terminate()
    assert page.dom is not None or page.error is not None, "the browser did not finish"
    check_page(page)
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
        queue = "aggregate" if w.startswith("aggregator.") else w  # the one aggregator takes every job
        from_here = [d for d in dead if d.address == queue]
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


def check_page(page: PageCheck) -> None:
    """The client table and the sample grids, as the browser rendered them from the live run."""
    assert page.error is None, repr(page.error)
    assert page.dom is not None
    t = Table()
    t.feed(page.dom)
    assert int(t.head.get("data-round", 0)) >= 1, page.dom[-3000:]
    assert [r["attrs"]["data-client"] for r in t.rows] == ["0", "1", "2", "3"], t.rows
    cuts = {"0": "0000", "1": "1111", "2": "1010", "3": "0101"}  # the e2e config's fixed cut bits
    for r in t.rows:
        slot, domain, bits, cluster, state, step_s, reason = r["cells"]
        assert slot == r["attrs"]["data-client"] and domain == "synthetic" and bits == cuts[slot], r
        assert state in ("expected", "arrived", "late", "dropped") and state == r["attrs"]["class"], r
        assert cluster.isdigit(), r
    assert t.images, "no sample grid on the page"
    for img in t.images:
        # data-loaded is set by the image's onload handler: the browser fetched and decoded the PNG.
        assert re.fullmatch(r"[1-9]\d*x[1-9]\d*", img.get("data-loaded", "")), img
        assert re.fullmatch(r"samples/round_\d{3}_cluster_\d+\.png", img["src"]), img
