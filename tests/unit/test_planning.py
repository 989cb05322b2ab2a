"""Cut planning: costs derived from the model, the paper's latency model, the exact planner, effective profiles and
the plan-cuts command line."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from hfgan_core.config import (
    PAPER_DEVICE_PROFILES,
    ConfigError,
    DeviceProfile,
    DevicesConfig,
    DomainConfig,
    ModelConfig,
    RunConfig,
    ScenarioConfig,
    ServerProfile,
    TrainConfig,
)
from hfgan_core.model import CutBits
from hfgan_core.planning import (
    batch_latency,
    client_gflops,
    compute_costs,
    effective_profiles,
    iteration_latency,
    latency_breakdown,
    latency_terms,
    optimise_column,
    plan_cuts,
    plan_for_run,
    predicted_compute_seconds,
)
from hfgan_core.planning.cli import main as cli_main
from hfgan_core.planning.planner import column_cost

torch.set_num_threads(1)


def _reference_path() -> Path:
    env = os.environ.get("HFGAN_REFERENCE_DIR")
    candidates = [Path(env) / "cut_selection" / "ga_ref20.json"] if env else []
    root = Path(__file__).resolve().parents[2]
    candidates += [
        root / "tests" / "data" / "ga_ref20.json",
        root.parent / "shared" / "reference" / "cut_selection" / "ga_ref20.json",
    ]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"ga_ref20.json not found (looked in {', '.join(map(str, candidates))}); "
        "set HFGAN_REFERENCE_DIR to the reference directory"
    )


@pytest.fixture(scope="module")
def ref() -> dict:
    return json.loads(_reference_path().read_text())


@pytest.fixture(scope="module")
def paper_costs():
    return compute_costs(ModelConfig(), batch_size=64, cost_model="paper")


@pytest.fixture(scope="module")
def corrected_costs():
    return compute_costs(ModelConfig(), batch_size=64, cost_model="corrected")


def _ref_clients(ref: dict) -> list[DeviceProfile]:
    return [DeviceProfile(*p) for p in ref["client_profiles_cpu_mhz_flops_per_cycle_data_rate"]]


def _ref_server(ref: dict) -> ServerProfile:
    s = ref["server"]
    return ServerProfile(s["computational_frequency"], s["cpu_cycles_per_flop"], s["transmission_rate"])


def _random_clients(rng: np.random.Generator, n: int) -> list[DeviceProfile]:
    out = []
    for _ in range(n):
        if out and rng.random() < 0.2:  # some duplicates: ties must not break exactness
            out.append(out[int(rng.integers(len(out)))])
            continue
        out.append(
            DeviceProfile(
                float(np.exp(rng.uniform(np.log(100), np.log(20000)))),
                int(rng.integers(1, 17)),
                float(np.exp(rng.uniform(np.log(1e6), np.log(2e9)))),
            )
        )
    return out


def _random_server(rng: np.random.Generator) -> ServerProfile:
    # From a server that is a bottleneck to one that is not.
    return ServerProfile(
        float(rng.uniform(0.5, 60)),
        float(rng.choice([1, 4, 16])),
        float(np.exp(rng.uniform(np.log(1e7), np.log(1e10)))),
    )


# ------------------------------------------------------------------------------------------------------------
# Costs


def test_block_gflops_and_per_cut_reproduce_the_reference_exactly(paper_costs, ref):
    assert paper_costs.block_gflops() == ref["block_gflops"]
    assert paper_costs.per_cut() == ref["per_cut"]
    assert paper_costs.generator.out_bytes == (3211264, 6422528, 6422528, 12845056, 200704)
    assert paper_costs.discriminator.out_bytes == (3211264, 1605632, 1605632, 589824, 256)


def test_costs_are_derived_from_the_torch_layers(paper_costs):
    kinds = [(lc.block, lc.kind) for lc in paper_costs.generator.layers]
    assert (1, "ConvTranspose2d") in kinds and (0, "Linear") in kinds and (4, "Tanh") in kinds
    e1 = next(lc for lc in paper_costs.generator.layers if lc.block == 1 and lc.kind == "ConvTranspose2d")
    assert e1.in_shape == (256, 7, 7) and e1.out_shape == (128, 14, 14)
    # Linear work scales with the batch; the per-sample layer counts do not change.
    half = compute_costs(ModelConfig(), batch_size=32)
    for a, b in zip(half.generator.fwd_gflops, paper_costs.generator.fwd_gflops, strict=True):
        assert a == pytest.approx(b / 2, rel=1e-15)
    assert half.discriminator.out_bytes[-1] == 128
    # Half-precision wire: half the bytes, same FLOPs.
    fp16 = compute_costs(ModelConfig(), bytes_per_element=2)
    assert fp16.generator.out_bytes[0] * 2 == paper_costs.generator.out_bytes[0]
    assert fp16.generator.fwd_gflops == paper_costs.generator.fwd_gflops


def test_corrected_model_differs_only_on_transposed_convolutions(paper_costs, corrected_costs):
    assert corrected_costs.discriminator == paper_costs.discriminator  # D has no transposed convolution
    changed = 0
    for p, c in zip(paper_costs.generator.layers, corrected_costs.generator.layers, strict=True):
        assert (p.block, p.kind, p.in_shape, p.out_shape) == (c.block, c.kind, c.in_shape, c.out_shape)
        if p.kind != "ConvTranspose2d" or p.in_shape[1:] == p.out_shape[1:]:
            assert (p.fwd_flops, p.bwd_flops) == (c.fwd_flops, c.bwd_flops)
        else:
            changed += 1
            assert c.fwd_flops < p.fwd_flops
    assert changed == 2  # E1 and E3 upsample; E2 and B5 keep the size
    # E1 on its input: 2*Cin*Cout*k*k*Hin*Win + bias per output element, then BN (8) and ReLU (1).
    e1 = (2 * 256 * 128 * 16 * 7 * 7 + 128 * 196 + 8 * 128 * 196 + 128 * 196) * 64 / 1e9
    assert corrected_costs.generator.fwd_gflops[1] == pytest.approx(e1, rel=1e-15)
    for i in (0, 2, 4):
        assert corrected_costs.generator.fwd_gflops[i] == paper_costs.generator.fwd_gflops[i]
        assert corrected_costs.generator.bwd_gflops[i] == paper_costs.generator.bwd_gflops[i]


def test_bad_cost_arguments():
    with pytest.raises(ConfigError):
        compute_costs(cost_model="exact")
    with pytest.raises(ConfigError):
        compute_costs(batch_size=0)


# ------------------------------------------------------------------------------------------------------------
# Latency model


def test_reproduces_all_200_fitness_vectors(paper_costs, ref):
    clients, server = _ref_clients(ref), _ref_server(ref)
    vectors = ref["fitness_vectors"]
    assert len(vectors) == 200
    expected = np.array([v["latency_s"] for v in vectors])
    got = batch_latency(latency_terms(paper_costs, clients, server), np.array([v["cuts"] for v in vectors]))
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=0)
    for v in vectors[::20]:  # the one-assignment entry point agrees
        assert iteration_latency(paper_costs, clients, server, v["cuts"]) == pytest.approx(v["latency_s"], rel=1e-9)
    assert iteration_latency(paper_costs, clients, server, ref["best_cuts"]) == pytest.approx(
        ref["best_latency_s"], rel=1e-9
    )


def test_breakdown_is_consistent(paper_costs, ref):
    clients, server = _ref_clients(ref), _ref_server(ref)
    cuts = ref["fitness_vectors"][7]["cuts"]
    bd = latency_breakdown(paper_costs, clients, server, cuts)
    assert bd.latency_s == pytest.approx(iteration_latency(paper_costs, clients, server, cuts), rel=1e-12)
    assert sum(s.seconds for s in bd.stages) == pytest.approx(bd.latency_s, rel=1e-12)
    for st in bd.stages:
        for ph in (st.first, st.second):
            assert ph.seconds == max(ph.per_client) == ph.per_client[ph.critical_client]
            assert sum(ph.parts.values()) == pytest.approx(ph.seconds, rel=1e-12)
    where, client, what = bd.bottleneck()
    assert where in {f"{s.name}/{p}" for s in bd.stages for p in ("first", "second")}
    assert 0 <= client < len(clients) and what in ("compute", "link", "server link", "server")


def test_corrected_latency_uses_the_head_block_in_backward(paper_costs, corrected_costs, ref):
    # The reference charges the server's backward run of the optional head block with the tail block's FLOPs;
    # kept with "paper" costs (to reproduce its numbers), fixed with "corrected" ones.
    clients, server = _ref_clients(ref), _ref_server(ref)
    t_paper = latency_terms(paper_costs, clients, server)
    t_corr = latency_terms(corrected_costs, clients, server)
    g_head_bwd_paper = [p for p in t_paper.phases if p.stage == 2 and p.position == 1][0]
    g_head_bwd_corr = [p for p in t_corr.phases if p.stage == 2 and p.position == 1][0]
    assert g_head_bwd_paper.coef == pytest.approx(paper_costs.generator.bwd_gflops[3] / 672, rel=1e-15)
    assert g_head_bwd_corr.coef == pytest.approx(corrected_costs.generator.bwd_gflops[1] / 672, rel=1e-15)


def test_latency_rejects_bad_input(paper_costs):
    server = ServerProfile()
    dev = PAPER_DEVICE_PROFILES["device1"]
    with pytest.raises(ConfigError):
        iteration_latency(paper_costs, [], server, [])
    with pytest.raises(ConfigError):
        iteration_latency(paper_costs, [dev, dev], server, [[1, 1, 1, 1]])
    with pytest.raises(ConfigError):
        iteration_latency(paper_costs, [dev], server, [[1, 1, 1]])
    with pytest.raises(ConfigError):
        iteration_latency(paper_costs, [DeviceProfile(0, 1, 1e6)], server, [[1, 1, 1, 1]])
    with pytest.raises(ConfigError):
        iteration_latency(paper_costs, [dev], ServerProfile(transmission_rate_bps=-1), [[1, 1, 1, 1]])


# ------------------------------------------------------------------------------------------------------------
# Planner


def _all_assignments(n: int) -> np.ndarray:
    codes = np.arange(16**n)
    bits = (codes[:, None] >> np.arange(4 * n)[None, ::-1]) & 1
    return bits.reshape(-1, n, 4).astype(np.int8)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_planner_equals_brute_force(n, paper_costs, corrected_costs):
    rng = np.random.default_rng(1000 + n)
    every = _all_assignments(n)
    for trial in range(6 if n < 4 else 3):
        costs = paper_costs if trial % 2 == 0 else corrected_costs
        clients, server = _random_clients(rng, n), _random_server(rng)
        plan = plan_cuts(costs, clients, server)
        brute = batch_latency(latency_terms(costs, clients, server), every).min()
        assert plan.latency_s == pytest.approx(brute, rel=1e-12)
        assert plan.latency_s == pytest.approx(iteration_latency(costs, clients, server, plan.cuts), rel=1e-12)
        assert len(plan.cuts) == n and all(isinstance(c, CutBits) for c in plan.cuts)


def _column_brute_force(alpha, a, b, beta, c, d) -> float:
    n = len(a)
    masks = ((np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1).astype(bool)  # True: bit 0
    cnt = masks.sum(axis=1)
    first = np.maximum(alpha * cnt + np.where(masks, a, 0).max(axis=1), np.where(~masks, b, 0).max(axis=1))
    second = np.maximum(beta * cnt + np.where(masks, c, 0).max(axis=1), np.where(~masks, d, 0).max(axis=1))
    return float((first + second).min())


def test_column_optimiser_equals_brute_force_up_to_12_clients():
    rng = np.random.default_rng(7)
    for n in range(1, 13):
        for trial in range(8):
            a, b, c, d = (rng.uniform(0.01, 1.0, n) * rng.choice([1.0, 10.0]) for _ in range(4))
            if trial % 2:  # coarse values: many ties
                a, b, c, d = (np.round(x, 1) + 0.1 for x in (a, b, c, d))
            alpha, beta = (float(rng.choice([0.0, 0.01, 0.1, 1.0]) * rng.random()) for _ in range(2))
            mask, value = optimise_column(alpha, a, b, beta, c, d)
            assert value == pytest.approx(_column_brute_force(alpha, a, b, beta, c, d), rel=1e-12)
            assert value == pytest.approx(column_cost(mask, alpha, a, b, beta, c, d), rel=1e-15)


def test_planner_on_the_reference_instance(paper_costs, ref):
    plan = plan_cuts(paper_costs, _ref_clients(ref), _ref_server(ref))
    assert plan.latency_s <= ref["best_latency_s"] + 1e-12  # 3.8668 s, the genetic search's answer
    assert plan.latency_s <= 3.8668


def test_planner_beats_simple_assignments_on_many_clients(paper_costs):
    rng = np.random.default_rng(3)
    clients, server = _random_clients(rng, 300), ServerProfile()
    plan = plan_cuts(paper_costs, clients, server)
    terms = latency_terms(paper_costs, clients, server)
    candidates = rng.integers(0, 2, size=(200, 300, 4)).astype(np.int8)
    candidates[0], candidates[1] = 0, 1
    assert plan.latency_s <= batch_latency(terms, candidates).min() + 1e-12


# ------------------------------------------------------------------------------------------------------------
# Adaptive re-planning


def test_effective_profiles_match_the_measurement(paper_costs):
    claimed = [PAPER_DEVICE_PROFILES[k] for k in ("device1", "device3", "device6")]
    cuts = [[0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]]
    predicted = [predicted_compute_seconds(paper_costs, p, c) for p, c in zip(claimed, cuts, strict=True)]
    eff = effective_profiles(
        {1: predicted[1] * 4.0, 2: [predicted[2] * 0.5, 99.0, predicted[2] * 0.5]},
        cuts,
        paper_costs,
        claimed,
        ServerProfile(),
    )
    assert eff[0] == claimed[0]  # not measured
    assert eff[1].cpu_mhz == pytest.approx(claimed[1].cpu_mhz / 4.0)
    assert eff[1].data_rate == claimed[1].data_rate and eff[1].flops_per_cycle == claimed[1].flops_per_cycle
    assert predicted_compute_seconds(paper_costs, eff[2], cuts[2]) == pytest.approx(predicted[2] * 0.5)  # median
    assert client_gflops(paper_costs, "0000") < client_gflops(paper_costs, "1111")
    # A slower device gets fewer client-side blocks after re-planning.
    before = plan_cuts(paper_costs, claimed, ServerProfile())
    slowed = effective_profiles(
        {1: predicted_compute_seconds(paper_costs, claimed[1], before.cuts[1]) * 200}, before.cuts, paper_costs, claimed
    )
    after = plan_cuts(paper_costs, slowed, ServerProfile())
    assert sum(after.cuts[1]) < sum(before.cuts[1])
    with pytest.raises(ValueError):
        effective_profiles({5: 1.0}, cuts, paper_costs, claimed)
    with pytest.raises(ValueError):
        effective_profiles({0: 0.0}, cuts, paper_costs, claimed)


def test_plan_for_run(paper_costs):
    scenario = ScenarioConfig(domains=(DomainConfig("MNIST", 3), DomainConfig("FashionMNIST", 2)))
    cfg = RunConfig(scenario=scenario, devices=DevicesConfig(clients=("device1", "device3")))
    plan = plan_for_run(cfg)
    clients = [PAPER_DEVICE_PROFILES["device1"], PAPER_DEVICE_PROFILES["device3"]] * 2 + [
        PAPER_DEVICE_PROFILES["device1"]
    ]
    assert plan.latency_s == pytest.approx(plan_cuts(paper_costs, clients, ServerProfile()).latency_s)
    fixed = cfg.replace(train=TrainConfig(cuts=((1, 1, 1, 1), (0, 0, 0, 0))))
    given = plan_for_run(fixed)
    assert [list(c) for c in given.cuts] == [[1, 1, 1, 1], [0, 0, 0, 0]] * 2 + [[1, 1, 1, 1]]
    assert given.latency_s >= plan.latency_s


# ------------------------------------------------------------------------------------------------------------
# Command line


def _run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main(["plan-cuts", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_plans_a_json_file(tmp_path, capsys, paper_costs):
    doc = {
        "server": {"computational_frequency_ghz": 42, "cpu_cycles_per_flop": 16, "transmission_rate_bps": 1e9},
        "clients": [
            {"cpu_mhz": 480, "flops_per_cycle": 1, "data_rate": 5e7},
            "device3",
            {"cpu_mhz": 9000, "flops_per_cycle": 4, "data_rate": 1e8, "name": "edge"},
        ],
    }
    path = tmp_path / "profiles.json"
    path.write_text(json.dumps(doc))
    code, out, err = _run_cli(capsys, str(path), "--json")
    assert code == 0 and err == ""
    result = json.loads(out)
    assert set(result) == {"cuts", "latency_s", "seconds"}
    clients = [DeviceProfile(480, 1, 5e7), PAPER_DEVICE_PROFILES["device3"], DeviceProfile(9000, 4, 1e8)]
    assert result["latency_s"] == pytest.approx(plan_cuts(paper_costs, clients, ServerProfile()).latency_s)
    assert len(result["cuts"]) == 3 and all(len(c) == 4 for c in result["cuts"])
    # Its own output evaluates to its latency.
    cuts_path = tmp_path / "cuts.json"
    cuts_path.write_text(json.dumps(result["cuts"]))
    code, out, _ = _run_cli(capsys, str(path), "--evaluate", str(cuts_path), "--json")
    assert code == 0 and json.loads(out)["latency_s"] == pytest.approx(result["latency_s"], rel=1e-12)
    code, out, _ = _run_cli(capsys, str(path))
    assert code == 0 and "bottleneck" in out and "edge" in out and "device3" in out


def test_cli_toml_presets_and_options(tmp_path, capsys, ref):
    path = tmp_path / "profiles.toml"
    path.write_text(
        'clients = ["fast", "device1"]\n\n[profiles.fast]\ncpu_mhz = 20000\nflops_per_cycle = 16\ndata_rate = 2e9\n'
    )
    code, out, _ = _run_cli(capsys, str(path), "--json", "--batch-size", "32", "--cost-model", "corrected")
    assert code == 0 and len(json.loads(out)["cuts"]) == 2
    code, out, _ = _run_cli(capsys, "paper_ga20", "--json")
    assert code == 0 and json.loads(out)["latency_s"] <= ref["best_latency_s"] + 1e-12
    best = tmp_path / "best.json"
    best.write_text(json.dumps(ref["best_cuts"]))
    code, out, _ = _run_cli(capsys, "paper_ga20", "--evaluate", str(best), "--json")
    assert code == 0 and json.loads(out)["latency_s"] == pytest.approx(ref["best_latency_s"], rel=1e-9)
    code, out, _ = _run_cli(capsys, "paper_devices", "--clients", "30", "--json")
    assert code == 0 and len(json.loads(out)["cuts"]) == 30
    # A run config: its devices cycled over its scenario's clients, its batch size and cost model.
    run = tmp_path / "run.toml"
    run.write_text(
        '[[scenario.domains]]\ndataset = "MNIST"\nclients = 5\n\n[train]\nbatch_size = 32\n'
        'cost_model = "corrected"\n\n[devices]\nclients = ["device1", "device7"]\n'
    )
    code, out, _ = _run_cli(capsys, str(run), "--json")
    clients = [PAPER_DEVICE_PROFILES["device1"], PAPER_DEVICE_PROFILES["device7"]] * 2 + [
        PAPER_DEVICE_PROFILES["device1"]
    ]
    expected = plan_cuts(compute_costs(batch_size=32, cost_model="corrected"), clients, ServerProfile())
    assert code == 0 and json.loads(out)["latency_s"] == pytest.approx(expected.latency_s, rel=1e-12)


@pytest.mark.parametrize(
    "doc, cuts",
    [
        ({"clients": [{"cpu_mhz": 480, "flops_per_cycle": 1}]}, None),  # missing field
        ({"clients": [{"cpu_mhz": 0, "flops_per_cycle": 1, "data_rate": 5e7}]}, None),  # non-positive speed
        ({"clients": [{"cpu_mhz": 480, "flops_per_cycle": 1, "data_rate": -5}]}, None),  # non-positive rate
        (
            {
                "server": {"computational_frequency_ghz": 42, "cpu_cycles_per_flop": 0, "transmission_rate_bps": 1e9},
                "clients": ["device1"],
            },
            None,
        ),
        ({"server": {"computational_frequency_ghz": 42}, "clients": ["device1"]}, None),  # incomplete server
        ({"clients": []}, None),  # empty client list
        ({"clients": ["device9"]}, None),  # unknown profile
        ({"clients": ["device1"], "colour": "red"}, None),  # unknown key
        ({"clients": ["device1", "device2"]}, [[1, 1, 1]]),  # cuts of the wrong length (and count)
        ({"clients": ["device1", "device2"]}, [[1, 1, 1, 1]]),  # wrong count
        ({"clients": ["device1"]}, [[1, 2, 1, 1]]),  # not a bit
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, doc, cuts):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    argv = [str(path), "--json"]
    if cuts is not None:
        cpath = tmp_path / "c.json"
        cpath.write_text(json.dumps(cuts))
        argv += ["--evaluate", str(cpath)]
    code, out, err = _run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("hfgan plan-cuts: error: ")


def test_cli_missing_and_malformed_files(tmp_path, capsys):
    code, _, err = _run_cli(capsys, str(tmp_path / "nope.json"))
    assert code == 2 and "not found" in err and err.count("\n") == 1
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = _run_cli(capsys, str(bad))
    assert code == 2 and "malformed JSON" in err
    code, _, err = _run_cli(capsys, "paper_devices", "--batch-size", "0")
    assert code == 2 and err.count("\n") == 1
    code, _, err = _run_cli(capsys, "paper_devices", "--evaluate", str(tmp_path / "none.json"))
    assert code == 2 and "not found" in err


def test_column_brute_force_helper_is_itself_right():
    # Guards the brute force used above against the direct definition on a small case.
    rng = np.random.default_rng(11)
    a, b, c, d = (rng.random(5) for _ in range(4))
    direct = min(
        column_cost(np.array(m, dtype=bool), 0.3, a, b, 0.2, c, d) for m in itertools.product([False, True], repeat=5)
    )
    assert _column_brute_force(0.3, a, b, 0.2, c, d) == pytest.approx(direct, rel=1e-15)
