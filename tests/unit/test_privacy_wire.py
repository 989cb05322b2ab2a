"""Privacy on the wire: a spy records every message of full rounds (transport and update log).

Checked:
- no message carries labels, noise, images, real/fake targets or per-sample losses: no tensor has the shape of any
  of them, and the raw bytes of the clients' actual batches (images, labels, noise) appear in no message body;
- activations and gradients have exactly the declared shapes for the sender's cut bits;
- aggregation inputs (client updates in the log) hold exactly the layers the client holds; each model assignment
  holds exactly the recipient's layers; the clustering service receives only [128, 7, 7] summaries;
- the scalar metrics that reach the coordinator (and from it the ledger) are exactly the names listed here.
"""

from __future__ import annotations

import pytest
import torch

from hfgan_core.config import DomainConfig, RunConfig, RuntimeConfig, ScenarioConfig, TrainConfig
from hfgan_core.data import TensorClientData
from hfgan_core.model import CutBits, architecture
from hfgan_core.protocol import (
    ActivationSummaries,
    ClientUpdate,
    DHeadOut,
    DMidGrad,
    DMidOut,
    DTailGrad,
    GHeadOut,
    GMidGrad,
    GMidOut,
    GTailGrad,
    ModelAssignment,
    RoundDone,
    ServerModel,
    ServerRoundDone,
    ServerUpdate,
    decode,
)
from hfgan_core.runtime.embedded import EmbeddedRunner
from hfgan_core.state import MemoryRoundStore
from hfgan_core.transport import MemoryTransport

CLIENT_METRICS = {"d_loss_real", "d_loss_fake", "g_loss", "step_s", "compute_s", "steps_dropped"}
SERVER_METRICS = {"windows", "window_s"}
CUTS = [(0, 0, 0, 0), (1, 1, 1, 1), (1, 0, 1, 0), (0, 1, 0, 1)]
B = 32


class SpiedData(TensorClientData):
    """Random client data that remembers every batch it hands out."""

    def __init__(self, n: int, seed: int, batches: list):
        base = TensorClientData.random(n, seed)
        super().__init__(base.images, base.labels)
        self.batches = batches

    def batch(self, generator: torch.Generator, batch_size: int):
        x, y = super().batch(generator, batch_size)
        self.batches.append((x.clone(), y.clone()))
        return x, y


