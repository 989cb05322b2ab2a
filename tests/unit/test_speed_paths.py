"""The faster paths compute what the plain ones compute: bit for bit where they claim to, within the split
equivalence tolerance where they do not (channels-last), and the codec's shortcuts reject what it rejected.
bfloat16 compute is a different numerical path: close to float32, not equal, and invisible outside the blocks."""

from __future__ import annotations

import copy

import pytest
import torch

from hfgan_core.config import DomainConfig, RunConfig, RuntimeConfig, ScenarioConfig, TrainConfig
from hfgan_core.data import TensorClientData
from hfgan_core.protocol.codec import Limits, is_finite, tensor_from_wire, tensor_to_wire
from hfgan_core.runtime.holder import make_adam
from hfgan_core.runtime.unsplit import UnsplitGAN


def _cfg(compute_dtype: str = "float32", **runtime) -> RunConfig:
    return RunConfig(
        scenario=ScenarioConfig(domains=(DomainConfig("synthetic", 1),)),
        train=TrainConfig(compute_dtype=compute_dtype),
        runtime=RuntimeConfig(**runtime),
    ).validate()


def _train(model: UnsplitGAN, steps: int) -> dict[str, torch.Tensor]:
    data = TensorClientData.random(256, 3)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x, y = data.batch(g, 16)
        model.train_step(x, y, torch.randn(16, model.cfg.model.z_dim, generator=g))
    mods = model.modules()
    return {f"{n}.{i}.{k}": v for n, d in mods.items() for i, b in d.items() for k, v in b.state_dict().items()}


def test_foreach_adam_is_bit_identical_to_the_per_parameter_loop():
    cfg = _cfg()
    fast = UnsplitGAN(cfg)
    plain = UnsplitGAN(cfg)
    tr = cfg.train
    for name in ("opt_g", "opt_d"):
        params = [p for group in getattr(plain, name).param_groups for p in group["params"]]
        setattr(plain, name, torch.optim.Adam(params, lr=tr.lr, betas=tuple(tr.betas), foreach=False))
    assert all(g["foreach"] for g in fast.opt_d.param_groups)
    a, b = _train(fast, 3), _train(plain, 3)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _plain_g_backward_step(model: UnsplitGAN):
    """UnsplitGAN.train_step as the reference writes it: the G step's backward also fills D's weight gradients."""
    import torch.nn.functional as F

    def step(images, labels, z):
        model.opt_d.zero_grad(set_to_none=True)
        fake = model.generate(z, labels)
        out_f = model.discriminate(fake.detach(), labels)
        F.binary_cross_entropy(out_f, torch.zeros_like(out_f)).backward()
        out_r = model.discriminate(images, labels)
        F.binary_cross_entropy(out_r, torch.ones_like(out_r)).backward()
        model.opt_d.step()
        model.opt_g.zero_grad(set_to_none=True)
        out_g = model.discriminate(fake, labels)
        F.binary_cross_entropy(out_g, torch.ones_like(out_g)).backward()
        model.opt_g.step()

    return step


def test_the_g_step_backward_into_g_only_is_bit_identical_to_the_full_backward():
    cfg = _cfg()
    fast, plain = UnsplitGAN(cfg), UnsplitGAN(cfg)
    plain.train_step = _plain_g_backward_step(plain)
    a, b = _train(fast, 3), _train(plain, 3)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # And it did leave D's weight gradients out of the G step (else there is nothing to save): the plain step's G
    # backward added to the D gradients its D step left; the fast one's are still the D step's alone.
    grads = [
        (f.grad, q.grad)
        for bf, bq in zip(fast.D.values(), plain.D.values())
        for f, q in zip(bf.parameters(), bq.parameters())
    ]
    assert any(not torch.equal(f, q) for f, q in grads)


def test_make_adam_uses_the_run_hyperparameters():
    p = torch.nn.Parameter(torch.ones(3))
    opt = make_adam([p], _cfg())
    group = opt.param_groups[0]
    assert group["lr"] == _cfg().train.lr and tuple(group["betas"]) == tuple(_cfg().train.betas)


def _first_step_grads(model: UnsplitGAN) -> dict[str, torch.Tensor]:
    grads: dict[str, torch.Tensor] = {}

    def record(net, blocks):
        for i, b in blocks.items():
            grads.update({f"{net}.{i}.{k}": p.grad.clone() for k, p in b.named_parameters()})

    model.before_step = record
    _train(model, 1)
    return grads


