"""Federation: summaries, KMeans, silhouette, KLD scores, aggregation weights and weighted averaging.

Expected values are computed independently of the implementation (by hand, or with a few lines of numpy written
out here), never by calling the code under test twice.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hfgan_core.config import ModelConfig
from hfgan_core.federation import (
    StateLayout,
    activation_summary,
    aggregate_round,
    aggregation_weights,
    average_members,
    choose_k,
    client_layers,
    cluster_clients,
    kld_by_group,
    kld_scores,
    kmeans,
    member_full_state,
    server_layers,
    silhouette_score,
    state_digest,
    weighted_average,
)
from hfgan_core.federation.weights import Weights
from hfgan_core.model import CutBits, architecture, build_networks, canonical_state

torch.set_num_threads(1)

# --------------------------------------------------------------------------------------------------------------
# Summary


def test_activation_summary_is_detached_float32_batch_mean():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float64).reshape(2, 3, 2, 2).requires_grad_(True)
    s = activation_summary(x)
    assert s.shape == (3, 2, 2) and s.dtype == torch.float32 and not s.requires_grad
    assert torch.equal(s, ((x[0] + x[1]) / 2).detach().float())


def test_activation_summary_rejects_bad_shapes():
    with pytest.raises(ValueError):
        activation_summary(torch.zeros(128, 7, 7))
    with pytest.raises(ValueError):
        activation_summary(torch.zeros(0, 128, 7, 7))


# --------------------------------------------------------------------------------------------------------------
# KLD


def _ref_kld(summaries: list[np.ndarray]) -> list[float]:
    """The reference formula written out in float64 numpy: sum (Q+e)(log(Q+e) - log(P+e)) / C."""
    eps = 1e-9
    probs = []
    for s in summaries:
        flat = s.reshape(s.shape[0], -1).astype(np.float64)
        e = np.exp(flat - flat.max(axis=1, keepdims=True))
        probs.append(e / e.sum(axis=1, keepdims=True))
    out = []
    for i, p in enumerate(probs):
        q = sum(probs[j] for j in range(len(probs)) if j != i) / (len(probs) - 1)
        out.append(float(((q + eps) * (np.log(q + eps) - np.log(p + eps))).sum() / p.shape[0]))
    return out


def test_kld_analytic_two_clients():
    # C=1, two positions. P0 = (1/2, 1/2), P1 = (3/4, 1/4).
    s0 = torch.tensor([[[0.0, 0.0]]])
    s1 = torch.tensor([[[math.log(3.0), 0.0]]])
    scores = kld_scores([s0, s1])
    # Client 0: Q = P1, KL(P1 || P0) = 3/4 ln(3/2) + 1/4 ln(1/2); client 1: KL(P0 || P1) = 1/2 ln(2/3) + 1/2 ln 2.
    assert scores[0] == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    assert scores[1] == pytest.approx(0.5 * math.log(2 / 3) + 0.5 * math.log(2.0), abs=1e-6)


def test_kld_three_clients_matches_hand_formula_with_epsilons():
    # C=2 channels, H*W=3 positions, 3 clients; one position far below the others so the epsilon matters.
    raw = [
        np.array([[[0.0, 1.0, 2.0]], [[-1.0, 0.5, 0.0]]], dtype=np.float32),
        np.array([[[2.0, 0.0, -30.0]], [[0.0, 0.0, 0.0]]], dtype=np.float32),
        np.array([[[1.0, 1.0, -25.0]], [[3.0, -2.0, 1.0]]], dtype=np.float32),
    ]
    expected = _ref_kld(raw)
    got = kld_scores([torch.from_numpy(r) for r in raw])
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
    # The epsilons are part of the definition: without them client 1's score differs measurably.
    no_eps = []
    for i in range(3):
        p = [np.exp(r.reshape(2, 3)) / np.exp(r.reshape(2, 3)).sum(1, keepdims=True) for r in raw]
        q = sum(p[j] for j in range(3) if j != i) / 2
        no_eps.append(float((q * (np.log(q) - np.log(p[i]))).sum() / 2))
    assert all(g >= 0 for g in got)
    assert max(abs(a - b) for a, b in zip(got, no_eps, strict=True)) > 1e-6


def test_kld_intra_vs_global_and_single_member():
    raw = {
        0: np.array([[[0.0, 1.0, 2.0]], [[-1.0, 0.5, 0.0]]], dtype=np.float32),
        1: np.array([[[0.5, 1.0, 2.5]], [[-1.0, 0.0, 0.0]]], dtype=np.float32),
        2: np.array([[[3.0, -1.0, 0.0]], [[2.0, 2.0, -3.0]]], dtype=np.float32),
    }
    summaries = {c: torch.from_numpy(r) for c, r in raw.items()}
    intra = kld_by_group(summaries, {0: 0, 1: 0, 2: 1})
    glob = kld_by_group(summaries)
    pair = _ref_kld([raw[0], raw[1]])
    assert intra[0] == pytest.approx(pair[0], rel=1e-5) and intra[1] == pytest.approx(pair[1], rel=1e-5)
    assert intra[2] == 0.0  # alone in its cluster: no "others", defined as 0
    assert [glob[c] for c in (0, 1, 2)] == pytest.approx(_ref_kld([raw[0], raw[1], raw[2]]), rel=1e-5)
    assert glob[0] > intra[0]  # client 2 is far from both, so the global mean is further from client 0
    assert kld_scores([summaries[0]]) == [0.0]


# --------------------------------------------------------------------------------------------------------------
# KMeans and silhouette


def _blobs(centres: list[float], per: int, dim: int, seed: int, spread: float = 0.1):
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(centres)), per)
    rng.shuffle(truth)
    base = rng.normal(size=(len(centres), dim)) * 10.0
    x = base[truth] + rng.normal(size=(len(truth), dim)) * spread
    return x, truth


def _first_appearance(labels) -> list[int]:
    seen: dict[int, int] = {}
    return [seen.setdefault(int(v), len(seen)) for v in labels]


def test_kmeans_recovers_separated_blobs_exactly_with_canonical_labels():
    x, truth = _blobs([0, 1, 2], per=6, dim=50, seed=3)
    res = kmeans(x, 3, seed=11)
    assert res.labels.tolist() == _first_appearance(truth)
    assert res.labels[0] == 0 and res.k == 3
    for j in range(3):
        assert np.allclose(res.centers[j], x[res.labels == j].mean(axis=0))
    assert res.inertia == pytest.approx(sum(((x[res.labels == j] - res.centers[j]) ** 2).sum() for j in range(3)))


def test_kmeans_is_deterministic_for_a_seed_and_labels_do_not_depend_on_it():
    x, _ = _blobs([0, 1, 2, 3], per=5, dim=20, seed=5, spread=2.0)
    a, b = kmeans(x, 4, seed=7), kmeans(x, 4, seed=7)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.centers, b.centers) and a.inertia == b.inertia
    x2, truth = _blobs([0, 1, 2, 3], per=5, dim=20, seed=5, spread=0.1)
    for seed in (0, 1, 2):
        assert kmeans(x2, 4, seed=seed).labels.tolist() == _first_appearance(truth)


def test_kmeans_k_equals_n_and_k_one():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 4))
    full = kmeans(x, 5, seed=0)
    assert full.labels.tolist() == [0, 1, 2, 3, 4] and full.inertia == 0.0
    assert np.array_equal(full.centers, x)
    one = kmeans(x, 1, seed=0)
    assert one.labels.tolist() == [0] * 5
    assert np.allclose(one.centers[0], x.mean(axis=0))
    assert one.inertia == pytest.approx(((x - x.mean(axis=0)) ** 2).sum())


def test_kmeans_duplicates_and_too_many_clusters():
    x = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.0, 5.0], [5.0, 5.0]])
    res = kmeans(x, 2, seed=0)
    assert res.labels.tolist() == [0, 0, 1, 1, 1] and res.inertia == 0.0
    with pytest.raises(ValueError, match="distinct"):
        kmeans(x, 3, seed=0)
    with pytest.raises(ValueError):
        kmeans(x, 6, seed=0)
    with pytest.raises(ValueError):
        kmeans(x, 0, seed=0)


def test_lloyd_relocates_empty_clusters():
    from hfgan_core.federation.kmeans import _lloyd

    x = np.array([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.1, 0.0], [0.0, 20.0], [0.0, 20.1]])
    # All three centres start on point 0: clusters 1 and 2 are empty after the first assignment and must be moved
    # onto the farthest points (4 and 5); Lloyd then ends at a fixpoint with no empty cluster (a local optimum here).
    labels, centers, _, _ = _lloyd(x, np.repeat(x[:1], 3, axis=0), max_iter=50, tol=0.0)
    assert sorted(np.bincount(labels, minlength=3).tolist()) == [1, 1, 4]
    assert labels[4] != labels[5]
    for j in range(3):
        assert np.allclose(centers[j], x[labels == j].mean(axis=0))
    # Restarts with k-means++ find the global optimum: the three pairs.
    assert kmeans(x, 3, seed=0).labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_cluster_clients_single_client():
    out = cluster_clients({3: torch.ones(2, 2, 2)}, 2, seed=0)
    assert out.assignment == {3: 0} and out.k == 1 and out.kld_intra == {3: 0.0} and out.kld_global == {3: 0.0}


def test_silhouette_hand_computed():
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    # Points 0 and 3: a = 1, b = 10.5; points 1 and 2: a = 1, b = 9.5.
    expected = (9.5 / 10.5 + 8.5 / 9.5) / 2
    assert silhouette_score(x, np.array([0, 0, 1, 1])) == pytest.approx(expected)
    # Clusters {0, 1}, {10}, {11}: singletons count 0; point 0: a = 1, b = min(10, 11); point 1: a = 1, b = 9.
    s = silhouette_score(x, np.array([0, 0, 1, 2]))
    assert s == pytest.approx((1 - 1 / 10 + 1 - 1 / 9) / 4)


@pytest.mark.slow
def test_choose_k_finds_the_blob_count_and_one_without_structure():
    x2, _ = _blobs([0, 1], per=5, dim=100, seed=1)
    x4, _ = _blobs([0, 1, 2, 3], per=4, dim=100, seed=2)
    assert choose_k(x2, 6, seed=0) == 2
    assert choose_k(x4, 8, seed=0) == 4
    noise = np.random.default_rng(4).normal(size=(10, 6272))
    assert choose_k(noise, 8, seed=0) == 1
    assert choose_k(x2[:2], 6, seed=0) == 1  # N < 3


def test_cluster_clients_assignment_scores_and_cap():
    x, truth = _blobs([0, 1], per=3, dim=2 * 3 * 3, seed=8)
    ids = [4, 9, 1, 7, 3, 5]  # not sorted: rows are ordered by client id inside
    summaries = {c: torch.tensor(row, dtype=torch.float32).reshape(2, 3, 3) for c, row in zip(ids, x, strict=True)}
    out = cluster_clients(summaries, 2, seed=0)
    by_id = sorted(zip(ids, truth, strict=True))
    assert [out.assignment[c] for c, _ in by_id] == _first_appearance([t for _, t in by_id])
    assert out.assignment[1] == 0 and out.k == 2 and out.features.shape == (6, 18)
    members = out.members()
    for cluster, group in members.items():
        expected = _ref_kld([summaries[c].numpy() for c in group])
        # float32 (as the reference): absolute error ~1e-7 on these small scores
        assert [out.kld_intra[c] for c in group] == pytest.approx(expected, rel=1e-5, abs=1e-6), cluster
    assert [out.kld_global[c] for c in sorted(ids)] == pytest.approx(
        _ref_kld([summaries[c].numpy() for c in sorted(ids)]), rel=1e-5, abs=1e-6
    )
    capped = cluster_clients(dict(list(summaries.items())[:4]), 10, seed=0)
    assert capped.k == 4 and capped.requested_k == 10 and sorted(capped.assignment.values()) == [0, 1, 2, 3]
    assert all(v == 0.0 for v in capped.kld_intra.values())  # every cluster has one member
    auto = cluster_clients(summaries, "auto", seed=0)
    assert auto.k == 2 and auto.assignment == out.assignment
    with pytest.raises(ValueError):
        cluster_clients(summaries, 0, seed=0)


# --------------------------------------------------------------------------------------------------------------
# Weights


N = {0: 100, 1: 200, 2: 300, 3: 50}
ASSIGN = {0: 0, 1: 0, 2: 0, 3: 1}
INTRA = {0: 0.1, 1: 0.5, 2: 0.2, 3: 7.0}
GLOBAL = {0: 0.3, 1: 0.1, 2: 0.4, 3: 0.2}


def test_weights_first_two_rounds_are_proportional_and_one_cluster():
    for rnd in (1, 2):
        w = aggregation_weights(rnd, [0, 1, 2, 3], N, ASSIGN, INTRA, GLOBAL)
        expected = {0: 100 / 650, 1: 200 / 650, 2: 300 / 650, 3: 50 / 650}
        assert list(w.clusters) == [0]
        assert w.clusters[0] == pytest.approx(expected, rel=1e-15)
        assert w.global_ == pytest.approx(expected, rel=1e-15)
    # No assignment or scores are needed before KLD weighting starts.
    w = aggregation_weights(1, [2, 0], N, {}, {}, {})
    assert w.clusters == {0: {0: 0.25, 2: 0.75}}


def test_weights_from_round_three_intra_global_and_single_member():
    w = aggregation_weights(3, [0, 1, 2, 3], N, ASSIGN, INTRA, GLOBAL)
    # 100 e^-0.1, 200 e^-0.5, 300 e^-0.2 normalised (computed by hand with a calculator / math.exp).
    assert w.clusters[0] == pytest.approx(
        {0: 0.197817974913423, 1: 0.2652027081012853, 2: 0.5369793169852917}, rel=1e-12
    )
    assert w.clusters[1] == {3: 1.0}  # single member: exactly 1, whatever its KLD
    # 100 e^-0.3, 200 e^-0.1, 300 e^-0.4, 50 e^-0.2 normalised.
    assert w.global_ == pytest.approx(
        {0: 0.14903344590851536, 1: 0.36405972378155027, 2: 0.4045531151905887, 3: 0.08235371511934565}, rel=1e-12
    )
    assert w.assignment == {0: 0, 1: 0, 2: 0, 3: 1}
    for members in [*w.clusters.values(), w.global_]:
        assert math.fsum(members.values()) == pytest.approx(1.0, abs=1e-15)


def test_weights_renormalise_over_arrived_clients():
    w = aggregation_weights(5, [0, 2, 3], N, ASSIGN, INTRA, GLOBAL)
    a, b = 100 * math.exp(-0.1), 300 * math.exp(-0.2)
    assert w.clusters[0] == pytest.approx({0: a / (a + b), 2: b / (a + b)}, rel=1e-12)
    assert w.global_ == pytest.approx({0: 0.23435132430159433, 2: 0.6361495415830873, 3: 0.1294991341153184}, rel=1e-12)
    # A cluster with no arrived member has no weights; its clients keep their model.
    w = aggregation_weights(5, [0, 1], N, ASSIGN, INTRA, GLOBAL)
    assert list(w.clusters) == [0] and list(w.global_) == [0, 1]


def test_weights_ablations_and_alpha():
    no_kld = aggregation_weights(4, [0, 1, 2, 3], N, ASSIGN, INTRA, GLOBAL, kld_weighting=False)
    assert no_kld.clusters == {0: pytest.approx({0: 1 / 6, 1: 2 / 6, 2: 3 / 6}), 1: {3: 1.0}}
    assert no_kld.global_ == pytest.approx({0: 100 / 650, 1: 200 / 650, 2: 300 / 650, 3: 50 / 650})
    no_clu = aggregation_weights(4, [0, 1, 2, 3], N, ASSIGN, INTRA, GLOBAL, clustering=False)
    assert list(no_clu.clusters) == [0] and no_clu.clusters[0] == pytest.approx(no_clu.global_)
    assert no_clu.global_ == pytest.approx(aggregation_weights(4, [0, 1, 2, 3], N, ASSIGN, INTRA, GLOBAL).global_)
    neither = aggregation_weights(4, [0, 1, 2, 3], N, ASSIGN, INTRA, GLOBAL, clustering=False, kld_weighting=False)
    assert neither.clusters[0] == pytest.approx({0: 100 / 650, 1: 200 / 650, 2: 300 / 650, 3: 50 / 650})
    a2 = aggregation_weights(3, [0, 1], N, {0: 0, 1: 0}, {0: 0.1, 1: 0.5}, GLOBAL, alpha=2.0)
    r0, r1 = 100 * math.exp(-0.2), 200 * math.exp(-1.0)
    assert a2.clusters[0] == pytest.approx({0: r0 / (r0 + r1), 1: r1 / (r0 + r1)}, rel=1e-12)
    early = aggregation_weights(2, [0, 1], N, {0: 0, 1: 0}, {0: 0.1, 1: 0.5}, GLOBAL, kld_from_round=2)
    assert early.clusters[0][0] == pytest.approx(100 * math.exp(-0.1) / (100 * math.exp(-0.1) + 200 * math.exp(-0.5)))


def test_weights_survive_huge_kld_and_reject_bad_input():
    w = aggregation_weights(3, [0, 1], {0: 1, 1: 3}, {0: 0, 1: 0}, {0: 2000.0, 1: 2000.0}, {0: 1e4, 1: 1e4})
    assert w.clusters[0] == pytest.approx({0: 0.25, 1: 0.75}) and w.global_ == pytest.approx({0: 0.25, 1: 0.75})
    with pytest.raises(ValueError, match="assignment"):
        aggregation_weights(3, [0, 1], N, {0: 0}, INTRA, GLOBAL)
    with pytest.raises(ValueError, match="KLD"):
        aggregation_weights(3, [0, 1], N, ASSIGN, {0: 0.1}, GLOBAL)
    with pytest.raises(ValueError, match="positive"):
        aggregation_weights(1, [0, 1], {0: 0, 1: 5}, {}, {}, {})
    with pytest.raises(ValueError):
        aggregation_weights(1, [], N, {}, {}, {})


# --------------------------------------------------------------------------------------------------------------
# Aggregation


@pytest.fixture(scope="module")
def layout() -> StateLayout:
    return StateLayout.from_config(ModelConfig())


def _const_state(layout: StateLayout, blocks, value: float, count: int) -> dict[str, torch.Tensor]:
    out = {}
    for net, i in blocks:
        for key, (shape, dtype) in layout.keys[net][i].items():
            out[key] = torch.full(shape, count if not dtype.is_floating_point else value, dtype=dtype)
    return out


def _held(layout: StateLayout, bits: str):
    cuts = CutBits.parse(bits)
    return [(s.name, i) for s in layout.arch.nets for i in s.client_blocks(*cuts.for_net(s.name))]


def _server(layout: StateLayout):
    return [(s.name, i) for s in layout.arch.nets for i in s.server_blocks()]


def _check_blocks(state, expected_float: dict[int, float], expected_int: dict[int, int] | None = None):
    """Every float tensor of block i (G and D alike) equals expected_float[i]; ints equal expected_int[i]."""
    for key, t in state.items():
        block = int(key.split(".")[1])
        if t.dtype.is_floating_point:
            assert t.dtype == torch.float32
            assert torch.all(t == expected_float[block]), (key, t.flatten()[0].item(), expected_float[block])
        elif expected_int is not None:
            assert t.dtype == torch.int64
            assert torch.all(t == expected_int[block]), (key, t.item(), expected_int[block])


CUTS = {0: CutBits.parse("0000"), 1: CutBits.parse("1111"), 2: CutBits.parse("1010")}


def _round_states(layout):
    clients = {
        0: _const_state(layout, _held(layout, "0000"), 1.0, 3),
        1: _const_state(layout, _held(layout, "1111"), 2.0, 8),
        2: _const_state(layout, _held(layout, "1010"), 4.0, 5),
    }
    server = _const_state(layout, _server(layout), 10.0, 20)
    return clients, server


def test_member_full_state_takes_own_blocks_and_server_rest(layout):
    clients, server = _round_states(layout)
    full = member_full_state(layout, CUTS[2], clients[2], server)
    all_keys = [k for net in ("G", "D") for i in range(5) for k in layout.keys[net][i]]
    assert list(full) == all_keys
    # 1010: holds G0, G1 (head), G4 and D0, D1 (head), D4; the server supplies blocks 2 and 3 of both.
    _check_blocks(full, {0: 4.0, 1: 4.0, 2: 10.0, 3: 10.0, 4: 4.0}, {0: 5, 1: 5, 2: 20, 3: 20, 4: 5})
    assert full["G.1.0.weight"] is clients[2]["G.1.0.weight"] and full["G.3.0.weight"] is server["G.3.0.weight"]
    # A bare Architecture gives the same state.
    bare = member_full_state(layout.arch, "1010", clients[2], server)
    assert list(bare) == all_keys and all(bare[k] is full[k] for k in all_keys)


def test_member_full_state_validates_keys(layout):
    clients, server = _round_states(layout)
    c0 = dict(clients[0])
    del c0["G.0.fc.1.running_mean"]
    with pytest.raises(ValueError, match=r"missing G\.0\.fc\.1\.running_mean"):
        member_full_state(layout, CUTS[0], c0, server)
    # A bare Architecture knows blocks, not keys: it catches a block that is missing altogether.
    no_g0 = {k: v for k, v in clients[0].items() if not k.startswith("G.0.")}
    with pytest.raises(ValueError, match=r"missing G\.0\.\*"):
        member_full_state(layout.arch, CUTS[0], no_g0, server)
    for arch in (layout, layout.arch):
        with pytest.raises(ValueError, match=r"unexpected G\.1\.0\.weight"):
            member_full_state(arch, CUTS[0], {**clients[0], "G.1.0.weight": server["G.1.0.weight"]}, server)
        with pytest.raises(ValueError, match=r"unexpected bogus"):
            member_full_state(arch, CUTS[0], {**clients[0], "bogus": torch.zeros(1)}, server)
        srv = {k: v for k, v in server.items() if not k.startswith("D.2.")}
        with pytest.raises(ValueError, match="server state: missing D.2"):
            member_full_state(arch, CUTS[0], clients[0], srv)
    # A client that holds G1 (head) but lost one of its keys: the bare architecture checks it against the server.
    c1 = {k: v for k, v in clients[1].items() if k != "G.1.1.running_var"}
    with pytest.raises(ValueError, match=r"G\.1\.1\.running_var"):
        member_full_state(layout.arch, CUTS[1], c1, server)
    bad_shape = {**clients[1], "G.1.0.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"G\.1\.0\.bias"):
        member_full_state(layout, CUTS[1], bad_shape, server)


def test_aggregate_round_mixed_cut_bits_against_hand_values(layout):
    clients, server = _round_states(layout)
    weights = Weights(clusters={0: {0: 0.25, 1: 0.75}, 1: {2: 1.0}}, global_={0: 0.5, 1: 0.25, 2: 0.25})
    cluster_models, global_model = aggregate_round(layout, weights, CUTS, clients, server)
    assert sorted(cluster_models) == [0, 1]
    # Cluster 0: client 0 (0000) holds blocks 0 and 4, client 1 (1111) holds 0, 1, 3, 4; block 2 is server-only.
    #   block 0: .25*1 + .75*2 = 1.75; block 1: .25*10 + .75*2 = 4.0; block 2: 10; block 3: 4.0; block 4: 1.75
    #   num_batches_tracked: block 0: .25*3 + .75*8 = 6.75 -> 7; block 1: .25*20 + .75*8 = 11; block 2: 20.
    _check_blocks(cluster_models[0], {0: 1.75, 1: 4.0, 2: 10.0, 3: 4.0, 4: 1.75}, {0: 7, 1: 11, 2: 20, 3: 11})
    # Cluster 1: one member with weight 1 -> exactly its full state.
    single = member_full_state(layout, CUTS[2], clients[2], server)
    assert all(torch.equal(cluster_models[1][k], v) for k, v in single.items())
    assert state_digest(cluster_models[1]) == state_digest(single)
    # Global: block 0: .5*1 + .25*2 + .25*4 = 2; block 1: .5*10 + .25*2 + .25*4 = 6.5; block 2: 10;
    #   block 3: .5*10 + .25*2 + .25*10 = 8; block 4: 2.  Counters: block 0: 1.5+2+1.25 = 4.75 -> 5;
    #   block 1: 10+2+1.25 = 13.25 -> 13; block 3: 10+2+5 = 17.
    _check_blocks(global_model, {0: 2.0, 1: 6.5, 2: 10.0, 3: 8.0, 4: 2.0}, {0: 5, 1: 13, 2: 20, 3: 17})
    # What each party then loads.
    srv = server_layers(layout, global_model)
    assert list(srv) == list(server)
    _check_blocks(srv, {1: 6.5, 2: 10.0, 3: 8.0})
    for c, cluster in ((0, 0), (1, 0), (2, 1)):
        mine = client_layers(layout, CUTS[c], cluster_models[cluster])
        assert list(mine) == list(clients[c])
    # A client of cluster 0 that did not arrive, with bits 0101 (G and D tails), loads its blocks from that model.
    late = client_layers(layout.arch, "0101", cluster_models[0])
    assert {k.split(".")[0] + k.split(".")[1] for k in late} == {"G0", "G3", "G4", "D0", "D3", "D4"}
    # average_members is the per-cluster job: same result, and ignores other clients' entries.
    job = average_members(layout, weights.clusters[0], CUTS, clients, server)
    assert state_digest(job) == state_digest(cluster_models[0])


def test_aggregate_round_rejects_missing_client(layout):
    clients, server = _round_states(layout)
    weights = Weights(clusters={0: {0: 0.5, 1: 0.5}}, global_={0: 0.5, 1: 0.5})
    with pytest.raises(ValueError, match=r"\[1\]"):
        aggregate_round(layout, weights, CUTS, {0: clients[0]}, server)


def test_real_model_split_and_reassemble(layout):
    cfg = ModelConfig()
    nets = build_networks(cfg, seed=3)
    full = {}
    for net, blocks in nets.items():
        full.update(canonical_state(net, dict(enumerate(blocks))))
    arch = architecture(cfg)
    for bits in ("0000", "1111", "0110"):
        mine = client_layers(arch, bits, full)
        theirs = server_layers(arch, full)
        rebuilt = member_full_state(layout, bits, mine, theirs)
        assert list(rebuilt) == list(full) and all(rebuilt[k] is full[k] for k in full)


def test_weighted_average_precision_and_integer_rounding():
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(4, 5)).astype(np.float32) for _ in range(3)]
    ws = [0.2, 0.3, 0.5]
    states = [
        {"a": torch.from_numpy(x), "n": torch.tensor(v, dtype=torch.int64)} for x, v in zip(xs, (1, 2, 4), strict=True)
    ]
    out = weighted_average(states, ws)
    acc = np.zeros((4, 5))
    for x, w in zip(xs, ws, strict=True):
        acc = acc + x.astype(np.float64) * w
    assert out["a"].dtype == torch.float32 and np.array_equal(out["a"].numpy(), acc.astype(np.float32))
    assert out["n"].dtype == torch.int64 and out["n"].item() == 3  # 0.2 + 0.6 + 2.0 = 2.8 -> 3
    # Ties round to even.
    half = [{"n": torch.tensor(2)}, {"n": torch.tensor(3)}]
    assert weighted_average(half, [0.5, 0.5])["n"].item() == 2
    half = [{"n": torch.tensor(3)}, {"n": torch.tensor(4)}]
    assert weighted_average(half, [0.5, 0.5])["n"].item() == 4
    # The result never aliases an input.
    assert out["a"].data_ptr() not in {s["a"].data_ptr() for s in states}
    with pytest.raises(ValueError, match="sum to 1"):
        weighted_average(states, [0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="missing"):
        weighted_average([{"a": torch.zeros(2)}, {"b": torch.zeros(2)}], [0.5, 0.5])
    with pytest.raises(ValueError):
        weighted_average([{"a": torch.zeros(2)}, {"a": torch.zeros(3)}], [0.5, 0.5])


def test_state_digest_is_bit_exact():
    state = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.tensor(7, dtype=torch.int64)}
    d = state_digest(state)
    assert len(d) == 64
    assert state_digest({"a": state["a"].clone(), "b": state["b"].clone()}) == d  # key order and copies don't matter
    flipped = state["b"].clone()
    flipped.view(torch.int32)[1, 2] ^= 1  # one bit of one element
    assert state_digest({**state, "b": flipped}) != d
    assert state_digest({**state, "b": state["b"].reshape(3, 2)}) != d  # same bytes, other shape
    assert state_digest({**state, "b": state["b"].view(torch.int32)}) != d  # same bytes, other dtype
    assert state_digest({"c": state["b"], "a": state["a"]}) != d  # other key
    assert state_digest({**state, "z": torch.zeros(0)}) != d
    assert state_digest({"x": torch.tensor([0.0])}) != state_digest({"x": torch.tensor([-0.0])})
    assert state_digest({"x": torch.ones(3, dtype=torch.bfloat16)}) == state_digest({"x": torch.ones(3).bfloat16()})
