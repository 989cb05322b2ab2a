"""`hfgan plan-cuts`: plan (or evaluate) the cut bits of a set of device profiles.

    hfgan plan-cuts PROFILES [--json] [--batch-size B] [--cost-model paper|corrected] [--clients N]
    hfgan plan-cuts PROFILES --evaluate CUTS.json [--json]

PROFILES is a JSON or TOML profiles file (see planning/profiles.py), a shipped preset (`paper_devices`: the paper's
seven device types, one client each; `paper_ga20`: the 20 clients of the reference genetic search) or a run config.
`--clients N` cycles the listed clients to N. `--json` prints {"cuts", "latency_s", "seconds"} (with --evaluate:
{"latency_s"}); without it, a table of the cuts, per-stage times and bottlenecks. Bad input prints one line on
stderr and exits with 2.

The lead's top-level CLI registers this with `add_parser(subparsers)` and dispatches to `run(args)`;
`python -m hfgan_core.planning.cli plan-cuts ...` runs it on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..config import COST_MODELS, ConfigError
from .costs import compute_costs
from .latency import STAGES, LatencyBreakdown, as_cut_array, latency_breakdown
from .planner import plan_cuts
from .profiles import ProfileSet, load_profiles

PROG = "hfgan plan-cuts"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `plan-cuts` subcommand; sets `func=run` as its default."""
    p = subparsers.add_parser(
        "plan-cuts",
        help="choose each client's cut bits to minimise the modelled iteration latency",
        description="Plan the cut bits [g_head, g_tail, d_head, d_tail] of each client with the exact planner "
        "over the paper's latency model, or evaluate a given assignment.",
    )
    p.add_argument(
        "profiles",
        metavar="PROFILES",
        help="profiles file (JSON/TOML), a preset (paper_devices, paper_ga20) or a run config",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--batch-size", type=int, default=None, help="batch size per client (default 64)")
    p.add_argument(
        "--cost-model",
        choices=COST_MODELS,
        default=None,
        help="FLOP counting: the paper's (default) or corrected transposed convolutions",
    )
    p.add_argument("--clients", type=int, default=None, metavar="N", help="cycle the listed clients to N clients")
    p.add_argument(
        "--evaluate",
        metavar="CUTS.json",
        default=None,
        help="evaluate this assignment (a JSON list of four-bit lists, one per client) instead of planning",
    )
    p.set_defaults(func=run)
    return p


def _load_cuts(path: str, n: int) -> list:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"cuts file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"malformed JSON in {path}: {exc}") from None
    if isinstance(data, dict) and "cuts" in data:  # the output of --json is accepted as input
        data = data["cuts"]
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a list of [g_head, g_tail, d_head, d_tail] lists")
    for i, c in enumerate(data):
        ok = isinstance(c, str) or (
            isinstance(c, list) and all(isinstance(b, int) and not isinstance(b, bool) for b in c)
        )
        if not ok:
            raise ConfigError(f"cuts[{i}]: expected four bits [g_head, g_tail, d_head, d_tail], got {c!r}")
    as_cut_array(data, n)  # validates the bits and the count
    return data


def _index_list(idx: list[int], width: int = 22) -> str:
    """0,5,10 or 0-3,7; when longer than `width`, the leading part and the count: 0,7,14,..(143)."""
    parts: list[str] = []
    start = prev = idx[0]
    for i in idx[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    text = ",".join(parts)
    if len(text) <= width:
        return text
    suffix = f",..({len(idx)})"
    kept: list[str] = []
    for part in parts:
        if len(",".join(kept + [part])) + len(suffix) > width:
            break
        kept.append(part)
    return ",".join(kept) + suffix


def format_table(ps: ProfileSet, bd: LatencyBreakdown, header: str) -> str:
    """A readable report: per profile and cut assignment its clients, cuts, stage times and where it is slowest;
    then the four stages with their critical clients."""
    lines = [header, f"modelled iteration latency: {bd.latency_s:.4f} s", ""]
    groups: dict[tuple, list[int]] = {}
    for i in range(len(ps.clients)):
        groups.setdefault((ps.names[i], ps.clients[i], tuple(bd.cuts[i])), []).append(i)
    short = ("G fwd", "D fwd", "G bwd", "D bwd")
    name_w = max(7, *(len(k[0]) for k in groups))
    lines.append(f"{'profile':<{name_w}}  {'clients':<22}  cuts  " + "".join(f"{s:>8}" for s in short) + "  slowest in")
    for (name, _, cuts), idx in groups.items():
        times = bd.client_stage_seconds(idx[0])
        crit = sorted({p for i in idx for p in bd.critical_phases(i)}, key=lambda p: (STAGES.index(p.split("/")[0]), p))
        lines.append(
            f"{name:<{name_w}}  {_index_list(idx):<22}  {''.join(map(str, cuts))}  "
            + "".join(f"{t:8.4f}" for t in times)
            + "  "
            + (", ".join(crit) if crit else "-")
        )
    lines.append("")
    lines.append(
        "cuts = g_head g_tail d_head d_tail (1: the client keeps that block); client times exclude the "
        "server's shared blocks"
    )
    lines.append("")
    lines.append(
        f"{'stage':<10}  {'total s':>8}  {'first phase (slowest client)':<34}  {'server s':>8}  "
        "second phase (slowest client)"
    )
    for st in bd.stages:

        def ph(p) -> str:
            return f"{p.seconds:.4f} (client {p.critical_client}, {p.limited_by})"

        lines.append(f"{st.name:<10}  {st.seconds:8.4f}  {ph(st.first):<34}  {st.server_s:8.4f}  {ph(st.second)}")
    where, client, what = bd.bottleneck()
    lines.append("")
    lines.append(f"bottleneck: {where}, client {client} ({ps.names[client]}), limited by {what}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Execute `plan-cuts`; returns the exit code (2 for bad input)."""
    try:
        ps = load_profiles(args.profiles)
        if args.clients is not None:
            ps = ps.cycled(args.clients)
        batch = args.batch_size if args.batch_size is not None else (ps.batch_size or 64)
        cost_model = args.cost_model or ps.cost_model or "paper"
        costs = compute_costs(batch_size=batch, cost_model=cost_model)
        server = ps.server
        header = (
            f"{len(ps.clients)} clients, cost model {cost_model}, batch {batch}; server "
            f"{server.computational_frequency_ghz * server.cpu_cycles_per_flop:g} GFLOP/s, "
            f"{server.transmission_rate_bps:.3g} B/s"
        )
        if args.evaluate is not None:
            cuts = _load_cuts(args.evaluate, len(ps.clients))
            bd = latency_breakdown(costs, ps.clients, server, cuts)
            if args.json:
                print(json.dumps({"latency_s": bd.latency_s}))
            else:
                print(format_table(ps, bd, "evaluated assignment: " + header))
            return 0
        plan = plan_cuts(costs, ps.clients, server)
        if args.json:
            print(json.dumps(plan.to_json()))
        else:
            bd = latency_breakdown(costs, ps.clients, server, plan.cuts)
            print(format_table(ps, bd, f"optimal cuts (exact planner, {plan.seconds * 1e3:.1f} ms): " + header))
        return 0
    except ConfigError as exc:
        msg = " ".join(str(exc).split())
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hfgan")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. piped into `head`: not an error; silence the flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
