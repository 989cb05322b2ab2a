"""Redis authentication against the real Redis: the role ACL rule (hfgan_core/state/acl.py) lets the round store do
its work and nothing dangerous; infrastructure roles given a wrong password exit 2 with one line that names the
user, never the password. Each test creates a temporary ACL user with a unique name and deletes it afterwards; the
default user is never changed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest
import redis

from hfgan_core.state import StateError
from hfgan_core.state.acl import ROLE_RULE, ROLE_USERS, acl_file, generate, role_acl
from hfgan_core.state.redis import RedisRoundStore

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def acl_user(redis_url):
    """(user, password, url) of a temporary user with the role rule, on the test database."""
    admin = redis.Redis.from_url(redis_url)
    user, password = f"hfgan-test-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", *ROLE_RULE.split())
    u = urllib.parse.urlparse(redis_url)
    url = f"redis://{user}:{password}@{u.hostname}:{u.port or 6379}{u.path or '/0'}"
    try:
        yield user, password, url
    finally:
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()


def test_the_role_rule_lets_the_store_work_and_nothing_dangerous(acl_user):
    user, password, url = acl_user
    run = f"acl-{uuid.uuid4().hex[:8]}"
    store = RedisRoundStore(url, retry_timeout=2)
    try:
        assert store.init_run(run, "digest", "{}")
        store.set_status(run, "running")
        assert store.transition(run, 0, "admitting", 1, "training")
        store.heartbeat(run, "coordinator", 5.0, "info")
        assert "coordinator" in store.alive(run)
        assert store.acquire_leader(run, "coordinator", "me", 5.0)
        store.put_doc(run, 1, "start", "{}")
        assert store.get_docs(run, 1) == {"start": "{}"}
        assert store.get_round(run) == (1, "training")
    finally:
        store.delete_run(run)
        store.close()
    raw = redis.Redis.from_url(url)
    try:
        for command in (
            ("FLUSHDB",),
            ("KEYS", "*"),
            ("CONFIG", "GET", "*"),
            ("SET", "other:key", "x"),
            ("ACL", "LIST"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                raw.execute_command(*command)
    finally:
        raw.close()


def test_a_wrong_password_is_a_one_line_error_not_a_retry(acl_user):
    user, password, url = acl_user
    wrong = url.replace(f":{password}@", ":not-the-password@")
    store = RedisRoundStore(wrong, retry_timeout=30)
    try:
        with pytest.raises(StateError, match=f"refused the credentials of user '{user}'") as err:
            store.get_round("x")
        assert "not-the-password" not in str(err.value)
    finally:
        store.close()


@pytest.mark.parametrize("role", ["coordinator", "server", "clustering", "aggregator"])
def test_infrastructure_roles_exit_2_given_a_wrong_redis_password(acl_user, amqp_url, tmp_path, role):
    user, password, url = acl_user
    env = {k: v for k, v in os.environ.items() if not k.startswith("HFGAN_")}
    env.update(
        HFGAN_CONFIG="quickstart",
        HFGAN_RUN_ID=f"acl-{uuid.uuid4().hex[:8]}",
        HFGAN_BROKER_URL=amqp_url,
        HFGAN_STATE_URL=url.replace(f":{password}@", ":wrong-password@"),
        HFGAN_RUN_DIR=str(tmp_path / "run"),
        HFGAN_CONNECT_TIMEOUT_S="30",  # a retried auth failure would take this long; it must not be retried
        PYTHONPATH=str(ROOT),
    )
    res = subprocess.run(
        [sys.executable, "-m", f"workers.{role}"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if "refused the credentials" in line]
    assert len(errors) == 1 and f"'{user}'" in errors[0], res.stderr[-2000:]
    assert "wrong-password" not in res.stderr + res.stdout


def test_generate_writes_the_acl_file_and_a_password_and_url_per_role(tmp_path):
    first = generate(tmp_path, host="redis", port=6379, db=0)
    assert sorted(first) == sorted(ROLE_USERS)
    assert generate(tmp_path) == first  # existing passwords are kept
    acl = (tmp_path / "users.acl").read_text()
    admin = (tmp_path / "default.password").read_text().strip()
    assert acl.startswith("user default on #") and acl == acl_file(first, admin) and admin not in acl
    assert (tmp_path / "default.password").stat().st_mode & 0o077 == 0
    for role, pw in first.items():
        assert role_acl(role, pw) in acl and pw not in acl  # hashes only
        assert (tmp_path / f"{role}.password").read_text().strip() == pw
        assert (tmp_path / f"{role}.password").stat().st_mode & 0o077 == 0
        url = urllib.parse.urlparse((tmp_path / f"{role}.url").read_text().strip())
        assert (url.username, urllib.parse.unquote(url.password), url.hostname) == (role, pw, "redis")


def _redis_server(tmp_path: Path, port: int) -> subprocess.Popen:
    """A redis-server of its own on `port` with the generated aclfile and the compose persistence (append-only
    file), so the shared test Redis's users are never touched."""
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"]
    cmd += ["--dir", str(tmp_path), "--aclfile", str(tmp_path / "redis" / "users.acl")]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while True:
        assert server.poll() is None, f"redis-server refused the generated aclfile: {server.stdout.read()[-2000:]}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            assert time.monotonic() < deadline, "redis-server did not listen within 60 s"
            time.sleep(0.2)


def _stop(server: subprocess.Popen) -> str:
    server.terminate()
    out, _ = server.communicate(timeout=30)
    return out


def test_a_real_redis_server_loads_the_generated_acl_file_and_replays_its_ledger_after_a_restart(tmp_path):
    """The generated users.acl as Redis's `aclfile` (what redis-acl.conf and compose do): the server starts, every
    role authenticates with its password, a connection without one can do nothing, and after a restart Redis
    replays the append-only file (the store's script effects are transactions in it) with nothing dropped. With
    `user default off` that replay failed with NOPERM and a resumed run's info was reduced to its status."""
    passwords = generate(tmp_path / "redis")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    role_url = f"redis://coordinator:{passwords['coordinator']}@127.0.0.1:{port}/0"
    server = _redis_server(tmp_path, port)
    try:
        for user, password in passwords.items():
            r = redis.Redis(host="127.0.0.1", port=port, username=user, password=password)
            assert r.set(f"hfgan:{{acl}}:{user}", "1") and r.ping(), user
            r.close()
        anonymous = redis.Redis(host="127.0.0.1", port=port)
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.get("hfgan:{acl}:coordinator")
        anonymous.close()
        store = RedisRoundStore(role_url, retry_timeout=5)
        assert store.init_run("aof", "digest-1", "{}")
        store.set_status("aof", "running")
        assert store.transition("aof", 0, "admitting", 1, "training")
        store.close()
    finally:
        _stop(server)
    server = _redis_server(tmp_path, port)
    try:
        store = RedisRoundStore(role_url, retry_timeout=5)
        info = store.run_info("aof")
        assert info and info.get("digest") == "digest-1" and info.get("status") == "running", info
        assert store.get_round("aof") == (1, "training")
        store.close()
    finally:
        log = _stop(server)
    assert "NOPERM" not in log, log[-2000:]
