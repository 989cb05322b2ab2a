"""Aggregation planning (federation/planning.py) with hand-computed cases: quorum, untrained clients, admitted
sample counts, clusters, KLD fill-in and the jobs' members, weights and recipients."""

from __future__ import annotations

import math

import pytest

from hfgan_core.federation.planning import (
    GLOBAL_JOB,
    Clusters,
    WeightRule,
    plan_round_jobs,
    resolve_clusters,
)

RULE = WeightRule(alpha=1.0, kld_from_round=3, kld_weighting=True, clustering=True)


def plan(round=1, *, members, participants=None, steps, server=5, quorum=0.5, clusters=None, rule=RULE, excluded=()):
    participants = sorted(members) if participants is None else participants
    clusters = clusters or Clusters({c: 0 for c in members})
    return plan_round_jobs(
        round,
        members=members,
        participants=participants,
        steps_done=steps,
        server_steps=server,
        quorum=quorum,
        clusters=clusters,
        rule=rule,
        excluded=excluded,
    )


def test_early_rounds_are_one_cluster_weighted_by_the_admitted_counts():
    # Admitted 10, 30, 60 samples: 0.1, 0.3, 0.6 in cluster 0 and globally, whatever the reports said.
    p = plan(members={0: 10, 1: 30, 2: 60}, steps={0: 4, 1: 4, 2: 4})
    assert p.skip is None
    assert set(p.jobs) == {0, GLOBAL_JOB}
    assert p.jobs[0].members == (0, 1, 2)
    assert p.jobs[0].weights == (0.1, 0.3, 0.6)
    assert p.jobs[0].recipients == (0, 1, 2)
    assert p.jobs[GLOBAL_JOB].weights == (0.1, 0.3, 0.6)
    assert p.jobs[GLOBAL_JOB].recipients == ()


def test_a_client_that_completed_no_step_is_not_averaged_and_the_others_renormalise():
    p = plan(members={0: 10, 1: 30, 2: 60}, steps={0: 4, 1: 0, 2: 4})
    assert p.untrained == (1,)
    assert p.averaged == (0, 2)
    assert p.jobs[0].members == (0, 2)
    assert p.jobs[0].weights == (10 / 70, 60 / 70)
    assert p.jobs[0].recipients == (0, 1, 2)  # the untrained client still loads its cluster's model


@pytest.mark.parametrize(
    ("quorum", "arrived", "skip"),
    [
        (0.5, {0: 1, 1: 1}, None),  # ceil(0.5 * 4) = 2 of 4
        (0.5, {0: 1}, "quorum not met"),
        (0.75, {0: 1, 1: 1}, "quorum not met"),  # ceil(3) = 3
        (0.0, {0: 1}, None),  # at least one client
        (0.0, {}, "quorum not met"),
        (0.5, {0: 1, 1: 0, 2: 0}, "quorum not met"),  # untrained clients do not count
    ],
)
def test_quorum_counts_the_averaged_clients_against_the_participants(quorum, arrived, skip):
    p = plan(members={c: 10 for c in range(4)}, steps=arrived, quorum=quorum)
    assert p.skip == skip
    assert (p.jobs == {}) == (skip is not None)


@pytest.mark.parametrize("server", [None, 0])
def test_no_server_training_skips_the_round(server):
    p = plan(members={0: 10, 1: 10}, steps={0: 3, 1: 3}, server=server)
    assert p.skip == "no training happened"


def test_a_report_from_a_client_that_is_no_member_is_ignored():
    p = plan(members={0: 10, 1: 10}, participants=[0, 1], steps={0: 3, 1: 3, 7: 3})
    assert p.averaged == (0, 1)
    assert p.jobs[GLOBAL_JOB].members == (0, 1)


def test_from_kld_round_on_clusters_weight_by_n_exp_minus_alpha_kld():
    # Cluster 0 = {0, 1}, cluster 1 = {2, 3}; client 3 did not arrive. Intra: 0 -> 0.0, 1 -> ln 2, 2 -> 0.5.
    # Weights in cluster 0: n exp(-kld) = 20 * 1 and 40 * 1/2 = 20 each -> 0.5, 0.5. Cluster 1: 2 alone -> 1.
    # Global: kld 0.0, 0.0, ln 3 with n = 20, 40, 30 -> 20, 40, 10 -> 2/7, 4/7, 1/7.
    members = {0: 20, 1: 40, 2: 30, 3: 50}
    clusters = Clusters(
        {0: 0, 1: 0, 2: 1, 3: 1},
        kld_intra={0: 0.0, 1: math.log(2), 2: 0.5},
        kld_global={0: 0.0, 1: 0.0, 2: math.log(3)},
    )
    p = plan(3, members=members, steps={0: 2, 1: 2, 2: 2}, clusters=clusters)
    assert p.jobs[0].members == (0, 1) and p.jobs[0].weights == pytest.approx((0.5, 0.5), abs=1e-15)
    assert p.jobs[1].members == (2,) and p.jobs[1].weights == (1.0,)
    assert p.jobs[1].recipients == (2, 3)
    assert p.jobs[GLOBAL_JOB].weights == pytest.approx((2 / 7, 4 / 7, 1 / 7), abs=1e-15)
    assert p.orphans == ()
    assert p.filled_kld == {}


