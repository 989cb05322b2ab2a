"""System benchmark: the broker (RabbitMQ + Redis) against the embedded runtime (memory), by clients and wire dtype.

    python bench/system.py [--clients 1,2,4,8] [--steps 6] [--repeats 2] [--wire float32,float16]
                           [--out bench/results/system.json]

Every run is a real round of the real roles in this process (`EmbeddedRunner`): one synthetic domain, N clients,
fixed cut bits cycling (0,0,0,0), (1,1,1,1), (1,0,1,0), (1,1,1,0), batch 64, `--steps` steps, then clustering and
aggregation (no evaluation). The backends differ only in what carries the messages and the ledger:

- `memory`: MemoryTransport + MemoryRoundStore (the embedded default);
- `amqp`: AmqpTransport on `--amqp` (a throw-away namespace, deleted afterwards) + RedisRoundStore on `--redis`
  (a unique run id, its keys deleted afterwards).

All runs of one invocation are interleaved (repeat by repeat, the order rotating) in one process with the same
torch threads, so the machine's drift hits every variant alike; the best repeat of each variant is reported.

Measures, per run:
- client-steps/s = clients x steps / the training span: from the first to the last split message (split traffic is
  what is published with `persistent=False`). Also against the server's window time (windows x window_s of the
  RoundReport, the time the server spends in its windows) and the coordinator's whole-round wall (join, training,
  clustering, aggregation, model distribution);
- bytes on the wire per client-step: the transport's `published_bytes` (message bodies; AMQP framing and headers
  are not counted), split traffic and everything;
- where the transport's own time goes: inside `publish` (with publisher confirms), receiving (`process` minus the
  handlers it runs), and the round store's calls; the rest is the roles' work (encode, decode, compute), the same
  for both backends;
- CPU seconds per client-step of this process and of the local broker and Redis (from /proc): unlike wall time,
  hardly changed by other load on a shared machine (but the broker's count includes anyone else's traffic on it);
  `cpu_ratio` in the JSON is memory's CPU over the broker backend's (all three processes);
- the ratio of each variant's throughput to memory float32 (the table), and the overhead ratio amqp / memory at
  the same wire dtype (the target: >= 0.9 at 4 and at 8 clients in float16).

`--profile N` adds one cProfile'd float16 run with N clients per broker backend and writes its top functions to
the JSON.

Experiments (`--backends memory,amqp,amqp-4k,amqp-noconfirm,amqp-4k-noconfirm`), changes made by this script
only, to measure what they gain or cost: `-4k` reads the socket 4 KiB at a time, pika's default and the transport's
behaviour before it read one broker frame (128 KiB) at a time (`connection.RECV_BYTES`);
`-noconfirm` publishes split traffic (transient) on a channel without publisher confirms.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.system_instrument import Tally, instrumented, service_cpu_s, time_store  # noqa: E402
from hfgan_core.config import DomainConfig, RunConfig, ScenarioConfig, TrainConfig  # noqa: E402
from hfgan_core.data import TensorClientData  # noqa: E402
from hfgan_core.runtime.embedded import EmbeddedRunner  # noqa: E402
from hfgan_core.state import MemoryRoundStore, RoundStore  # noqa: E402
from hfgan_core.transport import MemoryTransport, Transport  # noqa: E402

CUTS = ((0, 0, 0, 0), (1, 1, 1, 1), (1, 0, 1, 0), (1, 1, 1, 0))
BATCH = 64
MB = 1e6


# ------------------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Settings:
    steps: int
    amqp_url: str
    redis_url: str
    samples_per_client: int = 1024


def config(clients: int, wire: str, steps: int) -> RunConfig:
    return RunConfig(
        scenario=ScenarioConfig(name="bench-system", domains=(DomainConfig("synthetic", clients),)),
        train=TrainConfig(
            rounds=1, local_epochs=1, steps_per_epoch=steps, batch_size=BATCH, cuts=CUTS, wire_dtype=wire
        ),
    ).validate()


BACKENDS = ("memory", "amqp", "amqp-4k", "amqp-noconfirm", "amqp-4k-noconfirm")
PIKA_RECV_BYTES = 4 * 1024  # pika's own read size, `amqp-4k`


def unconfirmed_split(base: type[Transport]) -> type[Transport]:
    """EXPERIMENT: transient (split) messages go out on a second channel without publisher confirms, so a step's
    publishes do not each wait for the broker's round trip; persistent messages keep confirms. A lost split message
    would surface as a step deadline (the straggler path), not as an error at publish time."""

    class Unconfirmed(base):  # type: ignore[misc, valid-type]
        _fast: Any = None
        _fast_conn: Any = None

        def _send(self, exchange: str, key: str, frames: list, persistent: bool, mandatory: bool) -> None:
            if persistent:
                return super()._send(exchange, key, frames, persistent, mandatory)
            if self._fast is None or not self._fast.is_open or self._fast_conn is not self._conn:
                self._fast, self._fast_conn = self._conn.channel(), self._conn
            for headers, piece in frames:
                self._fast.basic_publish(exchange, key, bytes(piece), self._props(headers, persistent))

    Unconfirmed.__name__ = f"Unconfirmed{base.__name__}"
    return Unconfirmed


@contextlib.contextmanager
def pika_recv_bytes(n: int | None) -> Any:
    """EXPERIMENT: the socket read size of the connections the transport opens during the run (`-4k`: pika's 4 KiB
    and 100 KiB per wakeup, as before the transport raised them; each read is appended to pika's frame buffer with
    `bytes +=`, so megabyte messages cost thousands of reads and buffer copies)."""
    if not n:
        yield
        return
    from hfgan_core.transport.amqp import connection as amqp_connection

    old = amqp_connection.RECV_BYTES, amqp_connection.CONSUME_BYTES_PER_WAKEUP
    amqp_connection.RECV_BYTES, amqp_connection.CONSUME_BYTES_PER_WAKEUP = n, 100 * 1024
    try:
        yield
    finally:
        amqp_connection.RECV_BYTES, amqp_connection.CONSUME_BYTES_PER_WAKEUP = old


def backends(kind: str, s: Settings) -> tuple[Transport, RoundStore, Any]:
    """(transport, store, cleanup(run_id, clients)) of a backend."""
    if kind not in BACKENDS:
        raise SystemExit(f"unknown backend {kind!r} (known: {', '.join(BACKENDS)})")
    if kind == "memory":
        return instrumented(MemoryTransport)(), MemoryRoundStore(), lambda run, n: None
    from hfgan_core.state.redis import RedisRoundStore
    from hfgan_core.transport.amqp import AmqpTransport

    namespace = f"bsys-{uuid.uuid4().hex[:12]}"
    cls = unconfirmed_split(AmqpTransport) if "noconfirm" in kind else AmqpTransport
    transport = instrumented(cls)(s.amqp_url, namespace=namespace, name=f"bench-system-{namespace}")
    store = RedisRoundStore(s.redis_url)
    store.ping()

    def cleanup(run: str, n: int) -> None:
        # The whole throw-away namespace (every queue, the stream, the exchanges) and the run's ledger keys.
        with contextlib.suppress(Exception):
            transport.delete_topology(clients=range(n))
        with contextlib.suppress(Exception):
            store.delete_run(run)

    return transport, store, cleanup


def one_run(clients: int, kind: str, wire: str, s: Settings, profile: cProfile.Profile | None = None) -> dict:
    cfg = config(clients, wire, s.steps)
    datas = [TensorClientData.random(s.samples_per_client, 1000 + i) for i in range(clients)]
    transport, store, cleanup = backends(kind, s)
    tally: Tally = transport.tally  # type: ignore[attr-defined]
    time_store(store, tally)
    run_id = f"bench-system-{uuid.uuid4().hex[:12]}"
    try:
        runner = EmbeddedRunner(cfg, datas, [0] * clients, run_id=run_id, transport=transport, store=store)
        cpu0, svc0 = time.process_time(), service_cpu_s()
        t0 = time.perf_counter()
        with pika_recv_bytes(PIKA_RECV_BYTES if "4k" in kind else None):
            if profile is not None:
                profile.enable()
            try:
                result = runner.run()
            finally:
                if profile is not None:
                    profile.disable()
        wall = time.perf_counter() - t0
        cpu, svc1 = time.process_time() - cpu0, service_cpu_s()
    finally:
        cleanup(run_id, clients)
        with contextlib.suppress(Exception):
            transport.close()
        with contextlib.suppress(Exception):
            store.close()
    return run_record(clients, kind, wire, s, result, transport, tally, wall, cpu, svc0, svc1)


def run_record(
    clients: int,
    kind: str,
    wire: str,
    s: Settings,
    result: Any,
    transport: Any,
    tally: Tally,
    wall: float,
    cpu: float,
    svc0: dict[str, float],
    svc1: dict[str, float],
) -> dict:
    """One run's JSON record from its result and the tallies measured around it."""
    report = result.reports[0]
    server = report.server_metrics
    client_steps = clients * s.steps
    span = (tally.last_split - tally.first_split) if tally.first_split is not None else float("nan")
    window_total = server.get("window_s", float("nan")) * server.get("windows", 0.0)
    by_kind: dict[str, int] = {}
    for role in result.roles.values():
        for k, v in role.bytes_sent.items():
            by_kind[k] = by_kind.get(k, 0) + int(v)
    published = int(transport.published_bytes)  # type: ignore[attr-defined]
    receive_s = max(0.0, tally.process_s - tally.handler_s)
    return {
        "clients": clients,
        "backend": kind,
        "wire_dtype": wire,
        "steps": s.steps,
        "client_steps": client_steps,
        "complete": sorted(report.arrived) == list(range(clients))
        and not report.dropped
        and int(server.get("windows", 0)) == s.steps,
        "dropped": {str(k): v for k, v in report.dropped.items()},
        "late": {str(k): v for k, v in report.late.items()},
        "windows": server.get("windows"),
        "window_s": server.get("window_s"),
        "span_s": span,
        "window_total_s": window_total,
        "round_wall_s": report.wall_s,
        "run_wall_s": wall,
        "client_steps_per_s": client_steps / span,
        "client_steps_per_s_windows": client_steps / window_total,
        "client_steps_per_s_round": client_steps / report.wall_s,
        "published_bytes": published,
        "split_bytes": tally.split_bytes,
        "split_messages": tally.split_messages,
        "bytes_per_client_step": published / client_steps,
        "split_bytes_per_client_step": tally.split_bytes / client_steps,
        "split_bytes_per_message": tally.split_bytes / max(1, tally.split_messages),
        "bytes_by_kind": dict(sorted(by_kind.items())),
        "transport_s": {
            "publish": tally.publish_s,
            "receive": receive_s,
            "store": tally.store_s,
            "store_calls": tally.store_calls,
            "store_by_call": {
                k: round(v, 4) for k, v in sorted(tally.store_by_call.items(), key=lambda kv: -kv[1])[:8]
            },
        },
        "transport_share_of_round": (tally.publish_s + receive_s + tally.store_s) / report.wall_s,
        # CPU seconds per client-step of the whole run: this process, and the broker and Redis (when local).
        "cpu_s_per_client_step": {
            "bench": cpu / client_steps,
            **{k: (svc1.get(k, 0.0) - v) / client_steps for k, v in svc0.items()},
        },
    }


