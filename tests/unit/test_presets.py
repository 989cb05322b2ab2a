"""The shipped scenario presets load, validate and say what the paper's scenarios are."""

from __future__ import annotations

import pytest
import torch

from hfgan_core.config import PAPER_DEVICE_PROFILES, load_config, preset_names
from hfgan_core.data import load_scenario_data

torch.set_num_threads(1)

PAPER = {
    "s1": ("iid", ["MNIST"]),
    "s2": ("noniid", ["MNIST"]),
    "s3": ("iid", ["MNIST", "FashionMNIST"]),
    "s4": ("noniid", ["MNIST", "FashionMNIST"]),
    "s5": ("highly_noniid", ["MNIST", "FashionMNIST"]),
    "s6": ("iid", ["MNIST", "FashionMNIST", "KMNIST", "NotMNIST"]),
}
FIXED_CUTS = ((0, 0, 0, 0), (1, 1, 1, 1), (1, 0, 1, 0), (1, 1, 1, 0))
# The same four cut settings, ordered so that each domain's first client (the one evaluated) keeps its G blocks.
QUICKSTART_CUTS = ((1, 1, 1, 1), (0, 0, 0, 0), (1, 1, 1, 0), (1, 0, 1, 0))


def test_all_presets_are_listed():
    assert set(preset_names()) >= {*PAPER, "quickstart", "s3_lite"}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_scenarios(name):
    cfg = load_config(name)
    dist, domains = PAPER[name]
    sc = cfg.scenario
    assert sc.name == name and sc.distribution == dist
    assert [d.dataset for d in sc.domains] == domains
    assert all(d.clients == 20 and d.samples_per_client is None for d in sc.domains)
    assert sc.reference_train_size == 60000
    t = cfg.train
    assert (t.rounds, t.local_epochs, t.batch_size, t.cuts) == (50, 5, 64, "plan")
    assert (t.lr, t.betas, t.alpha, t.kld_from_round, t.steps_per_epoch) == (2e-4, (0.5, 0.999), 1.0, 3, None)
    assert t.n_clusters(sc) == len(domains)
    assert (t.score_samples, t.utility_samples, t.utility_epochs) == (5000, 30000, 15)
    # The paper's seven device types, cycled.
    names = cfg.devices.client_profile_names(sc.total_clients)
    assert names[:8] == [*PAPER_DEVICE_PROFILES, "device1"]
    assert cfg.devices.client_profiles(sc.total_clients)[2] == PAPER_DEVICE_PROFILES["device3"]


def test_quickstart_is_small_with_fixed_cuts():
    # The shape the README's quick start measured (time, scores, utility): change them together.
    cfg = load_config("quickstart")
    sc, t = cfg.scenario, cfg.train
    assert [(d.dataset, d.clients, d.samples_per_client) for d in sc.domains] == [
        ("MNIST", 2, 1500),
        ("FashionMNIST", 2, 1500),
    ]
    # The synthetic fallback holds enough for both clients of a domain.
    assert all(d.clients * d.samples_per_client <= 10 * sc.synthetic_train_per_class for d in sc.domains)
    assert (t.rounds, t.local_epochs, t.steps_per_epoch, t.batch_size) == (4, 1, 80, 32)
    # The paper's Adam and weighting; clustering from round 2, so three of the four rounds are clustered.
    assert (t.lr, t.betas, t.alpha, t.kld_from_round, t.n_clusters(sc)) == (2e-4, (0.5, 0.999), 1.0, 2, 2)
    assert t.cuts == QUICKSTART_CUTS
    assert (t.score_samples, t.utility_samples, t.utility_epochs) == (1000, 5000, 3)


def test_s3_lite_matches_the_reference_run():
    cfg = load_config("s3_lite")
    sc, t = cfg.scenario, cfg.train
    assert sc.distribution == "iid"
    assert [(d.dataset, d.clients, d.samples_per_client) for d in sc.domains] == [
        ("MNIST", 2, 1500),
        ("FashionMNIST", 2, 1500),
    ]
    assert (t.rounds, t.local_epochs, t.batch_size, t.cuts) == (8, 5, 64, FIXED_CUTS)
    assert t.n_clusters(sc) == 2
    # The paper's steps-per-epoch rule gives the reference's 24 steps.
    assert t.steps_per_epoch is None and -(-1500 // t.batch_size) == 24


@pytest.mark.slow
def test_quickstart_partitions_on_synthetic_data(tmp_path):
    cfg = load_config("quickstart").with_overrides("runtime", data_dir=str(tmp_path))
    data = load_scenario_data(cfg, allow_synthetic_fallback=True)
    assert [c.n for c in data.clients] == [d.samples_per_client for d in cfg.scenario.domains for _ in range(2)]
    assert len(data.notices) == 2
