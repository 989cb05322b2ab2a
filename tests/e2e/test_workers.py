"""Worker processes through the real RabbitMQ and Redis: `hfgan up`, `hfgan status`, `hfgan replay`, the
coordinator's standby, and the workers' exit codes.

Each test uses its own AMQP namespace (HFGAN_BROKER_NAMESPACE) and run id and deletes them afterwards. A service
that is down fails the tests (the fixtures of tests/integration/conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from hfgan_core.runtime import checkpoint as ckpt
from hfgan_core.state import open_store
from hfgan_core.transport import open_transport
from tests.integration.conftest import amqp_url, new_namespace, redis_url  # noqa: F401 - fixtures

pytestmark = pytest.mark.e2e

CONFIG = """
[scenario]
name = "e2e"
synthetic_train_per_class = 50
[[scenario.domains]]
dataset = "synthetic"
clients = 4
samples_per_client = 64

[train]
rounds = 2
local_epochs = 1
steps_per_epoch = 2
batch_size = 16
cuts = [[0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1]]
kld_from_round = 2
clusters = 2
score_samples = 100
utility_samples = 100
utility_epochs = 1

[runtime]
step_deadline_s = 30.0
round_deadline_s = 240.0
"""


@pytest.fixture
def e2e(tmp_path, amqp_url, redis_url):  # noqa: F811 - the fixtures imported above
    namespace = new_namespace()
    run = f"e2e-{uuid.uuid4().hex[:10]}"
    config = tmp_path / "e2e.toml"
    config.write_text(CONFIG)
    env = dict(
        os.environ,
        HFGAN_BROKER_NAMESPACE=namespace,
        HFGAN_CLASSIFIER_DIR=str(tmp_path / "classifiers"),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    for var in (
        "HFGAN_CONFIG",
        "HFGAN_RUN_ID",
        "HFGAN_BROKER_URL",
        "HFGAN_STATE_URL",
        "HFGAN_RUN_DIR",
        "HFGAN_DATA_DIR",
    ):
        env.pop(var, None)
    ctx = {
        "namespace": namespace,
        "run": run,
        "config": config,
        "env": env,
        "amqp": amqp_url,
        "redis": redis_url,
        "tmp": tmp_path,
        "procs": [],
    }
    yield ctx
    for p in ctx["procs"]:
        if p.poll() is None:
            p.kill()
            p.wait()
    t = open_transport(amqp_url, namespace=namespace)
    try:
        t.delete_topology(range(4))
    finally:
        t.close()
    store = open_store(redis_url)
    store.delete_run(run)
    store.close()


def hfgan(ctx, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hfgan_core.cli", *args], env=ctx["env"], capture_output=True, text=True, timeout=timeout
    )


def test_up_runs_the_workers_then_status_and_replay_check_the_run(e2e):
    run_dir = e2e["tmp"] / "run"
    t0 = time.monotonic()
    res = hfgan(
        e2e,
        "up",
        "--config",
        str(e2e["config"]),
        "--clients",
        "4",
        "--aggregators",
        "2",
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
        timeout=400,
    )
    up_s = time.monotonic() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert out["run_id"] == e2e["run"] and out["domains"]["synthetic"]["generation_score"] > 0
    print(f"hfgan up: {up_s:.1f} s")

    # The run directory is what `hfgan train` writes.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["run_id"] == e2e["run"] and summary["runtime"] == "workers"
    assert summary["bytes_sent"] > 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2] and all(r["aggregated"] for r in records)
    assert ckpt.complete_rounds(run_dir) == [1, 2]
    assert (run_dir / "config.toml").is_file() and (run_dir / "plots" / "generation_score.png").is_file()
    assert sorted(p.name for p in (run_dir / "samples").iterdir())
    logs = run_dir / "logs"
    names = {p.name for p in logs.glob("*.log")}
    assert names == {
        "coordinator.log",
        "server.log",
        "clustering.log",
        "aggregator.0.log",
        "aggregator.1.log",
        *(f"client.{i}.log" for i in range(4)),
    }
    # Four client processes claimed four different slots, and each saw the run to its end.
    slots = set()
    for i in range(4):
        text = (logs / f"client.{i}.log").read_text()
        m = re.search(r"claimed slot (\d) of run", text)
        assert m, text[-2000:]
        slots.add(int(m.group(1)))
        assert f"client.{m.group(1)}: finished" in text
    assert slots == {0, 1, 2, 3}
    assert "progress unavailable" not in res.stderr and "round 2/2" in res.stderr

    # The same run in one process (`hfgan train`, one torch thread like each worker) has the same models, bit for
    # bit: the worker processes compute exactly what the embedded runtime computes.
    train_dir = e2e["tmp"] / "train"
    tr = hfgan(
        e2e,
        "train",
        "--config",
        str(e2e["config"]),
        "--run-dir",
        str(train_dir),
        "--data-dir",
        str(e2e["tmp"] / "data"),
        "--threads",
        "1",
        "--no-utility",
        "--quiet",
        timeout=300,
    )
    assert tr.returncode == 0, tr.stderr[-3000:]
    embedded = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["digests"] for r in embedded] == [r["digests"] for r in records]
    assert set(records[1]["digests"]) == {"-1", "0", "1"}

    # hfgan status: from the ledger (and the dead-letter queue of the run's namespace).
    st = hfgan(
        e2e,
        "status",
        "--run",
        str(run_dir),
        "--state",
        e2e["redis"],
        "--json",
        "--broker",
        e2e["amqp"],
        "--namespace",
        e2e["namespace"],
    )
    assert st.returncode == 0, st.stderr
    doc = json.loads(st.stdout)
    assert (doc["status"], doc["round"], doc["phase"]) == ("finished", 2, "done")
    assert [c["state"] for c in doc["clients"]] == ["arrived"] * 4
    assert [c["cuts"] for c in doc["clients"]] == ["0000", "1111", "1010", "0101"]
    assert sorted(set(doc["clusters"]["assignment"].values())) == [0, 1] and doc["clusters"]["round"] == 2
    assert set(doc["digests"]["2"]) == {"-1", "0", "1"} and doc["stragglers"] == []
    assert doc["jobs"] == {"-1": "done", "0": "done", "1": "done"}
    assert doc["dead_letters"] == {}
    table = hfgan(e2e, "status", "--run", e2e["run"], "--state", e2e["redis"])
    assert table.returncode == 0 and "round 2/2 done" in table.stdout and "clusters (round 2)" in table.stdout

    # hfgan replay: every aggregated model of every round rebuilt bit for bit from the update log.
    common = ("--run", e2e["run"], "--state", e2e["redis"], "--broker", e2e["amqp"], "--namespace", e2e["namespace"])
    for rnd in ("1", "2"):
        rp = hfgan(e2e, "replay", *common, "--round", rnd, "--json")
        assert rp.returncode == 0, rp.stdout + rp.stderr
        result = json.loads(rp.stdout)
        assert result["match"] and all(c["match"] for c in result["clusters"])
        assert {c["cluster"] for c in result["clusters"]} == ({-1, 0} if rnd == "1" else {-1, 0, 1})
    unknown = hfgan(e2e, "replay", *common, "--round", "7")
    assert unknown.returncode == 2 and "no aggregation jobs" in unknown.stderr

    # A tampered digest in the ledger is caught.
    r = redis.Redis.from_url(e2e["redis"])
    key = f"hfgan:{{{e2e['run']}}}:round:2:digests"
    original = r.hget(key, "1")
    r.hset(key, "1", "0" * 64)
    try:
        bad = hfgan(e2e, "replay", *common, "--round", "2")
    finally:
        r.hset(key, "1", original)
        r.close()
    assert bad.returncode == 1
    assert "cluster 1: MISMATCH" in bad.stdout and "cluster 0: match" in bad.stdout


def start_worker(ctx, role: str, *flags: str, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
    p = subprocess.Popen(
        [sys.executable, "-m", f"workers.{role}", *flags], env=env or ctx["env"], stdout=out, stderr=subprocess.STDOUT
    )
    ctx["procs"].append(p)
    return p


def wait_for(path: Path, text: str, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(
        f"{text!r} not in {path} after {timeout} s:\n"
        + (path.read_text(errors="replace")[-2000:] if path.is_file() else "(no log)")
    )


def test_a_standby_coordinator_takes_over_and_a_second_leader_is_refused(e2e):
    env = dict(
        e2e["env"],
        HFGAN_CONFIG=str(e2e["config"]),
        HFGAN_RUN_ID=e2e["run"],
        HFGAN_BROKER_URL=e2e["amqp"],
        HFGAN_STATE_URL=e2e["redis"],
        HFGAN_RUN_DIR=str(e2e["tmp"] / "run"),
        HFGAN_DATA_DIR=str(e2e["tmp"] / "data"),
        HFGAN_LEASE_TTL_S="3",
        HFGAN_HEARTBEAT_S="0.5",
        HFGAN_HEARTBEAT_TTL_S="3",
    )
    logs = e2e["tmp"]
    leader = start_worker(e2e, "coordinator", env=env, log=logs / "a.log")
    wait_for(logs / "a.log", "leading run")
    standby = start_worker(e2e, "coordinator", "--standby-ok", env=env, log=logs / "b.log")
    wait_for(logs / "b.log", "waiting as its standby")
    # Without --standby-ok a second coordinator waits one lease TTL, then refuses (bad configuration).
    third = start_worker(e2e, "coordinator", env=env, log=logs / "c.log")
    assert third.wait(timeout=90) == 2
    assert "pass --standby-ok" in (logs / "c.log").read_text()
    assert standby.poll() is None and leader.poll() is None
    leader.send_signal(signal.SIGKILL)
    leader.wait()
    # The standby takes the lease once it expires, and resumes the run the ledger records (still admitting).
    wait_for(logs / "b.log", "leading run", timeout=120)
    wait_for(logs / "b.log", "resuming run", timeout=120)
    store = open_store(e2e["redis"])
    try:
        assert store.get_round(e2e["run"]) == (0, "admitting")
        assert store.run_info(e2e["run"])["status"] == "running"
    finally:
        store.close()
    standby.send_signal(signal.SIGTERM)
    assert standby.wait(timeout=120) == 0
    assert "stopped in round 0" in (logs / "b.log").read_text()


def test_worker_exit_codes(e2e, tmp_path):
    base = dict(
        e2e["env"],
        HFGAN_CONFIG=str(e2e["config"]),
        HFGAN_RUN_ID=e2e["run"],
        HFGAN_CONNECT_TIMEOUT_S="1",
        HFGAN_STATE_URL=e2e["redis"],
        HFGAN_BROKER_URL=e2e["amqp"],
    )
    # 2: bad configuration (no config at all; a config file that does not parse; an in-process broker URL).
    no_config = {k: v for k, v in base.items() if k != "HFGAN_CONFIG"}
    assert start_worker(e2e, "clustering", env=no_config).wait(timeout=60) == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nrounds = 'many'\n")
    assert start_worker(e2e, "aggregator", "--config", str(bad), env=base).wait(timeout=60) == 2
    assert start_worker(e2e, "server", "--broker", "memory://", env=base).wait(timeout=60) == 2
    # 3: a broker that does not answer (nothing listens on port 1).
    log = tmp_path / "unreachable.log"
    p = start_worker(e2e, "clustering", "--broker", "amqp://guest:guest@127.0.0.1:1/%2F", env=base, log=log)
    assert p.wait(timeout=60) == 3, log.read_text()[-2000:]
    assert "unreachable" in log.read_text()
    # 0: stopped by SIGTERM while serving.
    log = tmp_path / "clustering.log"
    p = start_worker(e2e, "clustering", env=base, log=log)
    deadline = time.monotonic() + 60
    store = open_store(e2e["redis"])
    try:
        while "clustering" not in store.alive(e2e["run"]):
            assert time.monotonic() < deadline and p.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
    finally:
        store.close()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 0
    assert "SIGTERM received" in log.read_text()
