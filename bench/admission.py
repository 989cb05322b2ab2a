"""Admission and heartbeats of many clients: the coordinator's slot table against the old Redis slot claim.

    python bench/admission.py [--sizes 100,1000,10000] [--beats 2000] [--out bench/results/admission.json]

Per size n, against the real Redis (--redis-url, default redis://127.0.0.1:6379/15; a unique run id,
deleted afterwards):

- **coordinator** (today): n simulated client processes ask for a slot with a `ClientHeartbeat` handled by the
  coordinator role (memory transport for the answers, the real Redis store for its heartbeat records), then
  `--beats` renewals from random slots, then spares asking while every slot is held. Reported: Redis commands sent
  and wall time per heartbeat, per admission, per spare request.
- **redis claim** (before, the baseline in the same process): each client process claimed its slot itself with the
  store's `claim_slot` Lua script and re-claimed it on every heartbeat; the script scans the slots, so its cost grows
  with n (the issue measured 1.0 / 2.7 / 43.8 ms at 100 / 1k / 10k).

Redis commands are counted on the client side (each pipelined command counts; a script call counts once, whatever
it does inside). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
import uuid
from pathlib import Path

from hfgan_core.config import DomainConfig, RunConfig, RuntimeConfig, ScenarioConfig, TrainConfig
from hfgan_core.protocol import ClientHeartbeat
from hfgan_core.runtime.coordinator import CoordinatorRole
from hfgan_core.runtime.host import RoleContext
from hfgan_core.settings import redact_url
from hfgan_core.state.redis import RedisRoundStore
from hfgan_core.transport import MemoryTransport

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"


class Counted:
    """Counts the Redis commands a store sends (pipelines count each queued command)."""

    def __init__(self, store: RedisRoundStore):
        self.n = 0
        r = store._r
        execute, pipeline = r.execute_command, r.pipeline

        def counted_execute(*args, **kw):
            self.n += 1
            return execute(*args, **kw)

        def counted_pipeline(*args, **kw):
            pipe = pipeline(*args, **kw)
            run = pipe.execute

            def counted_run(*a, **k):
                self.n += len(pipe.command_stack)
                return run(*a, **k)

            pipe.execute = counted_run
            return pipe

        r.execute_command, r.pipeline = counted_execute, counted_pipeline


def _cfg(n: int) -> RunConfig:
    return RunConfig(
        scenario=ScenarioConfig(domains=(DomainConfig("synthetic", n),)),
        train=TrainConfig(rounds=1, steps_per_epoch=1, batch_size=8, cuts=((0, 0, 0, 0),)),
        runtime=RuntimeConfig(),
    )


def _per(count: int, ops: int, seconds: float) -> dict[str, float]:
    return {"redis_ops": ops / count, "ms": 1000 * seconds / count}


def coordinator_case(redis_url: str, n: int, beats: int, spares: int, rng: random.Random) -> dict:
    run = f"bench-adm-{uuid.uuid4().hex[:8]}"
    store = RedisRoundStore(redis_url)
    counter = Counted(store)
    ctx = RoleContext(run=run, cfg=_cfg(n), transport=MemoryTransport(), store=store)
    role = CoordinatorRole(ctx, slot_ttl_s=3600.0)
    try:
        role.start()

        def beat(slot: int, owner: str) -> None:
            role.on_message(
                ClientHeartbeat(run=run, round=0, sender=f"client.{slot}", client=slot, owner=owner, info="bench")
            )

        out = {}
        for what, calls in (
            ("admission", [(c, f"p{c}") for c in range(n)]),
            ("heartbeat", [(c, f"p{c}") for c in (rng.randrange(n) for _ in range(beats))]),
            ("spare request", [(rng.randrange(n), f"spare{i}") for i in range(spares)]),
        ):
            ops0, t0 = counter.n, time.perf_counter()
            for slot, owner in calls:
                beat(slot, owner)
            out[what] = _per(len(calls), counter.n - ops0, time.perf_counter() - t0)
        assert len(role.slots.holders) == n
        return out
    finally:
        store.delete_run(run)
        store.close()


def redis_claim_case(redis_url: str, n: int, beats: int, rng: random.Random) -> dict:
    """The old path. The n holders are written directly (one pipeline: the old admission of n clients is O(n^2));
    then each heartbeat is what every client did: its heartbeat key, then `claim_slot`, whose script reads two keys
    per slot up to the holder's own (`lua_ops`: Redis commands run inside the script)."""
    run = f"bench-adm-{uuid.uuid4().hex[:8]}"
    store = RedisRoundStore(redis_url)
    try:
        pipe = store._r.pipeline(transaction=False)
        pipe.hset(store.key(run, "slots"), mapping={str(c): f"p{c}" for c in range(n)})
        for c in range(n):
            pipe.set(store.key(run, "hb", f"p{c}"), "bench", px=3_600_000)
        pipe.execute()
        counter = Counted(store)
        lua = 0
        t0 = time.perf_counter()
        for _ in range(beats):
            c = rng.randrange(n)
            store.heartbeat(run, f"p{c}", 3600.0, "bench")
            assert store.claim_slot(run, n, f"p{c}", 3600.0).slot == c
            lua += 2 * (c + 1)
        out = {"heartbeat": _per(beats, counter.n, time.perf_counter() - t0)}
        out["heartbeat"]["lua_ops"] = lua / beats
        return out
    finally:
        store.delete_run(run)
        store.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="a Redis database the bench may write to")
    p.add_argument("--sizes", default="100,1000,10000")
    p.add_argument("--beats", type=int, default=2000, help="heartbeats measured per size (the old path: a tenth)")
    p.add_argument("--spares", type=int, default=200)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "admission.json"))
    args = p.parse_args()
    rng = random.Random(0)
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        new = coordinator_case(args.redis_url, n, args.beats, args.spares, rng)
        old = redis_claim_case(args.redis_url, n, max(50, args.beats // 10), rng)
        rows.append({"clients": n, "coordinator": new, "redis_claim": old})
    head = f"{'clients':>8} | {'heartbeat ms':>12} {'ops':>4} | {'admission ms':>12} {'ops':>4} | "
    print(head + f"{'spare ms':>8} {'ops':>4} | {'old heartbeat ms':>16} {'ops':>4} {'lua ops':>8} | {'old/new':>7}")
    for r in rows:
        new, old = r["coordinator"], r["redis_claim"]
        print(
            f"{r['clients']:>8} | {new['heartbeat']['ms']:>12.3f} {new['heartbeat']['redis_ops']:>4.1f} | "
            f"{new['admission']['ms']:>12.3f} {new['admission']['redis_ops']:>4.1f} | "
            f"{new['spare request']['ms']:>8.3f} {new['spare request']['redis_ops']:>4.1f} | "
            f"{old['heartbeat']['ms']:>16.3f} {old['heartbeat']['redis_ops']:>4.1f} "
            f"{old['heartbeat']['lua_ops']:>8.0f} | "
            f"{old['heartbeat']['ms'] / new['heartbeat']['ms']:>7.1f}"
        )
    doc = {
        "what": "client admission and heartbeats: coordinator slot table vs the old per-client Redis slot claim",
        "redis": redact_url(args.redis_url),
        "host": platform.node(),
        "python": platform.python_version(),
        "load_avg": os.getloadavg(),
        "beats": args.beats,
        "rows": rows,
        "median_heartbeat_ms": statistics.median(r["coordinator"]["heartbeat"]["ms"] for r in rows),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
