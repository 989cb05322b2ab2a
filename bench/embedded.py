"""Embedded runtime against the same model trained unsplit in one process, optionally against another checkout.

    python bench/embedded.py [--clients 4] [--steps 24] [--repeats 3] [--wire float32] [--channels-last]
                             [--bfloat16]
                             [--baseline-tree /path/to/old/checkout] [--out bench/results/embedded.json]

Rows: `UnsplitGAN` on the concatenated batch (clients x 64, one D step and one G step per iteration); the embedded
runtime's training steps only (from the first client step to the last server window); the embedded whole round
(`EmbeddedRunner.run`: join, model build, steps, updates, clustering, aggregation, model distribution). Per phase:
time before the first step, the steps, after the last step, and inside the steps the time spent encoding and
decoding messages and in the optimisers.

Every measurement runs in a fresh subprocess of this script (`--worker`), so `--baseline-tree` can point at an older
checkout (a `git worktree` of the commit to compare with): its `hfgan_core` is imported instead of this one. Runs
are interleaved (baseline unsplit, baseline embedded, this unsplit, this embedded, repeat), because on a shared
machine absolute figures move by 2x within minutes: only ratios within one window mean anything. The best of
`--repeats` runs of each is reported, and the median of the per-repeat ratios next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
CUTS = ((0, 0, 0, 0), (1, 1, 1, 1), (1, 0, 1, 0), (1, 1, 1, 0))


# ------------------------------------------------------------------------------------------- in the subprocess
class _Timers:
    """Wall time accumulated per name by wrapping functions of the imported code (old and new have the same
    entry points, so the same wrappers measure both)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.marks: dict[str, float] = {}
        # The process's CPU seconds at the same marks: on a shared machine CPU time moves far less with the load
        # than wall time does (with one torch thread it is nearly independent of it).
        self.cpu_marks: dict[str, float] = {}

    def wrap(self, owner, attr: str, name: str, mark: str | None = None, first: bool = True) -> None:
        fn = getattr(owner, attr)
        timers = self

        def wrapped(*a, **k):
            t0 = time.perf_counter()
            if mark and (not first or mark not in timers.marks):
                timers.marks[mark] = t0
                timers.cpu_marks[mark] = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                t1 = time.perf_counter()
                timers.total[name] = timers.total.get(name, 0.0) + t1 - t0
                if mark and not first:
                    timers.marks[mark] = t1
                    timers.cpu_marks[mark] = time.process_time()

        setattr(owner, attr, wrapped)


def _settings(channels_last: bool, compute_dtype: str) -> tuple[dict, dict]:
    """(runtime, train) config overrides of a variant; empty for the defaults, so an older tree without the
    setting still builds its config."""
    rt = {"channels_last": True} if channels_last else {}
    tr = {"compute_dtype": compute_dtype} if compute_dtype != "float32" else {}
    return rt, tr


def _worker_embedded(clients: int, steps: int, wire: str, channels_last: bool, compute_dtype: str) -> dict:
    import torch

    from hfgan_core.config import DomainConfig, RunConfig, RuntimeConfig, ScenarioConfig, TrainConfig
    from hfgan_core.data import TensorClientData
    from hfgan_core.protocol import messages
    from hfgan_core.runtime import host
    from hfgan_core.runtime.client import ClientRole
    from hfgan_core.runtime.embedded import EmbeddedRunner
    from hfgan_core.runtime.server import ServerRole

    timers = _Timers()
    timers.wrap(host, "decode", "decode")
    timers.wrap(messages.Message, "encode", "encode")
    timers.wrap(torch.optim.Adam, "step", "optimizer")
    timers.wrap(ClientRole, "_start_step", "client_start_step", mark="first_step")
    timers.wrap(ServerRole, "_close_window", "server_close_window", mark="last_window", first=False)
    # Each role's handlers, the client's and the server's included: their split is the ceiling of what running
    # clients concurrently could gain (docs/benchmarks.md).
    classes = {
        "coordinator": "CoordinatorRole",
        "aggregator": "AggregatorRole",
        "clustering": "ClusteringRole",
        "client": "ClientRole",
        "server": "ServerRole",
    }
    for role, cls in classes.items():
        mod = __import__(f"hfgan_core.runtime.{role}", fromlist=["x"])
        timers.wrap(getattr(mod, cls), "on_message", f"role_{role}")
    rt, tr = _settings(channels_last, compute_dtype)
    cfg = RunConfig(
        scenario=ScenarioConfig(domains=(DomainConfig("synthetic", clients),)),
        train=TrainConfig(rounds=1, local_epochs=1, steps_per_epoch=steps, cuts=CUTS, wire_dtype=wire, **tr),
        runtime=RuntimeConfig(**rt),
    ).validate()
    datas = [TensorClientData.random(1024, i) for i in range(clients)]
    runner = EmbeddedRunner(cfg, datas, [0] * clients, run_id="bench")
    t0, c0 = time.perf_counter(), time.process_time()
    result = runner.run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    t1 = t0
    train_s = timers.marks["last_window"] - timers.marks["first_step"]
    train_cpu_s = timers.cpu_marks["last_window"] - timers.cpu_marks["first_step"]
    samples = clients * cfg.train.batch_size * steps
    phases = {
        "before_first_step_s": timers.marks["first_step"] - t1,
        "steps_s": train_s,
        "after_last_step_s": t1 + wall - timers.marks["last_window"],
        **{f"{k}_s": v for k, v in sorted(timers.total.items())},
    }
    return {
        "wall_s": wall,
        "train_s": train_s,
        "samples": samples,
        "samples_per_s": samples / wall,
        "train_samples_per_s": samples / train_s,
        "cpu_s": cpu,
        "cpu_samples_per_s": samples / cpu,
        "train_cpu_samples_per_s": samples / train_cpu_s,
        "fixed_cost_fraction": wall / train_s - 1.0,
        "bytes": result.bytes_sent,
        "phases": phases,
    }


