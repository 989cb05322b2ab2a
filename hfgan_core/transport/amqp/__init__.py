"""RabbitMQ transport (`AmqpTransport`), the broker topology and the client-user provisioning.

The wire, the topology, chunking, dead-lettering and the broker limits are described in docs/wire.md.
Modules: `connection` (connect, reconnect, declare), `topology` (names, queue arguments, permissions),
`chunking`, `stream` (the update log), `transport` (publish, consume, settle), `definitions` and `provision`
(users and definitions documents), `cli` (`hfgan broker ...`).
"""

from __future__ import annotations

from .chunking import DEFAULT_CHUNK_LIMITS, ChunkLimits, ChunkRefused, Reassembly, _Partial, chunk_header
from .cli import main
from .connection import AccessRefused, _ConnectionLost
from .definitions import (
    DEV_ADMIN,
    DEV_CLIENTS,
    broker_definitions_document,
    check_password_hash,
    client_definitions,
    dev_client_passwords,
    dev_role_passwords,
    hash_password,
    topology_definitions,
)
from .provision import (
    ClientCredentials,
    _wait_usable,
    derive_client_password,
    import_definitions,
    provision_client_users,
)
from .topology import (
    ADMIN_PERMISSIONS,
    DEAD_MAX_LENGTH,
    DEFAULT_BLOCKED_TIMEOUT_S,
    DEFAULT_HEARTBEAT_S,
    DEFAULT_MAX_FRAME_BODY,
    DEFAULT_NAMESPACE,
    H_ADDRESS,
    H_CHUNK_COUNT,
    H_CHUNK_ID,
    H_CHUNK_INDEX,
    H_REASON,
    H_REJECTED_BY,
    H_ROUND,
    MIB,
    NO_CHUNK_ADDRESSES,
    ROLES,
    STREAM_MAX_AGE,
    STREAM_MAX_BYTES,
    STREAM_PREFETCH,
    STREAM_SEGMENT_BYTES,
    Names,
    client_permissions,
    client_username,
    role_permissions,
    role_username,
)
from .transport import AmqpTransport, _Consumer

__all__ = [
    "ADMIN_PERMISSIONS",
    "DEAD_MAX_LENGTH",
    "DEFAULT_BLOCKED_TIMEOUT_S",
    "DEFAULT_HEARTBEAT_S",
    "DEFAULT_MAX_FRAME_BODY",
    "DEFAULT_NAMESPACE",
    "DEV_ADMIN",
    "DEV_CLIENTS",
    "H_ADDRESS",
    "H_CHUNK_COUNT",
    "H_CHUNK_ID",
    "H_CHUNK_INDEX",
    "H_REASON",
    "H_REJECTED_BY",
    "H_ROUND",
    "MIB",
    "NO_CHUNK_ADDRESSES",
    "ROLES",
    "STREAM_MAX_AGE",
    "STREAM_MAX_BYTES",
    "STREAM_PREFETCH",
    "STREAM_SEGMENT_BYTES",
    "DEFAULT_CHUNK_LIMITS",
    "AccessRefused",
    "ChunkLimits",
    "ChunkRefused",
    "Reassembly",
    "chunk_header",
    "AmqpTransport",
    "ClientCredentials",
    "Names",
    "_ConnectionLost",
    "_Consumer",
    "_Partial",
    "_wait_usable",
    "broker_definitions_document",
    "check_password_hash",
    "client_definitions",
    "client_permissions",
    "client_username",
    "derive_client_password",
    "dev_client_passwords",
    "dev_role_passwords",
    "hash_password",
    "import_definitions",
    "main",
    "provision_client_users",
    "role_permissions",
    "role_username",
    "topology_definitions",
]
