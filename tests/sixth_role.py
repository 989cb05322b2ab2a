"""A test-only sixth role, added the way docs/roles.md says a role is added: this module and one `roles.register`.

The observer subscribes to the round events (`events.round.#`, a broadcast the coordinator may send to every role)
and counts them by event. In the embedded runner its instances live in the runner; as a worker process
(`python -m tests.sixth_role`, which `hfgan up` starts because the role is registered) it writes what it counted to
`<run dir>/observer.json` when it stops. Nothing outside this module knows the role.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from pathlib import Path

from hfgan_core import roles
from hfgan_core.protocol import Message, RoundEvent
from hfgan_core.runtime.host import Reject, Role, RoleContext

NAME = "observer"
log = logging.getLogger("hfgan.observer")


class ObserverRole(Role):
    name = NAME
    accepts = (RoundEvent,)

    def __init__(self, ctx: RoleContext):
        super().__init__(ctx)
        self.events: Counter[str] = Counter()
        self.rounds: set[int] = set()

    def addresses(self) -> list[str]:
        return list(SPEC.addresses)

    def on_message(self, msg: Message) -> None:
        if not isinstance(msg, RoundEvent):
            raise Reject(f"unexpected: {msg.KIND}")
        self.events[msg.event] += 1
        self.rounds.add(msg.round)


def embedded_roles(env) -> list[Role]:
    return [ObserverRole(env.ctx())]


def serve_observer(opts, cfg, run_id, settings, stop) -> int:
    from hfgan_core.runtime.worker import EXIT_OK, WorkerLoop, close_quietly, open_backends

    transport, store = open_backends(cfg.runtime.broker_url, cfg.runtime.state_url, settings, NAME)
    try:
        role = ObserverRole(RoleContext(run=run_id, cfg=cfg, transport=transport, store=store))
        reason = WorkerLoop(role, settings, stop, info=lambda: f"{sum(role.events.values())} event(s)").run()
        out = {"reason": reason, "events": dict(role.events), "rounds": sorted(role.rounds)}
        (Path(cfg.runtime.run_dir) / "observer.json").write_text(json.dumps(out))
        log.info("observer: %s, %s", reason, out)
        return EXIT_OK
    finally:
        close_quietly(transport, store)


SPEC = roles.RoleSpec(
    name=NAME,
    role_class="tests.sixth_role:ObserverRole",
    identity=NAME,
    addresses=("events.round.#",),
    sends=(),
    serve="tests.sixth_role:serve_observer",
    embedded="tests.sixth_role:embedded_roles",
    worker="tests.sixth_role",
)


def register() -> roles.RoleSpec:
    return roles.register(SPEC)


if __name__ == "__main__":
    from workers.common import main

    register()
    sys.exit(main(NAME, __doc__))