def _worker_unsplit(clients: int, steps: int, channels_last: bool, compute_dtype: str) -> dict:
    import torch

    from hfgan_core.config import DomainConfig, RunConfig, RuntimeConfig, ScenarioConfig, TrainConfig
    from hfgan_core.data import TensorClientData
    from hfgan_core.runtime.unsplit import UnsplitGAN

    rt, tr = _settings(channels_last, compute_dtype)
    cfg = RunConfig(
        scenario=ScenarioConfig(domains=(DomainConfig("synthetic", 1),)),
        train=TrainConfig(**tr),
        runtime=RuntimeConfig(**rt),
    ).validate()
    model = UnsplitGAN(cfg)
    data = TensorClientData.random(1024 * clients, 99)
    g = torch.Generator().manual_seed(0)
    batch = 64 * clients

    def step() -> None:
        x, y = data.batch(g, batch)
        model.train_step(x, y, torch.randn(batch, cfg.model.z_dim, generator=g))

    step()  # warm up kernels and the allocator, outside the timing
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    samples = batch * steps
    return {
        "wall_s": wall,
        "samples": samples,
        "samples_per_s": samples / wall,
        "cpu_s": cpu,
        "cpu_samples_per_s": samples / cpu,
    }


def worker(args: argparse.Namespace) -> int:
    import torch

    sys.path.insert(0, args.tree)
    torch.set_num_threads(args.threads)
    if args.worker == "unsplit":
        out = _worker_unsplit(args.clients, args.steps, args.channels_last, args.compute_dtype)
    else:
        out = _worker_embedded(args.clients, args.steps, args.wire, args.channels_last, args.compute_dtype)
    import hfgan_core

    out["code"] = str(Path(hfgan_core.__file__).parent)
    print(json.dumps(out))
    return 0


