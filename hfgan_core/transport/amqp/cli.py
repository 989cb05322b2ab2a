"""`hfgan broker ...` (and `python -m hfgan_core.transport.amqp ...`): definitions, client provisioning, readiness.

Exit codes: 0 done; 2 bad usage or configuration (one line on stderr); 1 the broker refused or stayed unreachable.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ...settings import ConfigError, Settings
from ..base import TransportError
from .definitions import broker_definitions_document, dev_client_passwords
from .provision import provision_client_users, wait_for_broker
from .topology import DEFAULT_NAMESPACE

_COMMANDS = ("definitions", "provision-clients", "wait")


class BrokerUsageError(ValueError):
    """Bad arguments or configuration of a broker command (exit 2)."""


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:  # a *_FILE that cannot be read, both NAME and NAME_FILE set, ...
        raise BrokerUsageError(str(exc)) from exc


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `broker` with its subcommands on an argparse subparsers object."""
    p = subparsers.add_parser("broker", help="RabbitMQ definitions, client users, readiness")
    p.set_defaults(_broker_parser=p)
    sub = p.add_subparsers(dest="broker_command", metavar="{" + ",".join(_COMMANDS) + "}")
    d = sub.add_parser("definitions", help="write the development definitions.json (broker_config/)")
    d.add_argument("--out", help="file to write (default: stdout)")
    pc = sub.add_parser("provision-clients", help="create per-client broker users with their queues")
    pc.add_argument("--clients", type=int, help="clients 0..N-1 (default: the client count of --config)")
    pc.add_argument("--config", help="preset or TOML whose client count is used ($HFGAN_CONFIG)")
    pc.add_argument("--admin-url", help="http://admin:pass@host:15672 or rabbitmqctl ($HFGAN_ADMIN_URL[_FILE])")
    pc.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    pc.add_argument(
        "--dev-passwords",
        action="store_true",
        help="development passwords client-<k>-dev (else derived from $HFGAN_PROVISION_SECRET[_FILE], else random "
        "and printed as `client user password` lines)",
    )
    pc.add_argument("--verify-url", help="wait until every client can log in here ($HFGAN_BROKER_URL[_FILE])")
    pc.add_argument("--verify-timeout", type=float, default=120.0, help="seconds (default 120)")
    w = sub.add_parser("wait", help="wait until the broker accepts a login")
    w.add_argument("--url", help="AMQP URL ($HFGAN_BROKER_URL[_FILE])")
    w.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
    return p


def _client_count(args: argparse.Namespace) -> int:
    if args.clients is not None:
        if args.clients < 1:
            raise BrokerUsageError("--clients must be at least 1")
        return int(args.clients)
    config = args.config or _settings().config
    if not config:
        raise BrokerUsageError("give --clients N or --config C ($HFGAN_CONFIG)")
    from ...config import load_config

    try:
        return int(load_config(config).scenario.total_clients)
    except ConfigError as exc:
        raise BrokerUsageError(str(exc)) from exc


def _provision(args: argparse.Namespace) -> int:
    n = _client_count(args)
    env = _settings()
    admin_url = args.admin_url or env.admin_url
    if not admin_url:
        raise BrokerUsageError("give --admin-url (http://admin:pass@host:15672 or rabbitmqctl) or $HFGAN_ADMIN_URL")
    verify_url = args.verify_url or env.broker_url
    passwords = dev_client_passwords(n) if args.dev_passwords else None
    creds = provision_client_users(
        n,
        admin_url,
        namespace=args.namespace,
        passwords=passwords,
        secret=None if args.dev_passwords else env.provision_secret,
        verify_url=verify_url,
        verify_timeout=args.verify_timeout,
    )
    if args.dev_passwords:
        print(f"broker: client users client-0 .. client-{n - 1} ready (development passwords)", file=sys.stderr)
    else:
        for c in creds.values():
            print(c.client, c.username, c.password)
    return 0


def _wait(args: argparse.Namespace) -> int:
    url = args.url or _settings().broker_url
    if not url:
        raise BrokerUsageError("give --url amqp://user:pass@host:5672/ or $HFGAN_BROKER_URL")
    start = time.monotonic()
    wait_for_broker(url, args.timeout)
    print(f"broker: accepts logins (after {time.monotonic() - start:.1f} s)", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run a parsed `broker` command: 0 done, 2 bad usage (one line on stderr), 1 the broker failed."""
    cmd = getattr(args, "broker_command", None)
    if not getattr(args, "debug", False):
        # pika logs every refused connection attempt at ERROR; waiting for a booting broker makes many.
        logging.getLogger("pika").setLevel(logging.CRITICAL)
    try:
        if cmd == "definitions":
            text = broker_definitions_document()
            if args.out:
                Path(args.out).write_text(text)
            else:
                sys.stdout.write(text)
            return 0
        if cmd == "provision-clients":
            return _provision(args)
        if cmd == "wait":
            return _wait(args)
        raise BrokerUsageError(f"choose a subcommand: {', '.join(_COMMANDS)}")
    except (BrokerUsageError, OSError) as exc:
        print(f"hfgan broker: error: {exc}", file=sys.stderr)
        return 2
    except TransportError as exc:
        print(f"hfgan broker {cmd}: failed: {exc}".splitlines()[0], file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """`python -m hfgan_core.transport.amqp COMMAND ...`: the same commands as `hfgan broker COMMAND ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["provision"] and len(argv) > 1:  # the older spelling: `provision N --admin-url URL`
        argv = ["provision-clients", "--clients", *argv[1:]]
    parser = argparse.ArgumentParser(prog="python -m hfgan_core.transport.amqp")
    add_parser(parser.add_subparsers(dest="command"))
    return run(parser.parse_args(["broker", *argv]))
