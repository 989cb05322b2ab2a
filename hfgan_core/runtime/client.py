"""The client role: holds its data and the first and last blocks of G and D; drives its side of every step.

One training step, from the client's side (docs/ARCHITECTURE.md section 3; the server's side is in server.py):

    1. draw a batch (x, y) of its own data and noise z; G head(z, y) -> server              [g_head_out]
    2. G tail -> fakes; D head on the detached fakes and on the reals -> server              [d_head_out, "d"]
    3. D tail -> BCE(fake, 0) + BCE(real, 1); gradients at the D tail inputs -> server       [d_tail_grad, "d"]
    4. gradients at the D head outputs -> D head backward; Adam step on the client's D;
       D head (updated) on the same fakes, with their graph -> server                        [d_head_out, "g"]
    5. D tail -> BCE(fake, 1); gradient at the D tail input -> server                        [d_tail_grad, "g"]
    6. gradient at the D head output -> backward into the fakes and the G tail;
       gradient at the G tail input -> server                                                 [g_tail_grad]
    7. gradient at the G head output -> G head backward; Adam step on the client's G.

Labels, noise, images, targets and losses stay here; only activations and gradients at the cuts leave.

Every wait has a deadline here too: a step that gets no reply for `step_timeout_factor` x the step deadline (its
window was lost with a server that died) is abandoned as dropped and the next one starts, so a client never hangs;
a server that restarts says so at once (`steps_lost`): a step past its first reply is abandoned then, and one still
waiting for it sends its activation again.
The factor (5) is the longest a reply can legitimately take: a client whose activation missed a window waits for
that window, whose five phases each end at the step deadline at the latest. The step deadline here follows the
replies' measured pace as the server's does (pace.py), so a busy host does not time out a live server. The optional
`delay(role, segment)` hook runs after each client-side segment (names in `SEGMENTS`), before its result is sent:
device emulation (emulation.py) sleeps there.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..config import DeviceProfile
from ..model import CutBits, architecture, build_networks, canonical_state
from ..model.split import run_blocks
from ..protocol import (
    ClientUpdate,
    DHeadOut,
    DMidGrad,
    DMidOut,
    DTailGrad,
    GHeadOut,
    GMidGrad,
    GMidOut,
    GTailGrad,
    Join,
    Message,
    ModelAssignment,
    RoundClose,
    RoundDone,
    RoundStart,
    RunEnd,
    StepDropped,
    StepsLost,
    expect_shape,
)
from ..transport import COORDINATOR, SERVER, client_address
from . import checkpoint as ckpt
from .holder import BlockHolder
from .host import Reject, Role, RoleContext
from .pace import Pace


class ClientData(Protocol):
    n: int

    def batch(self, generator: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]: ...


# The client-side segments of one step, in order (the `delay` hook's second argument).
SEGMENTS = (
    "g_head_fwd",
    "g_tail_fwd+d_head_fwd",
    "d_tail_d",
    "d_head_bwd+d_head_fwd",
    "d_tail_g",
    "d_head_bwd+g_tail_bwd",
    "g_head_bwd",
)


def client_seed(seed: int, client: int) -> int:
    return int.from_bytes(hashlib.sha256(f"hfgan-client:{seed}:{client}".encode()).digest()[:8], "little") >> 1


class ClientRole(Role):
    accepts = (
        RoundStart,
        RoundClose,
        GMidOut,
        DMidOut,
        DMidGrad,
        GMidGrad,
        StepDropped,
        StepsLost,
        ModelAssignment,
        RunEnd,
    )
    step_timeout_factor = 5.0

    def __init__(
        self,
        ctx: RoleContext,
        client: int,
        domain: int,
        data: ClientData,
        profile: DeviceProfile | None = None,
        device: str | None = None,
        run_dir: str | Path | None = None,
        delay=None,
    ):
        super().__init__(ctx)
        self.client = client
        self.domain = domain
        self.data = data
        self.profile = profile
        self.name = f"client.{client}"
        self.device = torch.device(device or ctx.cfg.runtime.device)
        self.run_dir = Path(run_dir) if run_dir else None
        self.arch = architecture(ctx.cfg.model)
        self.rng = torch.Generator().manual_seed(client_seed(ctx.cfg.train.seed, client))
        self.delay = delay  # optional device emulation: delay(role, segment) sleeps (see SEGMENTS)
        self._full = build_networks(ctx.cfg.model, ctx.cfg.train.seed)
        self.cuts: CutBits | None = None
        self.holder: BlockHolder | None = None
        self.round = 0
        self.cluster = 0
        self.finished = False
        self._start_id = ""
        self._seg_t0 = time.perf_counter()
        self._last_progress = ctx.clock()
        self.steps_timed_out = 0
        self.pace = Pace(ctx.cfg.runtime.step_deadline_s, ctx.cfg.runtime.straggler_factor)
        self._reset_round()

    # ------------------------------------------------------------------------------------------ lifecycle
    def addresses(self) -> list[str]:
        return [client_address(self.client)]

    def start(self) -> None:
        p = self.profile
        profile = {"cpu_mhz": p.cpu_mhz, "flops_per_cycle": p.flops_per_cycle, "data_rate": p.data_rate} if p else {}
        self.send(
            COORDINATOR,
            Join(
                **self.envelope(0), client=self.client, domain=self.domain, n_samples=int(self.data.n), profile=profile
            ),
        )

    def _reset_round(self) -> None:
        self.in_round = False
        self.step = -1
        self.last_step = -1
        self.phase = "idle"
        self._t: dict[str, torch.Tensor] = {}
        self._losses: dict[str, list[float]] = {"d_loss_real": [], "d_loss_fake": [], "g_loss": []}
        self._step_times: list[float] = []
        self._compute_times: list[float] = []
        self._compute_in_step = 0.0
        self._step_started = 0.0
        self.steps_done = 0
        self.steps_dropped = 0

    def _apply_cuts(self, cuts: CutBits, state: dict[str, torch.Tensor] | None = None) -> None:
        """Hold the blocks these cut bits give the client; blocks it newly holds start from the initial weights
        (and are then normally overwritten by the cluster model that carries them)."""
        held = {spec.name: spec.client_blocks(*cuts.for_net(spec.name)) for spec in self.arch.nets}
        if self.holder is None:
            self.holder = BlockHolder(self.ctx.cfg, self._full, held, str(self.device))
            if state is not None:
                self.holder.load(state)
        else:
            self.holder.set_held(self._full, held, state)
        self.cuts = cuts

    # ---------------------------------------------------------------------------------------------- dispatch
    def on_message(self, msg: Message) -> None:
        self._seg_t0 = time.perf_counter()
        if isinstance(msg, RoundStart):
            self._on_round_start(msg)
        elif isinstance(msg, ModelAssignment):
            self._on_assignment(msg)
        elif isinstance(msg, RoundClose):
            if msg.round == self.round and self.in_round:
                self.ctx.log.info("%s: round %d closed before I finished (%s)", self.name, msg.round, msg.reason)
                self._reset_round()
        elif isinstance(msg, RunEnd):
            self.finished = True
        elif isinstance(msg, StepDropped):
            if msg.round == self.round and msg.step == self.step and self.in_round:
                self.steps_dropped += 1
                self._finish_step(dropped=True)
            else:
                raise Reject(f"stale: step_dropped for round {msg.round} step {msg.step}")
        elif isinstance(msg, StepsLost):
            self._on_steps_lost(msg)
        else:
            self._on_split(msg)

    def _on_steps_lost(self, msg: StepsLost) -> None:
        """The server restarted. The new server sends this before it reads its queue, so it reaches this client
        before anything the new server computes. A step past its first reply was in the dead server's window: it
        is lost, and the next step starts at once. A step still waiting for its first reply may have its
        activation in the server's queue (the new server serves it) or may have lost it with the dead server: the
        activation is sent once more, and the server takes the second copy of a step it still holds as that
        step (server.py `_supersede`)."""
        if not (self.in_round and msg.round == self.round and self.phase not in ("idle", "done")):
            raise Reject(f"stale: steps_lost for round {msg.round} (client at round {self.round}, {self.phase})")
        if self.phase == "g_fwd":
            self.ctx.log.warning(
                "%s: the server restarted (%s); sending step %d of round %d again",
                self.name,
                msg.reason,
                self.step,
                msg.round,
            )
            head = self._t["g_head"].detach()
            self.send(SERVER, GHeadOut(**self.envelope(self.round, self.step), client=self.client, act=head))
            return
        self.ctx.log.warning(
            "%s: the server lost step %d of round %d (%s); going on with the next",
            self.name,
            self.step,
            msg.round,
            msg.reason,
        )
        self.steps_dropped += 1
        self._finish_step(dropped=True)

    def _on_round_start(self, msg: RoundStart) -> None:
        if msg.round == self.round and msg.msg_id == self._start_id:
            return  # redelivered (this process resumed the round from the ledger already)
        if msg.round < self.round or (msg.round == self.round and self.in_round):
            raise Reject(f"stale: round_start {msg.round} while in round {self.round}")
        cuts = CutBits.parse(msg.cuts[self.client]) if self.client < len(msg.cuts) else None
        if cuts is None:
            raise Reject(f"bad_round_start: no cut bits for client {self.client}")
        if self.cuts != cuts:
            # Normally the previous round's model assignment already carried this round's blocks.
            self._apply_cuts(cuts)
        self._reset_round()
        self.round = msg.round
        self._start_id = msg.msg_id
        if self.client not in msg.participants:
            return
        self.in_round = True
        self.step = msg.steps_from - 1
        self.last_step = msg.steps_from + msg.steps - 1
        self.holder.train(True)
        self._start_step()

    # ---------------------------------------------------------------------------------------------- a step
    def resume_round(self, start: RoundStart) -> None:
        """Rejoin round `start.round` after a restart (from the coordinator's record of it): the round's steps are
        run again from the first, on the model this client held at the start of the round."""
        self._on_round_start(start)

    def tick(self, now: float) -> None:
        limit = self.step_timeout_factor * self.pace.deadline()
        if self.in_round and self.phase not in ("idle", "done") and now - self._last_progress > limit:
            self.ctx.log.warning(
                "%s: no reply for step %d of round %d in %.0f s (phase %s); abandoning the step",
                self.name,
                self.step,
                self.round,
                limit,
                self.phase,
            )
            self.steps_dropped += 1
            self.steps_timed_out += 1
            self._finish_step(dropped=True)

    def _start_step(self) -> None:
        self.step += 1
        self.phase = "g_fwd"
        # The g_head_fwd segment starts here: what ran before (a round start building the blocks, a restart's
        # set-up) is not the step's compute, and the emulated delay multiplies whatever this segment measures.
        self._step_started = self._seg_t0 = time.perf_counter()
        h = self.holder
        cfg = self.ctx.cfg
        x, y = self.data.batch(self.rng, cfg.train.batch_size)
        z = torch.randn(x.shape[0], cfg.model.z_dim, generator=self.rng)
        x, y, z = x.to(self.device), y.to(self.device), z.to(self.device)
        h.zero_grad("D")
        h.zero_grad("G")
        g = self.arch.generator
        head = run_blocks(h.blocks["G"], g.client_head(self.cuts.g_head), z, y)
        self._t = {"x": x, "y": y, "g_head": head}
        self._work("g_head_fwd")
        self.send(SERVER, GHeadOut(**self.envelope(self.round, self.step), client=self.client, act=head.detach()))

    def _expect(self, msg: Message, phase: str) -> None:
        if not self.in_round or msg.round != self.round or msg.step != self.step:
            raise Reject(
                f"stale: {msg.KIND} for round {msg.round} step {msg.step}, "
                f"client is at round {self.round} step {self.step}"
            )
        if self.phase != phase:
            raise Reject(f"out_of_order: {msg.KIND} in phase {self.phase}")

    def _on_split(self, msg: Message) -> None:
        if self.in_round and msg.round == self.round and msg.step == self.step:
            self.pace.observe(self.ctx.clock() - self._last_progress)  # how long the server took to reply
        t = self._t
        B = t["x"].shape[0] if "x" in t else 0
        if isinstance(msg, GMidOut):
            self._on_g_mid_out(msg, B)
        elif isinstance(msg, DMidOut) and msg.phase == "d":
            self._on_d_mid_out_d(msg, B)
        elif isinstance(msg, DMidGrad) and msg.phase == "d":
            self._on_d_mid_grad_d(msg)
        elif isinstance(msg, DMidOut) and msg.phase == "g":
            self._on_d_mid_out_g(msg, B)
        elif isinstance(msg, DMidGrad) and msg.phase == "g":
            self._on_d_mid_grad_g(msg)
        elif isinstance(msg, GMidGrad):
            self._on_g_mid_grad(msg)
        else:
            raise Reject(f"unexpected: {msg.KIND} phase {getattr(msg, 'phase', '')!r}")

    def _on_g_mid_out(self, msg: GMidOut, B: int) -> None:
        """g_fwd: the generator tail and the discriminator heads on fakes and reals."""
        g, d = self.arch.generator, self.arch.discriminator
        h, t, cuts = self.holder, self._t, self.cuts
        self._expect(msg, "g_fwd")
        expect_shape("g_mid_out.act", msg.act, (B, *g.tail_input_shape(cuts.g_tail)))
        t_in = msg.act.to(self.device).clone().requires_grad_(True)
        fake = run_blocks(h.blocks["G"], g.client_tail(cuts.g_tail), t_in)
        heads = d.client_head(cuts.d_head)
        d_fake = run_blocks(h.blocks["D"], heads, fake.detach(), t["y"])
        d_real = run_blocks(h.blocks["D"], heads, t["x"], t["y"])
        t.update(g_tail_in=t_in, fake=fake, d_fake=d_fake, d_real=d_real)
        self.phase = "d_fwd"
        self._work("g_tail_fwd+d_head_fwd")
        self.send(
            SERVER,
            DHeadOut(
                **self.envelope(self.round, self.step),
                client=self.client,
                phase="d",
                fake=d_fake.detach(),
                real=d_real.detach(),
            ),
        )

    def _on_d_mid_out_d(self, msg: DMidOut, B: int) -> None:
        """d_fwd: the discriminator tails and its loss, backward to the cut."""
        d = self.arch.discriminator
        h, cuts = self.holder, self.cuts
        self._expect(msg, "d_fwd")
        shape = (B, *d.tail_input_shape(cuts.d_tail))
        expect_shape("d_mid_out.fake", msg.fake, shape)
        if msg.real is None:
            raise Reject("malformed: d_mid_out phase d without the real activations")
        expect_shape("d_mid_out.real", msg.real, shape)
        tails = d.client_tail(cuts.d_tail)
        in_f = msg.fake.to(self.device).clone().requires_grad_(True)
        in_r = msg.real.to(self.device).clone().requires_grad_(True)
        out_f = run_blocks(h.blocks["D"], tails, in_f)
        out_r = run_blocks(h.blocks["D"], tails, in_r)
        loss_f = F.binary_cross_entropy(out_f, torch.zeros_like(out_f))
        loss_r = F.binary_cross_entropy(out_r, torch.ones_like(out_r))
        (loss_f + loss_r).backward()
        self._losses["d_loss_fake"].append(float(loss_f.detach()))
        self._losses["d_loss_real"].append(float(loss_r.detach()))
        self.phase = "d_bwd"
        self._work("d_tail_d")
        self.send(
            SERVER,
            DTailGrad(
                **self.envelope(self.round, self.step),
                client=self.client,
                phase="d",
                fake=in_f.grad,
                real=in_r.grad,
            ),
        )

    def _on_d_mid_grad_d(self, msg: DMidGrad) -> None:
        """d_bwd: the discriminator heads backward and the D step, then D on the fakes for the G step."""
        d = self.arch.discriminator
        h, t, cuts = self.holder, self._t, self.cuts
        self._expect(msg, "d_bwd")
        expect_shape("d_mid_grad.fake", msg.fake, tuple(t["d_fake"].shape))
        if msg.real is None:
            raise Reject("malformed: d_mid_grad phase d without the real gradient")
        expect_shape("d_mid_grad.real", msg.real, tuple(t["d_real"].shape))
        torch.autograd.backward([t["d_fake"], t["d_real"]], [msg.fake.to(self.device), msg.real.to(self.device)])
        h.step("D")
        # G step: D (now updated) on the same fakes, keeping their graph back to the generator.
        h.zero_grad("D")
        d_gen = run_blocks(h.blocks["D"], d.client_head(cuts.d_head), t["fake"], t["y"])
        t["d_gen"] = d_gen
        self.phase = "g_dfwd"
        self._work("d_head_bwd+d_head_fwd")
        self.send(
            SERVER,
            DHeadOut(**self.envelope(self.round, self.step), client=self.client, phase="g", fake=d_gen.detach()),
        )

    def _on_d_mid_out_g(self, msg: DMidOut, B: int) -> None:
        """g_dfwd: the discriminator tail on the fakes and the generator loss, backward to the cut."""
        d = self.arch.discriminator
        h, cuts = self.holder, self.cuts
        self._expect(msg, "g_dfwd")
        expect_shape("d_mid_out.fake", msg.fake, (B, *d.tail_input_shape(cuts.d_tail)))
        in_g = msg.fake.to(self.device).clone().requires_grad_(True)
        out = run_blocks(h.blocks["D"], d.client_tail(cuts.d_tail), in_g)
        g_loss = F.binary_cross_entropy(out, torch.ones_like(out))
        # The G step needs only the gradient at the cut, not the D tail's weight gradients (zeroed unused before
        # the next D step): computing just the former skips kernels and changes no value.
        g_loss.backward(inputs=[in_g])
        self._losses["g_loss"].append(float(g_loss.detach()))
        self.phase = "g_dbwd"
        self._work("d_tail_g")
        self.send(
            SERVER, DTailGrad(**self.envelope(self.round, self.step), client=self.client, phase="g", fake=in_g.grad)
        )

    def _on_d_mid_grad_g(self, msg: DMidGrad) -> None:
        """g_dbwd: the discriminator head backward to the generator tail."""
        t = self._t
        self._expect(msg, "g_dbwd")
        expect_shape("d_mid_grad.fake", msg.fake, tuple(t["d_gen"].shape))
        # Into the G tail and its input only: the D head's weight gradients of the G step are never used.
        t["d_gen"].backward(msg.fake.to(self.device), inputs=[t["g_tail_in"], *self.holder.parameters("G")])
        grad = t["g_tail_in"].grad
        self.phase = "g_bwd"
        self._work("d_head_bwd+g_tail_bwd")
        self.send(SERVER, GTailGrad(**self.envelope(self.round, self.step), client=self.client, grad=grad))

    def _on_g_mid_grad(self, msg: GMidGrad) -> None:
        """g_bwd: the generator head backward and the G step; the step is done."""
        h, t = self.holder, self._t
        self._expect(msg, "g_bwd")
        expect_shape("g_mid_grad.grad", msg.grad, tuple(t["g_head"].shape))
        t["g_head"].backward(msg.grad.to(self.device))
        h.step("G")
        self._work("g_head_bwd")
        self._finish_step(dropped=False)

    def _work(self, what: str) -> None:
        if self.delay is not None:
            self.delay(self, what)
        now = time.perf_counter()
        # The client's own compute (and emulated delay) in this step, without the waits for the server: what the
        # adaptive planner compares with its model.
        self._compute_in_step += now - self._seg_t0
        self._seg_t0 = now
        self._last_progress = self.ctx.clock()

    def segment_seconds(self) -> float:
        """Seconds this client has computed since its current segment began (for the `delay` hook)."""
        return time.perf_counter() - self._seg_t0

    def _finish_step(self, dropped: bool) -> None:
        self._t = {}
        self._step_times.append(time.perf_counter() - self._step_started)
        self.ctx.metrics.step(self._step_times[-1], dropped)
        self._compute_times.append(self._compute_in_step)
        self._compute_in_step = 0.0
        if not dropped:
            self.steps_done += 1
        if self.step >= self.last_step:
            self._finish_round()
        else:
            self._start_step()

    # ---------------------------------------------------------------------------------------------- round end
    def _finish_round(self) -> None:
        self.phase = "done"
        self.in_round = False
        self.ctx.metrics.round_finished()
        state = self.holder.state()
        update = ClientUpdate(
            **self.envelope(self.round),
            client=self.client,
            cuts=(tuple(self.cuts),),
            n_samples=int(self.data.n),
            state=state,
        )
        body = update.encode()
        self.log_update(body, self.round, update.KIND)
        metrics = {k: sum(v) / len(v) for k, v in self._losses.items() if v}
        if self._step_times:
            metrics["step_s"] = sum(self._step_times) / len(self._step_times)
            metrics["compute_s"] = sorted(self._compute_times)[len(self._compute_times) // 2]
        metrics["steps_dropped"] = float(self.steps_dropped)
        self.send(
            COORDINATOR,
            RoundDone(
                **self.envelope(self.round),
                client=self.client,
                n_samples=int(self.data.n),
                steps_done=self.steps_done,
                update_digest=update.msg_id,
                metrics=metrics,
            ),
        )

    def _on_assignment(self, msg: ModelAssignment) -> None:
        if msg.client != self.client:
            raise Reject(f"misrouted: model for client {msg.client} delivered to client {self.client}")
        if msg.round < self.round:
            raise Reject(f"stale: model of round {msg.round} while in round {self.round}")
        new_cuts = _cuts_of_state(self.arch, msg.state)
        # Checked against the blocks these cut bits give a client before anything changes: a rejected assignment
        # must leave the blocks this client holds (and their optimizer state) as they were.
        held = {spec.name: spec.client_blocks(*new_cuts.for_net(spec.name)) for spec in self.arch.nets}
        shapes = {
            k: tuple(v.shape)
            for net, idxs in held.items()
            for k, v in canonical_state(net, {i: self._full[net][i] for i in idxs}).items()
        }
        if set(msg.state) != set(shapes):
            raise Reject(f"bad_model: keys do not match the blocks held ({held})")
        for k, shape in shapes.items():
            expect_shape(f"model_assignment.state.{k}", msg.state[k], shape)
        if self.holder is None or self.cuts != new_cuts:
            self._apply_cuts(new_cuts, None)
        self.holder.load(msg.state)
        self.cluster = msg.cluster
        self.save_checkpoint(msg.round)

    # ----------------------------------------------------------------------------------------- checkpoints
    def checkpoint_name(self) -> str:
        return f"client_{self.client}.pt"

    def save_checkpoint(self, round: int) -> None:
        if self.run_dir is None:
            return
        ckpt.save_checkpoint(
            ckpt.round_dir(self.run_dir, round) / self.checkpoint_name(),
            role="client",
            round=round,
            config=self.ctx.cfg.to_dict(include_runtime=False),
            state=self.holder.state(),
            optimizers=self.holder.optimizer_states(),
            extra={
                "client": self.client,
                "cuts": list(self.cuts),
                "cluster": self.cluster,
                "rng": self.rng.get_state(),
            },
        )

    def restore(self, blob: dict[str, Any]) -> None:
        extra = blob["extra"]
        self._apply_cuts(CutBits.parse(extra["cuts"]), blob["state"])
        self.holder.load_optimizer_states(blob["optimizers"])
        self.cluster = int(extra["cluster"])
        self.rng.set_state(extra["rng"])
        self.round = int(blob["round"])


def _cuts_of_state(arch, state: dict[str, torch.Tensor]) -> CutBits:
    """Cut bits implied by which blocks a model assignment carries."""
    bits = []
    for spec in arch.nets:
        present = {int(k.split(".")[1]) for k in state if k.startswith(spec.name + ".")}
        head = next((hb for hb in (0, 1) if set(spec.client_head(hb)) == present & set(spec.client_head(1))), None)
        tail = next((tb for tb in (0, 1) if set(spec.client_tail(tb)) == present & set(spec.client_tail(1))), None)
        if head is None or tail is None or present != set(spec.client_blocks(head, tail)):
            raise Reject(f"bad_model: the blocks {sorted(present)} of {spec.name} are not a client's blocks")
        bits.append((head, tail))
    (gh, gt), (dh, dt) = bits
    return CutBits(gh, gt, dh, dt)
