"""`hfgan eval ...`: the evaluation part of the command line.

`add_parser(subparsers)` registers `eval` with the subcommand `fit-classifiers`, which fits the per-domain scoring
classifiers on the real training splits and stores them (default `<data_dir>/classifiers/<Dataset>.pt`).
`run(args)` executes it and returns the exit code. Bad input raises `ConfigError` (the main CLI maps it to exit
code 2). Evaluating a finished run (`hfgan eval --run-dir R`) is wired by the main CLI from the run's checkpoints
with `evaluate_generators`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..config import DATASETS, ConfigError
from ..settings import Settings
from .classifiers import DEFAULT_EPOCHS, classifier_path, fit_classifiers
from .training import as_tensors

DEFAULT_DATASETS = "MNIST,FashionMNIST"


def default_data_dir() -> str:
    return Settings.from_env().data_dir_or_default


def load_domain_splits(name: str, data_dir: str | os.PathLike[str]) -> tuple[Any, Any]:
    """(train, test) ImageSets of a dataset, through `hfgan_core.data.load_domain` (real data only: a scoring
    classifier fitted on a synthetic stand-in would score the wrong domain; `synthetic` itself is allowed)."""
    from ..data import load_domain

    domain = load_domain(name, data_dir, allow_synthetic_fallback=False)
    return domain.train, domain.test


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `eval` (and its subcommands) on the main CLI's subparsers; returns the `eval` parser."""
    parser = subparsers.add_parser("eval", help="evaluation: scoring classifiers, metrics of a run")
    sub = parser.add_subparsers(dest="eval_command", metavar="SUBCOMMAND")
    fit = sub.add_parser(
        "fit-classifiers",
        help="fit the per-domain scoring classifiers on the real training data",
        description="Fit one scoring classifier per dataset on its real training split and store it as "
        "<out>/<Dataset>.pt (default out: <data-dir>/classifiers).",
    )
    fit.add_argument("--data-dir", default=None, help="dataset root (default: $HFGAN_DATA_DIR or ./data)")
    fit.add_argument("--datasets", default=DEFAULT_DATASETS, help=f"comma-separated (default: {DEFAULT_DATASETS})")
    fit.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"training epochs (default: {DEFAULT_EPOCHS})")
    fit.add_argument("--out", default=None, help="output directory (default: <data-dir>/classifiers)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:N)")
    fit.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    fit.add_argument(
        "--limit",
        type=int,
        default=None,
        help="fit on a seeded random subset of this many training samples (quick checks)",
    )
    fit.add_argument("--quiet", action="store_true", help="print only the summary")
    return parser


def _parse_datasets(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--datasets: give at least one dataset")
    for n in names:
        if n not in DATASETS:
            raise ConfigError(f"--datasets: unknown dataset {n!r} (known: {', '.join(DATASETS)})")
    if len(set(names)) != len(names):
        raise ConfigError("--datasets: a dataset is listed twice")
    return names


def run(args: argparse.Namespace) -> int:
    """Execute an `hfgan eval` command; returns the exit code."""
    command = getattr(args, "eval_command", None)
    if command == "fit-classifiers":
        return _fit_classifiers(args)
    raise ConfigError("hfgan eval: choose a subcommand (fit-classifiers)")


def _fit_classifiers(args: argparse.Namespace) -> int:
    import torch

    names = _parse_datasets(args.datasets)
    if args.epochs < 1:
        raise ConfigError("--epochs must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    device = args.device
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:") or device == "mps"):
        raise ConfigError(f"--device: unknown torch device {device!r} (cpu, cuda, cuda:N)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available in this torch build or machine")
    data_dir = args.data_dir or default_data_dir()
    out = Path(args.out) if args.out else classifier_path(data_dir, names[0]).parent
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be at least 1")
    datasets = {}
    for name in names:
        train_set, test_set = load_domain_splits(name, data_dir)
        x_train, y_train = as_tensors(train_set, f"{name} training set")
        if args.limit is not None and args.limit < x_train.shape[0]:
            keep = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(args.seed))[: args.limit]
            x_train, y_train = x_train[keep], y_train[keep]
        datasets[name] = ((x_train, y_train), test_set)

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    results = fit_classifiers(datasets, out, epochs=args.epochs, seed=args.seed, device=args.device, log=log)
    print(f"{'dataset':<14} {'test acc %':>10} {'fit s':>8}  file")
    for name, r in results.items():
        print(f"{name:<14} {r['test_accuracy']:>10.2f} {r['fit_s']:>8.1f}  {r['path']}")
    return 0