# ------------------------------------------------------------------------------------------------- the driver
def run_one(tree: str, kind: str, args: argparse.Namespace, flags: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--tree", tree, "--clients", str(args.clients)]
    cmd += ["--steps", str(args.steps), "--wire", args.wire, "--threads", str(args.threads), *flags]
    env = {**os.environ, "PYTHONPATH": tree}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} in {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _best(runs: list[dict], key: str) -> dict:
    return max(runs, key=lambda r: r[key])


def summarize(runs: dict[str, list[dict]]) -> dict:
    u, e = runs["unsplit"], runs["embedded"]
    return {
        "unsplit": _best(u, "samples_per_s"),
        "embedded_round": _best(e, "samples_per_s"),
        "embedded_steps": _best(e, "train_samples_per_s"),
        "fixed_cost_fraction_median": statistics.median(r["fixed_cost_fraction"] for r in e),
        "runs": runs,
    }


ROWS = (
    ("unsplit", "samples_per_s", "UnsplitGAN"),
    ("embedded_steps", "train_samples_per_s", "embedded, training steps only"),
    ("embedded_round", "samples_per_s", "embedded, whole round"),
)
# The same rows by CPU time (samples per CPU-second of the process): the comparison to trust when the machine is
# shared, above all with one torch thread.
CPU_ROWS = (
    ("unsplit", "cpu_samples_per_s", "UnsplitGAN"),
    ("embedded_steps", "train_cpu_samples_per_s", "embedded, training steps only"),
    ("embedded_round", "cpu_samples_per_s", "embedded, whole round"),
)


def compare(new: dict[str, list[dict]], base: dict[str, list[dict]], summaries: dict, name: str) -> dict:
    """Ratios of a variant to the baseline: of the best runs, and the median of the per-repeat ratios."""
    kinds = {"unsplit": "unsplit", "embedded_steps": "embedded", "embedded_round": "embedded"}
    per = {
        row: [n[key] / b[key] for n, b in zip(new[kinds[row]], base[kinds[row]], strict=True)] for row, key, _ in ROWS
    }
    best = {row: summaries[name][row][key] / summaries["baseline"][row][key] for row, key, _ in ROWS}
    cpu = {
        row: statistics.median(n[key] / b[key] for n, b in zip(new[kinds[row]], base[kinds[row]], strict=True))
        for row, key, _ in CPU_ROWS
    }
    return {
        "best_of": best,
        "median_of_repeats": {k: statistics.median(v) for k, v in per.items()},
        "per_repeat": per,
        "cpu_time_median_of_repeats": cpu,
    }


def print_tables(out: dict, repeats: int) -> None:
    variants = out["variants"]
    first = next(iter(variants.values()))["unsplit"]["samples_per_s"]
    batch = out["batch_per_client"] * out["clients"]
    print(f"| code | what | samples/s (best of {out['repeats_done']}) | vs the first row |\n|---|---|---|---|")
    for name, v in variants.items():
        for row, key, label in ROWS:
            label = f"{label}, batch {batch}" if row == "unsplit" else label
            print(f"| {name} | {label} | {v[row][key]:.1f} | {v[row][key] / first:.2f} |")
    for name, v in variants.items():
        if "vs_baseline" in v:
            for how in ("best_of", "median_of_repeats", "cpu_time_median_of_repeats"):
                ratios = {k: round(x, 3) for k, x in v["vs_baseline"][how].items()}
                print(f"{name} / baseline ({how}): {json.dumps(ratios)}")
        ph = v["embedded_round"]["phases"]
        print(f"{name}, phases of its best round (s): " + ", ".join(f"{k} {x:.2f}" for k, x in ph.items()))


def report(args: argparse.Namespace, variants: list, runs: dict, repeats_done: int) -> dict:
    out = {
        "clients": args.clients,
        "steps": args.steps,
        "batch_per_client": 64,
        "wire_dtype": args.wire,
        "torch_threads": args.threads,
        "repeats_done": repeats_done,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "variants": {name: summarize(runs[name]) for name, _, _ in variants},
    }
    if args.baseline_tree:
        for name, _, _ in variants[1:]:
            out["variants"][name]["vs_baseline"] = compare(runs[name], runs["baseline"], out["variants"], name)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wire", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--channels-last", action="store_true", help="also measure this tree with runtime.channels_last")
    ap.add_argument(
        "--bfloat16", action="store_true", help="also measure this tree with train.compute_dtype = bfloat16"
    )
    ap.add_argument("--compute-dtype", default="float32", help=argparse.SUPPRESS)  # a worker's setting
    ap.add_argument("--baseline-tree", default=None, help="an older checkout to measure in the same window")
    ap.add_argument("--out", default="bench/results/embedded.json")
    ap.add_argument("--worker", choices=("unsplit", "embedded"), help=argparse.SUPPRESS)
    ap.add_argument("--tree", default=str(HERE), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    # (name, tree, worker flags): the settings that change the numerical path are variants of this tree.
    variants: list[tuple[str, str, tuple[str, ...]]] = [("this", str(HERE), ())]
    if args.channels_last:
        variants.append(("this+channels_last", str(HERE), ("--channels-last",)))
    if args.bfloat16:
        variants.append(("this+bfloat16", str(HERE), ("--compute-dtype", "bfloat16")))
    if args.bfloat16 and args.channels_last:
        variants.append(("this+bfloat16+channels_last", str(HERE), ("--compute-dtype", "bfloat16", "--channels-last")))
    if args.baseline_tree:
        variants.insert(0, ("baseline", str(Path(args.baseline_tree).resolve()), ()))
    runs: dict[str, dict[str, list[dict]]] = {name: {"unsplit": [], "embedded": []} for name, _, _ in variants}
    for i in range(args.repeats):
        for name, tree, flags in variants:
            for kind in ("unsplit", "embedded"):
                r = run_one(tree, kind, args, flags)
                runs[name][kind].append(r)
                extra = f" (steps only {r['train_samples_per_s']:.1f})" if kind == "embedded" else ""
                print(f"repeat {i + 1} {name} {kind}: {r['samples_per_s']:.1f} samples/s{extra}", file=sys.stderr)
        # Written after every complete repeat: on a loaded machine a long run may not be allowed to finish.
        out = report(args, variants, runs, i + 1)
    print_tables(out, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
