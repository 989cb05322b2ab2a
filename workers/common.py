"""The flags every worker takes, and the call into the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from hfgan_core.runtime.services import options_from_args, serve, setup_logging
from hfgan_core.settings import ConfigError, Settings


def parser(role: str, description: str, env: Settings) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m workers.{role}", description=description)
    p.add_argument("--config", help="a preset name or a TOML file ($HFGAN_CONFIG)")
    p.add_argument("--run-id", help="the run ($HFGAN_RUN_ID; default: the run directory's name)")
    p.add_argument("--broker", help="broker URL, amqp://... ($HFGAN_BROKER_URL)")
    p.add_argument("--state", help="state URL, redis://... ($HFGAN_STATE_URL)")
    p.add_argument("--data-dir", help="dataset root ($HFGAN_DATA_DIR)")
    p.add_argument("--run-dir", help="run outputs and checkpoints ($HFGAN_RUN_DIR)")
    p.add_argument("--device", help="torch device: cpu, cuda, cuda:N ($HFGAN_DEVICE)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument(
        "--no-fallback",
        dest="allow_fallback",
        action="store_false",
        default=not env.no_fallback,
        help="fail instead of using synthetic data for a missing dataset ($HFGAN_NO_FALLBACK=1)",
    )
    p.add_argument("--debug", action="store_true", help="debug logs")
    return p


def main(
    role: str,
    description: str,
    extra: Callable[[argparse.ArgumentParser, Settings], None] | None = None,
    argv: Sequence[str] | None = None,
) -> int:
    import logging

    try:
        env = Settings.from_env()
    except ConfigError as exc:
        print(f"{role}: error: {exc}", file=sys.stderr)
        return 2
    p = parser(role, description, env)
    if extra is not None:
        extra(p, env)
    args = p.parse_args(argv)
    setup_logging(role, logging.DEBUG if args.debug else logging.INFO)
    return serve(options_from_args(role, args))
