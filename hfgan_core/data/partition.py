"""Scenario partitioning: which training samples each client holds, following the reference (Data/data.py).

Clients are numbered domain by domain (all clients of the first domain, then the second, ...). For each client:

1. Equal split: the domain's training set is permuted and cut into `clients` contiguous parts whose sizes differ
   by at most one (np.array_split; the reference gives the whole remainder to the first part).
2. Label exclusions: IID none; non-IID 0, 2, 3 or 4 labels with probabilities 0.25, 0.3, 0.1, 0.1 (normalised to
   sum 1: 1/3, 0.4, 2/15, 2/15); highly non-IID 2 or 3 labels with probabilities 0.4, 0.6. The excluded labels are
   a uniform random set of that size; the client's samples with those labels are dropped.
3. Size cap: base = the domain's `samples_per_client` if set, else `reference_train_size // total_clients` (the
   reference's 60000 // number of clients). IID: base. Non-IID: with probability 0.3 `base * 2 // 3`, else base.
   Highly non-IID: with probability 0.2 `base // 6`, 0.3 `base // 3`, else base. (The reference multiplies by
   0.6666667, 0.1666667, 0.333333 and truncates; integer division gives the exact fractions, which can differ by
   one sample.) A client holding more than its cap keeps a random subset of `cap` samples.

Seeding (deterministic, independent of everything but `ScenarioConfig.partition_seed` and the client's position):
every random draw comes from `numpy.random.default_rng([partition_seed, stream, key])` where

- stream 0, key = domain index: the permutation of that domain's training set (step 1);
- stream 1, key = global client index: `u = rng.random()` picks the size tier (step 3), then `rng.choice` over the
  exclusion counts with the normalised probabilities, then `rng.choice(10, count, replace=False)` the labels
  (step 2). IID clients draw nothing;
- stream 2, key = global client index: the subset kept under the cap (`rng.choice(n, cap, replace=False)`).

So a client's exclusions and cap do not change when other domains gain or lose clients. The reference seeds
Python's `random` per domain (42, then 32) instead; its exact draws are not reproduced.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import ConfigError, ModelConfig, RunConfig, ScenarioConfig
from .domain import content_digest, load_domain_config, model_for_data
from .imageset import ImageSet, normalise

STREAM_SPLIT = 0
STREAM_CLIENT = 1
STREAM_SUBSET = 2

# (exclusion counts, probabilities before normalisation) per distribution.
EXCLUSIONS: dict[str, tuple[tuple[int, ...], tuple[float, ...]]] = {
    "iid": ((0,), (1.0,)),
    "noniid": ((0, 2, 3, 4), (0.25, 0.3, 0.1, 0.1)),
    "highly_noniid": ((2, 3), (0.4, 0.6)),
}
# Size tiers: (cumulative probability upper bound, numerator, denominator); the last tier catches the rest.
SIZE_TIERS: dict[str, tuple[tuple[float, int, int], ...]] = {
    "iid": ((1.0, 1, 1),),
    "noniid": ((0.3, 2, 3), (1.0, 1, 1)),
    "highly_noniid": ((0.2, 1, 6), (0.5, 1, 3), (1.0, 1, 1)),
}


@dataclass(frozen=True)
class ClientShard:
    """One client's share: indices into its domain's training set."""

    client: int
    domain: int
    dataset: str
    indices: np.ndarray = field(repr=False)  # int64, sorted
    excluded_labels: tuple[int, ...]
    size_cap: int

    @property
    def size(self) -> int:
        return int(self.indices.shape[0])


def _rng(seed: int, stream: int, key: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, key])


def draw_client_profile(
    distribution: str, seed: int, client: int, base: int, num_classes: int = 10
) -> tuple[tuple[int, ...], int]:
    """(excluded labels, size cap) of one client, from its own stream (see the module docstring)."""
    if distribution == "iid":
        return (), base
    rng = _rng(seed, STREAM_CLIENT, client)
    u = rng.random()
    cap = base
    for bound, num, den in SIZE_TIERS[distribution]:
        if u < bound:
            cap = base * num // den
            break
    counts, probs = EXCLUSIONS[distribution]
    p = np.asarray(probs, dtype=np.float64)
    # A dataset with few classes keeps at least one label whatever the draw.
    count = min(int(rng.choice(counts, p=p / p.sum())), num_classes - 1)
    labels = tuple(sorted(int(x) for x in rng.choice(num_classes, size=count, replace=False)))
    return labels, cap


def shard_cap(scenario: ScenarioConfig, client: int) -> int:
    """The most samples client `client` can hold in this scenario (its size cap, step 3), from the config alone:
    the coordinator admits no larger sample count from a client's join."""
    domains = scenario.client_domains()
    if not 0 <= client < len(domains):
        raise ValueError(f"client {client} is outside 0..{len(domains) - 1}")
    dom = scenario.domains[domains[client]]
    base = (
        dom.samples_per_client
        if dom.samples_per_client is not None
        else scenario.reference_train_size // scenario.total_clients
    )
    return draw_client_profile(scenario.distribution, scenario.partition_seed, client, base)[1]


