"""One round of the paper's scenario 1 on an accelerator: the split runtime against the same computation unsplit.

    python bench/gpu_round.py [--device cuda] [--clients 20] [--steps 235] [--precisions float32,tf32,bfloat16]
                              [--out bench/results/gpu_round.json]

Scenario 1 is 20 MNIST clients, IID, batch 64, 5 local epochs of 47 steps (235 steps a round), cut bits planned from
the preset's device profiles. The data here is synthetic (the same shapes; speed does not depend on the pixels), so
the script needs nothing but this tree and torch. Per precision, in one process:

- `UnsplitGAN` on the pooled batch (clients x 64), `--steps` iterations: the floor a faithful implementation can
  approach on that card (the reference figures from an H100: 13.1 s a round in float32, 5.1 s with TF32 or bfloat16);
- the embedded runtime (`EmbeddedRunner`: every role in this process, the memory transport, real encoded messages)
  with the clients and the server on `--device`: its training steps (first client step to the server's last window)
  and its whole round (join, steps, clustering, aggregation, model distribution). The reference code took 75 s a round
  on that H100.

Precisions: `float32` (cuDNN's TF32 off), `tf32` (TF32 for convolutions and matmuls, the same float32 code), and
`bfloat16` (`train.compute_dtype = "bfloat16"`: autocast in the convolution blocks). Every number goes to stdout, and
the JSON to `--out` (and to `$OUT/gpu_round.json` when `$OUT` is set, the device machine's way of returning files).
On a CPU (`--device cpu --clients 2 --steps 2`) the same script checks itself in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

from hfgan_core.config import DomainConfig, load_config  # noqa: E402
from hfgan_core.data import TensorClientData  # noqa: E402
from hfgan_core.runtime.embedded import EmbeddedRunner  # noqa: E402
from hfgan_core.runtime.unsplit import UnsplitGAN  # noqa: E402

PRECISIONS = ("float32", "tf32", "bfloat16")
BATCH = 64


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def s1_config(clients: int, steps: int, device: str, precision: str):
    """The s1 preset with synthetic data of the same shapes, one round of `steps` steps, on `device`."""
    import dataclasses

    cfg = load_config("s1")
    scenario = dataclasses.replace(cfg.scenario, domains=(DomainConfig("synthetic", clients),))
    cfg = cfg.replace(scenario=scenario)
    cfg = cfg.with_overrides(
        "train",
        rounds=1,
        local_epochs=1,
        steps_per_epoch=steps,
        compute_dtype="bfloat16" if precision == "bfloat16" else "float32",
    )
    return cfg.with_overrides("runtime", device=device, server_device=device).validate()


def time_unsplit(cfg, clients: int, steps: int, device: str) -> dict:
    model = UnsplitGAN(cfg, device=device)
    data = TensorClientData.random(BATCH * clients * 4, 99)
    g = torch.Generator().manual_seed(0)
    batch = BATCH * clients

    def step() -> None:
        x, y = data.batch(g, batch)
        model.train_step(x, y, torch.randn(batch, cfg.model.z_dim, generator=g))

    step()  # kernels chosen, memory allocated: outside the timing
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    wall = time.perf_counter() - t0
    return {"round_s": wall, "samples_per_s": batch * steps / wall}


def time_embedded(cfg, clients: int, steps: int, device: str) -> dict:
    from hfgan_core.runtime.client import ClientRole
    from hfgan_core.runtime.server import ServerRole

    marks: dict[str, float] = {}
    start, close = ClientRole._start_step, ServerRole._close_window

    def first_step(self, *a, **k):
        marks.setdefault("first_step", time.perf_counter())
        return start(self, *a, **k)

    def last_window(self, *a, **k):
        try:
            return close(self, *a, **k)
        finally:
            sync(device)
            marks["last_window"] = time.perf_counter()

    ClientRole._start_step, ServerRole._close_window = first_step, last_window
    try:
        # Scenario 1 shares 60,000 MNIST images among the clients (the cap the coordinator admits).
        datas = [TensorClientData.random(60000 // clients, i) for i in range(clients)]
        runner = EmbeddedRunner(cfg, datas, [0] * clients, run_id="gpu-round")
        sync(device)
        t0 = time.perf_counter()
        result = runner.run()
        sync(device)
        wall = time.perf_counter() - t0
    finally:
        ClientRole._start_step, ServerRole._close_window = start, close
    steps_s = marks["last_window"] - marks["first_step"]
    samples = BATCH * clients * steps
    return {
        "round_s": wall,
        "steps_s": steps_s,
        "samples_per_s_steps": samples / steps_s,
        "samples_per_s_round": samples / wall,
        "bytes_sent": result.bytes_sent,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--steps", type=int, default=235, help="steps of the round (scenario 1: 5 epochs x 47)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--out", default="bench/results/gpu_round.json")
    args = ap.parse_args(argv)
    precisions = [p for p in args.precisions.split(",") if p]
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        ap.error(f"unknown precision(s) {', '.join(unknown)} (known: {', '.join(PRECISIONS)})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here (use --device cpu to check the script)")
    name = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else (platform.processor() or platform.machine())
    )
    print(
        f"device {args.device} ({name}), torch {torch.__version__}, {args.clients} clients x batch {BATCH}, "
        f"{args.steps} steps a round",
        flush=True,
    )
    rows = []
    for precision in precisions:
        set_tf32(precision == "tf32")
        cfg = s1_config(args.clients, args.steps, args.device, precision)
        unsplit = time_unsplit(cfg, args.clients, args.steps, args.device)
        print(
            f"{precision}: unsplit {unsplit['round_s']:.2f} s a round ({unsplit['samples_per_s']:.0f} samples/s)",
            flush=True,
        )
        embedded = time_embedded(cfg, args.clients, args.steps, args.device)
        print(
            f"{precision}: embedded steps {embedded['steps_s']:.2f} s, whole round {embedded['round_s']:.2f} s "
            f"({embedded['samples_per_s_steps']:.0f} samples/s in the steps); embedded steps / unsplit "
            f"{embedded['steps_s'] / unsplit['round_s']:.2f}",
            flush=True,
        )
        rows.append({"precision": precision, "unsplit": unsplit, "embedded": embedded})
    set_tf32(False)
    out = {
        "device": args.device,
        "device_name": name,
        "torch": torch.__version__,
        "clients": args.clients,
        "steps": args.steps,
        "batch_per_client": BATCH,
        "rows": rows,
    }
    text = json.dumps(out, indent=2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_round.json").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
