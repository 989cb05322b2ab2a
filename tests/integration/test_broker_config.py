"""broker_config/: definitions.json is what the code generates (and what the transport declares, argument for
argument, so a broker that loaded it accepts every role's declarations), its password hashes match the documented
development passwords, and the management-API import sends what RabbitMQ expects."""

from __future__ import annotations

import base64
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from hfgan_core.transport.amqp import (
    DEV_ADMIN,
    ROLES,
    AmqpTransport,
    Names,
    check_password_hash,
    dev_client_passwords,
    dev_role_passwords,
    import_definitions,
    topology_definitions,
)
from hfgan_core.transport.base import TransportError

CONFIG = Path(__file__).resolve().parents[2] / "broker_config"


def _without_hashes(doc: dict) -> dict:
    doc = json.loads(json.dumps(doc))
    for user in doc["users"]:
        user.pop("password_hash")
    return doc


@pytest.fixture(scope="module")
def definitions() -> dict:
    return json.loads((CONFIG / "definitions.json").read_text())


def test_definitions_json_is_the_generated_document(definitions: dict) -> None:
    expected = topology_definitions(
        role_passwords=dev_role_passwords(), admin=DEV_ADMIN, clients=dev_client_passwords()
    )
    assert _without_hashes(definitions) == _without_hashes(expected), (
        "regenerate: hfgan broker definitions --out broker_config/definitions.json"
    )


def test_definitions_passwords_are_hashed_dev_passwords(definitions: dict) -> None:
    dev = {
        **dev_role_passwords(),
        DEV_ADMIN[0]: DEV_ADMIN[1],
        **{f"client-{k}": pw for k, pw in dev_client_passwords().items()},
    }
    assert {u["name"] for u in definitions["users"]} == set(dev) and "guest" not in dev
    for user in definitions["users"]:
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        assert dev[user["name"]] not in json.dumps(definitions)
        assert check_password_hash(dev[user["name"]], user["password_hash"])
        assert not check_password_hash("wrong", user["password_hash"])


def test_definitions_topology(definitions: dict) -> None:
    names = Names()
    queues = {q["name"]: q["arguments"] for q in definitions["queues"]}
    assert queues[names.updates]["x-queue-type"] == "stream" and "x-max-age" in queues[names.updates]
    work = [names.queue(a) for a in ("server", "coordinator", "clustering", "aggregate", "client.0")]
    assert all(queues[q]["x-dead-letter-exchange"] == names.dlx for q in work)
    assert "x-single-active-consumer" not in queues[names.queue("aggregate")]
    assert {(e["name"], e["type"]) for e in definitions["exchanges"]} == set(names.exchanges())
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in definitions["bindings"]}
    assert (names.dlx, names.dead, "") in bindings and (names.split, names.queue("client.3"), "client.3") in bindings
    for perm in definitions["permissions"]:
        for what in ("configure", "write", "read"):
            re.compile(perm[what])
    reads = {p["user"]: re.compile(p["read"]) for p in definitions["permissions"]}
    assert reads["client-1"].search("hfgan.client.1") and not reads["client-1"].search("hfgan.client.0")
    assert not reads["client-1"].search("hfgan.client.10") and not reads["client-1"].search("hfgan.split")
    for role in ROLES:
        assert not reads[role].search("hfgan.client.0"), role


def test_config_files() -> None:
    conf = (CONFIG / "rabbitmq.conf").read_text()
    settings = dict(line.split(" = ", 1) for line in conf.splitlines() if line and not line.startswith("#"))
    assert settings["load_definitions"] == "/etc/rabbitmq/definitions.json"
    assert int(settings["max_message_size"]) >= 8 * 1024 * 1024 + 4096  # one chunk and its headers fit
    assert re.fullmatch(r"\[(rabbitmq_\w+,)*rabbitmq_\w+\]\.\n", (CONFIG / "enabled_plugins").read_text())
    redis_conf = (CONFIG / "redis.conf").read_text()
    assert re.search(r"^appendonly yes$", redis_conf, re.M) and re.search(
        r"^maxmemory-policy noeviction$", redis_conf, re.M
    )


def test_the_broker_accepts_the_definitions_and_the_roles_declarations(amqp_url: str) -> None:
    """scripts/ci-services.sh imported definitions.json; every role may re-declare what it loaded (same arguments),
    with its documented development password."""
    with AmqpTransport(amqp_url, topology="declare") as t:
        t.declare()
    p = amqp_url.split("@", 1)[1]
    for role, password in dev_role_passwords().items():
        with AmqpTransport(f"amqp://{role}:{password}@{p}", topology="declare") as t:
            t.declare()


class _FakeManagementApi(BaseHTTPRequestHandler):
    seen: list[tuple[str, str, str, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["content-length"]))
        self.seen.append((self.path, self.headers["authorization"], self.headers["content-type"], body))
        ok = self.headers["authorization"] == "Basic " + base64.b64encode(b"hfgan-admin:p@ss").decode()
        self.send_response(204 if ok else 401)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_import_over_the_management_api_posts_the_document() -> None:
    server = HTTPServer(("127.0.0.1", 0), _FakeManagementApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    doc = topology_definitions(namespace="hfgantest")
    try:
        import_definitions(doc, f"http://hfgan-admin:p%40ss@127.0.0.1:{port}")
        path, _, ctype, body = _FakeManagementApi.seen[-1]
        assert (path, ctype, json.loads(body)) == ("/api/definitions", "application/json", doc)
        with pytest.raises(TransportError, match="401"):
            import_definitions(doc, f"http://hfgan-admin:wrong@127.0.0.1:{port}")
    finally:
        server.shutdown()
    with pytest.raises(TransportError, match="admin URL"):
        import_definitions(doc, "ftp://nowhere")


def test_hfgan_broker_provision_clients_creates_users_that_can_log_in(amqp_url: str, capsys) -> None:
    """`hfgan broker provision-clients` (what compose's broker-setup runs) against the real broker, through the
    local rabbitmqctl: each printed user logs in with its printed password and sees its own queue."""
    import subprocess

    from hfgan_core.cli import main
    from hfgan_core.transport.amqp import ClientCredentials, _wait_usable
    from tests.integration.conftest import new_namespace

    ns = new_namespace()
    admin_url = os.environ.get("HFGAN_TEST_RABBIT_ADMIN_URL", "rabbitmqctl")
    with AmqpTransport(amqp_url, namespace=ns) as t:
        t.declare()
    try:
        argv = ["broker", "provision-clients", "--clients", "2", "--namespace", ns, "--admin-url", admin_url]
        assert main([*argv, "--verify-url", amqp_url, "--verify-timeout", "60"]) == 0
        lines = [ln.split() for ln in capsys.readouterr().out.strip().splitlines()]
        assert [(int(k), user) for k, user, _ in lines] == [(0, f"{ns}-client-0"), (1, f"{ns}-client-1")]
        for k, user, password in lines:
            url = ClientCredentials(int(k), user, password).url(amqp_url)
            _wait_usable(url, Names(ns).queue(f"client.{k}"), 5)
    finally:
        with AmqpTransport(amqp_url, namespace=ns) as t:
            t.delete_topology(clients=range(2))
        for k in range(2):
            subprocess.run(["rabbitmqctl", "-q", "delete_user", f"{ns}-client-{k}"], capture_output=True, check=False)
