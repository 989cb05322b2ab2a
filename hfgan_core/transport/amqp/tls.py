"""TLS for AMQP connections, from the broker URL: `amqps://user:pass@host:5671/%2F?cafile=/path/ca.pem`.

An `amqps://` URL always verifies the broker's certificate chain and host name (`ssl.create_default_context`,
TLS 1.2 or newer). Two query parameters of our own, removed before pika parses the URL:

| parameter     | what                                                                                   |
|---------------|----------------------------------------------------------------------------------------|
| `cafile`      | PEM file of the CA(s) to trust instead of the system's (a development CA)              |
| `server_name` | the name the certificate must carry, when it differs from the URL's host               |

Both are refused on a plain `amqp://` URL: a CA file there would suggest a protection the connection does not have.
"""

from __future__ import annotations

import ssl

import pika

from ..base import TransportError

TLS_QUERY_KEYS = ("cafile", "server_name")


def tls_options(scheme: str, host: str | None, query: dict[str, str]) -> pika.SSLOptions | None:
    """pika's SSLOptions for an `amqps` URL (None for `amqp`); pops our keys from `query` (parsed query string)."""
    ours = {key: query.pop(key) for key in TLS_QUERY_KEYS if key in query}
    if scheme.lower() != "amqps":
        if ours:
            raise TransportError(f"broker URL: {', '.join(sorted(ours))} needs an amqps:// URL")
        return None
    try:
        context = ssl.create_default_context(cafile=ours.get("cafile"))
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(f"broker URL: cannot load cafile {ours.get('cafile')!r}: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return pika.SSLOptions(context, server_hostname=ours.get("server_name") or host)