def partition(
    scenario: ScenarioConfig, train_sets: Mapping[str, ImageSet], only_domains: Collection[int] | None = None
) -> list[ClientShard]:
    """Client shards for a scenario; `train_sets` maps each domain's dataset name to its training split.

    With `only_domains`, only those domains' shards are built (and only their training sets are needed); they are
    identical to the same shards of a full partition, since every draw is keyed by domain or client index.
    """
    if scenario.partition_seed < 0:  # numpy seed sequences take non-negative integers only
        raise ConfigError("scenario.partition_seed must not be negative")
    shards: list[ClientShard] = []
    total = scenario.total_clients
    client = 0
    for d, dom in enumerate(scenario.domains):
        if only_domains is not None and d not in only_domains:
            client += dom.clients
            continue
        if dom.dataset not in train_sets:
            raise ConfigError(f"scenario: no training data loaded for domain {dom.dataset}")
        labels = train_sets[dom.dataset].labels_numpy()
        n = labels.shape[0]
        if n // dom.clients < 1:
            raise ConfigError(
                f"scenario: {dom.clients} clients for the {n} training samples of {dom.dataset} (fewer than one each)"
            )
        base = dom.samples_per_client if dom.samples_per_client is not None else scenario.reference_train_size // total
        num_classes = train_sets[dom.dataset].num_classes
        perm = _rng(scenario.partition_seed, STREAM_SPLIT, d).permutation(n)
        for part in np.array_split(perm, dom.clients):
            excluded, cap = draw_client_profile(
                scenario.distribution, scenario.partition_seed, client, base, num_classes
            )
            keep = part[~np.isin(labels[part], excluded)] if excluded else part
            if keep.shape[0] > cap:
                pick = _rng(scenario.partition_seed, STREAM_SUBSET, client).choice(keep.shape[0], cap, replace=False)
                keep = keep[pick]
            if keep.shape[0] < 1:
                raise ConfigError(
                    f"scenario: client {client} ({dom.dataset}) would hold no samples "
                    f"(share {part.shape[0]}, cap {cap}, excluded labels {list(excluded)}); use fewer clients"
                )
            shards.append(ClientShard(client, d, dom.dataset, np.sort(keep).astype(np.int64), excluded, cap))
            client += 1
    return shards


