"""`hfgan dashboard`: a read-only web page that shows a run live, served by the standard library's HTTP server.

    hfgan dashboard --run ID [--state redis://...] [--run-dir R]     a run of workers (`hfgan up`, compose) or an
                                                                     embedded run with --state redis://
    hfgan dashboard --run-dir R                                      any run directory (an embedded run's ledger
                                                                     lives in its process: the page reads the files)

The page (dashboard.html, no build step) polls `/api/state` every two seconds and draws: the round and phase, a table
of the clients (slot, domain, cut bits, cluster, state, last step time, late/dropped reason), the generation score and
the training losses per domain (inline SVG), and the latest sample grid of each cluster (`/samples/<file>`, only the
PNG files of the run's samples/ directory). With a ledger, round, phase and clients come from it (`hfgan status`'s
document); the curves and the sample grids always come from the run directory (metrics.jsonl, samples/). Only GET is
served; the server binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..settings import DEFAULT_STATE_URL, Settings

SAMPLE = re.compile(r"round_(\d{3,})_cluster_(\d+)\.png")
PAGE = Path(__file__).with_name("dashboard.html")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("dashboard", help="a live web page of a run (ledger and run directory), read-only")
    p.add_argument("--run", help="a run id (its ledger in --state), or a run directory")
    p.add_argument("--run-dir", help="the run directory (default: the one the run's config names)")
    p.add_argument("--state", help=f"state URL ($HFGAN_STATE_URL, default {DEFAULT_STATE_URL}); not used without --run")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")
    p.add_argument("--wait", action="store_true", help="wait for a run the ledger does not know yet (compose)")
    return p


# ------------------------------------------------------------------------------------------------ the data
def read_records(run_dir: Path | None) -> list[dict[str, Any]]:
    from ..evaluation import MetricsLog

    if run_dir is None:
        return []
    return MetricsLog.read(run_dir / "metrics.jsonl")


def curves(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per domain: generation score per round, and the mean training losses per round."""
    scores: dict[str, list[list[float]]] = {}
    losses: dict[str, dict[str, list[list[float]]]] = {}
    for rec in records:
        r = int(rec["round"])
        for dom, s in (rec.get("generation_score") or {}).items():
            scores.setdefault(dom, []).append([r, float(s)])
        by_domain = rec.get("train_by_domain") or ({"all": rec["train"]} if rec.get("train") else {})
        for dom, values in by_domain.items():
            for k, v in values.items():
                if k in ("g_loss", "d_loss_real", "d_loss_fake"):
                    losses.setdefault(dom, {}).setdefault(k, []).append([r, float(v)])
    return {"scores": scores, "losses": losses}


def latest_samples(run_dir: Path | None) -> list[dict[str, Any]]:
    """The newest sample grid of each cluster."""
    best: dict[int, tuple[int, str]] = {}
    samples = run_dir / "samples" if run_dir is not None else None
    if samples is None or not samples.is_dir():
        return []
    for p in samples.iterdir():
        m = SAMPLE.fullmatch(p.name)
        if m:
            r, k = int(m.group(1)), int(m.group(2))
            if k not in best or r > best[k][0]:
                best[k] = (r, p.name)
    return [{"cluster": k, "round": r, "url": f"samples/{name}"} for k, (r, name) in sorted(best.items())]


