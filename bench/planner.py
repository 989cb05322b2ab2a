"""Benchmark of the exact cut planner against the reference genetic search (reference/cut_selection/ga_ref20.json).

    python bench/planner.py [--out bench/results/planner.json] [--reference PATH] [--repeats 5]

Cases: the reference's 20 clients; 80 clients (the 20-client list repeated 4 times, the same mix of the paper's
device types); 100 and 1000 clients with distinct random profiles (seeded). For each: the planner's wall time
(median of --repeats runs, including building the latency terms, excluding the one-off cost computation), its
latency, the all-ones and all-zeros assignments for scale, and the reference search's latency and time where known
(20 clients: 3.8668 s found in 385-670 s; 80 clients: about 26 minutes per the project's issue 3, no latency
published, so the reference's 20-client answer tiled 4 times is shown instead). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from hfgan_core.config import DeviceProfile, ServerProfile
from hfgan_core.planning import batch_latency, compute_costs, latency_terms, plan_cuts
from hfgan_core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
REF_SECONDS_20 = (385.0, 670.0)  # reference/cut_selection/README.md
REF_SECONDS_80 = 26 * 60.0  # issue 3: "about 6 minutes for 20 clients and 26 for 80"


def find_reference(explicit: str | None) -> Path:
    candidates = [Path(explicit)] if explicit else []
    env = Settings.from_env().reference_dir
    if env:
        candidates.append(Path(env) / "cut_selection" / "ga_ref20.json")
    candidates += [
        ROOT / "tests" / "data" / "ga_ref20.json",
        ROOT.parent / "shared" / "reference" / "cut_selection" / "ga_ref20.json",
    ]
    for c in candidates:
        if c.is_file():
            return c
    sys.exit(f"ga_ref20.json not found (looked in {', '.join(map(str, candidates))}); pass --reference")


def random_profiles(n: int, seed: int) -> list[DeviceProfile]:
    """Distinct devices spanning the paper's seven types: 480-15600 MHz and 5e7-1e9 B/s (log-uniform), 1-10
    FLOPs per cycle."""
    rng = np.random.default_rng(seed)
    mhz = np.exp(rng.uniform(np.log(480), np.log(15600), n))
    fpc = rng.integers(1, 11, n)
    rate = np.exp(rng.uniform(np.log(5e7), np.log(1e9), n))
    return [DeviceProfile(float(a), int(b), float(c)) for a, b, c in zip(mhz, fpc, rate, strict=True)]


def time_plan(costs, clients, server, repeats: int):
    times, plan = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        plan = plan_cuts(costs, clients, server)
        times.append(time.perf_counter() - t0)
    return plan, statistics.median(times)


def _cases(ref: dict, ref_clients: list) -> list[tuple]:
    """The benchmark's instances: (name, cost model, clients, reference latency, reference seconds, GA cuts)."""
    ga_best = np.array(ref["best_cuts"], dtype=np.int8)
    return [
        ("20 clients, reference list", "paper", ref_clients, ref["best_latency_s"], REF_SECONDS_20, ga_best),
        ("20 clients, corrected costs", "corrected", ref_clients, None, None, ga_best),
        (
            "80 clients, reference list x4",
            "paper",
            ref_clients * 4,
            None,
            (REF_SECONDS_80, REF_SECONDS_80),
            np.tile(ga_best, (4, 1)),
        ),
        ("100 clients, distinct random", "paper", random_profiles(100, 0), None, None, None),
        ("1000 clients, distinct random", "paper", random_profiles(1000, 1), None, None, None),
    ]


def _run_case(case: tuple, costs: dict, server: ServerProfile, repeats: int) -> dict:
    name, model, clients, ref_latency, ref_seconds, ga_cuts = case
    table = costs[model]
    plan, seconds = time_plan(table, clients, server, repeats)
    terms = latency_terms(table, clients, server)
    n = len(clients)
    base = batch_latency(terms, np.stack([np.ones((n, 4), np.int8), np.zeros((n, 4), np.int8)]))
    return {
        "case": name,
        "clients": n,
        "cost_model": model,
        "planner_seconds": seconds,
        "planner_latency_s": plan.latency_s,
        "all_ones_latency_s": float(base[0]),
        "all_zeros_latency_s": float(base[1]),
        "reference_latency_s": ref_latency,
        "reference_cuts_latency_s": float(batch_latency(terms, ga_cuts)[0]) if ga_cuts is not None else None,
        "reference_seconds": list(ref_seconds) if ref_seconds else None,
        "speedup": [ref_seconds[0] / seconds, ref_seconds[1] / seconds] if ref_seconds else None,
        "cuts": [list(c) for c in plan.cuts] if n <= 100 else None,
    }


def _print_table(rows: list[dict], max_rel: float, cost_seconds: float) -> None:
    def fmt_s(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    print(f"latency model vs the reference's 200 vectors: max relative error {max_rel:.2e}")
    print(f"cost table from the model: {cost_seconds * 1e3:.0f} ms (once per batch size and cost model)")
    print()
    header = (
        f"{'case':<31} {'N':>5} {'planner s':>10} {'latency s':>10} {'ref latency':>11} {'ref cuts':>9} "
        f"{'all-1':>9} {'all-0':>9} {'ref search s':>13} {'speedup':>17}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ref_s, sp = r["reference_seconds"], r["speedup"]
        ref_txt = "-" if not ref_s else "-".join(dict.fromkeys(f"{x:.0f}" for x in ref_s))
        sp_txt = "-" if not sp else "-".join(dict.fromkeys(f"{x:.3g}" for x in sp)) + "x"
        print(
            f"{r['case']:<31} {r['clients']:>5} {r['planner_seconds']:>10.5f} {r['planner_latency_s']:>10.4f} "
            f"{fmt_s(r['reference_latency_s']):>11} {fmt_s(r['reference_cuts_latency_s']):>9} "
            f"{r['all_ones_latency_s']:>9.3f} {r['all_zeros_latency_s']:>9.3f} {ref_txt:>13} {sp_txt:>17}"
        )
    print()
    print(
        "ref latency: the genetic search's answer; ref cuts: the modelled latency of its 20-client cuts "
        "(tiled for 80); all-1/all-0: every client keeps / gives away every optional block"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "planner.json"))
    ap.add_argument("--reference", default=None, help="path of ga_ref20.json")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    ref = json.loads(find_reference(args.reference).read_text())
    t0 = time.perf_counter()
    costs = {m: compute_costs(batch_size=64, cost_model=m) for m in ("paper", "corrected")}
    cost_seconds = (time.perf_counter() - t0) / 2
    server = ServerProfile(
        ref["server"]["computational_frequency"],
        ref["server"]["cpu_cycles_per_flop"],
        ref["server"]["transmission_rate"],
    )
    ref_clients = [DeviceProfile(*p) for p in ref["client_profiles_cpu_mhz_flops_per_cycle_data_rate"]]

    # The latency model against the reference's 200 vectors.
    vectors = ref["fitness_vectors"]
    got = batch_latency(latency_terms(costs["paper"], ref_clients, server), np.array([v["cuts"] for v in vectors]))
    expected = np.array([v["latency_s"] for v in vectors])
    max_rel = float(np.max(np.abs(got - expected) / expected))

    rows = [_run_case(case, costs, server, args.repeats) for case in _cases(ref, ref_clients)]
    result = {
        "what": "exact cut planner vs the reference genetic search (population 1000, 1000 generations)",
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "repeats": args.repeats,
        "cost_table_seconds": cost_seconds,
        "latency_model_max_rel_error_200_vectors": max_rel,
        "cases": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    _print_table(rows, max_rel, cost_seconds)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
