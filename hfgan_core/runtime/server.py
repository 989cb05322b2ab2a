"""The split-learning server: one shared copy of the middle blocks of G and D, run for all clients of a step at once.

Clients send their G head outputs for a step; the server collects them in a *window* and then runs the step's six
phases for the window's members together (BatchNorm sees the union of their batches, as in the paper's code):

    g_fwd   G middle forward                      (on g_head_out from every member)
    d_fwd   D middle forward on fakes and reals   (on d_head_out "d")   -> also the clustering summaries
    d_bwd   D middle backward; Adam step on D      (on d_tail_grad "d")
    g_dfwd  D middle forward on the fakes again   (on d_head_out "g")
    g_dbwd  D middle backward (no D step)          (on d_tail_grad "g")
    g_bwd   G middle backward; Adam step on G      (on g_tail_grad)

Stragglers: a window opens when every client the server still waits for has sent its activation, or when the step
deadline passes (the rest are "lagging": their activation is served in a later window; before any phase was
measured, the deadline follows how long the others took to send theirs after the round start). Within a window, a
member that misses a phase's deadline is dropped from the step (it gets `step_dropped`, the others go on). A phase's
deadline follows the members' measured pace (pace.py): max(step_deadline_s, straggler_factor x the median of the
recent response times in that phase, counted from when the server has sent the phase's outputs), so a busy host
slows every client without making them late; a window opens at the longest of the phase deadlines. The round ends
for the server when every participant has finished its last step or the coordinator closes the round; it then sends
the clustering summaries, logs its layers and reports to the coordinator.

Restart: a server that dies loses the window in flight and the round's updates so far. `resume_round` puts a new
server process back into the current round (from the last complete round's checkpoint and the coordinator's
`start` record) and tells every participant that has not finished the round that its step in flight is lost
(`steps_lost`), so it goes on at once instead of after its own step timeout (client.py `_on_steps_lost`). A client's
activation for another step supersedes whatever the server still holds of that client (a pending activation, or its
place in the open window): a client sends one only after it gave up or finished its previous step, so the old one
is dead on its side. Once every client reported the round, the coordinator closes a server's round that is still
open (its clients gave up steps it never learned about).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..federation.summary import activation_summary
from ..model import CutBits, architecture, build_networks
from ..model.split import server_forward
from ..protocol import (
    ActivationSummaries,
    DHeadOut,
    DMidGrad,
    DMidOut,
    DTailGrad,
    GHeadOut,
    GMidGrad,
    GMidOut,
    GTailGrad,
    Message,
    RoundClose,
    RoundStart,
    RunEnd,
    ServerModel,
    ServerRoundDone,
    ServerUpdate,
    StepDropped,
    StepsLost,
    expect_shape,
)
from ..transport import CLUSTERING, COORDINATOR, SERVER, client_address
from . import checkpoint as ckpt
from .holder import BlockHolder
from .host import Reject, Role, RoleContext
from .pace import Pace

PHASE_INPUT = {
    "d_fwd": (DHeadOut, "d"),
    "d_bwd": (DTailGrad, "d"),
    "g_dfwd": (DHeadOut, "g"),
    "g_dbwd": (DTailGrad, "g"),
    "g_bwd": (GTailGrad, None),
}
NEXT_PHASE = {"d_fwd": "d_bwd", "d_bwd": "g_dfwd", "g_dfwd": "g_dbwd", "g_dbwd": "g_bwd", "g_bwd": None}


class _Window:
    def __init__(self, members: list[int], steps: dict[int, int], now: float):
        self.members = list(members)
        self.steps = steps
        self.phase = "g_fwd"
        self.phase_started = now
        self.inbox: dict[int, Message] = {}
        self.t: dict[str, dict[int, torch.Tensor]] = {}


class ServerRole(Role):
    name = "server"
    accepts = (RoundStart, RoundClose, GHeadOut, DHeadOut, DTailGrad, GTailGrad, ServerModel, RunEnd)

    def __init__(self, ctx: RoleContext, device: str | None = None, run_dir: str | Path | None = None):
        super().__init__(ctx)
        self.device = torch.device(device or ctx.cfg.runtime.resolved_server_device)
        self.run_dir = Path(run_dir) if run_dir else None
        self.arch = architecture(ctx.cfg.model)
        full = build_networks(ctx.cfg.model, ctx.cfg.train.seed)
        held = {spec.name: spec.server_blocks() for spec in self.arch.nets}
        self.holder = BlockHolder(ctx.cfg, full, held, str(self.device))
        self.round = 0
        self.in_round = False
        self.finished_run = False
        self.participants: list[int] = []
        self.cuts: dict[int, CutBits] = {}
        self.last_step: dict[int, int] = {}
        self.done_clients: set[int] = set()
        self.lagging: set[int] = set()
        self.pending: dict[int, GHeadOut] = {}
        self.pending_since = 0.0
        self.window: _Window | None = None
        self.summaries: dict[int, torch.Tensor] = {}
        self.late: Counter[int] = Counter()
        self._start_id = ""
        self.windows_run = 0
        self.window_seconds = 0.0
        self._window_t0 = 0.0
        rt = ctx.cfg.runtime
        self.pace = {phase: Pace(rt.step_deadline_s, rt.straggler_factor) for phase in PHASE_INPUT}
        self.arrival = Pace(rt.step_deadline_s, rt.straggler_factor)  # G heads' arrival after the round start
        self.round_started = 0.0

    def addresses(self) -> list[str]:
        return [SERVER]

    # ---------------------------------------------------------------------------------------------- dispatch
    def on_message(self, msg: Message) -> None:
        if isinstance(msg, RoundStart):
            self._on_round_start(msg)
        elif isinstance(msg, RoundClose):
            if msg.round == self.round and self.in_round:
                self._abort_window(f"round closed: {msg.reason}")
                self._finish_round()
        elif isinstance(msg, ServerModel):
            self._on_model(msg)
        elif isinstance(msg, RunEnd):
            self.finished_run = True
        elif isinstance(msg, GHeadOut):
            self._on_g_head(msg)
        else:
            self._on_phase_input(msg)

    def _on_round_start(self, msg: RoundStart) -> None:
        if msg.round == self.round and msg.msg_id == self._start_id:
            return  # redelivered (this process resumed the round from the ledger already)
        if msg.round < self.round or (msg.round == self.round and self.in_round):
            raise Reject(f"stale: round_start {msg.round} while in round {self.round}")
        self.round = msg.round
        self.participants = sorted(msg.participants)
        self.cuts = {c: CutBits.parse(b) for c, b in enumerate(msg.cuts)}
        missing = [c for c in self.participants if c not in self.cuts]
        if missing:
            raise Reject(f"bad_round_start: no cut bits for clients {missing}")
        self.last_step = {c: msg.steps_from + msg.steps - 1 for c in self.participants}
        self.done_clients = set()
        self.lagging = set()
        self.pending = {}
        self.window = None
        self.summaries = {}
        self.late = Counter()
        self._start_id = msg.msg_id
        rt = self.ctx.cfg.runtime
        self.arrival = Pace(rt.step_deadline_s, rt.straggler_factor)
        self.round_started = self.ctx.clock()
        self.in_round = True
        self.holder.train(True)

    def resume_round(self, start: RoundStart, finished: set[int]) -> None:
        """Rejoin round `start.round` after a restart; `finished`: clients that already reported the round done
        (they send nothing more this round)."""
        self._on_round_start(start)
        self.done_clients |= {c for c in finished if c in self.last_step}
        # The steps the dead server had in flight are gone: tell their clients now rather than leave them waiting
        # out their step timeout (5 x the step deadline).
        for c in self.participants:
            if c not in self.done_clients:
                lost = StepsLost(**self.envelope(self.round), client=c, reason="the server restarted")
                self.send(client_address(c), lost)
        self._maybe_finish_round()

    def _check_sender(self, msg: Message, client: int) -> None:
        if not self.in_round or msg.round != self.round:
            raise Reject(
                f"stale: {msg.KIND} for round {msg.round}, server is at round {self.round}"
                f"{'' if self.in_round else ' (between rounds)'}"
            )
        if client not in self.last_step:
            raise Reject(f"unknown_client: client {client} does not take part in round {self.round}")
        if msg.sender != client_address(client):
            raise Reject(f"bad_sender: {msg.sender!r} sent a message for client {client}")

    def _on_g_head(self, msg: GHeadOut) -> None:
        c = msg.client
        self._check_sender(msg, c)
        if msg.step > self.last_step[c] or msg.step < 0:
            raise Reject(f"bad_step: client {c} step {msg.step} is outside its round")
        g = self.arch.generator
        expect_shape("g_head_out.act", msg.act, (msg.act.shape[0], *g.head_output_shape(self.cuts[c].g_head)))
        if not 1 <= msg.act.shape[0] <= self.ctx.cfg.train.batch_size:
            raise Reject(f"bad_shape: batch of {msg.act.shape[0]} outside 1..{self.ctx.cfg.train.batch_size}")
        self._supersede(c, msg.step)
        if not self.pending:
            self.pending_since = self.ctx.clock()
        self.arrival.observe(self.ctx.clock() - self.round_started)
        self.pending[c] = msg
        self.lagging.discard(c)
        self._maybe_open_window(self.ctx.clock())

    def _supersede(self, c: int, step: int) -> None:
        """A client sends another step's activation only once it is done with its previous step (finished,
        dropped, timed out, or restarted from its round's first step), and the queue keeps its messages in order:
        so a new step means that whatever this server still holds of that client's steps is dead on its side. Its
        place goes to the new step, so the client is not left waiting for replies to a step it gave up (or, if it
        finished the round before it restarted, for the end of a round it is running again). The others' steps
        go on; a client can only give up its own contribution this way. The same step sent again (after a server
        restart, `steps_lost`) replaces a pending copy and is refused once that step is in a window."""
        w = self.window
        if w is not None and c in w.members and w.steps[c] == step:
            raise Reject(f"duplicate: client {c} step {step} is already in the open window")
        old = self.pending.pop(c, None)
        if old is not None:
            if old.step != step:
                self.ctx.log.info("server: client %d step %d supersedes its step %d", c, step, old.step)
        elif w is not None and c in w.members:
            self.ctx.log.info("server: client %d step %d supersedes its step %d (window)", c, step, w.steps[c])
            w.members.remove(c)
            w.inbox.pop(c, None)
            w.steps.pop(c)
            if all(m in w.inbox for m in w.members):
                self._advance()  # the others had all answered this phase already
        if c in self.done_clients:
            self.ctx.log.info("server: client %d runs round %d again from step %d", c, self.round, step)
            self.done_clients.discard(c)

    def _on_phase_input(self, msg: Message) -> None:
        c = msg.client
        self._check_sender(msg, c)
        w = self.window
        if w is None or c not in w.members or msg.step != w.steps[c]:
            raise Reject(f"late: {msg.KIND} from client {c} step {msg.step} is not part of the current window")
        kind, phase = PHASE_INPUT[w.phase]
        if not isinstance(msg, kind) or (phase is not None and msg.phase != phase):
            raise Reject(f"out_of_order: {msg.KIND} ({getattr(msg, 'phase', '')}) while the window is in {w.phase}")
        if c in w.inbox:
            raise Reject(f"duplicate: second {msg.KIND} from client {c}")
        self._validate_phase_input(w, c, msg)
        w.inbox[c] = msg
        self.pace[w.phase].observe(self.ctx.clock() - w.phase_started)
        if all(m in w.inbox for m in w.members):
            self._advance()

    def _validate_phase_input(self, w: _Window, c: int, msg: Message) -> None:
        d = self.arch.discriminator
        cuts = self.cuts[c]
        B = w.t["g_in"][c].shape[0]
        if w.phase in ("d_fwd", "g_dfwd"):
            shape = (B, *d.head_output_shape(cuts.d_head))
            expect_shape("d_head_out.fake", msg.fake, shape)
            if w.phase == "d_fwd":
                if msg.real is None:
                    raise Reject("malformed: d_head_out phase d without the real activations")
                expect_shape("d_head_out.real", msg.real, shape)
        elif w.phase in ("d_bwd", "g_dbwd"):
            key = "d_out_f" if w.phase == "d_bwd" else "dg_out"
            expect_shape("d_tail_grad.fake", msg.fake, tuple(w.t[key][c].shape))
            if w.phase == "d_bwd":
                if msg.real is None:
                    raise Reject("malformed: d_tail_grad phase d without the real gradient")
                expect_shape("d_tail_grad.real", msg.real, tuple(w.t["d_out_r"][c].shape))
        elif w.phase == "g_bwd":
            expect_shape("g_tail_grad.grad", msg.grad, tuple(w.t["g_out"][c].shape))

    # ----------------------------------------------------------------------------------------------- windows
    def _waiting_for(self) -> set[int]:
        return {c for c in self.participants if c not in self.done_clients and c not in self.lagging}

    def _maybe_open_window(self, now: float) -> None:
        if self.window is not None or not self.pending or not self.in_round:
            return
        waiting = self._waiting_for()
        since, deadline = self._window_wait()
        if 2 * len(waiting & set(self.pending)) < len(waiting):
            deadline *= self._spike_factor()  # most have not sent yet: the host is slow, not they
        if not waiting <= set(self.pending) and now - since < deadline:
            return
        members = sorted(self.pending)
        for c in waiting - set(members):
            self.lagging.add(c)
            self.late[c] += 1
        msgs, self.pending = self.pending, {}
        self._open_window(members, msgs, now)

    def _open_window(self, members: list[int], msgs: dict[int, GHeadOut], now: float) -> None:
        w = _Window(members, {c: msgs[c].step for c in members}, now)
        self.window = w
        self._window_t0 = time.perf_counter()
        g = self.arch.generator
        self.holder.zero_grad("G")
        g_in = {c: msgs[c].act.to(self.device).clone().requires_grad_(True) for c in members}
        bits = {c: (self.cuts[c].g_head, self.cuts[c].g_tail) for c in members}
        g_out, _ = server_forward(g, self.holder.blocks["G"], g_in, bits)
        w.t["g_in"], w.t["g_out"] = g_in, g_out
        self._to_phase(w, "d_fwd", now)
        for c in members:
            self.send(
                client_address(c), GMidOut(**self.envelope(self.round, w.steps[c]), client=c, act=g_out[c].detach())
            )
        w.phase_started = self.ctx.clock()  # the members' time to answer starts once they have the outputs

    def _to_phase(self, w: _Window, phase: str, now: float) -> None:
        w.phase = phase
        w.phase_started = now
        w.inbox = {}

    def _advance(self) -> None:
        w = self.window
        assert w is not None
        d = self.arch.discriminator
        now = self.ctx.clock()
        inbox, members = w.inbox, [m for m in w.members if m in w.inbox]
        w.members = members
        if not members:
            self._close_window()
            return
        blocks = self.holder.blocks["D"]
        dbits = {c: (self.cuts[c].d_head, self.cuts[c].d_tail) for c in members}
        env = {c: self.envelope(self.round, w.steps[c]) for c in members}
        if w.phase == "d_fwd":
            self.holder.zero_grad("D")
            in_f = {c: inbox[c].fake.to(self.device).clone().requires_grad_(True) for c in members}
            in_r = {c: inbox[c].real.to(self.device).clone().requires_grad_(True) for c in members}
            out_f, _ = server_forward(d, blocks, in_f, dbits)
            out_r, captured = server_forward(d, blocks, in_r, dbits, capture=self.arch.summary_block)
            for c in members:
                if c in captured:
                    self.summaries[c] = activation_summary(captured[c]).cpu()
            w.t.update(d_in_f=in_f, d_in_r=in_r, d_out_f=out_f, d_out_r=out_r)
            self._to_phase(w, "d_bwd", now)
            for c in members:
                self.send(
                    client_address(c),
                    DMidOut(**env[c], client=c, phase="d", fake=out_f[c].detach(), real=out_r[c].detach()),
                )
        elif w.phase == "d_bwd":
            outs, grads = [], []
            for c in members:
                outs += [w.t["d_out_f"][c], w.t["d_out_r"][c]]
                grads += [inbox[c].fake.to(self.device), inbox[c].real.to(self.device)]
            torch.autograd.backward(outs, grads)
            self.holder.step("D")
            self._to_phase(w, "g_dfwd", now)
            for c in members:
                self.send(
                    client_address(c),
                    DMidGrad(**env[c], client=c, phase="d", fake=w.t["d_in_f"][c].grad, real=w.t["d_in_r"][c].grad),
                )
            for key in ("d_in_f", "d_in_r", "d_out_f", "d_out_r"):
                w.t.pop(key)
        elif w.phase == "g_dfwd":
            self.holder.zero_grad("D")
            in_g = {c: inbox[c].fake.to(self.device).clone().requires_grad_(True) for c in members}
            out_g, _ = server_forward(d, blocks, in_g, dbits)
            w.t.update(dg_in=in_g, dg_out=out_g)
            self._to_phase(w, "g_dbwd", now)
            for c in members:
                self.send(client_address(c), DMidOut(**env[c], client=c, phase="g", fake=out_g[c].detach()))
        elif w.phase == "g_dbwd":
            # Only the gradients at the members' cuts: the D middle's weight gradients of the G step are never
            # used (zeroed before the next D step), so they are not computed.
            torch.autograd.backward(
                [w.t["dg_out"][c] for c in members],
                [inbox[c].fake.to(self.device) for c in members],
                inputs=[w.t["dg_in"][c] for c in members],
            )
            self._to_phase(w, "g_bwd", now)
            for c in members:
                self.send(client_address(c), DMidGrad(**env[c], client=c, phase="g", fake=w.t["dg_in"][c].grad))
            w.t.pop("dg_in")
            w.t.pop("dg_out")
        elif w.phase == "g_bwd":
            torch.autograd.backward(
                [w.t["g_out"][c] for c in members], [inbox[c].grad.to(self.device) for c in members]
            )
            self.holder.step("G")
            for c in members:
                self.send(client_address(c), GMidGrad(**env[c], client=c, grad=w.t["g_in"][c].grad))
            self._close_window()
            return
        w.phase_started = self.ctx.clock()  # the members' time to answer starts once they have the outputs

    def _close_window(self) -> None:
        w = self.window
        assert w is not None
        for c, step in w.steps.items():
            if step >= self.last_step.get(c, -1):
                self.done_clients.add(c)
        self.windows_run += 1
        self.window_seconds += time.perf_counter() - self._window_t0
        self.ctx.metrics.step(time.perf_counter() - self._window_t0)
        self.window = None
        if self.pending:
            # The wait for the others starts when a window can open again: an activation that came in while this
            # window ran (a straggler's, after it was dropped) does not make the window's members late.
            self.pending_since = self.ctx.clock()
        self._maybe_finish_round()
        self._maybe_open_window(self.ctx.clock())

    def _drop(self, w: _Window, c: int, reason: str) -> None:
        self.late[c] += 1
        self.ctx.log.info("server: dropping client %d from step %d (%s)", c, w.steps[c], reason)
        self.send(client_address(c), StepDropped(**self.envelope(self.round, w.steps[c]), client=c, reason=reason))

    def _abort_window(self, reason: str) -> None:
        w = self.window
        if w is not None:
            for c in w.members:
                self._drop(w, c, reason)
            self.window = None
        for c, msg in self.pending.items():
            self.send(client_address(c), StepDropped(**self.envelope(self.round, msg.step), client=c, reason=reason))
        self.pending = {}

    def tick(self, now: float) -> None:
        if not self.in_round:
            return
        w = self.window
        deadline = self._phase_deadline(w) if w is not None else 0.0
        if w is not None and now - w.phase_started >= deadline:
            missing = [c for c in w.members if c not in w.inbox]
            for c in missing:
                self._drop(w, c, f"missed the {w.phase} deadline of {deadline:.3g}s")
                if w.steps[c] >= self.last_step.get(c, -1):
                    self.done_clients.add(c)
            self._advance()
        else:
            self._maybe_open_window(now)

    def _window_wait(self) -> tuple[float, float]:
        """(since when, how long) a window waits for clients that have not sent their activation."""
        measured = [p.deadline() for p in self.pace.values() if len(p)]
        if measured:
            return self.pending_since, max(measured)
        if self.arrival.factor > 0 and len(self.arrival):
            # Nothing measured yet (the run's first window): the missing are waited for factor times as long as
            # their peers took to send theirs after the round start (at least step_deadline_s), not forever: a
            # participant that never sends must not hold every window of the round until the round deadline.
            return self.round_started, self.arrival.deadline()
        return self.pending_since, self._fixed_deadline()

    def _fixed_deadline(self) -> float:
        """The deadline before anything was measured: the configured one, or none when deadlines follow the pace."""
        rt = self.ctx.cfg.runtime
        return rt.step_deadline_s if rt.straggler_factor <= 0 else math.inf

    def _spike_factor(self) -> float:
        return max(1.0, self.ctx.cfg.runtime.straggler_factor)

    def _phase_deadline(self, w: _Window) -> float:
        pace = self.pace[w.phase]
        if pace.factor > 0 and 2 * len(w.inbox) < len(w.members):
            if len(pace) < len(w.members):
                # Too little measured yet (the first windows): a member is late only once half its peers answered.
                return math.inf
            # Most members have not answered: the host slowed them all (a load spike the median has not caught up
            # with), not one of them. They get factor times longer; a dead member is dropped all the same.
            return pace.deadline() * self._spike_factor()
        return pace.deadline()

    # ---------------------------------------------------------------------------------------------- round end
    def _maybe_finish_round(self) -> None:
        if (
            self.in_round
            and self.window is None
            and not self.pending
            and all(c in self.done_clients for c in self.participants)
        ):
            self._finish_round()

    def _finish_round(self) -> None:
        self.in_round = False
        self.ctx.metrics.round_finished()
        env = self.envelope(self.round)
        if self.summaries:
            self.send(
                CLUSTERING, ActivationSummaries(**env, summaries={str(c): s for c, s in sorted(self.summaries.items())})
            )
        update = ServerUpdate(**env, state=self.holder.state())
        self.log_update(update.encode(), self.round, update.KIND)
        metrics = {"windows": float(self.windows_run)}
        if self.windows_run:
            metrics["window_s"] = self.window_seconds / self.windows_run
        self.windows_run, self.window_seconds = 0, 0.0
        self.send(
            COORDINATOR,
            ServerRoundDone(
                **env,
                steps_done=int(metrics["windows"]),
                update_digest=update.msg_id,
                metrics=metrics,
                late={str(c): n for c, n in self.late.items()},
            ),
        )

    def _on_model(self, msg: ServerModel) -> None:
        if msg.round < self.round or (msg.round == self.round and self.in_round):
            # A re-queued aggregation job answered twice: the server has moved on; loading it would undo training.
            raise Reject(f"stale: server model of round {msg.round} while in round {self.round}")
        have = self.holder.state()
        if set(msg.state) != set(have):
            raise Reject("bad_model: the server model does not hold exactly the server's blocks")
        for k, v in have.items():
            expect_shape(f"server_model.state.{k}", msg.state[k], tuple(v.shape))
        self.holder.load(msg.state)
        self.save_checkpoint(msg.round)

    # ----------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, round: int) -> None:
        if self.run_dir is None:
            return
        ckpt.save_checkpoint(
            ckpt.round_dir(self.run_dir, round) / "server.pt",
            role="server",
            round=round,
            config=self.ctx.cfg.to_dict(include_runtime=False),
            state=self.holder.state(),
            optimizers=self.holder.optimizer_states(),
        )

    def restore(self, blob: dict[str, Any]) -> None:
        self.holder.load(blob["state"])
        self.holder.load_optimizer_states(blob["optimizers"])
        self.round = int(blob["round"])
