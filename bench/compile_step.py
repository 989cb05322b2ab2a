"""`torch.compile` on the training step: does it pay for itself within a round?

    python bench/compile_step.py [--batch 256,64] [--steps 6] [--threads 2] [--out bench/results/compile_step.json]

`UnsplitGAN` (the same G and D the split runtime runs, one process) eager and with every block compiled by
inductor (`dynamic=False`: with automatic dynamic shapes torch 2.13 recompiles the D blocks, which see the detached
and the attached fakes, and inductor fails on the dynamic backward). Per batch size: the first step (which compiles),
the second, and the mean of `--steps` steady steps, eager and compiled interleaved in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from hfgan_core.config import DomainConfig, RunConfig, ScenarioConfig
from hfgan_core.runtime.unsplit import UnsplitGAN


def unsplit_step_inputs(batch: int) -> tuple[UnsplitGAN, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fresh `UnsplitGAN` of the default model and one fixed synthetic batch (images, labels, noise) for it."""
    cfg = RunConfig(scenario=ScenarioConfig(domains=(DomainConfig("synthetic", 1),))).validate()
    model = UnsplitGAN(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, *cfg.model.image_shape, generator=g) * 2 - 1
    y = torch.randint(0, cfg.model.num_classes, (batch,), generator=g)
    z = torch.randn(batch, cfg.model.z_dim, generator=g)
    return model, x, y, z


def measure(batch: int, steps: int, compiled: bool) -> dict:
    model, x, y, z = unsplit_step_inputs(batch)
    if compiled:
        for blocks in (model.G, model.D):
            for i in blocks:
                blocks[i] = torch.compile(blocks[i], dynamic=False)
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        model.train_step(x, y, z)
        times.append(time.perf_counter() - t0)
    steady = sum(times[2:]) / steps
    return {
        "first_step_s": times[0],
        "second_step_s": times[1],
        "steady_step_s": steady,
        "samples_per_s": batch / steady,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="256,64", help="comma-separated batch sizes")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/compile_step.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print("| batch | eager samples/s | compiled samples/s | compiled / eager | first compiled step (s) |")
    print("|---|---|---|---|---|")
    for batch in (int(b) for b in args.batch.split(",")):
        eager, comp = measure(batch, args.steps, False), measure(batch, args.steps, True)
        rows.append({"batch": batch, "eager": eager, "compiled": comp})
        ratio = comp["samples_per_s"] / eager["samples_per_s"]
        print(
            f"| {batch} | {eager['samples_per_s']:.1f} | {comp['samples_per_s']:.1f} | {ratio:.2f} | "
            f"{comp['first_step_s']:.1f} |",
            flush=True,
        )
    out = {"torch": torch.__version__, "threads": args.threads, "load_average_at_end": os.getloadavg(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