def test_channels_last_matches_the_default_layout_within_tolerance():
    # Compared before the optimiser steps: Adam's first step is about lr * sign(grad), so a last-bit difference in
    # a near-zero gradient flips a whole step; the gradients are what the layout can change.
    a = _first_step_grads(UnsplitGAN(_cfg()))
    cl_model = UnsplitGAN(_cfg(channels_last=True))
    conv = cl_model.D[1][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    b = _first_step_grads(cl_model)
    for k, err in _relative_errors(a, b).items():
        # Measured: 1.6e-4 to 1.2e-3 (G.0 and G.2 weights): close, but not the 1e-5 of split equivalence.
        assert err <= 1e-2, (k, err)


def _relative_errors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each gradient's largest difference relative to the largest gradient of the same network: a conv bias
    followed by BatchNorm has a gradient that is zero in exact arithmetic, so its own scale is rounding noise."""
    assert set(a) == set(b) and a
    scale = {net: max(float(v.abs().max()) for k, v in a.items() if k[0] == net) for net in "GD"}
    return {k: float((a[k] - b[k]).abs().max()) / scale[k[0]] for k in a}


class _InputsRoundedToBfloat16(UnsplitGAN):
    """float32 compute on images and noise rounded to bfloat16: how far bfloat16-sized rounding alone moves a
    step's gradients (the first step's gradients flow through BatchNorm and through the sum of the real and the
    fake terms, which cancel in part, so they are far more sensitive than any one multiply)."""

    def train_step(self, images, labels, z):
        return super().train_step(images.to(torch.bfloat16).float(), labels, z.to(torch.bfloat16).float())


def test_bfloat16_compute_is_close_to_float32_and_not_equal():
    a = _first_step_grads(UnsplitGAN(_cfg()))
    b = _first_step_grads(UnsplitGAN(_cfg("bfloat16")))
    assert all(v.dtype == torch.float32 for v in b.values())  # float32 weights and gradients (Adam's input)
    errors = _relative_errors(a, b)
    rounding = _relative_errors(a, _first_step_grads(_InputsRoundedToBfloat16(_cfg())))
    # bfloat16 compute moves the gradients about as far as rounding the inputs to bfloat16 does in float32
    # (measured: 0.17-0.21 against 0.16 of the network's largest gradient, both largest for G's convolutions),
    # not orders of magnitude further, as a broken autocast (say, float32 state rounded on every step) would.
    assert max(errors.values()) <= 2 * max(rounding.values()), (max(errors.values()), max(rounding.values()))
    # The setting does something: the convolution blocks' gradients move past float32's rounding ...
    assert errors["D.1.0.weight"] > 1e-4 and errors["G.1.0.weight"] > 1e-4
    # ... and the blocks without a convolution keep float32 (D's linear output layer sees bfloat16-rounded
    # features from the block before it, so only its inputs differ).
    model = UnsplitGAN(_cfg("bfloat16"))
    assert "forward" not in vars(model.D[4]) and "forward" not in vars(model.G[0])
    assert "forward" in vars(model.D[1]) and "forward" in vars(model.G[4])


def test_bfloat16_compute_keeps_names_and_float32_at_block_boundaries():
    plain, fast = UnsplitGAN(_cfg()), UnsplitGAN(_cfg("bfloat16"))
    for net in ("G", "D"):
        for i in plain.modules()[net]:
            assert list(plain.modules()[net][i].state_dict()) == list(fast.modules()[net][i].state_dict())
    y = torch.arange(4) % 10
    images = fast.generate(torch.randn(4, fast.cfg.model.z_dim), y)
    assert images.dtype == torch.float32 and fast.discriminate(images, y).dtype == torch.float32
    # A deep copy (how a holder takes a block) computes with its own weights, not the original's.
    block = fast.D[1]
    twin = copy.deepcopy(block)
    assert twin.forward.__self__ is twin
    block.eval()
    twin.eval()
    x = torch.randn(2, 64, 14, 14)
    with torch.no_grad():
        before = block(x)
        twin[0].weight.zero_()
        assert torch.equal(block(x), before) and not torch.equal(twin(x), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_is_finite_catches_every_non_finite_value(dtype):
    t = torch.randn(1000).to(dtype)
    assert is_finite(t)
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[537] = bad
        assert not is_finite(u), bad
    both = t.clone()
    both[1], both[2] = float("inf"), float("-inf")  # their sum is NaN, still caught
    assert not is_finite(both)


def test_is_finite_accepts_large_finite_values_whose_sum_overflows():
    big = torch.full((10,), torch.finfo(torch.float16).max, dtype=torch.float16)
    assert not bool(torch.isfinite(big.sum()))
    assert is_finite(big)
    assert is_finite(torch.empty(0))


def test_wire_bytes_are_a_view_with_the_tensor_bytes():
    t = torch.randn(4, 5).t()  # not contiguous
    wire = tensor_to_wire(t)
    assert bytes(wire["data"]) == t.contiguous().numpy().tobytes()
    assert torch.equal(tensor_from_wire({**wire, "data": bytes(wire["data"])}, Limits(), "t"), t)
    scalar = tensor_to_wire(torch.tensor(2.5))
    assert bytes(scalar["data"]) == torch.tensor(2.5).numpy().tobytes() and scalar["shape"] == []


def test_a_bfloat16_run_says_what_it_is_and_warns_where_the_cpu_would_emulate_it():
    from hfgan_core.model.precision import bfloat16_notice, cpu_has_bfloat16

    with_bf16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
    without = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n"
    assert cpu_has_bfloat16(with_bf16) is True and cpu_has_bfloat16(without) is False
    assert cpu_has_bfloat16("flags\t: amx_bf16 amx_tile\n") is True
    assert "not the paper's float32" in bfloat16_notice("cpu", with_bf16)
    assert "likely be slower" in bfloat16_notice("cpu", without)
    assert "likely be slower" not in bfloat16_notice("cpu", with_bf16)
    assert "likely be slower" not in bfloat16_notice("cuda", without)  # a GPU's bfloat16 is its own
