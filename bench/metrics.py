"""What the Prometheus metrics cost: the embedded runtime with every role's metrics on against the same run with the
default no-op metrics, samples per second and their ratio.

    python bench/metrics.py [--clients 4] [--steps 16] [--repeats 3] [--out bench/results/metrics.json]

Both sides are real embedded runs (every role, every message encoded and decoded, clustering and aggregation at the
end of the round, no evaluation), interleaved in this process on the same threads; each role of the metrics side
has its own `PromMetrics` registry, as a worker process would (no HTTP server: a scrape is not part of the hot
path). The best of `--repeats` runs of each is compared. Also reported: the cost of one hook call, no-op and
Prometheus, against the time to encode one client message of the run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hfgan_core.config import DomainConfig, RunConfig, ScenarioConfig, TrainConfig  # noqa: E402
from hfgan_core.data import TensorClientData  # noqa: E402
from hfgan_core.protocol.messages import GHeadOut  # noqa: E402
from hfgan_core.runtime.embedded import EmbeddedRunner  # noqa: E402
from hfgan_core.runtime.metrics import Metrics, PromMetrics, total  # noqa: E402
from hfgan_core.runtime.metrics import parse_text as _parse  # noqa: E402

CUTS = ((0, 0, 0, 0), (1, 1, 1, 1), (1, 0, 1, 0), (1, 1, 1, 0))


def run(clients: int, steps: int, metrics: bool) -> dict:
    cfg = RunConfig(
        scenario=ScenarioConfig(domains=(DomainConfig("synthetic", clients),)),
        train=TrainConfig(rounds=1, local_epochs=1, steps_per_epoch=steps, cuts=CUTS),
    ).validate()
    datas = [TensorClientData.random(1024, i) for i in range(clients)]
    runner = EmbeddedRunner(cfg, datas, [0] * clients, run_id="bench")
    registries = []
    if metrics:
        for role in runner.roles:
            role.ctx.metrics = PromMetrics(role.name, "bench")
            registries.append(role.ctx.metrics)
    t0 = time.perf_counter()
    runner.run()
    wall = time.perf_counter() - t0
    samples = clients * cfg.train.batch_size * steps
    out = {"wall_s": wall, "samples_per_s": samples / wall}
    if metrics:
        from prometheus_client import generate_latest

        scraped = [_parse(generate_latest(m.registry).decode()) for m in registries]
        out["messages_counted"] = sum(total(s, "hfgan_messages_total") for s in scraped)
    return out


def hook_costs() -> dict:
    noop, prom = Metrics(), PromMetrics("client.0", "bench")
    msg = GHeadOut(run="bench", round=1, step=0, sender="client.0", client=0, act=torch.randn(64, 256, 7, 7))
    n = 20000
    encode_s = min(timeit.repeat(lambda: msg.encode("float32"), number=20, repeat=5)) / 20
    return {
        "noop_hook_s": min(timeit.repeat(lambda: noop.message("out", "g_head_out", 1000, 0.001), number=n, repeat=5))
        / n,
        "prometheus_hook_s": min(
            timeit.repeat(lambda: prom.message("out", "g_head_out", 1000, 0.001), number=n, repeat=5)
        )
        / n,
        "encode_g_head_out_s": encode_s,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/metrics.json")
    args = ap.parse_args()
    run(args.clients, 2, False)  # warm up kernels and allocator
    off, on = [], []
    for i in range(args.repeats):
        off.append(run(args.clients, args.steps, False))
        on.append(run(args.clients, args.steps, True))
        print(
            f"repeat {i + 1}: metrics off {off[-1]['samples_per_s']:.1f} samples/s, on {on[-1]['samples_per_s']:.1f}",
            file=sys.stderr,
        )
    best_off = max(off, key=lambda r: r["samples_per_s"])
    best_on = max(on, key=lambda r: r["samples_per_s"])
    hooks = hook_costs()
    out = {
        "clients": args.clients,
        "steps": args.steps,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "metrics_off": best_off,
        "metrics_on": best_on,
        "ratio": best_on["samples_per_s"] / best_off["samples_per_s"],
        "hooks": hooks,
        "runs": {"off": off, "on": on},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(
        "| embedded run | samples/s | ratio |\n|---|---|---|\n"
        f"| metrics off (no-op default) | {best_off['samples_per_s']:.1f} | 1.00 |\n"
        f"| metrics on (a registry per role) | {best_on['samples_per_s']:.1f} | {out['ratio']:.3f} |\n\n"
        "| one call | seconds |\n|---|---|\n"
        f"| no-op hook | {hooks['noop_hook_s']:.2e} |\n"
        f"| Prometheus hook (counter x2 + histogram) | {hooks['prometheus_hook_s']:.2e} |\n"
        f"| encode one g_head_out (64x256x7x7 float32) | {hooks['encode_g_head_out_s']:.2e} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
