"""`hfgan status --run R`: where a run stands, from its ledger (and, with --broker, the dead-letter queue).

Shows the run's status, its round and phase, and for each client: its state this round (expected / arrived / late /
clipped / rejected: its update was not averaged / dropped, with the reason), whether its heartbeat is alive, its cut
bits and cluster, and its last losses; then the clusters, the stragglers of the last rounds, the model digests,
and the workers whose heartbeats are alive.
`--json` prints the same as one JSON object. `R` is a run id, or a run directory (its marker names the run).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..settings import DEFAULT_STATE_URL, Settings
from . import ledger


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("status", help="round, phase, clients, clusters and stragglers of a run (from the ledger)")
    p.add_argument("--run", required=True, help="a run id, or a run directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--state", help=f"state URL ($HFGAN_STATE_URL, default {DEFAULT_STATE_URL})")
    p.add_argument("--broker", help="broker URL: also count the dead letters ($HFGAN_BROKER_URL)")
    p.add_argument("--namespace", help="AMQP namespace ($HFGAN_BROKER_NAMESPACE, hfgan)")
    return p


def resolve_run(run: str) -> str:
    """A run id from `--run`: a run directory's marker names its run; anything else is the id itself."""
    from .recorder import read_run_marker

    path = Path(run)
    if path.is_dir():
        marker = read_run_marker(path)
        if marker is None or not marker.get("run_id"):
            raise ConfigError(f"{run} is a directory without an hfgan run")
        return str(marker["run_id"])
    return run


def collect(store: Any, run: str, now: float | None = None) -> dict[str, Any]:
    """The status document of a run; ConfigError for an unknown run."""
    now = time.time() if now is None else now
    info = store.run_info(run)
    if info is None:
        raise ConfigError(f"unknown run {run!r} in the state store")
    config = json.loads(info.get("config") or "{}")
    n_clients = sum(int(d.get("clients", 0)) for d in config.get("scenario", {}).get("domains", []))
    rounds = int(config.get("train", {}).get("rounds", 0))
    r, phase = store.get_round(run)
    alive = store.alive(run)
    cuts = store.get_cuts(run)
    members = ledger.parse_members(store.get_docs(run, 0).get(ledger.MEMBERS))
    docs = ledger.RoundDocs.read(store, run, r) if r else ledger.RoundDocs({})
    records = store.round_clients(run, r) if r else {}
    metrics = store.get_metrics(run, r) if r else {}
    assignment, kld_intra, kld_global, clusters_round = _latest_clusters(store, run, r)
    clients = _client_rows(n_clients, records, metrics, members, alive, cuts, assignment, kld_intra, kld_global, now)
    # A claimed client slot is kept by a second heartbeat under its process's name: shown once, as client.<k>.
    slot_owners = {
        info.split()[3]
        for name, info in alive.items()
        if name.startswith("client.") and info.startswith("slot ") and len(info.split()) > 3
    }
    stragglers = _stragglers(store, run, r)
    start = docs.start or {}
    digests = _digests(store, run, r)
    server = metrics.get("server", {})
    return {
        "run": run,
        "status": info.get("status"),
        "config_digest": info.get("digest"),
        "scenario": config.get("scenario", {}).get("name"),
        "round": r,
        "rounds": rounds,
        "phase": phase,
        "steps": start.get("steps"),
        "deadline_in_s": round(start["deadline"] - now, 1) if start.get("deadline") and phase == "training" else None,
        "arrived": sum(1 for c in clients if c["state"] in ("arrived", "late", "rejected", "clipped")),
        "participants": len(start.get("participants", [])),
        "clients": clients,
        "clusters": {"round": clusters_round, "assignment": {str(c): k for c, k in sorted(assignment.items())}},
        "stragglers": stragglers,
        "server": {
            "alive": "server" in alive,
            "windows": server.get("windows"),
            "window_s": server.get("window_s"),
            "late": (docs.server_done or {}).get("late", {}),
        },
        "jobs": {str(k): ("done" if k in docs.aggs else "queued") for k in sorted(docs.jobs)},
        "digests": digests,
        "workers": {name: info for name, info in sorted(alive.items()) if name not in slot_owners},
        "checkpoints": {str(k): v for k, v in sorted(store.get_checkpoints(run).items())},
    }


def _latest_clusters(store: Any, run: str, r: int) -> tuple[dict, dict, dict, int]:
    """The newest clustering at or before round r: (assignment, kld_intra, kld_global, its round; 0 for none)."""
    assignment, kld_intra, kld_global = ({}, {}, {})
    clusters_round = 0
    for past in range(r, 0, -1):
        a, ki, kg = store.get_clusters(run, past)
        if a:
            assignment, kld_intra, kld_global, clusters_round = a, ki, kg, past
            break
    return assignment, kld_intra, kld_global, clusters_round


def _client_rows(
    n_clients: int,
    records: dict,
    metrics: dict,
    members: dict,
    alive: dict,
    cuts: dict,
    assignment: dict,
    kld_intra: dict,
    kld_global: dict,
    now: float,
) -> list[dict[str, Any]]:
    """One status row per client slot of the scenario."""
    clients = []
    for c in range(n_clients):
        rec = records.get(c)
        m = metrics.get(f"client.{c}", {})
        clients.append(
            {
                "client": c,
                "state": rec.state if rec else ("joined" if c in members else "absent"),
                "reason": rec.reason if rec else "",
                "since_s": round(now - rec.ts, 1) if rec else None,
                "alive": f"client.{c}" in alive,
                "heartbeat": alive.get(f"client.{c}", ""),
                "domain": members[c][0] if c in members else None,
                "n_samples": members[c][1] if c in members else None,
                "cuts": cuts.get(c),
                "cluster": assignment.get(c),
                "kld_intra": kld_intra.get(c),
                "kld_global": kld_global.get(c),
                "g_loss": m.get("g_loss"),
                "step_s": m.get("step_s"),
            }
        )
    return clients


