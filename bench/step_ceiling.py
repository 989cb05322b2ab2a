"""How much faster can the float32 training step get on this CPU without changing its arithmetic?

    python bench/step_ceiling.py [--batch 64,256] [--steps 4] [--threads 2] [--out bench/results/step_ceiling.json]

The step (`UnsplitGAN.train_step`, which the split runtime matches to 0.97-1.02 in speed) is timed, and
`torch.profiler` splits it into the time inside the convolutions and matrix products (oneDNN / MKL kernels) and
everything else (BatchNorm, activations, the loss, Adam, copies, Python). The multiply-adds those kernels must do
per step are counted from the model's layers (`planning.compute_costs`, transposed convolutions on their input
size, their true work), and the CPU's attainable float32 rate is measured as a large square matrix product on the
same threads, in the same process, minutes apart at most. From these:

- `kernel_rate_of_peak`: the rate the step's kernels achieve, as a share of the matrix-product peak;
- ceilings, as speed-ups over the measured step: every kernel at the peak and the rest unchanged
  (`ceiling_kernels_at_peak`); the rest costing nothing and the kernels unchanged (`ceiling_rest_free`); both
  (`ceiling_both`, the step as pure arithmetic at the peak rate, which no implementation reaches).

A faster path that keeps the arithmetic (bit-identical results, as the repository's other speed changes are) cannot
beat `ceiling_both`; one that does not (bfloat16, another convolution algorithm, channels-last) is a different
numerical path behind its own flag (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.compile_step import unsplit_step_inputs  # noqa: E402
from hfgan_core.config import ModelConfig  # noqa: E402
from hfgan_core.planning.costs import LayerCost, compute_costs  # noqa: E402

WEIGHT_LAYERS = ("Linear", "Conv2d", "ConvTranspose2d")
# The profiler's names for the kernels counted as "matrix work". Transposed convolutions forward run inside
# aten::_convolution (oneDNN is called through a dispatch stub, not an operator), so its self time is theirs.
KERNEL_OPS = (
    "aten::mkldnn_convolution",
    "aten::_convolution",
    "aten::convolution_backward",
    "aten::mm",
    "aten::addmm",
)


@dataclass(frozen=True)
class StepFlops:
    """Multiply-add FLOPs (2 per multiply-add, biases included) of the weight layers in one training step."""

    generator: float
    discriminator: float

    @property
    def total(self) -> float:
        return self.generator + self.discriminator


def _weight_layers(layers: tuple[LayerCost, ...]) -> list[LayerCost]:
    return [la for la in layers if la.kind in WEIGHT_LAYERS]


def step_flops(model: ModelConfig, batch: int) -> StepFlops:
    """FLOPs of the step's matrix work at this batch size.

    The step (runtime/unsplit.py): G forward once and backward once (weights and inputs, none into z); D forward
    three times (detached fakes, reals, fakes again) and backward twice in full (weights and inputs, none into the
    images); then once more into its input only for the G step (weight gradients left out). An input gradient costs
    what the forward costs; `compute_costs` counts a full backward (2 x forward, the first weight layer 1 x).
    """
    costs = compute_costs(model, batch_size=1, cost_model="corrected")
    g = _weight_layers(costs.generator.layers)
    d = _weight_layers(costs.discriminator.layers)
    g_flops = sum(la.fwd_flops + la.bwd_flops for la in g)
    # The G step's pass through D computes input gradients only: the forward's multiplies, without the bias.
    d_flops = sum(3 * la.fwd_flops + 2 * la.bwd_flops + (la.fwd_flops - _bias_flops(la)) for la in d)
    return StepFlops(float(g_flops * batch), float(d_flops * batch))


def _bias_flops(layer: LayerCost) -> int:
    # compute_costs adds one FLOP per output element for the bias (every weight layer of these models has one).
    return math.prod(layer.out_shape)


def gemm_peak(threads: int, sizes: tuple[int, ...] = (2048, 3072), reps: int = 4) -> float:
    """Best float32 FLOP/s of a square matrix product on these threads (what MKL's GEMM attains here)."""
    if not sizes or min(sizes) < 1:
        raise ValueError(f"matrix sizes must be positive, got {sizes}")
    torch.set_num_threads(threads)
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up: MKL's buffers and the threads' first touch
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def measure_step(batch: int, steps: int) -> dict:
    """Wall time of `steps` training steps and, from a profiled repeat, the share inside the kernels."""
    model, x, y, z = unsplit_step_inputs(batch)
    model.train_step(x, y, z)  # warm-up: oneDNN primitive creation, Adam state
    t0 = time.perf_counter()
    for _ in range(steps):
        model.train_step(x, y, z)
    step_s = (time.perf_counter() - t0) / steps

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            model.train_step(x, y, z)
        profiled_step_s = (time.perf_counter() - t0) / steps
    kernel_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in KERNEL_OPS)
    # The profiler's own bookkeeping slows the profiled steps; the kernels' share of those steps is applied to
    # the unprofiled step time.
    kernel_share = min(1.0, kernel_us / 1e6 / steps / profiled_step_s)
    return {"step_s": step_s, "profiled_step_s": profiled_step_s, "kernel_share": kernel_share}


