"""Client-user provisioning on a running broker: per-client passwords, and definitions imported through the
management HTTP API or a local `rabbitmqctl`."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions as pex

from ...settings import redact_url
from ..base import (
    TransportError,
)
from .connection import _Connection
from .definitions import client_definitions
from .topology import (
    DEFAULT_NAMESPACE,
    Names,
    client_username,
)


def derive_client_password(secret: str, username: str) -> str:
    """A per-client password derived from a provisioning secret (HMAC-SHA256), for deployments that cannot store
    generated passwords. Whoever knows the secret can derive every client's password: give it only to the
    provisioner and hand each client its own password, never the secret."""
    mac = hmac.new(secret.encode(), username.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:24]).decode()


@dataclass(frozen=True)
class ClientCredentials:
    client: int
    username: str
    password: str = field(repr=False)

    def url(self, broker_url: str) -> str:
        """`broker_url` (e.g. amqp://guest:guest@rabbitmq:5672/) with this client's user and password."""
        p = urllib.parse.urlsplit(broker_url)
        host = p.hostname or "localhost"
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{urllib.parse.quote(self.username, safe='')}:{urllib.parse.quote(self.password, safe='')}@{host}"
        if p.port:
            netloc += f":{p.port}"
        return urllib.parse.urlunsplit((p.scheme, netloc, p.path, p.query, p.fragment))


def import_definitions(doc: Mapping[str, Any], admin_url: str, *, timeout: float = 60.0) -> None:
    """Merge a definitions document into a running broker. `admin_url` is the management API
    (`http://admin:pass@host:15672`, the rabbitmq_management plugin) or `rabbitmqctl` (the local CLI, run on the
    broker's host with the rights to use it). Existing entities not in `doc` are left alone (guest included)."""
    body = json.dumps(doc).encode()
    if admin_url in ("rabbitmqctl", "rabbitmqctl:"):
        # Through stdin (no file argument): a file would have to be readable by the broker's user, hashes and all.
        try:
            res = subprocess.run(
                ["rabbitmqctl", "-q", "import_definitions", "--format", "json"],
                input=body.decode(),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TransportError(f"rabbitmqctl import_definitions failed: {exc}") from exc
        if res.returncode != 0:
            detail = (res.stderr or res.stdout).strip().splitlines()
            raise TransportError(f"rabbitmqctl import_definitions failed: {detail[-1] if detail else res.returncode}")
        return
    p = urllib.parse.urlsplit(admin_url)
    if p.scheme not in ("http", "https"):
        raise TransportError(
            f"admin URL must be http(s)://user:pass@host:15672 or 'rabbitmqctl', not {redact_url(admin_url)!r}"
        )
    base = f"{p.scheme}://{p.hostname}:{p.port or (443 if p.scheme == 'https' else 15672)}{p.path.rstrip('/')}"
    req = urllib.request.Request(
        base + "/api/definitions", data=body, method="POST", headers={"content-type": "application/json"}
    )
    token = base64.b64encode(
        f"{urllib.parse.unquote(p.username or '')}:{urllib.parse.unquote(p.password or '')}".encode()
    ).decode()
    req.add_header("authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - an operator-given URL
            resp.read()
    except urllib.error.HTTPError as exc:
        raise TransportError(f"management API refused the definitions: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise TransportError(f"management API unreachable at {base}: {exc}") from exc


def provision_client_users(
    clients: int | Iterable[int],
    admin_url: str,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    vhost: str = "/",
    passwords: Mapping[int, str] | None = None,
    secret: str | None = None,
    verify_url: str | None = None,
    verify_timeout: float = 30.0,
) -> dict[int, ClientCredentials]:
    """Create (or update) one broker user per client with least-privilege permissions, and its queue and binding.

    `clients`: a count n (clients 0..n-1) or explicit ids. Passwords come from `passwords`, else are derived from
    `secret` (`derive_client_password`), else are random (returned; store them where only that client reads them).
    The topology (the `split` exchange) must exist already. Idempotent: running it again updates passwords and
    permissions and keeps queued messages. `rabbitmqctl import_definitions` finishes asynchronously: with
    `verify_url` (any AMQP URL of the broker; its credentials are replaced) this waits until every client can log
    in and sees its queue.
    """
    ids = list(range(clients)) if isinstance(clients, int) else [int(k) for k in clients]
    creds: dict[int, ClientCredentials] = {}
    for k in ids:
        user = client_username(k, namespace)
        if passwords is not None and k in passwords:
            pw = passwords[k]
        elif secret is not None:
            pw = derive_client_password(secret, user)
        else:
            pw = secrets.token_urlsafe(18)
        creds[k] = ClientCredentials(k, user, pw)
    doc = client_definitions({k: c.password for k, c in creds.items()}, namespace=namespace, vhost=vhost)
    import_definitions(doc, admin_url)
    if verify_url is not None:
        names = Names(namespace)
        for c in creds.values():
            _wait_usable(c.url(verify_url), names.queue(f"client.{c.client}"), verify_timeout)
    return creds


def _wait_usable(url: str, queue: str | None, timeout: float) -> None:
    """Retry logging in at `url` (and, with `queue`, checking that it exists) until it works or `timeout` passes:
    a broker still booting, or still applying imported definitions, refuses logins for a while."""
    deadline = time.monotonic() + timeout
    params = _Connection._parameters(url, "hfgan-provision")  # amqps:// with its CA file, as the workers
    while True:
        try:
            conn = pika.BlockingConnection(params)
            try:
                if queue is not None:
                    conn.channel().queue_declare(queue, passive=True)
                return
            finally:
                with contextlib.suppress(Exception):
                    conn.close()
        except (pex.AMQPError, OSError) as exc:
            if time.monotonic() > deadline:
                raise TransportError(
                    f"user {params.credentials.username!r} cannot use the broker at {params.host}:{params.port} "
                    f"after {timeout:.0f} s: {exc!r}"
                ) from exc
            time.sleep(0.1)


def wait_for_broker(url: str, timeout: float) -> None:
    """Wait until the broker at `url` (amqp://user:pass@host:port/vhost) accepts this user's login."""
    try:
        pika.URLParameters(url)
    except (ValueError, TypeError) as exc:
        raise TransportError("bad broker URL (amqp://user:password@host:5672/vhost)") from exc
    _wait_usable(url, None, timeout)
