"""Split equivalence (docs/ARCHITECTURE.md section 3): one step through the roles over the memory transport computes
exactly what the same model computes in one process.

- one client, each of the 16 cut-bit settings: against the unsplit G and D (UnsplitGAN);
- several clients with different cut bits: against the reference implementation's computation written out here by
  hand (per-client segments, server segments on the concatenated batch, one optimizer per segment).

Compared: the losses, the gradients each optimizer sees right before its step, and the parameters after the step,
all to a relative error of 1e-5 in float32 (and with bfloat16 compute on both sides).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from hfgan_core.config import DomainConfig, RunConfig, ScenarioConfig, TrainConfig
from hfgan_core.data import TensorClientData
from hfgan_core.model import CutBits, architecture, build_networks
from hfgan_core.protocol import RoundStart
from hfgan_core.runtime.client import ClientRole, client_seed
from hfgan_core.runtime.host import RoleContext, RoleHost
from hfgan_core.runtime.server import ServerRole
from hfgan_core.runtime.unsplit import UnsplitGAN
from hfgan_core.state import MemoryRoundStore
from hfgan_core.transport import SERVER, MemoryTransport, client_address

TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def make_cfg(
    n_clients: int, cuts: list[tuple[int, int, int, int]], batch: int = 64, compute_dtype: str = "float32"
) -> RunConfig:
    return RunConfig(
        scenario=ScenarioConfig(domains=(DomainConfig("synthetic", n_clients),)),
        train=TrainConfig(seed=11, cuts=tuple(cuts), batch_size=batch, compute_dtype=compute_dtype),
    ).validate()


def run_split_step(cfg: RunConfig, datas: list[TensorClientData], steps: int = 1):
    """Run `steps` steps through the real roles over the memory transport; record grads before each Adam step."""
    transport, store = MemoryTransport(), MemoryRoundStore()

    def ctx() -> RoleContext:
        return RoleContext(run="eq", cfg=cfg, transport=transport, store=store)

    server = ServerRole(ctx())
    clients = [ClientRole(ctx(), client=i, domain=0, data=d) for i, d in enumerate(datas)]
    grads: list[dict[str, torch.Tensor]] = []

    def recorder(holder):
        original = holder.step

        def step(net: str) -> None:
            grads.append({name: p.grad.clone() for name, p in holder._named_params(net) if p.grad is not None})
            original(net)

        holder.step = step

    for role in [server, *clients]:
        RoleHost(role, strict=True).bind()
    n = len(datas)
    cuts = tuple(tuple(cfg.train.cuts[i % len(cfg.train.cuts)]) for i in range(n))
    for c in clients:
        c._apply_cuts(CutBits(*cuts[c.client]))
        recorder(c.holder)
    recorder(server.holder)
    start = RoundStart(
        run="eq", round=1, sender="coordinator", participants=tuple(range(n)), cuts=cuts, steps=steps, deadline=1e18
    )
    transport.publish(SERVER, start.encode())
    for i in range(n):
        transport.publish(client_address(i), start.encode())
    while transport.process_one():
        pass
    assert all(c.phase == "done" and c.steps_done == steps for c in clients)
    assert not transport.dead_letters(), transport.dead_letters()
    merged_grads: dict[str, torch.Tensor] = {}
    for g in grads:  # names are unique per holder; clients are compared one by one below
        merged_grads.update(g)
    return server, clients, grads


# ------------------------------------------------------------------------------------------ one client, 16 cuts


@pytest.mark.slow
# bfloat16 compute (model/precision.py) runs the same autocast region per block on both sides and float32 across
# every cut, so the split run is still the unsplit model's computation: checked on cut bits that move each
# optional block to either side.
@pytest.mark.parametrize(
    "bits,compute_dtype",
    [pytest.param(b, "float32", id="".join(map(str, b))) for b in itertools.product((0, 1), repeat=4)]
    + [
        pytest.param(b, "bfloat16", id="".join(map(str, b)) + "-bf16")
        for b in ((0, 0, 0, 0), (1, 1, 1, 1), (1, 0, 0, 1))
    ],
)
def test_one_client_matches_unsplit(bits, compute_dtype):
    cfg = make_cfg(1, [bits], compute_dtype=compute_dtype)
    data = TensorClientData.random(200, seed=3)
    server, (client,), split_grads = run_split_step(cfg, [data])

    ref = UnsplitGAN(cfg)
    ref_grads: dict[str, dict[str, torch.Tensor]] = {}

    def hook(net, modules):
        ref_grads[net] = {
            f"{net}.{i}.{k}": p.grad.clone()
            for i, m in modules.items()
            for k, p in m.named_parameters()
            if p.grad is not None
        }

    ref.before_step = hook
    rng = torch.Generator().manual_seed(client_seed(cfg.train.seed, 0))
    x, y = data.batch(rng, cfg.train.batch_size)
    z = torch.randn(x.shape[0], cfg.model.z_dim, generator=rng)
    losses = ref.train_step(x, y, z)

    # Losses (the client's own, reported as scalars to the coordinator).
    assert client._losses["d_loss_real"][0] == pytest.approx(losses.d_loss_real, rel=TOL)
    assert client._losses["d_loss_fake"][0] == pytest.approx(losses.d_loss_fake, rel=TOL)
    assert client._losses["g_loss"][0] == pytest.approx(losses.g_loss, rel=TOL)

    # Gradients right before each optimizer step: every parameter of the model, from whichever side holds it.
    split: dict[str, torch.Tensor] = {}
    for g in split_grads:
        split.update(g)
    expected = {**ref_grads["D"], **ref_grads["G"]}
    arch = architecture(cfg.model)
    cuts = CutBits(*bits)
    used_server = {f"{s.name}.{i}." for s in arch.nets for i in s.server_path(*cuts.for_net(s.name))}
    used_client = {f"{s.name}.{i}." for s in arch.nets for i in s.client_blocks(*cuts.for_net(s.name))}
    for name, ref_grad in expected.items():
        prefix = ".".join(name.split(".")[:2]) + "."
        assert prefix in used_server | used_client
        assert name in split, f"no gradient for {name}"
        assert rel_err(split[name], ref_grad) <= TOL, name

    # Parameters and BatchNorm buffers after the step.
    after = {
        **client.holder.state(),
        **{k: v for k, v in server.holder.state().items() if any(k.startswith(p) for p in used_server)},
    }
    ref_state = {}
    for net, mods in ref.modules().items():
        for i, m in mods.items():
            ref_state.update({f"{net}.{i}.{k}": v for k, v in m.state_dict().items()})
    assert set(after) == set(ref_state)
    for name, value in ref_state.items():
        if value.is_floating_point():
            assert rel_err(after[name], value) <= TOL, name
        else:
            assert torch.equal(after[name], value), name


# ------------------------------------------------------------------------------- several clients, mixed cuts


def direct_reference_steps(cfg: RunConfig, datas: list[TensorClientData], steps: int):
    """The reference code's computation, written directly: per-client head/tail segments, the server's blocks on
    the concatenation of the clients that need them (head-on-server clients first), per-client BCE losses summed."""
    arch = architecture(cfg.model)
    g_spec, d_spec = arch.generator, arch.discriminator
    init = build_networks(cfg.model, cfg.train.seed)
    n = len(datas)
    cuts = [CutBits(*cfg.train.cuts[i % len(cfg.train.cuts)]) for i in range(n)]
    tr = cfg.train

    def adam(mods):
        return torch.optim.Adam([p for m in mods for p in m.parameters()], lr=tr.lr, betas=tr.betas)

    client_g = [{i: copy.deepcopy(init["G"][i]) for i in g_spec.client_blocks(c.g_head, c.g_tail)} for c in cuts]
    client_d = [{i: copy.deepcopy(init["D"][i]) for i in d_spec.client_blocks(c.d_head, c.d_tail)} for c in cuts]
    server_g = {i: copy.deepcopy(init["G"][i]) for i in g_spec.server_blocks()}
    server_d = {i: copy.deepcopy(init["D"][i]) for i in d_spec.server_blocks()}
    opt_cg = [adam(m.values()) for m in client_g]
    opt_cd = [adam(m.values()) for m in client_d]
    opt_sg, opt_sd = adam(server_g.values()), adam(server_d.values())
    rngs = [torch.Generator().manual_seed(client_seed(tr.seed, i)) for i in range(n)]
    history = []

    def server_part(blocks, xs, head_bits, tail_bits):
        # Clients whose optional head runs on the server enter at block 1: E1 on their concatenation first.
        a = [i for i in range(n) if head_bits[i] == 0]
        b = [i for i in range(n) if head_bits[i] == 1]
        parts = []
        if a:
            parts.append(blocks[1](torch.cat([xs[i] for i in a])))
        if b:
            parts.append(torch.cat([xs[i] for i in b]))
        e2 = blocks[2](torch.cat(parts))
        order = a + b
        chunks = dict(zip(order, torch.split(e2, [xs[i].shape[0] for i in order])))
        e3_users = [i for i in order if tail_bits[i] == 0]
        out = dict(chunks)
        if e3_users:
            e3 = blocks[3](torch.cat([chunks[i] for i in e3_users]))
            out.update(zip(e3_users, torch.split(e3, [xs[i].shape[0] for i in e3_users])))
        return [out[i] for i in range(n)]

    def head(blocks, spec, bit, x, y):
        for i in spec.client_head(bit):
            x = blocks[i](x, y) if i == 0 else blocks[i](x)
        return x

    def tail(blocks, spec, bit, x):
        for i in spec.client_tail(bit):
            x = blocks[i](x)
        return x

    def discriminate(images, labels):
        hs = [head(client_d[i], d_spec, cuts[i].d_head, images[i], labels[i]) for i in range(n)]
        mids = server_part(server_d, hs, [c.d_head for c in cuts], [c.d_tail for c in cuts])
        return [tail(client_d[i], d_spec, cuts[i].d_tail, mids[i]) for i in range(n)]

    for _ in range(steps):
        batches = [datas[i].batch(rngs[i], tr.batch_size) for i in range(n)]
        xs = [b[0] for b in batches]
        ys = [b[1] for b in batches]
        zs = [torch.randn(xs[i].shape[0], cfg.model.z_dim, generator=rngs[i]) for i in range(n)]
        for o in [opt_sd, *opt_cd]:
            o.zero_grad()
        g_heads = [head(client_g[i], g_spec, cuts[i].g_head, zs[i], ys[i]) for i in range(n)]
        g_mids = server_part(server_g, g_heads, [c.g_head for c in cuts], [c.g_tail for c in cuts])
        fakes = [tail(client_g[i], g_spec, cuts[i].g_tail, g_mids[i]) for i in range(n)]
        out_f = discriminate([f.detach() for f in fakes], ys)
        loss_f = [F.binary_cross_entropy(o, torch.zeros_like(o)) for o in out_f]
        torch.stack(loss_f).sum().backward()
        out_r = discriminate(xs, ys)
        loss_r = [F.binary_cross_entropy(o, torch.ones_like(o)) for o in out_r]
        torch.stack(loss_r).sum().backward()
        for o in [opt_sd, *opt_cd]:
            o.step()
        for o in [opt_sg, *opt_cg]:
            o.zero_grad()
        out_g = discriminate(fakes, ys)
        loss_g = [F.binary_cross_entropy(o, torch.ones_like(o)) for o in out_g]
        torch.stack(loss_g).sum().backward()
        for o in [opt_sg, *opt_cg]:
            o.step()
        history.append(([float(v) for v in loss_r], [float(v) for v in loss_f], [float(v) for v in loss_g]))
    return client_g, client_d, server_g, server_d, history


@pytest.mark.slow
@pytest.mark.parametrize("steps", [1, 2])
def test_several_clients_match_direct_reference(steps):
    bits = [(0, 0, 0, 0), (1, 1, 1, 1), (1, 0, 1, 0), (0, 1, 1, 0)]
    cfg = make_cfg(4, bits)
    datas = [TensorClientData.random(150 + 10 * i, seed=20 + i) for i in range(4)]
    server, clients, _ = run_split_step(cfg, datas, steps=steps)
    client_g, client_d, server_g, server_d, history = direct_reference_steps(cfg, datas, steps)

    for i, c in enumerate(clients):
        for key, idx in (("d_loss_real", 0), ("d_loss_fake", 1), ("g_loss", 2)):
            for s in range(steps):
                assert c._losses[key][s] == pytest.approx(history[s][idx][i], rel=TOL), (i, key, s)
        state = c.holder.state()
        for net, blocks in (("G", client_g[i]), ("D", client_d[i])):
            for b, m in blocks.items():
                for k, v in m.state_dict().items():
                    got = state[f"{net}.{b}.{k}"]
                    if v.is_floating_point():
                        assert rel_err(got, v) <= TOL, (i, net, b, k)
                    else:
                        assert torch.equal(got, v)
    sstate = server.holder.state()
    for net, blocks in (("G", server_g), ("D", server_d)):
        for b, m in blocks.items():
            for k, v in m.state_dict().items():
                got = sstate[f"{net}.{b}.{k}"]
                if v.is_floating_point():
                    assert rel_err(got, v) <= TOL, (net, b, k)
                else:
                    assert torch.equal(got, v)
