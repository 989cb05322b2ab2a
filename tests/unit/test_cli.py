"""`hfgan` bad input: one line on stderr, exit code 2, and nothing half-written left behind.

Every case runs `hfgan_core.cli.main` in process and fails before training starts, so none of them fits a
classifier or trains anything; each checks that the run directory was not created (or is byte-for-byte unchanged),
and that nothing was written to the data or classifier directories. Smoke checks of `hfgan data check` and
`hfgan plan-cuts` through the same entry point close the file.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest

from hfgan_core.cli import build_parser, load_run_config, main
from hfgan_core.config import ENV_OVERRIDES, load_config
from hfgan_core.runtime.recorder import RUN_MARKER, write_run_marker

SHARED = Path(os.environ.get("HFGAN_SHARED_DATASETS", "/work/shared/datasets"))


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No HFGAN_* variable from the caller leaks in; classifiers would go to a directory the test watches."""
    for var in (*ENV_OVERRIDES, "HFGAN_CLASSIFIER_DIR", "HFGAN_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HFGAN_CLASSIFIER_DIR", str(tmp_path / "classifiers"))
    monkeypatch.chdir(tmp_path)


def snapshot(root: Path) -> dict[str, bytes] | None:
    if not root.exists():
        return None
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code: int, err: str, *needles: str) -> str:
    assert code == 2
    line = err.strip()
    assert "\n" not in line, f"more than one line on stderr:\n{err}"
    assert line.startswith("hfgan train: error: "), line
    for n in needles:
        assert n in line, (n, line)
    return line


def train_argv(tmp_path: Path, config: str = "quickstart", *extra: str, data: Path | None = None) -> list[str]:
    data = data if data is not None else tmp_path / "data"
    return ["train", "--config", config, "--data-dir", str(data), "--run-dir", str(tmp_path / "run"), "--quiet", *extra]


def assert_nothing_written(tmp_path: Path, data_before: dict | None = None) -> None:
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "classifiers").exists()
    assert snapshot(tmp_path / "data") == data_before


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def one_domain_toml(extra_scenario: str = "", extra_train: str = "", clients: int = 2) -> str:
    return (
        f'[scenario]\nname = "t"\n{extra_scenario}\n[[scenario.domains]]\ndataset = "synthetic"\n'
        f"clients = {clients}\n\n[train]\nrounds = 1\n{extra_train}\n"
    )


# ------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(("flag", "expected"), [((), "float32"), (("--compute-dtype", "bfloat16"), "bfloat16")])
def test_compute_dtype_flag_reaches_the_run_config(tmp_path, flag, expected):
    args = build_parser().parse_args(train_argv(tmp_path, "quickstart", *flag))
    assert load_run_config(args).train.compute_dtype == expected


def test_compute_dtype_flag_rejects_other_dtypes(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(train_argv(tmp_path, "quickstart", "--compute-dtype", "float16"))
    assert exc.value.code == 2 and "invalid choice: 'float16'" in capsys.readouterr().err


def test_unknown_preset(tmp_path, capsys):
    code, out, err = run_cli(capsys, train_argv(tmp_path, "no_such_preset"))
    assert_usage_error(code, err, "unknown preset 'no_such_preset'", "quickstart")
    assert out == ""
    assert_nothing_written(tmp_path)


def test_missing_config_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, train_argv(tmp_path, str(tmp_path / "absent.toml")))
    assert_usage_error(code, err, "config file not found")
    assert_nothing_written(tmp_path)