def test_a_cluster_without_an_arrived_member_has_no_job_and_its_clients_are_orphans():
    members = {0: 10, 1: 10, 2: 10}
    clusters = Clusters({0: 0, 1: 0, 2: 1}, kld_intra={0: 0.1, 1: 0.1}, kld_global={0: 0.2, 1: 0.2})
    p = plan(3, members=members, steps={0: 1, 1: 1}, clusters=clusters, quorum=0.5)
    assert set(p.jobs) == {0, GLOBAL_JOB}
    assert p.jobs[0].weights == (0.5, 0.5)
    assert p.orphans == (2,)


def test_a_client_without_kld_is_weighted_like_the_least_similar_one():
    # Client 2 has no score: it gets max(0.0, ln 2) = ln 2; global n exp(-kld) = 10, 5, 5 -> 0.5, 0.25, 0.25.
    members = {0: 10, 1: 10, 2: 10}
    clusters = Clusters({0: 0, 1: 0, 2: 0}, kld_intra={0: 0.0, 1: math.log(2)}, kld_global={0: 0.0, 1: math.log(2)})
    p = plan(3, members=members, steps={0: 1, 1: 1, 2: 1}, clusters=clusters)
    assert p.filled_kld == {"intra-cluster": ((2,), math.log(2)), "global": ((2,), math.log(2))}
    assert p.jobs[GLOBAL_JOB].weights == pytest.approx((0.5, 0.25, 0.25), abs=1e-15)


def test_without_kld_weighting_or_clustering_weights_are_proportional_in_one_cluster():
    members = {0: 10, 1: 30}
    rule = WeightRule(kld_weighting=False, clustering=False)
    clusters = Clusters({0: 0, 1: 1})  # ignored without clustering
    p = plan(5, members=members, steps={0: 1, 1: 1}, clusters=clusters, rule=rule)
    assert set(p.jobs) == {0, GLOBAL_JOB}
    assert p.jobs[0].weights == (0.25, 0.75)
    assert p.jobs[0].recipients == (0, 1)


def test_resolve_clusters_takes_the_result_from_the_kld_round_and_keeps_previous_clusters_otherwise():
    result = Clusters({0: 1, 1: 0}, kld_intra={0: 0.5}, kld_global={0: 0.25, 1: 0.75})
    # Round 2 (< kld_from_round): one cluster; only the global scores are kept.
    early = resolve_clusters(2, [0, 1, 2], {0: 1}, result, RULE, need_result=False)
    assert early == Clusters({0: 0, 1: 0, 2: 0}, {}, {0: 0.25, 1: 0.75})
    # Round 3 with a result: the result's clusters; client 2 keeps its previous cluster 1.
    late = resolve_clusters(3, [0, 1, 2], {2: 1}, result, RULE, need_result=True)
    assert late == Clusters({2: 1, 0: 1, 1: 0}, {0: 0.5}, {0: 0.25, 1: 0.75})
    # Round 3 without a result: the previous clusters; new members start in 0.
    kept = resolve_clusters(3, [0, 1, 2], {0: 1, 1: 1}, None, RULE, need_result=True)
    assert kept.assignment == {0: 1, 1: 1, 2: 0}


def test_a_client_excluded_after_its_update_was_missing_is_planned_as_if_it_had_not_reported():
    # The coordinator plans the round again without a client whose named update the aggregators kept refusing as
    # missing (runtime/coordinator_jobs.py): everything (members, weights, KLD fill-in, recipients, orphans) is
    # exactly the plan of the round in which that client never reported, bit for bit.
    members = {0: 20, 1: 40, 2: 30, 3: 50}
    clusters = Clusters(
        {0: 0, 1: 0, 2: 1, 3: 1},
        kld_intra={0: 0.0, 1: math.log(2), 2: 0.5},
        kld_global={0: 0.3, 1: 0.1, 2: math.log(3)},
    )
    for r, excluded, rest in ((1, (3,), {0, 1, 2}), (3, (1,), {0, 2, 3}), (3, (2, 3), {0, 1})):
        steps = {0: 2, 1: 2, 2: 2, 3: 2}
        got = plan(r, members=members, steps=steps, clusters=clusters, excluded=excluded)
        absent = plan(r, members=members, steps={c: steps[c] for c in rest}, clusters=clusters)
        assert got == absent, (r, excluded)
        assert not set(excluded) & set(got.averaged)
    assert plan(3, members=members, steps={0: 2, 1: 2, 2: 2, 3: 2}, clusters=clusters, excluded=(2, 3)).orphans == (
        2,
        3,
    )
    # Excluded clients do not count for the quorum.
    assert plan(members=members, steps={0: 1, 1: 1, 2: 1}, excluded=(1, 2)).skip == "quorum not met"
