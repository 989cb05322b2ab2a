"""`python -m hfgan_core.transport.amqp` and the `hfgan broker` commands: definitions and provisioning."""

from __future__ import annotations

import os

from ..base import (
    TransportError,
)
from .definitions import broker_definitions_document
from .provision import provision_client_users
from .topology import (
    DEFAULT_NAMESPACE,
)


def main(argv: list[str] | None = None) -> int:
    """`python -m hfgan_core.transport.amqp definitions` prints broker_config/definitions.json;
    `... provision N --admin-url URL [--namespace NS]` creates client users 0..N-1 (passwords derived from the
    secret in $HFGAN_PROVISION_SECRET, else random) and prints `client user password` lines."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m hfgan_core.transport.amqp")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("definitions", help="print the development definitions.json")
    pv = sub.add_parser("provision", help="create per-client broker users with their queues")
    pv.add_argument("clients", type=int)
    pv.add_argument("--admin-url", required=True, help="http://admin:pass@host:15672 or rabbitmqctl")
    pv.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    args = ap.parse_args(argv)
    if args.cmd == "definitions":
        sys.stdout.write(broker_definitions_document())
        return 0
    try:
        creds = provision_client_users(
            args.clients, args.admin_url, namespace=args.namespace, secret=os.environ.get("HFGAN_PROVISION_SECRET")
        )
    except TransportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for c in creds.values():
        print(c.client, c.username, c.password)
    return 0