def test_malformed_toml(tmp_path, capsys):
    path = write(tmp_path, "bad.toml", "[train\nrounds = 2\n")
    code, _, err = run_cli(capsys, train_argv(tmp_path, path))
    assert_usage_error(code, err, "malformed TOML", "bad.toml")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        (one_domain_toml(extra_train="roundz = 3"), ("train: unknown key(s) roundz",)),
        (one_domain_toml() + "\n[trian]\nrounds = 1\n", ("config: unknown key(s) trian",)),
        (one_domain_toml(extra_scenario="clientz = 3"), ("scenario: unknown key(s) clientz",)),
    ],
)
def test_unknown_key(tmp_path, capsys, text, needles):
    code, _, err = run_cli(capsys, train_argv(tmp_path, write(tmp_path, "c.toml", text)))
    assert_usage_error(code, err, *needles)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        (one_domain_toml().replace("rounds = 1", 'rounds = "two"'), ("train.rounds", "expected int", "str")),
        (one_domain_toml().replace("rounds = 1", "rounds = true"), ("train.rounds",)),
        (one_domain_toml().replace("clients = 2", "clients = 2.5"), ("scenario.domains[0].clients",)),
        (one_domain_toml(extra_train='lr = "fast"'), ("train.lr",)),
        (one_domain_toml(extra_train="cuts = [[0, 1]]"), ("train.cuts",)),
        ("train = 3\n" + one_domain_toml().replace("[train]\nrounds = 1", ""), ("train: expected a table",)),
        (one_domain_toml().replace("rounds = 1", "rounds = 0"), ("train.rounds must be a positive integer",)),
        (one_domain_toml().replace('"synthetic"', '"CIFAR"'), ("unknown dataset 'CIFAR'",)),
        (one_domain_toml(extra_train='compute_dtype = "float16"'), ("train.compute_dtype must be one of",)),
    ],
)
def test_wrong_type_or_value(tmp_path, capsys, text, needles):
    code, _, err = run_cli(capsys, train_argv(tmp_path, write(tmp_path, "c.toml", text)))
    assert_usage_error(code, err, *needles)
    assert_nothing_written(tmp_path)


