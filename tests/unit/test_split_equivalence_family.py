"""Split equivalence for the other members of the model family: the one-client check of
`test_split_equivalence.py` (losses, gradients and parameters of a split step against the unsplit G and D, to a
relative error of 1e-5) run unchanged on 32x32 RGB images (all 16 cut settings) and 64x64 RGB images (two)."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

from hfgan_core.config import DomainConfig, ModelConfig, RunConfig, ScenarioConfig, TrainConfig
from hfgan_core.data import TensorClientData


def _equivalence_module():
    # Loaded under its own name, so the 28x28 tests' module is left exactly as pytest collects it.
    path = Path(__file__).with_name("test_split_equivalence.py")
    spec = importlib.util.spec_from_file_location("split_equivalence_for_family", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(bits: tuple[int, ...], size: int, channels: int, monkeypatch) -> None:
    eq = _equivalence_module()
    model = ModelConfig(image_size=size, channels=channels)
    made: list[tuple[int, ...]] = []

    def make_cfg(
        n_clients: int, cuts: list[tuple[int, int, int, int]], batch: int = 64, compute_dtype: str = "float32"
    ) -> RunConfig:
        made.append(model.image_shape)
        return RunConfig(
            model=model,
            scenario=ScenarioConfig(domains=(DomainConfig("synthetic-colour", n_clients),)),
            train=TrainConfig(seed=11, cuts=tuple(cuts), batch_size=batch, compute_dtype=compute_dtype),
        ).validate()

    def random(cls, n: int, seed: int) -> TensorClientData:
        g = torch.Generator().manual_seed(seed)
        return cls(torch.rand(n, channels, size, size, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g))

    monkeypatch.setattr(eq, "make_cfg", make_cfg)
    monkeypatch.setattr(TensorClientData, "random", classmethod(random))
    eq.test_one_client_matches_unsplit(bits, "float32")
    assert made == [(channels, size, size)]  # the check ran on this family member


@pytest.mark.slow
@pytest.mark.parametrize("bits", list(itertools.product((0, 1), repeat=4)), ids=lambda b: "".join(map(str, b)))
def test_32x32_rgb_one_client_matches_unsplit(bits, monkeypatch):
    _run(bits, 32, 3, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [(0, 0, 0, 0), (1, 1, 1, 1)], ids=lambda b: "".join(map(str, b)))
def test_64x64_rgb_one_client_matches_unsplit(bits, monkeypatch):
    _run(bits, 64, 3, monkeypatch)
