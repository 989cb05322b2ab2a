"""End to end: the compose stack in containers (compose.yaml), as a user starts it; see conftest.py for the setup.

1. `up` with 4 clients and 2 aggregators; workers turn healthy; a stopped (hung) aggregator turns unhealthy and
   healthy again once it continues; a client and the server crash mid-round (SIGKILL) and Docker restarts them;
   `down` mid-run and `up` with the same run id resume from the ledger and the volumes; the run finishes with every
   round recorded once; `hfgan status` and `hfgan replay` run inside a container; clients used TLS and Redis
   refused a client without the password.
2. `--scale client=8` with an 8-client config: every client claims its own slot and the run finishes; its models
   (one torch thread per container) equal, digest for digest, those of `hfgan train --threads 1` on this host.

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


def _metrics(stack) -> list[dict]:
    text = stack.read(f"/runs/{stack.run_id}/metrics.jsonl")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _restarts(stack, container: str) -> int:
    return int(stack.inspect(container)["RestartCount"])


def test_stack_runs_heals_restarts_and_resumes(stack_factory):
    stack = stack_factory("main", "stack4.toml", "compose-main")
    t0 = time.monotonic()
    stack.up("client=4", "aggregator=2")
    first_round_s = stack.wait_round(1)
    print(f"\ncompose: up -> round 1 training: {time.monotonic() - t0:.1f} s")
    assert len(stack.containers("client")) == 4 and len(stack.containers("aggregator")) == 2

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
        return {f"client-{k}" for k in range(4)} <= {user for user, _ in conns}

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

    # Crashes mid-round: a client and the server die (SIGKILL); the restart policy brings them back.
    stack.wait_round(2)
    client, server = stack.containers("client")[1], stack.containers("server")[0]
    before = {client: _restarts(stack, client), server: _restarts(stack, server)}
    stack.crash(client)
    stack.crash(server)
    for c in (client, server):
        stack.wait(f"{c} restarted", lambda c=c: _restarts(stack, c) > before[c], limit_s=300)
        # Its logs span both lives: serving the run a second time means it came back into the run.
        stack.wait(f"{c} serving again", lambda c=c: stack.logs(c).count(": serving run") >= 2, limit_s=600)

    # down mid-run (volumes kept), up again with the same run id: the run resumes and finishes.
    stack.wait_round(3)
    stack.down(volumes=False)
    assert not stack.containers("coordinator", all_=True)
    t1 = time.monotonic()
    stack.up("client=4", "aggregator=2")
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
    print(f"compose: round wall times {walls} (round 1 reached {first_round_s:.1f} s after up)")

    # hfgan status and hfgan replay, in a container of the stack (its image, network and secrets).
    st = stack.run("hfgan", "status", "--run", stack.run_id, "--json")
    assert st.returncode == 0, st.stderr[-2000:]
    status = json.loads(st.stdout)
    assert (status["status"], status["round"], status["phase"]) == ("finished", 3, "done"), status
    rp = stack.run("hfgan", "replay", "--run", stack.run_id, "--round", "3", "--json")
    assert rp.returncode == 0, rp.stdout[-2000:] + rp.stderr[-2000:]
    replayed = json.loads(rp.stdout)
    assert replayed["match"] and all(c["match"] for c in replayed["clusters"]), replayed

    # Redis refuses a connection without its password.
    (redis,) = stack.containers("redis")
    noauth = subprocess.run(["docker", "exec", redis, "redis-cli", "ping"], capture_output=True, text=True, timeout=30)
    assert "NOAUTH" in noauth.stdout + noauth.stderr


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


def test_eight_clients_scale_and_match_the_one_process_run(stack_factory, tmp_path):
    stack = stack_factory("scale", "scale8.toml", "compose-scale")
    t0 = time.monotonic()
    stack.up("client=8", "aggregator=1")
    stack.wait_round(1)
    up_to_round = time.monotonic() - t0
    took = stack.wait_finished()
    print(f"\ncompose 8 clients: up -> round 1 {up_to_round:.1f} s, finished {took + up_to_round:.1f} s after up")

    clients = stack.containers("client", all_=True)
    assert len(clients) == 8
    slots = []
    for c in clients:
        claims = re.findall(r"claimed slot (\d+) of run", stack.logs(c))
        assert claims, stack.logs(c)[-2000:]
        slots.append(int(claims[-1]))  # the last claim (a client starved past its TTL may have claimed again)
        assert stack.inspect(c)["State"]["ExitCode"] == 0, stack.logs(c)[-2000:]
    assert sorted(slots) == list(range(8)), slots
    records = _metrics(stack)
    assert [r["round"] for r in records] == [1, 2] and all(r["aggregated"] for r in records)

    # The same config in one process on this host, one torch thread: the same models, bit for bit.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HFGAN_")} | {"OMP_NUM_THREADS": "1"}
    env["HFGAN_CLASSIFIER_DIR"] = str(tmp_path / "classifiers")
    tr = subprocess.run(
        [sys.executable, "-m", "hfgan_core.cli", "train", "--config", str(CONFIGS / "scale8.toml")]
        + ["--run-dir", str(tmp_path / "train"), "--data-dir", str(tmp_path / "data")]
        + ["--threads", "1", "--no-utility", "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert tr.returncode == 0, tr.stderr[-3000:]
    embedded = [json.loads(line) for line in Path(tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["digests"] for r in embedded] == [r["digests"] for r in records]
    assert len(records[1]["digests"]) == 3  # the global model and two clusters