def file_state(run_dir: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Round, phase and clients from the run directory alone (a run without a reachable ledger)."""
    from ..config import load_config
    from .recorder import read_run_marker

    marker = read_run_marker(run_dir) or {}
    cfg = load_config(str(run_dir / "config.toml")) if (run_dir / "config.toml").is_file() else None
    summary = _json(run_dir / "summary.json") or {}
    last = records[-1] if records else {}
    n_clients = cfg.scenario.total_clients if cfg else 0
    names = cfg.scenario.domain_names if cfg else ()
    domains = cfg.scenario.client_domains() if cfg else []
    fixed_cuts = cfg.train.cuts if cfg and isinstance(cfg.train.cuts, list | tuple) else None
    cuts = summary.get("cuts", {})
    clients = []
    for c in range(n_clients):
        state, reason = "expected", ""
        if str(c) in (last.get("dropped") or {}):
            state, reason = "dropped", last["dropped"][str(c)]
        elif str(c) in (last.get("late") or {}):
            state, reason = "late", f"late for {last['late'][str(c)]} step(s)"
        elif c in (last.get("arrived") or []):
            state = "arrived"
        bits = cuts.get(str(c)) or ("".join(str(int(b)) for b in fixed_cuts[c]) if fixed_cuts else None)
        clients.append(
            {
                "client": c,
                "domain": names[domains[c]] if names else None,
                "cuts": bits,
                "cluster": (last.get("clusters") or {}).get(str(c)),
                "state": state,
                "reason": reason,
                "step_s": (last.get("step_s") or {}).get(str(c)),
                "alive": None,
            }
        )
    rounds = cfg.train.rounds if cfg else None
    return {
        "run": marker.get("run_id", run_dir.name),
        "status": "finished" if summary else "running (read from the run directory)",
        "round": int(last.get("round", 0)),
        "rounds": rounds,
        "phase": "done" if records else "admitting",
        "clients": clients,
        "source": "run directory",
    }


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Source:
    """Where the page's data comes from: a ledger (RoundStore) and/or a run directory."""

    def __init__(self, run: str | None, run_dir: Path | None, store: Any = None):
        self.run, self.run_dir, self.store = run, run_dir, store

    def snapshot(self) -> dict[str, Any]:
        records = read_records(self.run_dir)
        if self.store is not None and self.run is not None:
            state = self._ledger_state(records[-1] if records else {})
        elif self.run_dir is not None:
            state = file_state(self.run_dir, records)
        else:
            raise ConfigError("nothing to show: no ledger and no run directory")
        return {
            **state,
            **curves(records),
            "samples": latest_samples(self.run_dir),
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "time": time.time(),
        }

    def _ledger_state(self, last: dict[str, Any]) -> dict[str, Any]:
        """From the ledger; a client's step time is its last reported one (this round's, else the last record's)."""
        from . import status

        doc = status.collect(self.store, self.run)
        config = json.loads(self.store.run_info(self.run).get("config") or "{}")
        names = [d.get("dataset") for d in config.get("scenario", {}).get("domains", [])]
        clients = []
        for c in doc["clients"]:
            dom = c["domain"]
            clients.append(
                {
                    **{k: c[k] for k in ("client", "cuts", "cluster", "state", "reason", "alive")},
                    "step_s": c["step_s"]
                    if c["step_s"] is not None
                    else (last.get("step_s") or {}).get(str(c["client"])),
                    "domain": names[dom] if isinstance(dom, int) and 0 <= dom < len(names) else dom,
                }
            )
        return {
            **{k: doc[k] for k in ("run", "status", "round", "rounds", "phase", "arrived", "participants")},
            "clients": clients,
            "stragglers": doc["stragglers"],
            "workers": sorted(doc["workers"]),
            "source": "ledger",
        }

    def sample_file(self, name: str) -> Path | None:
        """The PNG of samples/ called `name`, or None (nothing outside samples/ is ever served)."""
        if self.run_dir is None or not SAMPLE.fullmatch(name):
            return None
        path = self.run_dir / "samples" / name
        return path if path.is_file() else None


# ---------------------------------------------------------------------------------------------- the server
class Handler(BaseHTTPRequestHandler):
    source: Source
    server_version = "hfgan-dashboard"

    def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", PAGE.read_bytes())
        elif path == "/api/state":
            try:
                body = json.dumps(self.source.snapshot(), default=str).encode()
            except Exception as exc:  # a ledger or a file being rewritten: the page shows it and tries again
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, "application/json", json.dumps({"error": str(exc)}).encode())
                return
            self._send(HTTPStatus.OK, "application/json", body)
        elif path.startswith("/samples/"):
            file = self.source.sample_file(path[len("/samples/") :])
            if file is None:
                self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found")
            else:
                self._send(HTTPStatus.OK, "image/png", file.read_bytes())
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found")

    def _send(self, code: HTTPStatus, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet: a poll every two seconds
        pass


def make_server(source: Source, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"source": source})
    return ThreadingHTTPServer((host, port), handler)


def open_source(args: argparse.Namespace) -> Source:
    """The run's ledger and directory from the flags; ConfigError when neither can be found."""
    from ..state import open_store
    from .status import resolve_run

    run_dir = Path(args.run_dir) if args.run_dir else None
    if not args.run:
        if run_dir is None:
            raise ConfigError("pass --run ID (a run in the ledger) or --run-dir R (a run directory)")
        if not run_dir.is_dir():
            raise ConfigError(f"--run-dir {run_dir}: no such directory")
        return Source(None, run_dir)
    if run_dir is not None and not run_dir.is_dir():
        # A run of workers whose coordinator has not created it yet: curves and samples appear with it.
        print(f"{run_dir} does not exist (yet)", file=sys.stderr, flush=True)
    if Path(args.run).is_dir() and run_dir is None:
        run_dir = Path(args.run)
    run = resolve_run(args.run)
    store = open_store(args.state or Settings.from_env().state_url_or_default, retry_timeout=5.0)
    info = store.run_info(run)
    if info is None and getattr(args, "wait", False):
        print(f"waiting for run {run!r} to appear in the state store ...", file=sys.stderr, flush=True)
    while info is None and getattr(args, "wait", False):
        time.sleep(2.0)  # the coordinator registers the run once its data is loaded
        info = store.run_info(run)
    if info is None:
        store.close()
        raise ConfigError(f"unknown run {run!r} in the state store (--wait waits for it)")
    if run_dir is None:
        configured = json.loads(info.get("config") or "{}").get("runtime", {}).get("run_dir")
        if configured and Path(configured).is_dir():
            run_dir = Path(configured)
    return Source(run, run_dir, store)


def run(args: argparse.Namespace) -> int:
    source = open_source(args)
    try:
        server = make_server(source, args.host, args.port)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {exc}") from exc
    host, port = server.server_address[:2]
    print(f"dashboard of {source.run or source.run_dir}: http://{host}:{port}/  (Ctrl-C stops it)", flush=True)
    if source.run_dir is None:
        print("no run directory found: no curves and no samples (pass --run-dir)", file=sys.stderr)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if source.store is not None:
            source.store.close()
    return 0
