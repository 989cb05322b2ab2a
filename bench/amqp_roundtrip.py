"""The AMQP transport's cost per megabyte of split traffic, in one process: publish (confirmed, transient) messages of
split size to N client queues and consume them again, as the server's fan-out and the clients do in an embedded run
over the broker. Interleaves the socket read sizes given, so old and new behaviour share one window.

    python bench/amqp_roundtrip.py [--messages 96] [--mb 2] [--fan 4] [--repeats 3] [--read-bytes 4096,131072]
                                   [--out bench/results/amqp_roundtrip.json]

Per run: wall ms per MB (and the part spent inside `publish`, which waits for the broker's confirm), CPU ms per MB
of this process and of the local broker processes (`beam.smp`, summed over every broker on the machine: other
users' traffic counts too). `--read-bytes 4096` is pika's own read size, what the transport used before it set
`connection.RECV_BYTES`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.system_instrument import service_cpu_s  # noqa: E402
from hfgan_core.transport.amqp import AmqpTransport  # noqa: E402
from hfgan_core.transport.amqp import connection as amqp_connection  # noqa: E402


def one_run(url: str, messages: int, size: int, fan: int, read_bytes: int) -> dict:
    amqp_connection.RECV_BYTES = read_bytes
    amqp_connection.CONSUME_BYTES_PER_WAKEUP = max(100 * 1024, 8 * read_bytes) if read_bytes > 4096 else 100 * 1024
    t = AmqpTransport(url, namespace=f"brt-{uuid.uuid4().hex[:10]}", name="bench-amqp-roundtrip")
    got: list[int] = []
    try:
        t.declare()
        for c in range(fan):
            t.consume(f"client.{c}", lambda d: (got.append(len(d.body)), d.ack()))
        body = os.urandom(size)
        c0, s0, w0, pub = time.process_time(), service_cpu_s(), time.perf_counter(), 0.0
        for i in range(messages // fan):
            p0 = time.perf_counter()
            for c in range(fan):
                t.publish(f"client.{c}", body, persistent=False)
            pub += time.perf_counter() - p0
            while len(got) < (i + 1) * fan:
                t.process(0.5)
        wall, cpu, s1 = time.perf_counter() - w0, time.process_time() - c0, service_cpu_s()
    finally:
        with contextlib.suppress(Exception):
            t.delete_topology(clients=range(fan))
        t.close()
    mb = len(got) * size / 1e6
    return {
        "read_bytes": read_bytes,
        "mb": mb,
        "wall_ms_per_mb": wall / mb * 1e3,
        "publish_ms_per_mb": pub / mb * 1e3,
        "cpu_ms_per_mb": cpu / mb * 1e3,
        "broker_cpu_ms_per_mb": (s1.get("beam.smp", 0.0) - s0.get("beam.smp", 0.0)) / mb * 1e3,
        "load_average": list(os.getloadavg()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=96)
    ap.add_argument("--mb", type=float, default=2.0, help="message size (2 MB: a split message in float16)")
    ap.add_argument("--fan", type=int, default=4, help="client queues (messages published before waiting)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--read-bytes", default="4096,131072")
    ap.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    ap.add_argument("--out", default="bench/results/amqp_roundtrip.json")
    args = ap.parse_args()
    sizes = [int(x) for x in args.read_bytes.split(",") if x.strip()]
    old = amqp_connection.RECV_BYTES, amqp_connection.CONSUME_BYTES_PER_WAKEUP
    runs = []
    try:
        for rep in range(args.repeats):
            for n in sizes[rep % len(sizes) :] + sizes[: rep % len(sizes)]:
                r = one_run(args.amqp, args.messages, int(args.mb * 1e6), args.fan, n)
                runs.append(r)
                print(
                    f"read {n:>7} B: wall {r['wall_ms_per_mb']:.2f} ms/MB (publish {r['publish_ms_per_mb']:.2f}), "
                    f"cpu {r['cpu_ms_per_mb']:.2f} ms/MB, broker {r['broker_cpu_ms_per_mb']:.2f} ms/MB, "
                    f"load {r['load_average'][0]:.1f}",
                    flush=True,
                )
    finally:
        amqp_connection.RECV_BYTES, amqp_connection.CONSUME_BYTES_PER_WAKEUP = old
    summary = {
        str(n): {
            k: statistics.median(r[k] for r in runs if r["read_bytes"] == n)
            for k in ("wall_ms_per_mb", "publish_ms_per_mb", "cpu_ms_per_mb", "broker_cpu_ms_per_mb")
        }
        for n in sizes
    }
    print(json.dumps(summary, indent=1))
    out = {"bench": "amqp_roundtrip", "args": {**vars(args), "amqp": args.amqp.split("@")[-1]}, "median": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**out, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