def _stragglers(store: Any, run: str, r: int) -> list[dict[str, Any]]:
    """Clients late, dropped, rejected or clipped in the last three rounds."""
    stragglers = []
    for past in range(max(1, r - 2), r + 1):
        for c, rec in sorted(store.round_clients(run, past).items()):
            if rec.state in ("late", "dropped", "rejected", "clipped"):
                stragglers.append({"round": past, "client": c, "state": rec.state, "reason": rec.reason})
    return stragglers


def _digests(store: Any, run: str, r: int) -> dict[str, dict[str, Any]]:
    """The model digests of the last two rounds, by round."""
    digests = {}
    for past in range(max(1, r - 1), r + 1):
        d = store.get_model_digests(run, past)
        if d:
            digests[str(past)] = {str(k): v for k, v in sorted(d.items())}
    return digests


def _fmt(v: Any, spec: str = "") -> str:
    if v is None or v == "":
        return "-"
    return format(v, spec) if spec else str(v)


def render(doc: dict[str, Any]) -> str:
    lines = [
        f"run {doc['run']} ({doc['scenario']}): {doc['status']}, round {doc['round']}/{doc['rounds']} "
        f"{doc['phase']}"
        + (f", {doc['arrived']}/{doc['participants']} arrived" if doc["participants"] else "")
        + (f", deadline in {doc['deadline_in_s']:.0f} s" if doc["deadline_in_s"] is not None else "")
    ]
    lines.append("")
    head = (
        f"{'client':>6} {'state':<9} {'alive':<5} {'cuts':<4} {'clu':>3} {'domain':>6} {'samples':>7} "
        f"{'g_loss':>7} {'step_s':>7}  reason"
    )
    lines.append(head)
    for c in doc["clients"]:
        lines.append(
            f"{c['client']:>6} {c['state']:<9} {'yes' if c['alive'] else 'no':<5} {_fmt(c['cuts']):<4} "
            f"{_fmt(c['cluster']):>3} {_fmt(c['domain']):>6} {_fmt(c['n_samples']):>7} "
            f"{_fmt(c['g_loss'], '.3f'):>7} {_fmt(c['step_s'], '.2f'):>7}  {c['reason']}"
        )
    lines.append("")
    groups: dict[int, list[str]] = {}
    for c, k in doc["clusters"]["assignment"].items():
        groups.setdefault(k, []).append(c)
    if groups:
        lines.append(
            f"clusters (round {doc['clusters']['round']}): "
            + " ".join("{" + ",".join(v) + "}" for _, v in sorted(groups.items()))
        )
    s = doc["server"]
    lines.append(
        f"server: {'alive' if s['alive'] else 'not alive'}, windows {_fmt(s['windows'], '.0f')}, "
        f"{_fmt(s['window_s'], '.2f')} s per window" + (f", late {s['late']}" if s["late"] else "")
    )
    if doc["jobs"]:
        lines.append("jobs: " + ", ".join(f"cluster {k}: {v}" for k, v in doc["jobs"].items()))
    if doc["stragglers"]:
        lines.append("stragglers:")
        for st in doc["stragglers"]:
            lines.append(f"  round {st['round']} client {st['client']}: {st['state']} ({st['reason']})")
    else:
        lines.append("stragglers: none")
    for rnd, d in doc["digests"].items():
        lines.append(
            f"digests round {rnd}: "
            + ", ".join(f"{'global' if k == '-1' else 'cluster ' + k} {v[:16]}" for k, v in d.items())
        )
    lines.append("workers alive: " + (", ".join(doc["workers"]) or "none"))
    if "dead_letters" in doc:
        dl = doc["dead_letters"]
        lines.append("dead letters: " + (", ".join(f"{k} x{n}" for k, n in dl.items()) or "none"))
    return "\n".join(lines)


def dead_letter_counts(broker: str, namespace: str | None) -> dict[str, int]:
    from collections import Counter

    from ..transport import open_transport

    opts: dict[str, Any] = {"reconnect_timeout": 5.0}
    if namespace:
        opts["namespace"] = namespace
    t = open_transport(broker, **opts)
    try:
        counts: Counter[str] = Counter(f"{d.address}: {d.reason.split(':', 1)[0]}" for d in t.dead_letters())
    finally:
        t.close()
    return dict(counts.most_common())


def run(args: argparse.Namespace) -> int:
    from ..state import open_store

    env = Settings.from_env()
    state = args.state or env.state_url_or_default
    run_id = resolve_run(args.run)
    store = open_store(state, retry_timeout=5.0)
    try:
        doc = collect(store, run_id)
    finally:
        store.close()
    broker = args.broker or None
    if broker:
        doc["dead_letters"] = dead_letter_counts(broker, args.namespace or env.namespace)
    print(json.dumps(doc, indent=2) if args.json else render(doc))
    return 0