def ceilings(step_s: float, kernel_share: float, flops: float, peak: float) -> dict:
    kernel_s = step_s * kernel_share
    rest_s = step_s - kernel_s
    at_peak_s = flops / peak
    return {
        "kernel_s": kernel_s,
        "rest_s": rest_s,
        "kernel_rate_flops": flops / kernel_s if kernel_s > 0 else float("nan"),
        "kernel_rate_of_peak": at_peak_s / kernel_s if kernel_s > 0 else float("nan"),
        "ceiling_kernels_at_peak": step_s / (at_peak_s + rest_s),
        "ceiling_rest_free": step_s / kernel_s if kernel_s > 0 else float("inf"),
        "ceiling_both": step_s / at_peak_s,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="64,256", help="comma-separated batch sizes (64: a client's, 256: 4 clients')")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per measurement (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gemm-sizes", default="2048,3072", help="square matrix sizes tried for the peak")
    ap.add_argument("--out", default="bench/results/step_ceiling.json")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.threads < 1:
        ap.error("--steps and --threads must be at least 1")
    batches = [int(b) for b in args.batch.split(",")]
    if not batches or any(b < 1 for b in batches):
        ap.error("--batch needs positive batch sizes")
    sizes = tuple(int(n) for n in args.gemm_sizes.split(","))
    torch.set_num_threads(args.threads)
    model_cfg = ModelConfig()
    peaks = [gemm_peak(args.threads, sizes)]
    rows = []
    print(
        "| batch | step (s) | samples/s | kernels' share of the step | GFLOP per step | kernels' GFLOP/s | of the GEMM "
        "peak | ceiling: kernels at peak | ceiling: rest free | ceiling: both |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for batch in batches:
        flops = step_flops(model_cfg, batch).total
        m = measure_step(batch, args.steps)
        peaks.append(gemm_peak(args.threads, sizes))
        # The peak measured on either side of this step measurement: the better of the two, so the ceilings are
        # not inflated by a moment of contention during the matrix product.
        peak = max(peaks[-2:])
        c = ceilings(m["step_s"], m["kernel_share"], flops, peak)
        rows.append({"batch": batch, "gflop_per_step": flops / 1e9, "gemm_peak_gflops": peak / 1e9, **m, **c})
        print(
            f"| {batch} | {m['step_s']:.3f} | {batch / m['step_s']:.1f} | {m['kernel_share']:.0%} | {flops / 1e9:.1f} "
            f"| {c['kernel_rate_flops'] / 1e9:.0f} | {c['kernel_rate_of_peak']:.0%} | "
            f"{c['ceiling_kernels_at_peak']:.2f}x | {c['ceiling_rest_free']:.2f}x | {c['ceiling_both']:.2f}x |",
            flush=True,
        )
    print(f"GEMM peak (float32, {args.threads} threads): " + ", ".join(f"{p / 1e9:.0f}" for p in peaks) + " GFLOP/s")
    out = {
        "bench": "step_ceiling",
        "torch": torch.__version__,
        "threads": args.threads,
        "steps": args.steps,
        "machine": platform.processor() or platform.machine(),
        "gemm_peaks_gflops": [p / 1e9 for p in peaks],
        "load_average_at_end": os.getloadavg(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
