"""A client process: its slot from the coordinator over the broker, then the client role. It never opens the ledger.

Clients are untrusted (docs/security.md), so a client process has no Redis URL or credentials: whatever the
environment says, it never opens a state store (its role context holds `NoLedger`, which refuses every use).

Its identity is its broker user. The slot:

- `--client k`, or a broker URL whose user is `client-k`: slot k only (production: one set of credentials each);
- a URL with `{slot}` (`amqp://client-{slot}:client-{slot}-dev@host/%2F`, the development case where
  `docker compose --scale client=N` starts N identical processes): it connects as one slot's user, asks for that
  slot with a `ClientHeartbeat`, and, refused, reconnects as the user of the free slot the coordinator names in its
  `SlotGrant`; with none free it waits as a spare and asks again every heartbeat, taking over a slot whose holder
  stopped renewing it;
- any other user (guest, in tests): any slot, on one connection.

Answers come on `events.slot.<owner>` (an exclusive subscription of this connection; only the coordinator's count).
The process then keeps its slot with a heartbeat over the broker; the coordinator refusing one (a spare took the
slot over while this process was frozen) ends the process with exit code 1. A restarted client restores its last
checkpoint; the coordinator sends it its round's start again when it rejoins a round in training.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from .. import roles
from ..config import ConfigError, RunConfig
from ..protocol import ClientHeartbeat, SlotGrant, WireError, decode
from ..state import StateError
from ..transport import COORDINATOR
from ..transport.base import EVENTS_PREFIX, Delivery, Transport
from . import checkpoint as ckpt
from .aggregator import forged_sender
from .host import RoleContext
from .slots import OWNER
from .worker import EXIT_INTERNAL, EXIT_OK, StopFlag, WorkerExit, WorkerLoop, WorkerSettings, close_quietly, open_broker

log = logging.getLogger("hfgan")


class NoLedger:
    """The state store of a client: there is none (clients never touch Redis)."""

    def __getattr__(self, name: str) -> Any:
        raise StateError(f"clients have no ledger access (tried {name})")


class SlotWatch:
    """Collects the coordinator's answers on `events.slot.<owner>`; anything else there is dead-lettered."""

    def __init__(self, run: str, owner: str, namespace: str = roles.DEFAULT_NAMESPACE):
        self.run, self.owner = run, owner
        self.namespace = namespace  # the broker users of another namespace are `<namespace>-client-k`
        self.grant: SlotGrant | None = None
        self.lost: str | None = None

    def on_delivery(self, delivery: Delivery) -> None:
        try:
            msg = decode(delivery.body, kinds=(SlotGrant,))
        except WireError as exc:
            delivery.reject(f"{exc.reason}: {exc.detail}")
            return
        forged = forged_sender(delivery.headers.get("user_id"), msg.sender, self.namespace)
        if forged or msg.sender != "coordinator" or msg.owner != self.owner or msg.run != self.run:
            delivery.reject(forged or f"bad_sender: slot answers come from the coordinator, not {msg.sender!r}")
            return
        self.grant = msg
        delivery.ack()


def client_owner(process: str) -> str:
    """This client process's slot owner: `<hostname>-<pid>` (`process`) and a random part, new with every start.

    Docker restarts a crashed client container with the same hostname and runs the client as pid 1 again. With
    `<hostname>-<pid>` alone the restarted process asked for its old slot as the slot's old holder: the coordinator
    took the request for a renewal, which it does not answer, so the process waited for an answer forever while its
    slot looked alive and the round waited for it (seen in tests/compose). A new owner is a new holder: refused
    while the dead one's slot is fresh, granted once it expired, and it rejoins the round (admission.py)."""
    return f"{process[:56]}-{secrets.token_hex(3)}"


def _fixed_slot(url: str, n: int, client: int | None) -> int | None:
    if client is not None:
        return client
    if "{slot}" in url:
        return None
    m = re.fullmatch(r"client-(\d+)", unquote(urlparse(url).username or ""))
    if m and int(m.group(1)) < n:
        return int(m.group(1))
    return None


