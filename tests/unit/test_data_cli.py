"""`hfgan data check|prepare` exit codes and output."""

from __future__ import annotations

import argparse
import gzip
import json
import os
from pathlib import Path

import pytest

from hfgan_core.data import cli

SHARED = Path(os.environ.get("HFGAN_SHARED_DATASETS", "/work/shared/datasets"))


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hfgan")
    sub = parser.add_subparsers(dest="command")
    cli.add_parser(sub)
    return parser.parse_args(argv)


def _link(data: Path, name: str) -> Path:
    raw = data / name / "raw"
    raw.mkdir(parents=True)
    for f in (SHARED / name / "raw").glob("*.gz"):
        (raw / f.name).symlink_to(f)
    return raw


@pytest.mark.slow
def test_check_ok_and_json(tmp_path, capsys):
    _link(tmp_path, "MNIST")
    assert cli.run(_parse(["data", "check", "--data-dir", str(tmp_path)])) == 0
    out = capsys.readouterr().out
    assert "MNIST" in out and "verified" in out and "not found" in out
    assert cli.run(_parse(["data", "check", "--data-dir", str(tmp_path), "--json"])) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["MNIST"]["verified"] and not rows["KMNIST"]["found"]


@pytest.mark.slow
def test_check_exits_1_on_corrupt_data(tmp_path, capsys):
    raw = _link(tmp_path, "MNIST")
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"garbage"))
    assert cli.run(_parse(["data", "check", "--data-dir", str(tmp_path)])) == 1
    assert "CORRUPT" in capsys.readouterr().out


def test_data_without_subcommand_is_bad_usage(capsys):
    assert cli.run(_parse(["data"])) == 2
    assert "check or prepare" in capsys.readouterr().err


@pytest.mark.slow
def test_data_dir_defaults_to_env(tmp_path, monkeypatch, capsys):
    _link(tmp_path, "FashionMNIST")
    monkeypatch.setenv("HFGAN_DATA_DIR", str(tmp_path))
    assert cli.run(_parse(["data", "check"])) == 0
    assert str(tmp_path / "FashionMNIST" / "raw") in capsys.readouterr().out


@pytest.mark.slow
def test_prepare_with_everything_present_exits_0(tmp_path, capsys):
    _link(tmp_path, "MNIST")
    _link(tmp_path, "FashionMNIST")
    assert cli.run(_parse(["data", "prepare", "--no-network", "--data-dir", str(tmp_path)])) == 0
    out = capsys.readouterr().out
    assert out.count("present") == 2 and "unavailable" in out  # KMNIST, NotMNIST


@pytest.mark.parametrize("argv", [["data", "check", "--bogus"], ["data", "nope"]])
def test_argparse_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit) as exc:
        _parse(argv)
    assert exc.value.code == 2
