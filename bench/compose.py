"""Compose benchmark: the stack in containers against `hfgan up` (the same roles as local processes), same config.

    python bench/compose.py [--config tests/compose/configs/stack4.toml] [--clients 4] [--aggregators 2]
                            [--amqp amqp://guest:guest@127.0.0.1:5672/%2F] [--redis redis://127.0.0.1:6379/15]
                            [--out bench/results/compose.json]

Both runs happen in this process, one after the other, on this machine: `hfgan up` with the local RabbitMQ and
Redis (a throw-away namespace and run id, deleted afterwards), then `docker-compose up` of compose.yaml with the
local images (deploy/compose.local.yaml; scripts/compose-images.sh builds them) in a Compose project of its own,
removed with its volumes afterwards. Measured:

- `up -> round 1`: from the start command to the ledger's round 1 (polled every second): container start, imports,
  data, the coordinator's scoring classifier, admission;
- each round's wall time (`wall_s` in metrics.jsonl, the coordinator's clock) and the whole run;
- the ratio containers / processes of the mean round time;
- the image sizes (`docker image inspect`), and the load average before and after (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hfgan_core.state import open_store  # noqa: E402
from hfgan_core.transport import open_transport  # noqa: E402
from tests.compose.conftest import Stack, free_host_ports  # noqa: E402

IMAGES = ("hfgan:local", "hfgan-local/python:3.11", "hfgan-local/rabbitmq:3.10-management", "hfgan-local/redis:7")


def image_sizes() -> dict[str, float]:
    out = {}
    for image in IMAGES:
        res = subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", image], capture_output=True, text=True)
        if res.returncode == 0:
            out[image] = round(int(res.stdout.strip()) / 1e6, 1)
    return out


def rounds(metrics: str) -> list[float]:
    return [json.loads(line)["wall_s"] for line in metrics.splitlines() if line.strip()]


def run_processes(args: argparse.Namespace, tmp: Path) -> dict:
    run, namespace = f"bench-up-{uuid.uuid4().hex[:8]}", f"bench{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HFGAN_")} | {"OMP_NUM_THREADS": "1"}
    env["HFGAN_CLASSIFIER_DIR"] = str(tmp / "classifiers")
    cmd = [sys.executable, "-m", "hfgan_core.cli", "up", "--config", args.config, "--clients", str(args.clients)]
    cmd += ["--aggregators", str(args.aggregators), "--broker", args.amqp, "--state", args.redis]
    cmd += ["--namespace", namespace, "--run-id", run, "--run-dir", str(tmp / "run"), "--data-dir", str(tmp / "data")]
    cmd += ["--no-utility", "--quiet"]
    store = open_store(args.redis)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    try:
        while proc.poll() is None:
            if first is None and store.get_round(run)[0] >= 1:
                first = time.monotonic() - t0
            time.sleep(1.0)
        total = time.monotonic() - t0
        err = proc.stderr.read() if proc.stderr else ""
        if proc.returncode != 0:
            raise SystemExit(f"hfgan up failed ({proc.returncode}): {err[-2000:]}")
        return {
            "up_to_round1_s": first,
            "total_s": total,
            "round_s": rounds((tmp / "run" / "metrics.jsonl").read_text()),
        }
    finally:
        if proc.poll() is None:
            proc.kill()
        store.delete_run(run)
        store.close()
        t = open_transport(args.amqp, namespace=namespace)
        try:
            t.delete_topology(range(args.clients))
        finally:
            t.close()


def run_containers(args: argparse.Namespace) -> dict:
    config_dir = Path(args.config).resolve().parent
    stack = Stack(
        "bench",
        {
            "HFGAN_CONFIG": f"/etc/hfgan/configs/{Path(args.config).name}",
            "HFGAN_CONFIG_DIR": str(config_dir),
            "HFGAN_RUN_ID": f"bench-compose-{uuid.uuid4().hex[:6]}",
            "HFGAN_NO_UTILITY": "1",
            **free_host_ports(),
        },
    )
    try:
        t0 = time.monotonic()
        stack.up(f"client={args.clients}", f"aggregator={args.aggregators}")
        first = stack.wait("round 1", lambda: stack.ledger_round()[0] >= 1, every_s=1.0)
        stack.wait_finished()
        total = time.monotonic() - t0
        return {
            "up_to_round1_s": first,
            "total_s": total,
            "round_s": rounds(stack.read(f"/runs/{stack.run_id}/metrics.jsonl")),
        }
    finally:
        stack.down(volumes=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "tests/compose/configs/stack4.toml"))
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--aggregators", type=int, default=2)
    ap.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    ap.add_argument("--out", default=str(ROOT / "bench/results/compose.json"))
    args = ap.parse_args()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-compose-") as tmp:
        processes = run_processes(args, Path(tmp))
    containers = run_containers(args)
    mean = {k: sum(v["round_s"]) / len(v["round_s"]) for k, v in (("p", processes), ("c", containers))}
    doc = {
        "config": args.config,
        "clients": args.clients,
        "aggregators": args.aggregators,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "loadavg_before": load0,
        "loadavg_after": os.getloadavg(),
        "processes": processes,
        "containers": containers,
        "round_ratio_containers_over_processes": mean["c"] / mean["p"],
        "image_mb": image_sizes(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print("| | up -> round 1 (s) | rounds (s) | whole run (s) |")
    print("|---|---|---|---|")
    for name, r in (("`hfgan up` (processes)", processes), ("compose (containers)", containers)):
        walls = ", ".join(f"{w:.1f}" for w in r["round_s"])
        print(f"| {name} | {r['up_to_round1_s']:.1f} | {walls} | {r['total_s']:.1f} |")
    print(f"\nmean round, containers / processes: {doc['round_ratio_containers_over_processes']:.2f}")
    print("images (MB): " + ", ".join(f"{k} {v}" for k, v in doc["image_mb"].items()))
    print(f"load average before {load0[0]:.1f}, after {doc['loadavg_after'][0]:.1f} ({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
