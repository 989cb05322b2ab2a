"""`hfgan bench quality` at a tiny scale on synthetic data: every method runs and reports, the report answers from
its numbers, FedGAN-style averaging is the weighted mean, local-only never averages, same-cut is the best uniform
assignment, and finished methods are skipped on a re-run."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

from hfgan_core.bench import quality
from hfgan_core.bench.baselines import (
    BaselineContext,
    Member,
    federated_average,
    model_state,
    run_baseline,
    steps_per_round,
)
from hfgan_core.bench.cli import main as bench_main
from hfgan_core.bench.quality import METHODS, SPLIT_METHODS, BenchSettings, run_bench
from hfgan_core.bench.report import NAMES, claims, compare
from hfgan_core.config import (
    ConfigError,
    DeviceProfile,
    DevicesConfig,
    DomainConfig,
    RunConfig,
    RuntimeConfig,
    ScenarioConfig,
    ServerProfile,
    TrainConfig,
    load_config,
)
from hfgan_core.planning import iteration_latency, run_costs
from hfgan_core.runtime.client import client_seed
from hfgan_core.runtime.unsplit import UnsplitGAN

PNG = b"\x89PNG\r\n\x1a\n"


def tiny_cfg(root, clients: int = 2) -> RunConfig:
    return RunConfig(
        scenario=ScenarioConfig(
            name="tiny", domains=(DomainConfig("synthetic", clients),), synthetic_train_per_class=30
        ),
        # KLD weighting from the first round, so that one round exercises it (and the clustering service's scores).
        train=TrainConfig(batch_size=16, kld_from_round=1),
        runtime=RuntimeConfig(data_dir=str(root / "nodata")),
    ).validate()


def tiny_settings(out, **changes) -> BenchSettings:
    s = BenchSettings(
        config="tiny",
        out=str(out),
        rounds=1,
        local_epochs=1,
        steps_per_epoch=1,
        samples_per_client=100,
        score_samples=50,
        utility_samples=50,
        utility_epochs=1,
        allow_synthetic=True,
        classifier_epochs=1,
        progress=False,
    )
    return dataclasses.replace(s, **changes)


@pytest.fixture(scope="module")
def bench_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HFGAN_CLASSIFIER_DIR", str(root / "classifiers"))
        for var in (
            "HFGAN_DATA_DIR",
            "HFGAN_RUN_DIR",
            "HFGAN_BROKER_URL",
            "HFGAN_STATE_URL",
            "HFGAN_DEVICE",
            "HFGAN_RUN_ID",
            "HFGAN_SERVER_DEVICE",
        ):
            mp.delenv(var, raising=False)
        yield root


@pytest.fixture(scope="module")
def full_bench(bench_env):
    out = bench_env / "out"
    logs: list[str] = []
    rep = run_bench(tiny_settings(out), base_cfg=tiny_cfg(bench_env), log=logs.append)
    return out, rep, logs


# ----------------------------------------------------------------------------------------------------------------
# The whole bench


@pytest.mark.slow
def test_every_method_runs_and_writes_its_summary(full_bench):
    out, rep, _ = full_bench
    assert list(rep["methods"]) == list(METHODS)
    for m in METHODS:
        run_dir = out / "runs" / m
        summary = json.loads((run_dir / "summary.json").read_text())
        assert "synthetic" in summary["domains"]
        res = json.loads((run_dir / quality.RESULT_FILE).read_text())
        dom = res["domains"]["synthetic"]
        assert [r for r, _ in dom["history"]] == [1]  # a generation score per round
        assert 1.0 - 1e-6 <= dom["generation_score"] <= 10.0
        assert dom["generation_score"] == pytest.approx(dom["history"][-1][1])
        for key in ("accuracy", "precision", "recall", "f1", "fpr"):
            assert 0.0 <= dom["utility"][key] <= 100.0
        assert res["wall_train_s"] > 0 and res["wall_eval_s"] > 0
        assert res["modelled_latency_s"] > 0
        assert res["steps_per_round"] == 1
        assert (out / "samples" / f"{m}_synthetic.png").read_bytes().startswith(PNG)
        if m in SPLIT_METHODS:
            assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
            assert not (run_dir / "checkpoints").exists()  # pruned: evidence keeps metrics and images only
            assert res["bytes_per_round"] > 0 and res["bytes_all_roles"] >= res["bytes_sent"]
            assert len(res["clusters"]) == 1
    # Traffic per round: FedGAN-style exchanges two whole models per client; local only and centralized none.
    fed = rep["methods"]["fedgan"]
    assert fed["bytes_per_round"] == 2 * fed["model_bytes"] * 2
    assert rep["methods"]["local_only"]["bytes_per_round"] == 0
    assert rep["methods"]["centralized"]["bytes_per_round"] == 0
    assert set(rep["methods"]["local_only"]["domains"]["synthetic"]["per_client"]) == {"0", "1"}
    # Baselines' modelled latency: the whole model on the slowest device (far above the split methods').
    assert fed["modelled_latency_s"] > rep["methods"]["huscf"]["modelled_latency_s"]


@pytest.mark.slow
def test_report_has_every_method_and_domain_the_answers_and_the_scale(full_bench):
    out, rep, _ = full_bench
    md = (out / "report.md").read_text()
    table = md.split("### synthetic", 1)[1].split("\n\n", 2)[1]  # the per-domain results table
    for m in METHODS:
        assert f"| {NAMES[m]} |" in table
    assert "## Answers" in md
    assert len(rep["answers"]) == 4  # one domain x (FedGAN, no clustering) x (accuracy, generation score)
    for a in rep["answers"]:
        assert a["answer"] in ("yes", "no", "no (tie)")
        assert a["text"] in md
    assert any(c["claim"].startswith("1.1x to 2.2x") for c in rep["claims"])
    # The scale factors: paper value, value here, factor.
    rows = {r["knob"]: r for r in rep["scale_factors"]}
    assert (rows["rounds"]["paper"], rows["rounds"]["here"]) == (50, 1)
    assert rows["rounds"]["factor"] == pytest.approx(1 / 50)
    assert "| rounds | 50 | 1 | 0.020 |" in md
    assert "| utility samples | 30000 | 50 |" in md
    for p in rep["plots"].values():
        assert (out / p).read_bytes().startswith(PNG)
    assert json.loads((out / "report.json").read_text())["digest"] == rep["digest"]
    # The scoring classifier is identified, so that reports can be compared with each other.
    scorer = rep["machine"]["scoring_classifiers"]["synthetic"]
    assert scorer["seed"] == 0 and scorer["epochs"] == 1 and 0 < scorer["test_accuracy"] <= 100
    assert f"synthetic test accuracy {scorer['test_accuracy']:.2f}% (seed 0, 1 epochs" in md


@pytest.mark.slow
def test_the_scoring_classifier_does_not_depend_on_the_training_seed(tmp_path, monkeypatch):
    from hfgan_core.data import load_scenario_data
    from hfgan_core.runtime.recorder import classifier_facts, ensure_classifiers

    digests = []
    for seed in (0, 5):
        monkeypatch.setenv("HFGAN_CLASSIFIER_DIR", str(tmp_path / f"classifiers-{seed}"))
        cfg = tiny_cfg(tmp_path).with_overrides("train", seed=seed).validate()
        data = load_scenario_data(cfg, allow_synthetic_fallback=True, log=lambda s: None)
        ensure_classifiers(cfg, data.train_sets, data.test_sets, data.sources, log=lambda s: None, epochs=1)
        facts = classifier_facts(cfg, data.sources)["synthetic"]
        assert facts["seed"] == 0
        digests.append(facts["file_sha256"])
    assert digests[0] == digests[1]  # the same instrument, bit for bit


@pytest.mark.slow
def test_rerun_skips_finished_methods_and_refuses_other_settings(full_bench, bench_env):
    out, rep, _ = full_bench
    files = {m: out / "runs" / m / quality.RESULT_FILE for m in METHODS}
    before = {m: p.stat().st_mtime_ns for m, p in files.items()}
    logs: list[str] = []
    again = run_bench(tiny_settings(out), base_cfg=tiny_cfg(bench_env), log=logs.append)
    for m in METHODS:
        assert any(line.startswith(f"[{m}] finished earlier: skipping") for line in logs)
        assert files[m].stat().st_mtime_ns == before[m]
    assert again["methods"]["huscf"]["domains"] == rep["methods"]["huscf"]["domains"]
    with pytest.raises(ConfigError, match="other settings"):
        run_bench(tiny_settings(out, rounds=2, methods=("fedgan",)), base_cfg=tiny_cfg(bench_env), log=logs.append)


# ----------------------------------------------------------------------------------------------------------------
# Baselines


@pytest.mark.slow
def test_fedgan_average_is_the_weighted_mean_loaded_by_every_client(tmp_path):
    cfg = tiny_cfg(tmp_path)
    gans = [UnsplitGAN(cfg, seed=s) for s in (1, 2, 3)]
    # A tiny tensor set by hand: D's last bias (one element), and BatchNorm counters.
    with torch.no_grad():
        for g, v, count in zip(gans, (1.0, 2.0, 4.0), (1, 2, 10)):
            g.D[4].fc.bias.fill_(v)
            g.G[1][1].num_batches_tracked.fill_(count)
    states = [{k: v.clone() for k, v in model_state(g).items()} for g in gans]
    params_before = [[id(p) for grp in g.opt_g.param_groups for p in grp["params"]] for g in gans]
    federated_average(gans, [1, 1, 2])  # weights 1/4, 1/4, 1/2
    assert float(gans[0].D[4].fc.bias.detach()) == 0.25 * 1.0 + 0.25 * 2.0 + 0.5 * 4.0  # 2.75, exact
    assert int(gans[1].G[1][1].num_batches_tracked) == 6  # 5.75 rounded
    after = [model_state(g) for g in gans]
    for key, ref in states[0].items():
        if not ref.is_floating_point():
            continue
        expected = (
            0.25 * states[0][key].double() + 0.25 * states[1][key].double() + 0.5 * states[2][key].double()
        ).float()
        for a in after:
            assert torch.allclose(a[key], expected, rtol=0, atol=1e-6), key
    for a in after[1:]:  # every client holds the same global model
        assert all(torch.equal(a[k], after[0][k]) for k in a)
    # Loaded in place: each optimiser still steps the model's own parameters.
    for g, ids in zip(gans, params_before):
        assert [id(p) for grp in g.opt_g.param_groups for p in grp["params"]] == ids


@pytest.fixture(scope="module")
def baseline_ctx(bench_env):
    from hfgan_core.data import load_scenario_data
    from hfgan_core.runtime.recorder import ensure_classifiers

    cfg = quality.reduced_scenario(tiny_cfg(bench_env), 2, 100)
    cfg = cfg.with_overrides(
        "train", rounds=1, local_epochs=1, steps_per_epoch=2, score_samples=50, utility_samples=50, utility_epochs=1
    ).validate()
    data = load_scenario_data(cfg, allow_synthetic_fallback=True, log=lambda s: None)
    classifiers = ensure_classifiers(cfg, data.train_sets, data.test_sets, data.sources, log=lambda s: None, epochs=1)
    return cfg, data, classifiers


def _ctx(baseline_ctx, root, method):
    cfg, data, classifiers = baseline_ctx
    return BaselineContext(cfg, data, classifiers, root / method, root / "samples", log=lambda s: None)


@pytest.mark.slow
def test_fedgan_clients_end_identical_and_local_only_clients_never_average(baseline_ctx, tmp_path):
    cfg, data, _ = baseline_ctx
    initial = model_state(UnsplitGAN(cfg, seed=cfg.train.seed))
    fed = run_baseline(_ctx(baseline_ctx, tmp_path, "fedgan"), "fedgan").members
    s0, s1 = (model_state(m.gan) for m in fed)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert not all(torch.equal(s0[k], initial[k]) for k in s0)  # they did train

    local = run_baseline(_ctx(baseline_ctx, tmp_path, "local_only"), "local_only").members
    l0, l1 = (model_state(m.gan) for m in local)
    assert not all(torch.equal(l0[k], l1[k]) for k in l0)
    # Client 0's model is exactly what client 0 alone produces from its own data and random stream.
    alone = Member(
        "client 0",
        UnsplitGAN(cfg, seed=cfg.train.seed),
        data.clients[0],
        torch.Generator().manual_seed(client_seed(cfg.train.seed, 0)),
        cfg.train.batch_size,
        "synthetic",
        (0,),
    )
    for _ in range(cfg.train.rounds * steps_per_round(cfg, [c.n for c in data.clients])):
        alone.step(cfg.model.z_dim)
    mine = model_state(alone.gan)
    assert all(torch.allclose(l0[k].float(), mine[k].float(), rtol=0, atol=1e-6) for k in l0)


@pytest.mark.slow
def test_centralized_pools_each_domain_and_draws_the_domains_batch(baseline_ctx, tmp_path):
    cfg, data, _ = baseline_ctx
    run = run_baseline(_ctx(baseline_ctx, tmp_path, "centralized"), "centralized")
    (m,) = run.members
    assert m.n == sum(c.n for c in data.clients)
    assert m.batch_size == cfg.train.batch_size * 2  # batch x clients in the domain
    assert run.result["bytes_sent"] == 0


# ----------------------------------------------------------------------------------------------------------------
# Same cut, scale, answers, CLI


def _brute_force(cfg):
    n = cfg.scenario.total_clients
    costs = run_costs(cfg)
    profiles = cfg.devices.client_profiles(n)
    table = {
        bits: iteration_latency(costs, profiles, cfg.devices.server, [bits] * n)
        for bits in itertools.product((0, 1), repeat=4)
    }
    best = min(table.values())
    return {b for b, v in table.items() if v == best}, best


def test_same_cut_is_the_uniform_assignment_with_the_lowest_modelled_latency(tmp_path):
    paper_devices = tiny_cfg(tmp_path, clients=5)
    # Fast devices with fast links next to a slow server: holding every optional block is best.
    fast = paper_devices.replace(
        devices=DevicesConfig(
            server=ServerProfile(computational_frequency_ghz=0.05),
            profiles=(("fast", DeviceProfile(1e6, 16, 1e12)),),
            clients=("fast",),
        )
    )
    picks = []
    for cfg in (paper_devices, fast):
        bits, latency, table = quality.best_uniform_cut(cfg)
        best_set, best = _brute_force(cfg)
        assert bits in best_set and latency == pytest.approx(best, rel=1e-12)
        assert len(table) == 16
        assert quality.split_method_config(cfg, "same_cut").train.cuts == (bits,)
        picks.append(bits)
    assert picks[0] != picks[1]  # the choice depends on the profiles


def test_reduced_scale_of_a_preset_and_its_estimate():
    paper = load_config("s3")
    cfg = quality.with_scale(quality.reduced_scenario(paper, 2, 1000), quality.Scale(2, 1000, 6, 2, 2000, 10000, 5))
    assert [(d.clients, d.samples_per_client) for d in cfg.scenario.domains] == [(2, 1000), (2, 1000)]
    rows = {r["knob"]: r for r in quality.scale_factors(paper, cfg, steps_per_round=32)}
    assert (rows["clients per domain"]["paper"], rows["clients per domain"]["here"]) == (20, 2)
    assert (rows["samples per client (cap)"]["paper"], rows["samples per client (cap)"]["here"]) == (1500, 1000)
    assert rows["training steps per method"]["here"] == 6 * 32
    c = quality.CostConstants()
    est = {m: quality.estimate_seconds(cfg, 32, m, c) for m in METHODS}
    # 192 steps of 4 clients x 64 at 1.9 s each; local only evaluates one model per client.
    assert est["fedgan"]["train_s"] == pytest.approx(192 * 1.9)
    assert est["local_only"]["eval_s"] > est["fedgan"]["eval_s"]
    assert 30 < quality.estimate_total_minutes(cfg, 32, METHODS, c) <= 60


def _result(acc: float, score: float, latency: float = 1.0) -> dict:
    return {
        "domains": {"A": {"generation_score": score, "history": [[1, score]], "utility": {"accuracy": acc}}},
        "modelled_latency_s": latency,
    }


def test_answers_and_claims_follow_the_numbers():
    results = {
        "huscf": _result(90.0, 8.0, 3.0),
        "no_clustering": _result(95.0, 9.0, 3.0),
        "fedgan": _result(60.0, 4.0, 200.0),
        "local_only": _result(70.0, 5.0, 200.0),
    }
    assert compare(results, "fedgan", "A", "accuracy")["answer"] == "yes"
    assert compare(results, "fedgan", "A", "accuracy")["difference"] == pytest.approx(30.0)
    assert compare(results, "no_clustering", "A", "generation score")["answer"] == "no"
    by_start = {c["claim"][:12]: c["verdict"] for c in claims(results, ["A"])}
    assert by_start["1.1x to 2.2x"] == "holds"  # 8/4 and 8/5
    assert by_start["about 10% be"] == "holds"  # +50% and +28.6%
    assert by_start["much lower ("] == "holds"
    assert by_start["ablation: cl"] == "does not hold"
    results["fedgan"] = _result(89.0, 7.5, 200.0)  # HuSCF-GAN still ahead, but by far less
    by_start = {c["claim"][:12]: c["verdict"] for c in claims(results, ["A"])}
    assert by_start["1.1x to 2.2x"] == "holds partly"  # 8/7.5 = 1.07 < 1.1
    assert by_start["about 10% be"] == "holds partly"  # +1.1% over FedGAN-style
    results["fedgan"] = _result(90.001, 8.0, 200.0)
    assert compare(results, "fedgan", "A", "accuracy")["answer"] == "no (tie)"


def test_cli_estimate_only_and_bad_methods(tmp_path, capsys, bench_env):
    toml = tmp_path / "tiny.toml"
    toml.write_text(
        '[scenario]\nname = "tinytoml"\nsynthetic_train_per_class = 30\n\n[[scenario.domains]]\n'
        'dataset = "synthetic"\nclients = 2\n\n[train]\nbatch_size = 16\n'
    )
    out = tmp_path / "out"
    rc = bench_main(
        [
            "quality",
            "--config",
            str(toml),
            "--estimate-only",
            "--allow-synthetic",
            "--out",
            str(out),
            "--data-dir",
            str(tmp_path / "nodata"),
            "--rounds",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0
    assert "cost estimate" in err and "scale factors" in err and "local_only" in err
    assert not out.exists()  # an estimate runs nothing and writes nothing
    rc = bench_main(["quality", "--config", str(toml), "--methods", "huscf,gan9000", "--out", str(out)])
    assert rc == 2
    assert "gan9000" in capsys.readouterr().err


def test_device_link_bytes_count_what_clients_send_and_what_is_sent_to_them():
    by_role = {
        "client.0": {"g_head_out": 100, "round_done": 3},
        "client.1": {"d_head_out": 50},
        "server": {"g_mid_out": 7, "steps_lost": 2, "activation_summaries": 1000, "server_update": 500},
        "aggregator.0": {"model_assignment": 20, "server_model": 4000},
        "coordinator": {"round_start": 5, "aggregate_job": 300, "round_event": 60},
        "clustering": {"cluster_result": 9},
    }
    # 103 + 50 from the clients; 7 + 2 + 20 + 5 sent to them; summaries, updates, jobs and events never reach a device.
    assert quality.device_link_bytes(by_role) == 103 + 50 + 7 + 2 + 20 + 5