def profile_run(clients: int, kind: str, s: Settings, top: int = 30) -> dict:
    prof = cProfile.Profile()
    res = one_run(clients, kind, "float16", s, profile=prof)
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (fname, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{Path(fname).parent.name}/{Path(fname).name}:{line}:{func}",
                "calls": nc,
                "tottime_s": round(tt, 4),
                "cumtime_s": round(ct, 4),
            }
        )
    by_cum = sorted(
        (r for r in rows if "pika" in r["function"] or "transport" in r["function"]), key=lambda r: -r["cumtime_s"]
    )
    return {
        "backend": kind,
        "run": res,
        "top_by_tottime": sorted(rows, key=lambda r: -r["tottime_s"])[:top],
        "transport_top_by_cumtime": by_cum[:top],
    }


# ------------------------------------------------------------------------------------------------------ report
def best(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: r["client_steps_per_s"])


def table(summary: list[dict]) -> str:
    head = (
        "| clients | transport | wire dtype | client-steps/s (span) | client-steps/s (windows) | "
        "client-steps/s (round) | MB/client-step split | MB/client-step all | CPU ms/client-step (this process "
        "+ broker + redis) | ratio vs memory float32 | amqp / memory same dtype |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in summary:
        lines.append(
            f"| {r['clients']} | {r['backend']} | {r['wire_dtype']} | {r['client_steps_per_s']:.2f} | "
            f"{r['client_steps_per_s_windows']:.2f} | {r['client_steps_per_s_round']:.2f} | "
            f"{r['split_bytes_per_client_step'] / MB:.2f} | {r['bytes_per_client_step'] / MB:.2f} | "
            f"{cpu_text(r)} | {r['ratio_vs_memory_float32']:.2f} | "
            + (f"{r['overhead_ratio']:.2f}" if r.get("overhead_ratio") is not None else "-")
            + " |"
        )
    return "\n".join(lines)


def cpu_text(r: dict) -> str:
    c = r["cpu_s_per_client_step"]
    return (
        f"{c['bench'] * 1e3:.0f} + {c.get('beam.smp', 0.0) * 1e3:.0f} + {c.get('redis-server', 0.0) * 1e3:.0f}"
        if r["backend"] != "memory"
        else f"{c['bench'] * 1e3:.0f}"
    )


def parse_list(text: str, kind: type) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,2,4,8", help="comma-separated client counts")
    ap.add_argument("--steps", type=int, default=6, help="steps per client (one local epoch)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--wire", default="float32,float16", help="wire dtypes")
    ap.add_argument(
        "--backends",
        default="memory,amqp",
        help=f"comma-separated, of {', '.join(BACKENDS)} (the amqp-* ones are experiments, see --help)",
    )
    ap.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile one float16 run with N clients of every non-memory backend",
    )
    ap.add_argument("--out", default="bench/results/system.json")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging_quiet()
    s = Settings(steps=args.steps, amqp_url=args.amqp, redis_url=args.redis)
    clients, wires, kinds = parse_list(args.clients, int), parse_list(args.wire, str), parse_list(args.backends, str)
    variants = [(k, w) for k in kinds for w in wires]

    # Warm-up (kernels, allocator, the broker connection path); not measured.
    for kind in kinds:
        one_run(1, kind, wires[0], Settings(steps=1, amqp_url=s.amqp_url, redis_url=s.redis_url))

    t_start = time.perf_counter()
    runs = measure(args.repeats, clients, variants, s)
    summary = summarise(runs, clients, variants)
    target = target_row(summary)
    out = results(args, clients, wires, kinds, summary, runs, t_start, target)
    if args.profile:
        out["profile"] = [profile_run(args.profile, k, s) for k in kinds if k != "memory"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=float))
    print(
        f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"{args.steps} steps x batch {BATCH} per client, best of {args.repeats}"
    )
    print(table(summary))
    if target:
        ratios = ", ".join(
            f"{r['clients']} clients " + ("-" if r["overhead_ratio"] is None else f"{r['overhead_ratio']:.2f}")
            for r in target
        )
        print(f"\ntarget (amqp >= {TARGET} x memory at 4 and 8 clients, float16): {ratios}")
    return 0


