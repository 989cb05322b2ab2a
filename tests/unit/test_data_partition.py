"""Scenario partitioning against its definition (reference Data/data.py), client batches, synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hfgan_core.config import ConfigError, DomainConfig, RunConfig, RuntimeConfig, ScenarioConfig
from hfgan_core.data import (
    ClientData,
    ImageSet,
    load_client_data,
    load_scenario_data,
    partition,
    synthetic_sets,
    synthetic_split,
)

torch.set_num_threads(1)


def _labels_only(name: str, n: int, seed: int = 0) -> ImageSet:
    """A set with uniform random labels and no real pixel memory (partitioning only reads labels)."""
    labels = np.random.default_rng(seed).integers(0, 10, n)
    pixels = torch.zeros(1, 28, 28, dtype=torch.uint8).expand(n, 28, 28)
    return ImageSet(name, pixels, torch.from_numpy(labels.astype(np.int64)))


def _scenario(dist: str, domains: list[tuple[str, int, int | None]], **kw) -> ScenarioConfig:
    sc = ScenarioConfig(name="t", distribution=dist, domains=tuple(DomainConfig(d, c, s) for d, c, s in domains), **kw)
    sc.validate()
    return sc


# ------------------------------------------------------------------------------------------------------------------
# Equal split, numbering, caps


def test_iid_equal_split_numbering_and_disjointness():
    sets = {"MNIST": _labels_only("MNIST", 1003), "FashionMNIST": _labels_only("FashionMNIST", 500, 1)}
    sc = _scenario("iid", [("MNIST", 4, 10_000), ("FashionMNIST", 3, 10_000)])
    shards = partition(sc, sets)
    assert [s.client for s in shards] == list(range(7))
    assert [s.domain for s in shards] == [0, 0, 0, 0, 1, 1, 1]
    assert [s.dataset for s in shards] == ["MNIST"] * 4 + ["FashionMNIST"] * 3
    sizes = [s.size for s in shards]
    assert sizes[:4] == [251, 251, 251, 250] and sizes[4:] == [167, 167, 166]
    for dom, n in (("MNIST", 1003), ("FashionMNIST", 500)):
        idx = np.concatenate([s.indices for s in shards if s.dataset == dom])
        assert len(np.unique(idx)) == len(idx) == n  # a partition of the whole set
    assert all(s.excluded_labels == () and s.indices.dtype == np.int64 for s in shards)
    # The split is a random permutation, not contiguous blocks.
    assert not np.array_equal(shards[0].indices, np.arange(251))


def test_iid_cap_is_reference_size_over_total_clients():
    sets = {"MNIST": _labels_only("MNIST", 6000), "FashionMNIST": _labels_only("FashionMNIST", 6000)}
    sc = _scenario("iid", [("MNIST", 2, None), ("FashionMNIST", 2, None)], reference_train_size=2000)
    shards = partition(sc, sets)
    assert all(s.size_cap == 500 and s.size == 500 for s in shards)  # 2000 // 4 clients, out of 3000 each


def test_samples_per_client_overrides_the_cap():
    sets = {"MNIST": _labels_only("MNIST", 6000)}
    shards = partition(_scenario("iid", [("MNIST", 3, 123)]), sets)
    assert [s.size for s in shards] == [123] * 3 and all(s.size_cap == 123 for s in shards)


# ------------------------------------------------------------------------------------------------------------------
# Label exclusions and size ratios over many clients


N_MANY = 2000


def _many(dist: str, seed: int = 42):
    sets = {"synthetic": _labels_only("synthetic", N_MANY * 60, seed=3)}
    sc = _scenario(dist, [("synthetic", N_MANY, None)], partition_seed=seed)
    return partition(sc, sets), sets["synthetic"].labels_numpy()


@pytest.mark.slow
@pytest.mark.parametrize(
    "dist, count_p, tiers",
    [
        ("noniid", {0: 0.25 / 0.75, 2: 0.3 / 0.75, 3: 0.1 / 0.75, 4: 0.1 / 0.75}, {20: 0.3, 30: 0.7}),
        ("highly_noniid", {2: 0.4, 3: 0.6}, {5: 0.2, 10: 0.3, 30: 0.5}),
    ],
)
def test_exclusion_and_size_frequencies(dist, count_p, tiers):
    shards, labels = _many(dist)
    counts = np.array([len(s.excluded_labels) for s in shards])
    for k, p in count_p.items():
        assert abs(np.mean(counts == k) - p) < 0.04, (k, np.mean(counts == k), p)
    assert set(np.unique(counts)) == set(count_p)
    caps = np.array([s.size_cap for s in shards])  # base = 60000 // 2000 = 30
    for cap, p in tiers.items():
        assert abs(np.mean(caps == cap) - p) < 0.04, (cap, np.mean(caps == cap), p)
    assert set(np.unique(caps)) == set(tiers)
    # Every label is excluded about equally often.
    per_label = np.bincount(np.concatenate([s.excluded_labels for s in shards]).astype(int), minlength=10)
    assert per_label.min() > 0.8 * per_label.mean()
    for s in shards:
        assert len(set(s.excluded_labels)) == len(s.excluded_labels)
        assert not np.isin(labels[s.indices], s.excluded_labels).any()  # excluded labels really absent
        share_kept = 60 - np.isin(labels[s.indices], s.excluded_labels).sum()
        assert s.size <= s.size_cap and s.size <= share_kept


def test_noniid_client_keeps_its_share_minus_excluded_labels_when_under_the_cap():
    sets = {"MNIST": _labels_only("MNIST", 2000)}
    labels = sets["MNIST"].labels_numpy()
    # Same seed: the IID partition (cap above the share) shows each client's share of the equal split.
    shares = partition(_scenario("iid", [("MNIST", 10, 1000)]), sets)
    shards = partition(_scenario("noniid", [("MNIST", 10, 1000)]), sets)
    assert {s.size_cap for s in shards} <= {666, 1000}
    for share, s in zip(shares, shards, strict=True):
        assert share.size == 200
        expected = share.indices[~np.isin(labels[share.indices], s.excluded_labels)]
        np.testing.assert_array_equal(s.indices, expected)
    assert any(s.excluded_labels for s in shards) and any(not s.excluded_labels for s in shards)


@pytest.mark.slow
def test_partition_is_deterministic_and_seeded():
    a, _ = _many("noniid", seed=42)
    b, _ = _many("noniid", seed=42)
    c, _ = _many("noniid", seed=7)
    assert [s.excluded_labels for s in a] == [s.excluded_labels for s in b]
    assert all(np.array_equal(x.indices, y.indices) for x, y in zip(a, b, strict=True))
    assert [s.excluded_labels for s in a] != [s.excluded_labels for s in c]
    assert sum(np.array_equal(x.indices, y.indices) for x, y in zip(a, c, strict=True)) < 5


def test_a_clients_draws_do_not_depend_on_other_domains():
    sets = {"MNIST": _labels_only("MNIST", 3000), "FashionMNIST": _labels_only("FashionMNIST", 3000, 1)}
    one = partition(_scenario("noniid", [("MNIST", 5, None), ("FashionMNIST", 5, None)]), sets)
    two = partition(_scenario("noniid", [("MNIST", 5, None), ("FashionMNIST", 8, None)]), sets)
    assert [s.excluded_labels for s in one] == [s.excluded_labels for s in two][:10]


def test_too_many_clients_is_a_config_error():
    sets = {"MNIST": _labels_only("MNIST", 10)}
    with pytest.raises(ConfigError) as exc:
        partition(_scenario("iid", [("MNIST", 11, None)]), sets)
    assert "11 clients for the 10 training samples of MNIST" in str(exc.value) and "\n" not in str(exc.value)
    # A size cap that rounds to zero (base 5 // 6) leaves a highly non-IID client with nothing.
    big = {"MNIST": _labels_only("MNIST", 10_000)}
    with pytest.raises(ConfigError, match="would hold no samples"):
        partition(_scenario("highly_noniid", [("MNIST", 100, None)], reference_train_size=500), big)
    with pytest.raises(ConfigError, match="no training data loaded for domain KMNIST"):
        partition(_scenario("iid", [("KMNIST", 2, None)]), big)


# ------------------------------------------------------------------------------------------------------------------
# ClientData


def _indexed_set(n: int) -> ImageSet:
    pixels = torch.arange(n, dtype=torch.uint8).view(n, 1, 1).expand(n, 28, 28).contiguous()
    return ImageSet("x", pixels, torch.arange(n, dtype=torch.int64) % 10)


def test_client_batches_are_distinct_uniform_and_seeded():
    train = _indexed_set(200)
    shard = partition(_scenario("iid", [("synthetic", 4, None)]), {"synthetic": train})[1]
    cd = ClientData(shard, train)
    assert cd.n == 50 and cd.client == 1
    torch.testing.assert_close(cd.images, train.images[torch.from_numpy(shard.indices)])
    x, y = cd.batch(torch.Generator().manual_seed(0), 16)
    assert x.shape == (16, 1, 28, 28) and y.shape == (16,)
    ids = torch.round((x[:, 0, 0, 0] + 1) / 2 * 255).long()
    assert len(set(ids.tolist())) == 16 and set(ids.tolist()) <= set(shard.indices.tolist())
    assert torch.equal(y, ids % 10)  # images and labels stay paired
    # min(batch, n): a batch larger than the client's data is all of it, each once.
    x_all, _ = cd.batch(torch.Generator().manual_seed(0), 64)
    assert x_all.shape[0] == 50
    # Same generator state -> same batch; uniform over many draws.
    x2, _ = cd.batch(torch.Generator().manual_seed(0), 16)
    assert torch.equal(x, x2)
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(256)
    for _ in range(1000):
        xb, _ = cd.batch(g, 5)
        counts.index_add_(0, torch.round((xb[:, 0, 0, 0] + 1) / 2 * 255).long(), torch.ones(5))
    hits = counts[torch.from_numpy(shard.indices)]
    assert hits.sum() == 5000 and hits.min() > 60 and hits.max() < 145  # expected 100 each


# ------------------------------------------------------------------------------------------------------------------
# Synthetic data and load_scenario_data


def test_synthetic_is_deterministic_balanced_and_normalised():
    a = synthetic_split(30, True, 0)
    b = synthetic_split(30, True, 0)
    assert torch.equal(a.pixels, b.pixels) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.pixels, synthetic_split(30, False, 0).pixels[:300])
    assert not torch.equal(a.pixels, synthetic_split(30, True, 1).pixels)
    assert torch.bincount(a.labels).tolist() == [30] * 10
    assert a.images.shape == (300, 1, 28, 28) and a.images.dtype == torch.float32
    assert -1.0 <= float(a.images.min()) < -0.9 and 0.9 < float(a.images.max()) <= 1.0
    train, test = synthetic_sets(7)
    assert (len(train), len(test)) == (70, 1000)


def _train_small_cnn(x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor, classes: int = 10) -> float:
    """Test accuracy of a tiny CNN after 3 epochs: the "a small classifier learns it" bar."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 5, stride=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 5, stride=2),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 4 * 4, classes),
    )
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    for _ in range(3):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            b = perm[i : i + 64]
            loss = torch.nn.functional.cross_entropy(m(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((m(xt).argmax(1) == yt).float().mean())


@pytest.mark.parametrize("variant", [0, 2])
def test_synthetic_classes_are_learnable(variant):
    train, test = synthetic_sets(150, variant)
    assert _train_small_cnn(train.images, train.labels, test.images, test.labels) > 0.85


def test_synthetic_variants_are_distinguishable_domains():
    # The stand-ins for different datasets must look different, or clustering could not separate the domains.
    train = [synthetic_split(30, True, v) for v in range(5)]
    test = [synthetic_split(10, False, v) for v in range(5)]
    x = torch.cat([s.images for s in train])
    xt = torch.cat([s.images for s in test])
    y = torch.arange(5).repeat_interleave(300)
    yt = torch.arange(5).repeat_interleave(100)
    assert _train_small_cnn(x, y, xt, yt, classes=5) > 0.95


def test_load_scenario_data_with_and_without_fallback(tmp_path):
    sc = _scenario("iid", [("MNIST", 2, 64), ("FashionMNIST", 2, 64)], synthetic_train_per_class=20)
    cfg = RunConfig(scenario=sc, runtime=RuntimeConfig(data_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="dataset MNIST not found"):
        load_scenario_data(cfg, allow_synthetic_fallback=False)
    logged: list[str] = []
    data = load_scenario_data(cfg, allow_synthetic_fallback=True, log=logged.append)
    assert len(data.notices) == 2 and logged == data.notices
    assert "MNIST not available" in data.notices[0] and "synthetic" in data.notices[0]
    assert [c.n for c in data.clients] == [64] * 4 and [s.client for s in data.shards] == [0, 1, 2, 3]
    assert set(data.test_sets) == {"MNIST", "FashionMNIST"} and len(data.test_sets["MNIST"]) == 1000
    assert data.sources == {"MNIST": "synthetic", "FashionMNIST": "synthetic"}
    # The two stand-ins differ (distinct variants), so the domains stay distinct.
    assert not torch.equal(data.train_sets["MNIST"].pixels, data.train_sets["FashionMNIST"].pixels)
    # The synthetic domain itself never produces a notice.
    syn = RunConfig(scenario=_scenario("iid", [("synthetic", 2, None)], synthetic_train_per_class=20))
    d2 = load_scenario_data(syn, allow_synthetic_fallback=False)
    assert d2.notices == [] and [c.n for c in d2.clients] == [100, 100]


def test_load_client_data_matches_the_full_partition(tmp_path):
    sc = _scenario("noniid", [("MNIST", 3, 50), ("FashionMNIST", 2, 50)], synthetic_train_per_class=20)
    cfg = RunConfig(scenario=sc, runtime=RuntimeConfig(data_dir=str(tmp_path)))
    full = load_scenario_data(cfg, allow_synthetic_fallback=True)
    for k in (0, 2, 3, 4):
        one, notices = load_client_data(cfg, k, allow_synthetic_fallback=True)
        assert one.client == k and len(notices) == 1
        np.testing.assert_array_equal(one.shard.indices, full.shards[k].indices)
        assert one.shard.excluded_labels == full.shards[k].excluded_labels
        assert torch.equal(one.images, full.clients[k].images) and torch.equal(one.labels, full.clients[k].labels)
    with pytest.raises(ConfigError, match="client 5 is not in 0..4"):
        load_client_data(cfg, 5, allow_synthetic_fallback=True)