@pytest.mark.slow
def test_nothing_private_leaves_a_client(monkeypatch):
    cfg = RunConfig(
        scenario=ScenarioConfig(domains=(DomainConfig("synthetic", 4),)),
        train=TrainConfig(
            rounds=3, local_epochs=1, steps_per_epoch=2, batch_size=B, cuts=tuple(CUTS), kld_from_round=2, clusters=2
        ),
        runtime=RuntimeConfig(),
    ).validate()
    transport, store = MemoryTransport(), MemoryRoundStore()
    sent: list[tuple[str, bytes]] = []
    transport.spy = lambda address, body: sent.append((address, body))
    original_append = transport.append_log

    def spy_log(body: bytes, *, round: int) -> None:
        sent.append(("log", body))
        original_append(body, round=round)

    transport.append_log = spy_log

    batches: list = []
    noise: list[torch.Tensor] = []
    real_randn = torch.randn

    def spy_randn(*args, **kwargs):
        out = real_randn(*args, **kwargs)
        if len(args) == 2 and args[1] == cfg.model.z_dim:
            noise.append(out.clone())
        return out

    import hfgan_core.runtime.client as client_mod

    monkeypatch.setattr(client_mod.torch, "randn", spy_randn)
    datas = [SpiedData(100, seed=i, batches=batches) for i in range(4)]
    runner = EmbeddedRunner(cfg, datas, [0, 0, 0, 0], run_id="priv", transport=transport, store=store)
    result = runner.run()
    monkeypatch.setattr(client_mod.torch, "randn", real_randn)
    assert len(result.reports) == 3 and not transport.dead_letters()
    assert len(batches) == 4 * 2 * 3 and len(noise) == len(batches)

    arch = architecture(cfg.model)
    g, d = arch.generator, arch.discriminator
    cuts = {c: CutBits(*CUTS[c]) for c in range(4)}
    forbidden_shapes = {(B,), (B, 1), (B, cfg.model.z_dim), (B, 1, 28, 28), (B, 2, 28, 28)}
    kinds_seen = set()
    for address, body in sent:
        msg = decode(body)
        kinds_seen.add(msg.KIND)
        for name, t in msg.tensors().items():
            assert tuple(t.shape) not in forbidden_shapes, (msg.KIND, name, tuple(t.shape))
        c = getattr(msg, "client", None)
        if isinstance(msg, GHeadOut):
            assert msg.act.shape == (B, *g.head_output_shape(cuts[c].g_head))
        elif isinstance(msg, GMidOut):
            assert msg.act.shape == (B, *g.tail_input_shape(cuts[c].g_tail))
        elif isinstance(msg, GTailGrad):
            assert msg.grad.shape == (B, *g.tail_input_shape(cuts[c].g_tail))
        elif isinstance(msg, GMidGrad):
            assert msg.grad.shape == (B, *g.head_output_shape(cuts[c].g_head))
        elif isinstance(msg, DHeadOut | DMidGrad):
            shape = (B, *d.head_output_shape(cuts[c].d_head))
            assert msg.fake.shape == shape and (msg.real is None or msg.real.shape == shape)
            assert (msg.real is None) == (msg.phase == "g")
        elif isinstance(msg, DMidOut | DTailGrad):
            shape = (B, *d.tail_input_shape(cuts[c].d_tail))
            assert msg.fake.shape == shape and (msg.real is None or msg.real.shape == shape)
        elif isinstance(msg, ClientUpdate):
            assert address == "log"
            held = {f"{s.name}.{i}." for s in arch.nets for i in s.client_blocks(*cuts[c].for_net(s.name))}
            assert {k.rsplit(".", 1)[0].rsplit(".", 0)[0] for k in msg.state}
            assert {".".join(k.split(".")[:2]) + "." for k in msg.state} == held
        elif isinstance(msg, ModelAssignment):
            assert address == f"client.{c}"
            held = {f"{s.name}.{i}." for s in arch.nets for i in s.client_blocks(*cuts[c].for_net(s.name))}
            assert {".".join(k.split(".")[:2]) + "." for k in msg.state} == held
        elif isinstance(msg, ServerUpdate | ServerModel):
            server_blocks = {f"{s.name}.{i}." for s in arch.nets for i in s.server_blocks()}
            assert {".".join(k.split(".")[:2]) + "." for k in msg.state} == server_blocks
        elif isinstance(msg, ActivationSummaries):
            assert address == "clustering"
            assert set(msg.summaries) == {"0", "1", "2", "3"}
            assert all(t.shape == (128, 7, 7) for t in msg.summaries.values())
        elif isinstance(msg, RoundDone):
            assert set(msg.metrics) <= CLIENT_METRICS and {"d_loss_real", "d_loss_fake", "g_loss"} <= set(msg.metrics)
        elif isinstance(msg, ServerRoundDone):
            assert set(msg.metrics) <= SERVER_METRICS
        if address == "clustering":
            assert isinstance(msg, ActivationSummaries)
    assert {"g_head_out", "d_head_out", "client_update", "model_assignment", "activation_summaries"} <= kinds_seen

    # The raw bytes of every batch the clients drew (images, labels, noise) appear in no message.
    bodies = [body for _, body in sent]
    needles = []
    for (x, y), z in zip(batches, noise):
        for t in (x, y, z):
            raw = t.contiguous().numpy().tobytes()
            needles.append(raw[len(raw) // 2 : len(raw) // 2 + 48])
    for needle in needles:
        assert not any(needle in body for body in bodies)

    # The ledger holds only the scalar metrics named above.
    for r in range(1, 4):
        for who, metrics in store.get_metrics("priv", r).items():
            assert set(metrics) <= (SERVER_METRICS if who == "server" else CLIENT_METRICS), (who, metrics)
