"""The `hfgan` command line.

Exit codes: 0 success; 2 bad usage or configuration (one line on stderr); 1 any other failure (one line on stderr;
`--debug` shows the traceback). `hfgan up` returns its coordinator's exit code (see workers/__init__.py), 130 after
Ctrl-C; `hfgan replay` returns 1 when a replayed model does not match its recorded digest.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import COMPUTE_DTYPES, ConfigError, RunConfig, apply_env, load_config


class UsageError(ConfigError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 itself; keep its one-line style
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="a preset name (quickstart, s1..s6, s3_lite) or a TOML file")
    p.add_argument("--rounds", type=int, help="number of rounds")
    p.add_argument("--local-epochs", type=int, help="local epochs per round")
    p.add_argument("--steps-per-epoch", type=int, help="steps per epoch (default: max_k ceil(n_k / batch))")
    p.add_argument("--data-dir", help="dataset root ($HFGAN_DATA_DIR)")
    p.add_argument("--run-dir", help="where the run writes its outputs ($HFGAN_RUN_DIR)")
    p.add_argument("--run-id", help="run id (default: the run directory's name)")
    p.add_argument("--seed", type=int, help="training seed")
    p.add_argument("--broker", help="broker URL: memory:// (default) or amqp://... ($HFGAN_BROKER_URL)")
    p.add_argument("--state", help="state URL: memory:// (default) or redis://... ($HFGAN_STATE_URL)")
    p.add_argument("--device", help="torch device of clients, aggregators, evaluation (cpu, cuda, cuda:N)")
    p.add_argument("--server-device", help="torch device of the split server (default: --device)")
    p.add_argument("--wire-dtype", choices=("float32", "float16", "bfloat16"), help="activation/gradient precision")
    p.add_argument(
        "--compute-dtype",
        choices=COMPUTE_DTYPES,
        help="arithmetic of the convolution blocks (bfloat16: autocast, faster, not the paper's float32)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (1: bit-reproducible from the seed)")
    p.add_argument(
        "--tensorboard", metavar="DIR", help="write per-round scalars and sample grids for TensorBoard to DIR"
    )


def build_parser() -> argparse.ArgumentParser:
    from .data import cli as data_cli
    from .evaluation import cli as eval_cli
    from .planning import cli as plan_cli

    parser = _Parser(prog="hfgan", description="HuSCF-GAN: split, clustered federated cGAN training.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    tr = sub.add_parser("train", help="train a run (all roles in this process by default)")
    _run_options(tr)
    tr.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    tr.add_argument("--synthetic", action="store_true", help="use the synthetic dataset for every domain")
    tr.add_argument(
        "--no-fallback", action="store_true", help="fail instead of using synthetic data for a missing dataset"
    )
    tr.add_argument(
        "--no-utility", action="store_true", help="skip the final utility metrics (30k samples x 15 epochs per domain)"
    )
    tr.add_argument("--aggregators", type=int, default=1, help="aggregator roles (embedded)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")

    from .runtime import dashboard as dashboard_cli
    from .runtime import replay as replay_cli
    from .runtime import status as status_cli
    from .runtime import up as up_cli

    up_cli.add_parser(sub, _run_options)
    status_cli.add_parser(sub)
    replay_cli.add_parser(sub)
    dashboard_cli.add_parser(sub)

    ev = eval_cli.add_parser(sub)
    ev.add_argument("--run-dir", help="evaluate a finished run: final generation score and utility per domain")
    ev.add_argument("--no-utility", action="store_true", help="generation score only")
    data_cli.add_parser(sub)
    plan_cli.add_parser(sub)
    from .bench import cli as bench_cli

    bench_cli.add_parser(sub)
    from .transport.amqp import cli as broker_cli

    broker_cli.add_parser(sub)
    return parser


def load_run_config(args: argparse.Namespace) -> RunConfig:
    cfg = apply_env(load_config(args.config))
    cfg = cfg.with_fields_from(
        "train", args, ("rounds", "local_epochs", "steps_per_epoch", "seed", "wire_dtype", "compute_dtype")
    )
    cfg = cfg.with_runtime_flags(args).with_overrides(
        "runtime", server_device=args.server_device, tensorboard_dir=args.tensorboard
    )
    if getattr(args, "synthetic", False):
        import dataclasses

        from .config import DomainConfig

        doms = tuple(DomainConfig("synthetic", d.clients, d.samples_per_client) for d in cfg.scenario.domains)
        if len(doms) > 1:
            raise ConfigError(
                "--synthetic: the synthetic dataset is one domain; use it with a one-domain scenario "
                "or point --data-dir at a directory without the datasets"
            )
        cfg = cfg.replace(scenario=dataclasses.replace(cfg.scenario, domains=doms))
    return cfg.validate()


def cmd_train(args: argparse.Namespace) -> int:
    from .runtime.train import train

    cfg = load_run_config(args)
    if args.aggregators < 1:
        raise ConfigError("--aggregators must be at least 1")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    summary = train(
        cfg,
        resume=args.resume,
        allow_synthetic_fallback=not args.no_fallback,
        utility=not args.no_utility,
        progress=not args.quiet,
        log=log,
        aggregators=args.aggregators,
    )
    print(
        json.dumps(
            {"run_dir": cfg.runtime.run_dir, "domains": summary["domains"], "wall_s": summary["wall_s"]}, indent=2
        )
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if getattr(args, "eval_command", None):
        from .evaluation import cli as eval_cli

        return eval_cli.run(args)
    if not args.run_dir:
        raise ConfigError("hfgan eval: give --run-dir R (evaluate a run) or a subcommand (fit-classifiers)")
    from .runtime.evaluate_run import evaluate_run

    result = evaluate_run(
        Path(args.run_dir), utility=not args.no_utility, log=lambda s: print(s, file=sys.stderr, flush=True)
    )
    print(json.dumps(result, indent=2))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from .runtime import up

    return up.run(args, load_run_config)


def cmd_status(args: argparse.Namespace) -> int:
    from .runtime import status

    return status.run(args)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from .runtime import dashboard

    return dashboard.run(args)


def cmd_replay(args: argparse.Namespace) -> int:
    from .runtime import replay

    return replay.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("matplotlib", "PIL", "pika"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    handlers = {"train": cmd_train, "eval": cmd_eval, "up": cmd_up, "status": cmd_status, "replay": cmd_replay}
    handlers["dashboard"] = cmd_dashboard
    try:
        if args.command in handlers:
            return handlers[args.command](args)
        if args.command == "data":
            from .data import cli as data_cli

            return data_cli.run(args)
        if args.command == "plan-cuts":
            from .planning import cli as plan_cli

            return plan_cli.run(args)
        if args.command == "broker":
            from .transport.amqp import cli as broker_cli

            return broker_cli.run(args)
        if args.command == "bench":
            from .bench import cli as bench_cli

            return bench_cli.run(args)
        parser.error(f"unknown command {args.command}")
    except ConfigError as exc:
        print(f"hfgan {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hfgan {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user; the traceback with --debug
        if args.debug:
            raise
        print(f"hfgan {args.command}: failed: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