def measure(repeats: int, clients: list[int], variants: list[tuple[str, str]], s: Settings) -> list[dict]:
    """Every measured run, the variants rotated each repeat."""
    runs: list[dict] = []
    for rep in range(repeats):
        for n in clients:
            order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
            for kind, wire in order:
                r = one_run(n, kind, wire, s)
                r["repeat"] = rep
                runs.append(r)
                print(
                    f"repeat {rep + 1} clients {n} {kind:6s} {wire}: {r['client_steps_per_s']:.2f} client-steps/s "
                    f"(span {r['span_s']:.2f} s, round {r['round_wall_s']:.2f} s, "
                    f"{r['split_bytes_per_client_step'] / MB:.2f} MB split/client-step, transport "
                    f"{r['transport_share_of_round']:.1%} of the round){'' if r['complete'] else ' INCOMPLETE'}",
                    file=sys.stderr,
                    flush=True,
                )
    return runs


def summarise(runs: list[dict], clients: list[int], variants: list[tuple[str, str]]) -> list[dict]:
    """The best run of every (clients, backend, wire dtype), with its ratios against memory."""
    summary = []
    for n in clients:
        ref = [r for r in runs if r["clients"] == n and r["backend"] == "memory" and r["wire_dtype"] == "float32"]
        ref_rate = best(ref)["client_steps_per_s"] if ref else None
        for kind, wire in variants:
            mine = [r for r in runs if r["clients"] == n and r["backend"] == kind and r["wire_dtype"] == wire]
            b = dict(best(mine))
            b["ratio_vs_memory_float32"] = b["client_steps_per_s"] / ref_rate if ref_rate else float("nan")
            mem = [r for r in runs if r["clients"] == n and r["backend"] == "memory" and r["wire_dtype"] == wire]
            b["overhead_ratio"] = (
                b["client_steps_per_s"] / best(mem)["client_steps_per_s"] if kind != "memory" and mem else None
            )
            # Noise-robust companion of overhead_ratio: CPU per client-step of memory over that of this backend
            # (this process + broker + Redis), the throughput ratio to expect where the broker shares the cores.
            b["cpu_ratio"] = (
                best(mem)["cpu_s_per_client_step"]["bench"] / sum(b["cpu_s_per_client_step"].values())
                if kind != "memory" and mem
                else None
            )
            b["overhead_ratio_round"] = (
                b["client_steps_per_s_round"] / best(mem)["client_steps_per_s_round"]
                if kind != "memory" and mem
                else None
            )
            summary.append(b)
    return summary


