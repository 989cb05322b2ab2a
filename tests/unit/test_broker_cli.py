"""`hfgan broker ...`: the definitions it writes, and one-line errors with exit 2 for bad usage (no broker needed;
provisioning against the real broker is in tests/integration/test_broker_config.py)."""

from __future__ import annotations

import json
import socket

from hfgan_core.cli import main
from hfgan_core.transport.amqp import DEV_ADMIN, check_password_hash, dev_client_passwords, topology_definitions
from hfgan_core.transport.amqp import main as module_main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_definitions_writes_the_generated_document(tmp_path) -> None:
    out = tmp_path / "definitions.json"
    assert main(["broker", "definitions", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    expected = topology_definitions(role_passwords={}, admin=DEV_ADMIN, clients=dev_client_passwords())
    assert {q["name"] for q in doc["queues"]} == {q["name"] for q in expected["queues"]}
    users = {u["name"]: u for u in doc["users"]}
    assert check_password_hash("client-3-dev", users["client-3"]["password_hash"])
    assert check_password_hash(DEV_ADMIN[1], users[DEV_ADMIN[0]]["password_hash"])


def test_bad_usage_is_one_line_and_exit_2(capsys, monkeypatch) -> None:
    for var in ("HFGAN_ADMIN_URL", "HFGAN_ADMIN_URL_FILE", "HFGAN_CONFIG", "HFGAN_BROKER_URL"):
        monkeypatch.delenv(var, raising=False)
    cases = [
        (["broker"], "choose a subcommand"),
        (["broker", "provision-clients", "--admin-url", "rabbitmqctl"], "--clients N or --config"),
        (["broker", "provision-clients", "--clients", "2"], "--admin-url"),
        (["broker", "provision-clients", "--clients", "0", "--admin-url", "rabbitmqctl"], "at least 1"),
        (["broker", "provision-clients", "--config", "nope", "--admin-url", "rabbitmqctl"], "unknown preset"),
        (["broker", "wait"], "--url"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (argv, err)


def test_a_secret_file_that_cannot_be_read_is_a_usage_error(capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("HFGAN_ADMIN_URL", raising=False)
    monkeypatch.setenv("HFGAN_ADMIN_URL_FILE", str(tmp_path / "missing"))
    assert main(["broker", "provision-clients", "--clients", "1"]) == 2
    assert "HFGAN_ADMIN_URL_FILE" in capsys.readouterr().err


def test_wait_for_an_unreachable_broker_fails_without_showing_the_password(capsys) -> None:
    url = f"amqp://someone:s3cret-pw@127.0.0.1:{_free_port()}/"
    assert main(["broker", "wait", "--url", url, "--timeout", "0.3"]) == 1
    err = capsys.readouterr().err
    assert "someone" in err and "s3cret-pw" not in err and len(err.strip().splitlines()) == 1


def test_the_module_entry_point_keeps_the_older_provision_spelling(capsys, monkeypatch) -> None:
    monkeypatch.delenv("HFGAN_ADMIN_URL", raising=False)
    monkeypatch.delenv("HFGAN_ADMIN_URL_FILE", raising=False)
    assert module_main(["provision", "3"]) == 2  # parsed as provision-clients --clients 3: only the URL is missing
    assert "--admin-url" in capsys.readouterr().err


def test_transport_errors_never_show_a_password() -> None:
    import pytest

    from hfgan_core.transport.amqp import AmqpTransport, import_definitions
    from hfgan_core.transport.base import TransportError

    for bad in ("amqp://u:s3cret-pw@host:notaport/", "amqp://u:s3cret-pw@host/?heartbeat=abc"):
        with pytest.raises(TransportError) as exc:
            AmqpTransport(bad)
        assert "s3cret-pw" not in str(exc.value) and "u:***@host" in str(exc.value)
    with pytest.raises(TransportError) as exc:
        import_definitions({}, "ftp://admin:s3cret-pw@h/")
    assert "s3cret-pw" not in str(exc.value)
