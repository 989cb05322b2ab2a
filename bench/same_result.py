"""Does a change of code change a result? Train the same config with one torch thread on two checkouts and compare.

    python bench/same_result.py --baseline-tree /path/to/old/checkout [--config FILE.toml] [--rounds 2]
                                [--steps-per-epoch 12] [--data-dir data] [--out bench/results/same_result.json]

Each checkout's `hfgan train` runs in its own subprocess with that checkout first on `sys.path` (a `git worktree` of
the commit to compare with, as `bench/embedded.py --baseline-tree` uses). With one thread a run is bit-reproducible
from its seed, so a refactoring that keeps the math gives the same model digests every round, the same losses, the
same clusters and KLD scores, the same generation scores and utility metrics, and the same bytes on the wire. Only
the timings may differ. Values that only one side reports (a metric added later) are listed, not compared.

Exit status: 0 when every compared value is equal, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Wall-clock measurements: they differ between any two runs.
TIMING_KEYS = {"wall_s", "step_s", "score_s", "generate_s", "train_s", "measured_step_s", "round_wall_s"}
_TRAIN = "import sys; from hfgan_core.cli import main; sys.exit(main())"


def train(tree: Path, run_dir: Path, args: argparse.Namespace) -> float:
    cmd = [sys.executable, "-c", _TRAIN, "train", "--config", args.config, "--threads", "1", "--quiet"]
    cmd += ["--rounds", str(args.rounds), "--steps-per-epoch", str(args.steps_per_epoch)]
    cmd += ["--data-dir", str(Path(args.data_dir).resolve()), "--run-dir", str(run_dir)]
    cmd += ["--run-id", "same-result"]  # every envelope carries it: the same id gives the same bytes on the wire
    t0 = time.perf_counter()
    # cwd = the checkout: `python -c` puts it first on sys.path, ahead of the installed hfgan_core.
    done = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"same_result: hfgan train failed in {tree}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def _commit(tree: Path) -> str:
    """The checkout's commit (with "+changes" when its tracked files differ), not its path on this machine."""
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=tree).returncode != 0
    return (rev or "unknown") + ("+changes" if dirty else "")


def _shown(path: Path) -> str:
    """A path as the results file records it: relative to this checkout when inside it, not this machine's."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def load_run(run_dir: Path) -> dict[str, Any]:
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    # The coordinator's round events carry the round's wall time as text (the "done" event's wall_s), so their byte
    # count, and with it the run's total, moves with the clock's digits: both are compared without those events.
    events = summary.get("bytes_by_role", {}).get("coordinator", {}).pop("round_event", None)
    if events is not None and "bytes_sent" in summary:
        summary["bytes_sent_without_round_events"] = summary.pop("bytes_sent") - events
    return {"rounds": rounds, "summary": summary}


def compare(old: Any, new: Any, path: str, report: dict[str, list[str]]) -> None:
    """Walks both results; fills report["equal"], ["different"] and ["one_side"] with value paths."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key in TIMING_KEYS:
                continue
            if key not in old or key not in new:
                report["one_side"].append(where)
            else:
                compare(old[key], new[key], where, report)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            compare(a, b, f"{path}[{i}]", report)
    else:
        report["equal" if old == new else "different"].append(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline-tree", required=True, help="the checkout to compare with (e.g. a git worktree)")
    # A file, not a preset name: a preset may differ between the two checkouts.
    p.add_argument(
        "--config",
        default=str(ROOT / "hfgan_core" / "presets" / "quickstart.toml"),
        help="TOML config, the same file for both (default: this checkout's quickstart preset)",
    )
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps-per-epoch", type=int, default=12)
    p.add_argument("--data-dir", default=str(ROOT / "data"))
    p.add_argument("--out", default=None, help="write the comparison as JSON here")
    args = p.parse_args(argv)
    trees = {"baseline": Path(args.baseline_tree).resolve(), "this": ROOT}
    if not (trees["baseline"] / "hfgan_core").is_dir():
        p.error(f"--baseline-tree {args.baseline_tree}: no hfgan_core/ there (give a checkout, e.g. a git worktree)")
    if not Path(args.config).is_file():
        p.error(f"--config {args.config}: no such file (a TOML file, the same for both checkouts)")
    with tempfile.TemporaryDirectory(prefix="same-result-") as tmp:
        results, walls = {}, {}
        for name, tree in trees.items():
            what = f"{args.rounds} rounds of {args.steps_per_epoch} steps, 1 thread"
            print(f"training {Path(args.config).name} ({what}) in {tree}")
            walls[name] = train(tree, Path(tmp) / name, args)
            results[name] = load_run(Path(tmp) / name)
    report: dict[str, list[str]] = {"equal": [], "different": [], "one_side": []}
    compare(results["baseline"], results["this"], "", report)
    digests = [r["digests"] for r in results["this"]["rounds"]]
    print(
        f"{len(report['equal'])} values equal, {len(report['different'])} different, "
        f"{len(report['one_side'])} reported by one side only (not compared); timings left out"
    )
    for r, d in enumerate(digests, 1):
        print(f"round {r} model digests: " + ", ".join(f"{k}={v[:12]}" for k, v in sorted(d.items())))
    for path in report["different"]:
        print(f"DIFFERENT: {path}")
    for path in report["one_side"]:
        print(f"one side only: {path}")
    if args.out:
        doc = {
            "commits": {k: _commit(v) for k, v in trees.items()},
            "config": _shown(Path(args.config)),
            "rounds": args.rounds,
            "steps_per_epoch": args.steps_per_epoch,
            "threads": 1,
            "wall_s": walls,
            "digests": digests,
            **report,
        }
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if not report["different"] else 1


if __name__ == "__main__":
    sys.exit(main())
