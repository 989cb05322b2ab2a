"""Embedded runtime against the same model trained unsplit in one process: samples per second, and their ratio.

    python bench/embedded.py [--clients 4] [--steps 24] [--repeats 3] [--out bench/results/embedded.json]

The embedded side is a real run: every role, every message encoded and decoded through the memory transport,
clustering and aggregation at the end of the round (no evaluation). The baseline is `UnsplitGAN` on the
concatenated batch (clients x 64), one D step and one G step per iteration: the floor the paper's reference
code measures against. Both run in this process, interleaved, on the same threads; the best of `--repeats` runs of
each is compared.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hfgan_core.config import DomainConfig, RunConfig, ScenarioConfig, TrainConfig  # noqa: E402
from hfgan_core.data import TensorClientData  # noqa: E402
from hfgan_core.runtime.embedded import EmbeddedRunner  # noqa: E402
from hfgan_core.runtime.unsplit import UnsplitGAN  # noqa: E402

CUTS = ((0, 0, 0, 0), (1, 1, 1, 1), (1, 0, 1, 0), (1, 1, 1, 0))


def embedded_run(clients: int, steps: int, wire: str) -> dict:
    cfg = RunConfig(
        scenario=ScenarioConfig(domains=(DomainConfig("synthetic", clients),)),
        train=TrainConfig(rounds=1, local_epochs=1, steps_per_epoch=steps, cuts=CUTS, wire_dtype=wire),
    ).validate()
    datas = [TensorClientData.random(1024, i) for i in range(clients)]
    runner = EmbeddedRunner(cfg, datas, [0] * clients, run_id="bench")
    t0 = time.perf_counter()
    result = runner.run()
    wall = time.perf_counter() - t0
    server = result.reports[0].server_metrics
    train_s = server["window_s"] * server["windows"]
    samples = clients * cfg.train.batch_size * steps
    return {
        "wall_s": wall,
        "train_s": train_s,
        "samples": samples,
        "samples_per_s": samples / wall,
        "train_samples_per_s": samples / train_s,
        "bytes": result.bytes_sent,
        "bytes_per_step": result.bytes_sent / steps,
    }


def unsplit_run(clients: int, steps: int) -> dict:
    cfg = RunConfig(scenario=ScenarioConfig(domains=(DomainConfig("synthetic", 1),))).validate()
    model = UnsplitGAN(cfg)
    data = TensorClientData.random(1024 * clients, 99)
    g = torch.Generator().manual_seed(0)
    batch = 64 * clients
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = data.batch(g, batch)
        z = torch.randn(batch, cfg.model.z_dim, generator=g)
        model.train_step(x, y, z)
    wall = time.perf_counter() - t0
    samples = batch * steps
    return {"wall_s": wall, "samples": samples, "samples_per_s": samples / wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--wire", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--out", default="bench/results/embedded.json")
    args = ap.parse_args()
    unsplit_run(args.clients, 2)  # warm up kernels and allocator
    emb, uns = [], []
    for i in range(args.repeats):
        uns.append(unsplit_run(args.clients, args.steps))
        emb.append(embedded_run(args.clients, args.steps, args.wire))
        print(
            f"repeat {i + 1}: unsplit {uns[-1]['samples_per_s']:.1f} samples/s, embedded "
            f"{emb[-1]['samples_per_s']:.1f} samples/s (training only {emb[-1]['train_samples_per_s']:.1f})",
            file=sys.stderr,
        )
    best_e = max(emb, key=lambda r: r["samples_per_s"])
    best_u = max(uns, key=lambda r: r["samples_per_s"])
    out = {
        "clients": args.clients,
        "steps": args.steps,
        "batch_per_client": 64,
        "wire_dtype": args.wire,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "unsplit": best_u,
        "embedded": best_e,
        "ratio": best_e["samples_per_s"] / best_u["samples_per_s"],
        "ratio_training_only": best_e["train_samples_per_s"] / best_u["samples_per_s"],
        "runs": {"unsplit": uns, "embedded": emb},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(
        f"| runtime | samples/s | ratio |\n|---|---|---|\n"
        f"| unsplit, one process (batch {64 * args.clients}) | {best_u['samples_per_s']:.1f} | 1.00 |\n"
        f"| embedded, {args.clients} clients (whole round) | {best_e['samples_per_s']:.1f} | {out['ratio']:.2f} |\n"
        f"| embedded, steps only | {best_e['train_samples_per_s']:.1f} | {out['ratio_training_only']:.2f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