class SlotClient:
    """Asks for a slot and keeps it (see the module docstring)."""

    def __init__(self, cfg: RunConfig, run: str, settings: WorkerSettings, stop: StopFlag, owner: str, fixed):
        self.cfg, self.run, self.settings, self.stop = cfg, run, settings, stop
        self.owner = re.sub(r"[^A-Za-z0-9_-]", "-", owner)[:64]
        assert OWNER.fullmatch(self.owner)
        self.n = cfg.scenario.total_clients
        self.url = cfg.runtime.broker_url
        self.fixed = _fixed_slot(self.url, self.n, fixed)
        self.watch = SlotWatch(run, self.owner, settings.namespace or roles.DEFAULT_NAMESPACE)
        self.transport: Transport | None = None
        self.slot = -1
        self._connected_as: int | None = None
        self.traffic: dict[str, float] = {}

    def _connect(self, slot: int) -> Transport:
        per_slot = "{slot}" in self.url
        if self.transport is not None and (not per_slot or self._connected_as == slot):
            return self.transport
        close_quietly(self.transport)
        self.transport = open_broker(self.url.replace("{slot}", str(slot)), self.settings, f"client.{slot}")
        self.transport.consume(f"{EVENTS_PREFIX}slot.{self.owner}", self.watch.on_delivery)
        self._connected_as = slot
        return self.transport

    def beat(self, slot: int, info: str) -> None:
        msg = ClientHeartbeat(
            run=self.run,
            round=0,
            sender=f"client.{slot}",
            client=slot,
            owner=self.owner,
            info=info,
            traffic=self.traffic,
        )
        self.transport.publish(COORDINATOR, msg.encode(), persistent=False)

    def _ask(self, slot: int) -> SlotGrant | None:
        t = self._connect(slot)
        self.watch.grant = None
        self.beat(slot, "asking for a client slot")
        end = time.monotonic() + max(2.0, 2 * self.settings.heartbeat_s)
        while self.watch.grant is None and time.monotonic() < end and not self.stop.requested:
            t.process(timeout=0.1)
        return self.watch.grant

    def acquire(self) -> int | None:
        """The slot granted to this process (None if stopped first)."""
        slot = self.fixed if self.fixed is not None else zlib.crc32(self.owner.encode()) % self.n
        said: set[str] = set()
        while not self.stop.requested:
            grant = self._ask(slot)
            if grant is not None and grant.granted and grant.client == slot:
                self.slot = slot
                return slot
            if grant is None:
                if "silent" not in said:
                    log.info("client: no answer from the coordinator yet; asking again")
                    said.add("silent")
            elif self.fixed is None and grant.free_slot >= 0:
                slot = grant.free_slot
                continue
            elif "spare" not in said:
                log.info("client: all %d slots of run %s are taken; waiting as a spare", self.n, self.run)
                said.add("spare")
            self.stop.sleep(self.settings.heartbeat_s)
        return None

    def keep(self, info: str, leaving: bool) -> None:
        """One heartbeat for the slot held; a refusal means a spare took the slot over."""
        grant, self.watch.grant = self.watch.grant, None
        if grant is not None and not grant.granted and grant.client == self.slot and not leaving:
            raise WorkerExit(EXIT_INTERNAL, f"lost client slot {self.slot} of run {self.run} to another process")
        self.beat(self.slot, info)


def serve_client(opts, cfg: RunConfig, run_id: str, settings: WorkerSettings, stop: StopFlag, owner: str) -> int:
    from ..data import load_client_data
    from .client import ClientRole
    from .emulation import emulator_for
    from .services import latest_checkpoint

    n = cfg.scenario.total_clients
    if opts.client is not None and not 0 <= opts.client < n:
        raise ConfigError(f"--client {opts.client}: the run has clients 0..{n - 1}")
    if cfg.runtime.state_url and not cfg.runtime.state_url.startswith("memory:"):
        log.info("client: the state URL is not used: clients reach the coordinator over the broker only")
    slots = SlotClient(cfg, run_id, settings, stop, owner, opts.client)
    try:
        slot = slots.acquire()
        if slot is None:
            return EXIT_OK
        log.info("client: claimed slot %d of run %s as %s", slot, run_id, slots.owner)
        name = f"client.{slot}"
        data, notices = load_client_data(cfg, slot, allow_synthetic_fallback=opts.allow_fallback)
        for notice in notices:
            log.warning("%s: NOTICE: %s", name, notice)
        profile = cfg.devices.client_profiles(n)[slot]
        ctx = RoleContext(run=run_id, cfg=cfg, transport=slots.transport, store=NoLedger(), log=log)
        role = ClientRole(
            ctx,
            client=slot,
            domain=cfg.scenario.client_domains()[slot],
            data=data,
            profile=profile,
            device=cfg.runtime.device,
            run_dir=cfg.runtime.run_dir,
            delay=emulator_for(cfg, slot, profile),
        )
        latest = latest_checkpoint(Path(cfg.runtime.run_dir or "."), role.checkpoint_name(), 1 << 30)
        if latest is not None:
            role.restore(ckpt.load_checkpoint(latest[1], role="client"))
            log.info("%s: restored %s (round %d)", name, latest[1], latest[0])

        def info() -> str:
            return f"slot {slot} owner {slots.owner} round {role.round} {role.phase} step {max(role.step, 0)}"

        def send_beat(text: str, leaving: bool) -> None:
            slots.traffic = {
                "bytes_sent": float(sum(role.bytes_sent.values())),
                "messages_sent": float(sum(role.messages_sent.values())),
            }
            slots.keep(text, leaving)

        loop = WorkerLoop(role, settings, stop, info=info, watch_run_status=False, send_beat=send_beat)
        if role.delay is not None:
            role.delay.sleep = loop.sliced_sleep  # an emulated slow segment must not let the heartbeat lapse
        reason = loop.run()
        log.info("%s: %s (%d step(s) timed out)", name, reason, role.steps_timed_out)
        return EXIT_OK
    finally:
        close_quietly(slots.transport)
