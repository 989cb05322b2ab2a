"""`hfgan replay --run R --round N`: redo round N's aggregation from the update log and check it bit for bit.

The coordinator records each aggregation job in the ledger (`job.<cluster>`: members, weights, the msg_id of every
update used) and the aggregators record the digest of each model they built. Replay reads the round's updates from
the update log (the stream), recomputes every job exactly as an aggregator does (`read_round_updates`,
`compute_job`, `state_digest`) and compares with the ledger's digests.

Exit code: 0 every cluster matches; 1 a mismatch (or a model that cannot be rebuilt: an update missing from the
log); 2 bad usage (unknown run, a round without recorded jobs, a broker that is not amqp://).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, RunConfig
from ..settings import DEFAULT_BROKER_URL, DEFAULT_STATE_URL, Settings, redact_url


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("replay", help="rebuild a round's aggregated models from the update log and check their digests")
    p.add_argument("--run", required=True, help="a run id, or a run directory")
    p.add_argument("--round", type=int, required=True, help="the round to replay")
    shown = DEFAULT_BROKER_URL.replace("%", "%%")  # argparse %-formats help texts
    p.add_argument("--broker", help=f"broker URL ($HFGAN_BROKER_URL, default {shown})")
    p.add_argument("--state", help=f"state URL ($HFGAN_STATE_URL, default {DEFAULT_STATE_URL})")
    p.add_argument("--namespace", help="AMQP namespace ($HFGAN_BROKER_NAMESPACE, hfgan)")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


@dataclass(frozen=True)
class ClusterCheck:
    cluster: int
    recorded: str | None
    replayed: str | None
    error: str = ""

    @property
    def match(self) -> bool:
        return self.recorded is not None and self.recorded == self.replayed


def config_from_ledger(info: dict[str, str]) -> RunConfig:
    """The run's config from its ledger record (plain `to_dict` data: device profiles there are (name, profile)
    pairs, which the TOML reader takes as a table); checked against the recorded digest."""
    plain = json.loads(info["config"])
    devices = plain.get("devices", {})
    if isinstance(devices.get("profiles"), list):
        devices["profiles"] = {name: prof for name, prof in devices["profiles"]}
    cfg = RunConfig.from_dict(plain).validate()
    if cfg.digest() != info.get("digest"):
        raise ConfigError("the run's recorded configuration does not reproduce its digest")
    return cfg


def replay_round(
    transport: Any, store: Any, run: str, round: int, log: logging.Logger | None = None
) -> list[ClusterCheck]:
    """Recompute every job of `round`; ConfigError for an unknown run or a round without jobs."""
    from ..federation import state_digest
    from . import ledger
    from .aggregator import compute_job, read_round_updates
    from .host import Reject, RoleContext

    info = store.run_info(run)
    if info is None:
        raise ConfigError(f"unknown run {run!r} in the state store")
    cfg = config_from_ledger(info)
    docs = ledger.RoundDocs.read(store, run, round)
    if not docs.jobs:
        raise ConfigError(f"run {run!r} has no aggregation jobs recorded for round {round}")
    ctx = RoleContext(run=run, cfg=cfg, transport=transport, store=store, log=log or logging.getLogger("hfgan"))
    offset = store.get_log_offset(run, round) or 0
    recorded = store.get_model_digests(run, round)
    updates = read_round_updates(ctx, round)
    out = []
    for k, doc in sorted(docs.jobs.items()):
        job = ledger.job_from_doc(run, round, doc, offset)
        try:
            digest = state_digest(compute_job(ctx, job, updates))
            out.append(ClusterCheck(k, recorded.get(k), digest))
        except Reject as exc:
            out.append(ClusterCheck(k, recorded.get(k), None, exc.reason))
    return out


def run(args: argparse.Namespace) -> int:
    from ..state import open_store
    from ..transport import open_transport
    from .status import resolve_run

    env = Settings.from_env()
    broker = args.broker or env.broker_url_or_default
    state = args.state or env.state_url_or_default
    if not broker.startswith(("amqp://", "amqps://")):
        raise ConfigError(f"--broker {redact_url(broker)}: replay reads the update log of a broker (amqp://)")
    if args.round < 1:
        raise ConfigError("--round must be at least 1")
    run_id = resolve_run(args.run)
    opts: dict[str, Any] = {"reconnect_timeout": 10.0}
    namespace = args.namespace or env.namespace
    if namespace:
        opts["namespace"] = namespace
    store = open_store(state, retry_timeout=5.0)
    transport = open_transport(broker, **opts)
    try:
        checks = replay_round(transport, store, run_id, args.round)
    finally:
        transport.close()
        store.close()
    ok = all(c.match for c in checks)
    if args.json:
        print(
            json.dumps(
                {
                    "run": run_id,
                    "round": args.round,
                    "match": ok,
                    "clusters": [
                        {
                            "cluster": c.cluster,
                            "recorded": c.recorded,
                            "replayed": c.replayed,
                            "match": c.match,
                            "error": c.error,
                        }
                        for c in checks
                    ],
                },
                indent=2,
            )
        )
    else:
        for c in checks:
            name = "global" if c.cluster < 0 else f"cluster {c.cluster}"
            if c.match:
                print(f"{name:>10}: match    {c.replayed}")
            elif c.error:
                print(f"{name:>10}: FAILED   {c.error}")
            else:
                print(f"{name:>10}: MISMATCH replayed {c.replayed} != recorded {c.recorded}")
        print(
            f"round {args.round} of run {run_id}: " + ("every model matches its recorded digest" if ok else "MISMATCH"),
            file=sys.stderr,
        )
    return 0 if ok else 1
