"""`hfgan bench ...`: the benchmark part of the command line.

    hfgan bench quality --config s3 [--out DIR] [--data-dir D] [--methods huscf,fedgan,...] [--paper-scale]
                        [--rounds N] [--local-epochs N] [--steps-per-epoch N] [--clients-per-domain N]
                        [--samples-per-client N] [--score-samples N] [--utility-samples N] [--utility-epochs N]
                        [--budget-min M] [--device cpu|cuda] [--seed S] [--threads T] [--force] [--estimate-only]

`add_parser(subparsers)` registers `bench` with the subcommand `quality`; `run(args)` executes it and returns the
exit code. Bad input raises `ConfigError` (the main CLI maps it to exit code 2).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from ..config import ConfigError
from .methods import METHODS


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `bench` (and `bench quality`) on the main CLI's subparsers; returns the `bench` parser."""
    parser = subparsers.add_parser(
        "bench", help="benchmarks: quality against baselines", description="Benchmarks that write a report."
    )
    sub = parser.add_subparsers(dest="bench_command", metavar="SUBCOMMAND", parser_class=type(parser))
    q = sub.add_parser(
        "quality",
        help="HuSCF-GAN vs ablations and baselines on the same data, budget and seeds; writes a report",
        description="Run HuSCF-GAN, its ablations (no clustering, size-only weights, same cut) and the baselines "
        "(centralized per domain, FedGAN-style averaging, local only) on the same data, budget and seeds, and write "
        "report.md / report.json with plots and sample grids. Re-running the same command skips finished methods.",
    )
    q.add_argument("--config", required=True, help="a preset (s1..s6, s3_lite, quickstart) or a TOML file")
    q.add_argument("--out", help="report directory (default: runs/bench-quality/<scenario>)")
    q.add_argument("--data-dir", help="dataset root ($HFGAN_DATA_DIR)")
    q.add_argument(
        "--methods",
        help=f"comma-separated subset of {','.join(METHODS)} (default: all)",
    )
    q.add_argument("--paper-scale", action="store_true", help="the preset unchanged (for a machine with a GPU)")
    q.add_argument("--rounds", type=int, help="rounds (overrides the scale)")
    q.add_argument("--local-epochs", type=int, help="local epochs per round")
    q.add_argument("--steps-per-epoch", type=int, help="steps per epoch (default: max_k ceil(n_k / batch))")
    q.add_argument("--clients-per-domain", type=int, help="clients per domain (reduced scale: 2)")
    q.add_argument("--samples-per-client", type=int, help="cap on each client's samples (reduced scale: 1000)")
    q.add_argument("--score-samples", type=int, help="samples of the generation score")
    q.add_argument("--utility-samples", type=int, help="generated samples the utility CNN trains on")
    q.add_argument("--utility-epochs", type=int, help="epochs of the utility CNN")
    q.add_argument(
        "--budget-min",
        type=float,
        default=60.0,
        help="reduced scale: the richest setting whose estimate fits this many minutes (default 60)",
    )
    q.add_argument("--device", help="torch device (cpu, cuda, cuda:N)")
    q.add_argument("--seed", type=int, help="training seed (every method)")
    q.add_argument("--threads", type=int, help="torch CPU threads")
    q.add_argument(
        "--force", action="store_true", help="redo finished methods (and replace a bench with other settings in --out)"
    )
    q.add_argument(
        "--allow-synthetic",
        action="store_true",
        help="use synthetic stand-ins for missing datasets (the report says so)",
    )
    q.add_argument("--keep-checkpoints", action="store_true", help="keep the split runs' checkpoints")
    q.add_argument("--classifier-epochs", type=int, help="epochs when a scoring classifier must be fitted")
    q.add_argument("--calibrate", action="store_true", help="measure the cost constants here before estimating")
    q.add_argument("--estimate-only", action="store_true", help="print the scale and the cost estimate, run nothing")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def command_line(argv: list[str] | None = None) -> str:
    """The command as `hfgan bench quality ...`, however it was started (hfgan, python -m, bench/quality.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("quality") + 1 :] if "quality" in argv else argv
    return "hfgan bench quality " + shlex.join(rest)


def settings_from_args(args: argparse.Namespace, argv: list[str] | None = None):
    from .quality import BenchSettings

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else METHODS
    command = command_line(argv)
    out = args.out
    if not out:
        from pathlib import Path

        out = str(Path("runs") / "bench-quality" / Path(args.config).stem)
    return BenchSettings(
        config=args.config,
        out=out,
        data_dir=args.data_dir,
        methods=methods,
        paper_scale=args.paper_scale,
        clients_per_domain=args.clients_per_domain,
        samples_per_client=args.samples_per_client,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        steps_per_epoch=args.steps_per_epoch,
        score_samples=args.score_samples,
        utility_samples=args.utility_samples,
        utility_epochs=args.utility_epochs,
        budget_min=args.budget_min,
        device=args.device,
        seed=args.seed,
        threads=args.threads,
        force=args.force,
        allow_synthetic=args.allow_synthetic,
        keep_checkpoints=args.keep_checkpoints,
        classifier_epochs=args.classifier_epochs,
        calibrate=args.calibrate,
        estimate_only=args.estimate_only,
        progress=not args.quiet,
        command=command,
    ).validate()


def run(args: argparse.Namespace) -> int:
    if getattr(args, "bench_command", None) != "quality":
        raise ConfigError("hfgan bench: give a subcommand (quality)")
    from .quality import run_bench

    settings = settings_from_args(args)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = run_bench(settings, log=log)
    if settings.estimate_only:
        return 0
    from .report import summary_table

    print(summary_table(result))
    print(f"report: {settings.out}/report.md (numbers: report.json)")
    failing = [c["claim"] for c in result.get("claims", []) if c["verdict"] in ("does not hold", "holds partly")]
    if failing:
        print("claims that do not (fully) hold at this scale: " + "; ".join(failing), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m hfgan_core.bench.cli quality ...` (or bench/quality.py): the bench without the main CLI."""
    parser = argparse.ArgumentParser(prog="hfgan")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(["bench", *argv])
    try:
        return run(args)
    except ConfigError as exc:
        print(f"hfgan bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