TARGET = 0.9


def target_row(summary: list[dict]) -> list[dict]:
    """The summary rows the target is read from: amqp, 4 and 8 clients, float16 on the wire."""
    return [r for r in summary if r["clients"] in (4, 8) and r["backend"] == "amqp" and r["wire_dtype"] == "float16"]


def results(
    args: argparse.Namespace,
    clients: list[int],
    wires: list[str],
    kinds: list[str],
    summary: list[dict],
    runs: list[dict],
    t_start: float,
    target: list[dict],
) -> dict[str, Any]:
    """The JSON document written to --out (without the profile, which main adds)."""
    out: dict[str, Any] = {
        "bench": "system",
        "steps": args.steps,
        "batch_per_client": BATCH,
        "repeats": args.repeats,
        "cuts": [list(c) for c in CUTS],
        "clients": clients,
        "wire_dtypes": wires,
        "backends": kinds,
        "amqp": args.amqp.split("@")[-1],
        "redis": args.redis.split("@")[-1],
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "bench_wall_s": time.perf_counter() - t_start,
        "target": {
            "what": f"amqp client-steps/s >= {TARGET} x memory at 4 and 8 clients, float16 on the wire",
            "ratio": {str(r["clients"]): r["overhead_ratio"] for r in target},
            # Unknown (None) when a ratio could not be taken: an invocation without the memory backend.
            "met": all(r["overhead_ratio"] >= TARGET for r in target)
            if target and all(r["overhead_ratio"] is not None for r in target)
            else None,
        },
        "summary": summary,
        "runs": runs,
    }
    return out


def logging_quiet() -> None:
    """The roles log every round at INFO; the bench prints its own lines."""
    import logging

    logging.getLogger("hfgan").setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
