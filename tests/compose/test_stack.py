"""End to end: the compose stack in containers (compose.yaml), as a user starts it; see conftest.py for the setup.

One stack, one run (tests/compose/configs/stack8.toml: 8 clients, 3 rounds), every point of the compose issue in
order, so the suite pays for one stack start (CI runs it: scripts/test.sh):

1. `up` with 4 clients and 2 aggregators: the 4 clients claim slots and the run waits in admission; `--scale
   client=8`: the 4 new ones find the free slots and the run starts;
2. every worker turns healthy; clients' broker connections are TLS, the server's is not; a stopped (hung)
   aggregator turns unhealthy and healthy again once it continues;
3. a client and the server crash mid-round 2 (SIGKILL) and Docker restarts them; they serve the run again;
4. `down` mid-round 3 and `up` with the same run id resume from the ledger and the volumes; the run finishes with
   every round recorded once, `summary.json` in the `runs` volume, and the 8 client containers of the resumed stack
   on slots 0-7, all exiting 0;
5. `hfgan status` and `hfgan replay` of the last round, inside a container;
6. Redis refuses a connection without a user's password, and no client container holds a Redis credential;
7. round 1 (one torch thread per container, before any fault) has the digests of `hfgan train --threads 1` of the
   same file, run on the host meanwhile. Rounds 2 and 3 are not compared: the crashes and the resume make clients
   abandon or redo steps, so their models legitimately differ.

Times (from `up` to the first round, per round) are printed for docs/deployment.md, never asserted.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.compose.conftest import CONFIGS

pytestmark = [pytest.mark.compose, pytest.mark.slow]

WORKERS = ("coordinator", "server", "clustering", "aggregator", "client")
CONFIG = "stack8.toml"


def _metrics(stack) -> list[dict]:
    text = stack.read(f"/runs/{stack.run_id}/metrics.jsonl")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _restarts(stack, container: str) -> int:
    return int(stack.inspect(container)["RestartCount"])


def _claims(stack, container: str) -> list[int]:
    return [int(k) for k in re.findall(r"claimed slot (\d+) of run", stack.logs(container))]


def _train_on_host(tmp_path: Path) -> subprocess.Popen:
    """`hfgan train --threads 1` of the same config on the host, in the background (it overlaps the stack's start)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HFGAN_")} | {"OMP_NUM_THREADS": "1"}
    env["HFGAN_CLASSIFIER_DIR"] = str(tmp_path / "classifiers")
    cmd = [sys.executable, "-m", "hfgan_core.cli", "train", "--config", str(CONFIGS / CONFIG)]
    cmd += ["--run-dir", str(tmp_path / "train"), "--data-dir", str(tmp_path / "data")]
    cmd += ["--threads", "1", "--no-utility", "--quiet"]
    log = open(tmp_path / "train.log", "w")  # noqa: SIM115 - closed with the process below
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def test_the_stack_scales_heals_restarts_resumes_and_matches_the_one_process_run(stack_factory, tmp_path):
    stack = stack_factory("main", CONFIG, "compose-main")
    train = _train_on_host(tmp_path)
    try:
        _scale_up_to_the_first_round(stack)
        _health_and_tls(stack)
        _crash_a_client_and_the_server(stack)
        _down_and_up_resumes(stack)
        _status_replay_and_secrets(stack)
        assert train.wait(timeout=1200) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        if train.poll() is None:
            train.kill()
    embedded = [json.loads(line) for line in Path(tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    records = _metrics(stack)
    assert embedded[0]["digests"] == records[0]["digests"], "round 1 differs from hfgan train --threads 1"
    assert set(records[0]["digests"]) == {"-1", "0"}  # the global model and one cluster (two from round 2 on)
    same = [a["digests"] == b["digests"] for a, b in zip(embedded, records, strict=True)]
    print(f"compose: digests equal to hfgan train per round (rounds 2-3 had faults): {same}")


def _scale_up_to_the_first_round(stack) -> None:
    t0 = time.monotonic()
    stack.up("client=4", "aggregator=2")
    clients = []

    def four_claimed() -> bool:
        clients[:] = stack.containers("client")
        return len(clients) == 4 and all(_claims(stack, c) for c in clients)

    stack.wait("4 clients on slots", four_claimed)
    assert stack.ledger_round() == (0, "admitting"), "the run waits for the config's 8 clients"
    stack.up("client=8", "aggregator=2")
    assert set(clients) < set(stack.containers("client")), "scaling up keeps the running clients"
    stack.wait_round(1)
    print(f"\ncompose: up (4 clients, then 8) -> round 1 training: {time.monotonic() - t0:.1f} s")
    assert len(stack.containers("client")) == 8 and len(stack.containers("aggregator")) == 2
    slots = sorted(_claims(stack, c)[-1] for c in stack.containers("client"))
    assert slots == list(range(8)), slots


def _health_and_tls(stack) -> None:
    # Health: every worker's probe passes while its loop beats.
    # (Each one seen healthy at least once: on a loaded host a busy worker's probe may time out now and then.)
    unseen = {c for role in WORKERS for c in stack.containers(role)}

    def all_seen_healthy() -> bool:
        unseen.difference_update({c for c in unseen if stack.health(c) == "healthy"})
        return not unseen

    stack.wait("every worker healthy", all_seen_healthy, limit_s=600)

    # Every client's broker connection is TLS (amqps, certificate verified); the infrastructure roles use plain
    # AMQP on the compose network.
    conns: list[tuple[str, str]] = []

    def every_client_connected() -> bool:
        conns[:] = _broker_connections(stack)
        return {f"client-{k}" for k in range(8)} <= {user for user, _ in conns}

    stack.wait("the clients' broker connections", every_client_connected, limit_s=300)
    by_user = {user: ssl for user, ssl in conns}
    assert all(ssl == "true" for user, ssl in conns if user.startswith("client-")), conns
    assert by_user.get("server") == "false", conns

    # A hung worker (SIGSTOP: alive to Docker, but its loop no longer beats) turns unhealthy; SIGCONT heals it.
    agg = stack.containers("aggregator")[0]
    pid = stack.inspect(agg)["State"]["Pid"]
    os.kill(pid, 19)  # SIGSTOP
    try:
        stack.wait("a stopped aggregator unhealthy", lambda: stack.health(agg) == "unhealthy", limit_s=300)
    finally:
        os.kill(pid, 18)  # SIGCONT
    stack.wait("the aggregator healthy again", lambda: stack.health(agg) == "healthy", limit_s=300)


def _crash_a_client_and_the_server(stack) -> None:
    # A client and the server die (SIGKILL) mid-round; the restart policy brings them back and they serve again.
    stack.wait_round(2)
    client, server = stack.containers("client")[1], stack.containers("server")[0]
    before = {client: _restarts(stack, client), server: _restarts(stack, server)}
    stack.crash(client)
    stack.crash(server)
    for c in (client, server):
        stack.wait(f"{c} restarted", lambda c=c: _restarts(stack, c) > before[c], limit_s=300)
        # Its logs span both lives: serving the run a second time means it came back into the run.
        stack.wait(f"{c} serving again", lambda c=c: stack.logs(c).count(": serving run") >= 2, limit_s=600)


def _down_and_up_resumes(stack) -> None:
    # down mid-run (volumes kept), up again with the same run id: the run resumes and finishes.
    stack.wait_round(3)
    stack.down(volumes=False)
    assert not stack.containers("coordinator", all_=True)
    t1 = time.monotonic()
    stack.up("client=8", "aggregator=2")
    resumed_to = stack.wait("the coordinator resuming", lambda: _coordinator_says(stack, "resuming run"))
    stack.wait_finished()
    print(f"compose: up again -> resumed in {resumed_to:.1f} s, finished {time.monotonic() - t1:.1f} s after up")

    summary = json.loads(stack.read(f"/runs/{stack.run_id}/summary.json"))
    assert summary["run_id"] == stack.run_id and summary["rounds"] == 3 and summary["runtime"] == "workers"
    assert summary["bytes_sent"] > 0
    records = _metrics(stack)
    assert [r["round"] for r in records] == [1, 2, 3], "every round recorded exactly once"
    assert all(r["aggregated"] for r in records)
    walls = [r.get("wall_s") or r.get("wall_time_s") for r in records]
    print(f"compose: round wall times {walls}")
    # The resumed stack's 8 clients: each on its own slot, each exited 0 once the run finished.
    clients = stack.containers("client", all_=True)
    assert len(clients) == 8
    slots = []
    for c in clients:
        claims = _claims(stack, c)
        assert claims, stack.logs(c)[-2000:]
        slots.append(claims[-1])  # the last claim (a client starved past its TTL may have claimed again)
        assert stack.inspect(c)["State"]["ExitCode"] == 0, stack.logs(c)[-2000:]
    assert sorted(slots) == list(range(8)), slots


def _status_replay_and_secrets(stack) -> None:
    # hfgan status and hfgan replay, in a container of the stack (its image, network and secrets).
    st = stack.run("hfgan", "status", "--run", stack.run_id, "--json")
    assert st.returncode == 0, st.stderr[-2000:]
    status = json.loads(st.stdout)
    assert (status["status"], status["round"], status["phase"]) == ("finished", 3, "done"), status
    rp = stack.run("hfgan", "replay", "--run", stack.run_id, "--round", "3", "--json")
    assert rp.returncode == 0, rp.stdout[-2000:] + rp.stderr[-2000:]
    replayed = json.loads(rp.stdout)
    assert replayed["match"] and all(c["match"] for c in replayed["clusters"]), replayed

    # Redis refuses a connection without a user's password (its default user is off), and a client container holds
    # no Redis credential: no secrets volume.
    (redis,) = stack.containers("redis")
    noauth = subprocess.run(["docker", "exec", redis, "redis-cli", "ping"], capture_output=True, text=True, timeout=30)
    assert "NOAUTH" in noauth.stdout + noauth.stderr
    client_mounts = [m["Destination"] for m in stack.inspect(stack.containers("client", all_=True)[0])["Mounts"]]
    assert not any(d.startswith("/run/hfgan/secrets") for d in client_mounts), client_mounts


def _coordinator_says(stack, text: str) -> bool:
    return any(text in stack.logs(c) for c in stack.containers("coordinator", all_=True))


def _broker_connections(stack) -> list[tuple[str, str]]:
    """(user, "true"/"false" for TLS) of every connection RabbitMQ has now, from its management API on the host port
    compose published (127.0.0.1 only; cheaper than starting rabbitmqctl's Erlang VM on a loaded host)."""
    (rabbit,) = stack.containers("rabbitmq")
    host_port = subprocess.run(
        ["docker", "port", rabbit, "15672/tcp"], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()[0]
    assert host_port.startswith("127.0.0.1:"), f"the management UI is published on {host_port}"
    request = urllib.request.Request(f"http://{host_port}/api/connections?columns=user,ssl")
    token = base64.b64encode(b"hfgan-admin:admin-dev").decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=60) as response:
        conns = json.load(response)
    return [(c["user"], "true" if c["ssl"] else "false") for c in conns]
