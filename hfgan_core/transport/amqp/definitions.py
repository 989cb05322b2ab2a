"""RabbitMQ definitions documents: the topology, the role, administrator and client users, and the
development credentials of broker_config/definitions.json."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from typing import Any

from .topology import (
    ADMIN_PERMISSIONS,
    DEFAULT_NAMESPACE,
    Names,
    _definition_entities,
    broker_roles,
    client_permissions,
    client_username,
    role_permissions,
    role_username,
)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt(4) + sha256(salt + password))."""
    salt = secrets.token_bytes(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def check_password_hash(password: str, password_hash: str) -> bool:
    raw = base64.b64decode(password_hash)
    return hmac.compare_digest(raw, base64.b64decode(hash_password(password, raw[:4])))


def _user(name: str, password: str, tags: list[str], limits: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "password_hash": hash_password(password),
        "hashing_algorithm": "rabbit_password_hashing_sha256",
        "tags": tags,
        "limits": dict(limits or {}),
    }


def topology_definitions(
    *,
    namespace: str = DEFAULT_NAMESPACE,
    vhost: str = "/",
    role_passwords: Mapping[str, str] | None = None,
    admin: tuple[str, str] | None = None,
    clients: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """A RabbitMQ definitions document: the topology, and optionally the role users (`role_passwords`: role ->
    password), an administrator (`admin`: (user, password)) and per-client users (`clients`: k -> password)."""
    names = Names(namespace)
    users: list[dict[str, Any]] = []
    perms: list[dict[str, Any]] = []
    if admin is not None:
        users.append(_user(admin[0], admin[1], ["administrator"]))
        perms.append({"user": admin[0], "vhost": vhost, **ADMIN_PERMISSIONS})
    for role, regexes in role_permissions(names).items():
        if role_passwords and role in role_passwords:
            user = role_username(role, namespace)
            users.append(_user(user, role_passwords[role], []))
            perms.append({"user": user, "vhost": vhost, **regexes})
    doc = {
        "users": users,
        "vhosts": [{"name": vhost}],
        "permissions": perms,
        "topic_permissions": [],
        "parameters": [],
        "global_parameters": [],
        "policies": [],
        **_definition_entities(names, vhost),
    }
    if clients:
        extra = client_definitions(clients, namespace=namespace, vhost=vhost)
        for key in ("users", "permissions", "queues", "bindings"):
            doc[key] += extra[key]
    return doc


def client_definitions(
    clients: Mapping[int, str], *, namespace: str = DEFAULT_NAMESPACE, vhost: str = "/"
) -> dict[str, list[dict[str, Any]]]:
    """Users, permissions, queues and bindings of the given clients (k -> password)."""
    names = Names(namespace)
    out: dict[str, list[dict[str, Any]]] = {"users": [], "permissions": [], "queues": [], "bindings": []}
    for k, password in sorted(clients.items()):
        user = client_username(k, namespace)
        out["users"].append(_user(user, password, [], names.limits.client_user_limits()))
        out["permissions"].append({"user": user, "vhost": vhost, **client_permissions(names, k)})
        qname, qargs, (ex, _, rk) = names.client_queue(k)
        out["queues"].append({"name": qname, "vhost": vhost, "durable": True, "auto_delete": False, "arguments": qargs})
        out["bindings"].append(
            {
                "source": ex,
                "vhost": vhost,
                "destination": qname,
                "destination_type": "queue",
                "routing_key": rk,
                "arguments": {},
            }
        )
    return out


# Development credentials of broker_config/definitions.json (documented in broker_config/README.md). Production
# deployments import their own definitions or change these passwords (rabbitmqctl change_password).
DEV_ADMIN = ("hfgan-admin", "admin-dev")
DEV_CLIENTS = 4


def dev_role_passwords() -> dict[str, str]:
    return {role: f"{role}-dev" for role in broker_roles()}


def dev_client_passwords(n: int = DEV_CLIENTS) -> dict[int, str]:
    return {k: f"client-{k}-dev" for k in range(n)}


def broker_definitions_document(
    role_passwords: Mapping[str, str] | None = None,
    admin: tuple[str, str] = DEV_ADMIN,
    clients: Mapping[int, str] | None = None,
) -> str:
    """The text of broker_config/definitions.json (the development credentials unless told otherwise)."""
    doc = topology_definitions(
        role_passwords=dev_role_passwords() if role_passwords is None else role_passwords,
        admin=admin,
        clients=dev_client_passwords() if clients is None else clients,
    )
    return json.dumps(doc, indent=2) + "\n"