def test_bad_option_values(tmp_path, capsys):
    code, _, err = run_cli(capsys, train_argv(tmp_path, "quickstart", "--aggregators", "0"))
    assert_usage_error(code, err, "--aggregators")
    code, _, err = run_cli(capsys, train_argv(tmp_path, "quickstart", "--rounds", "0"))
    assert_usage_error(code, err, "train.rounds")
    code, _, err = run_cli(capsys, train_argv(tmp_path, "quickstart", "--device", "tpu"))
    assert_usage_error(code, err, "unknown torch device 'tpu'")
    code, _, err = run_cli(capsys, train_argv(tmp_path, "quickstart", "--synthetic"))  # two domains
    assert_usage_error(code, err, "--synthetic")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    "argv",
    [
        ["train"],
        ["train", "--config", "quickstart", "--rounds", "two"],
        ["train", "--config", "quickstart", "--wire-dtype", "int8"],
        ["frobnicate"],
    ],
)
def test_argparse_errors_exit_2(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("hfgan")
    assert " error: " in err.strip().splitlines()[-1]
    assert not (tmp_path / "runs").exists()


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- data


def test_missing_dataset_with_no_fallback(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    code, out, err = run_cli(capsys, train_argv(tmp_path, "quickstart", "--no-fallback"))
    assert_usage_error(code, err, "dataset MNIST not found", str(tmp_path / "data" / "MNIST" / "raw"))
    assert out == ""
    assert_nothing_written(tmp_path, data_before={})


def test_incomplete_dataset_is_an_error_even_with_fallback(tmp_path, capsys):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").symlink_to(SHARED / "MNIST" / "raw" / "train-images-idx3-ubyte.gz")
    code, _, err = run_cli(capsys, train_argv(tmp_path, "quickstart"))
    assert_usage_error(code, err, "dataset MNIST is incomplete", "t10k-labels-idx1-ubyte")
    assert not (tmp_path / "run").exists() and not (tmp_path / "classifiers").exists()


def _corrupt_mnist(data: Path, how: str) -> Path:
    """MNIST in `data` (the large files linked, the small one copied) with one byte of one file changed."""
    src = SHARED / "MNIST" / "raw"
    raw = data / "MNIST" / "raw"
    raw.mkdir(parents=True)
    victim = "t10k-labels-idx1-ubyte.gz"
    for f in src.glob("*.gz"):
        if f.name == victim:
            shutil.copyfile(f, raw / f.name)
        else:
            (raw / f.name).symlink_to(f)
    path = raw / victim
    blob = bytearray(path.read_bytes())
    if how == "flipped_gz_byte":  # a damaged download: the .gz no longer decompresses cleanly
        blob[len(blob) // 2] ^= 0x40
        path.write_bytes(bytes(blob))
    else:  # a valid gzip of altered content (one label changed): only the checksum can tell
        content = bytearray(gzip.decompress(bytes(blob)))
        content[100] = (content[100] + 1) % 10
        path.write_bytes(gzip.compress(bytes(content)))
    return path


@pytest.mark.parametrize("how", ["flipped_gz_byte", "altered_content"])
@pytest.mark.parametrize("fallback", [True, False])
def test_corrupt_dataset_file_is_an_error_not_a_fallback(tmp_path, capsys, how, fallback):
    victim = _corrupt_mnist(tmp_path / "data", how)
    before = snapshot(tmp_path / "data")
    code, out, err = run_cli(capsys, train_argv(tmp_path, "quickstart", *([] if fallback else ["--no-fallback"])))
    line = assert_usage_error(code, err, "corrupt dataset file", str(victim))
    if how == "altered_content":
        assert "sha256 mismatch" in line
    assert "synthetic" not in err and out == ""
    assert_nothing_written(tmp_path, data_before=before)


def test_more_clients_than_the_data_allows(tmp_path, capsys):
    # 1 synthetic sample per class: 10 training samples for 11 clients.
    text = one_domain_toml(extra_scenario="synthetic_train_per_class = 1", clients=11)
    code, _, err = run_cli(capsys, train_argv(tmp_path, write(tmp_path, "c.toml", text)))
    assert_usage_error(code, err, "11 clients for the 10 training samples of synthetic")
    assert_nothing_written(tmp_path)


def test_samples_cap_that_leaves_a_client_empty(tmp_path, capsys):
    # Highly non-IID label exclusions with 3 samples per class: some client ends up with nothing.
    text = one_domain_toml(extra_scenario='synthetic_train_per_class = 1\ndistribution = "highly_noniid"', clients=10)
    code, _, err = run_cli(capsys, train_argv(tmp_path, write(tmp_path, "c.toml", text)))
    assert_usage_error(code, err, "would hold no samples", "use fewer clients")
    assert_nothing_written(tmp_path)


# ------------------------------------------------------------------------------------------- run directory


def _prepared_run_dir(tmp_path: Path, cfg) -> dict[str, bytes]:
    run = tmp_path / "run"
    write_run_marker(run, cfg, "earlier")
    (run / "metrics.jsonl").write_text('{"round": 1}\n')
    return snapshot(run)


@pytest.mark.slow
def test_run_dir_holding_a_different_run(tmp_path, capsys):
    other = load_config("quickstart").with_overrides("train", seed=7)
    before = _prepared_run_dir(tmp_path, other)
    for extra in ([], ["--resume"]):
        code, _, err = run_cli(capsys, train_argv(tmp_path, "quickstart", *extra))
        assert_usage_error(code, err, "already holds a different run", other.digest()[:12])
        assert snapshot(tmp_path / "run") == before
    assert not (tmp_path / "classifiers").exists()


@pytest.mark.slow
def test_existing_run_without_resume(tmp_path, capsys):
    before = _prepared_run_dir(tmp_path, load_config("quickstart"))
    code, _, err = run_cli(capsys, train_argv(tmp_path, "quickstart"))
    assert_usage_error(code, err, "already holds this run", "--resume")
    assert snapshot(tmp_path / "run") == before
    assert not (tmp_path / "classifiers").exists()


def test_runtime_options_do_not_make_a_different_run(tmp_path, capsys):
    """Where a run executes (data dir, device, threads) is not what it is: still 'this run', not 'a different'."""
    before = _prepared_run_dir(tmp_path, load_config("quickstart"))
    code, _, err = run_cli(
        capsys, train_argv(tmp_path, "quickstart", "--threads", "1", "--aggregators", "2", data=tmp_path / "elsewhere")
    )
    assert_usage_error(code, err, "already holds this run")
    assert snapshot(tmp_path / "run") == before


def test_non_empty_directory_that_is_not_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, train_argv(tmp_path, "quickstart"))
    assert_usage_error(code, err, "not empty and holds no hfgan run")
    assert snapshot(run) == {"notes.txt": b"mine"}


@pytest.mark.slow
def test_resume_without_a_run(tmp_path, capsys):
    code, _, err = run_cli(capsys, train_argv(tmp_path, "quickstart", "--resume"))
    assert_usage_error(code, err, "nothing to resume")
    assert_nothing_written(tmp_path)


def test_run_marker_records_the_digest(tmp_path):
    """The marker written for a run names its digest: what the checks above compare against."""
    cfg = load_config("quickstart")
    write_run_marker(tmp_path / "r", cfg, "r")
    marker = json.loads((tmp_path / "r" / RUN_MARKER).read_text())
    assert marker["digest"] == cfg.digest() and marker["run_id"] == "r"
    assert load_config(str(tmp_path / "r" / "config.toml")).digest() == cfg.digest()


# ------------------------------------------------------------------------------------------- other commands


@pytest.mark.slow
def test_data_check_smoke(tmp_path, capsys):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (SHARED / "MNIST" / "raw").glob("*.gz"):
        (raw / f.name).symlink_to(f)
    code, out, err = run_cli(capsys, ["data", "check", "--data-dir", str(tmp_path / "data"), "--json"])
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == {"MNIST", "FashionMNIST", "KMNIST", "NotMNIST", "synthetic"}
    assert (
        rows["MNIST"]["found"] and rows["MNIST"]["verified"] and "60000 train / 10000 test" in rows["MNIST"]["detail"]
    )
    assert not rows["FashionMNIST"]["found"] and not rows["FashionMNIST"]["corrupt"]
    assert rows["synthetic"]["verified"]
    # A corrupt file makes `data check` fail (exit 1) and say so.
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07"))
    code, out, _ = run_cli(capsys, ["data", "check", "--data-dir", str(tmp_path / "data")])
    assert code == 1 and "CORRUPT" in out


def test_plan_cuts_smoke(tmp_path, capsys):
    code, out, err = run_cli(capsys, ["plan-cuts", "paper_devices", "--json"])
    assert code == 0, err
    plan = json.loads(out)
    assert len(plan["cuts"]) == 7 and all(len(c) == 4 and set(c) <= {0, 1} for c in plan["cuts"])
    assert 0 < plan["latency_s"] < 100
    code, out, _ = run_cli(capsys, ["plan-cuts", "paper_devices"])
    assert code == 0 and "modelled iteration latency" in out and "device1" in out
    # A run config works as a profiles file: one cut assignment per client of the scenario.
    code, out, _ = run_cli(capsys, ["plan-cuts", "quickstart", "--json"])
    assert code == 0 and len(json.loads(out)["cuts"]) == load_config("quickstart").scenario.total_clients
    code, _, err = run_cli(capsys, ["plan-cuts", str(tmp_path / "absent.json")])
    assert code == 2 and err.strip().startswith("hfgan plan-cuts: error:") and "\n" not in err.strip()


def test_eval_of_a_directory_without_a_run(tmp_path, capsys):
    code, _, err = run_cli(capsys, ["eval", "--run-dir", str(tmp_path / "run"), "--no-utility"])
    assert code == 2 and err.strip() == f"hfgan eval: error: {tmp_path / 'run'} holds no hfgan run"
    write_run_marker(tmp_path / "run", load_config("quickstart"), "run")  # started, but no round finished
    code, _, err = run_cli(capsys, ["eval", "--run-dir", str(tmp_path / "run")])
    assert code == 2 and err.strip() == f"hfgan eval: error: no checkpoint in {tmp_path / 'run'}"
    assert not (tmp_path / "run" / "eval.json").exists() and not (tmp_path / "classifiers").exists()


@pytest.mark.parametrize(
    "command",
    [["train"], ["eval"], ["data", "check"], ["plan-cuts"], ["up"], ["status"], ["replay"], ["dashboard"], ["broker"]],
)
def test_every_command_prints_its_help(capsys, command):
    """argparse formats help with %: a default shown in a help text (a URL with %2F) must not break --help."""
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    assert "usage: hfgan" in capsys.readouterr().out