class TensorClientData:
    """A client's training images ([-1, 1] float, [N, 1, 28, 28]) and labels, with the reference's batch draw."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
            raise ValueError("a client needs as many labels as images, and at least one sample")
        self.images = images
        self.labels = labels.contiguous()

    @classmethod
    def random(cls, n: int, seed: int) -> TensorClientData:
        """Deterministic random images and labels: for tests and benchmarks that measure the system, not the GAN."""
        g = torch.Generator().manual_seed(seed)
        return cls(torch.rand(n, 1, 28, 28, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g))

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, generator: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """min(batch_size, n) distinct samples drawn uniformly (a fresh shuffle every step, as the reference)."""
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        idx = torch.randperm(self.n, generator=generator)[: min(batch_size, self.n)]
        return self.images[idx], self.labels[idx]


class ClientData(TensorClientData):
    """A client's shard of its domain's training set."""

    def __init__(self, shard: ClientShard, train: ImageSet) -> None:
        self.shard = shard
        idx = torch.from_numpy(shard.indices)
        # Normalise only this client's rows (elementwise, so identical to slicing the normalised set).
        super().__init__(normalise(train.pixels[idx]), train.labels[idx])

    @property
    def client(self) -> int:
        return self.shard.client


@dataclass(frozen=True)
class ScenarioData:
    clients: list[ClientData]
    shards: list[ClientShard]
    train_sets: dict[str, ImageSet]
    test_sets: dict[str, ImageSet]
    notices: list[str]
    sources: dict[str, str]  # domain -> directory read, or "synthetic"
    digests: dict[str, str]  # domain -> content digest of its train and test data
    model: ModelConfig  # the model config that fits the data


def load_scenario_data(
    cfg: RunConfig,
    allow_synthetic_fallback: bool = False,
    log: Callable[[str], None] | None = None,
    adopt_model_shape: bool = False,
) -> ScenarioData:
    """Load every domain's data from `cfg.runtime.data_dir` (synthetic stand-ins where allowed) and partition it.

    The data's shape is checked against `cfg.model` (ConfigError on a mismatch), or with `adopt_model_shape` the
    returned `model` takes it (see `model_for_data`).
    """
    sc = cfg.scenario
    train_sets: dict[str, ImageSet] = {}
    test_sets: dict[str, ImageSet] = {}
    notices: list[str] = []
    sources: dict[str, str] = {}
    digests: dict[str, str] = {}
    for dom in sc.domains:
        dd = load_domain_config(dom, cfg.runtime.data_dir, sc.synthetic_train_per_class, allow_synthetic_fallback, log)
        train_sets[dom.dataset], test_sets[dom.dataset] = dd.train, dd.test
        sources[dom.dataset] = dd.source
        digests[dom.dataset] = content_digest(dd.train, dd.test)
        if dd.notice:
            notices.append(dd.notice)
    model = model_for_data(cfg.model, train_sets, adopt_model_shape)
    shards = partition(sc, train_sets)
    clients = [ClientData(s, train_sets[s.dataset]) for s in shards]
    return ScenarioData(clients, shards, train_sets, test_sets, notices, sources, digests, model)


def load_client_data(
    cfg: RunConfig, client: int, allow_synthetic_fallback: bool = False, log: Callable[[str], None] | None = None
) -> tuple[ClientData, list[str]]:
    """One client's data (for a client worker): loads and partitions only that client's domain.

    Returns the ClientData and the notices (a synthetic substitution, if any).
    """
    sc = cfg.scenario
    if not 0 <= client < sc.total_clients:
        raise ConfigError(f"client {client} is not in 0..{sc.total_clients - 1}")
    d = sc.client_domains()[client]
    dom = sc.domains[d]
    dd = load_domain_config(dom, cfg.runtime.data_dir, sc.synthetic_train_per_class, allow_synthetic_fallback, log)
    model_for_data(cfg.model, {dom.dataset: dd.train}, adopt=False)
    shard = next(s for s in partition(sc, {dom.dataset: dd.train}, only_domains={d}) if s.client == client)
    return ClientData(shard, dd.train), [dd.notice] if dd.notice else []


__all__ = [
    "EXCLUSIONS",
    "SIZE_TIERS",
    "ClientData",
    "ClientShard",
    "TensorClientData",
    "ScenarioData",
    "draw_client_profile",
    "load_client_data",
    "load_scenario_data",
    "partition",
]
