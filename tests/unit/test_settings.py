"""settings.py: every HFGAN_* variable read in one place, the *_FILE rule for secrets, and URL redaction."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hfgan_core.config import RunConfig, apply_env, dump_toml
from hfgan_core.runtime.worker import WorkerSettings
from hfgan_core.settings import (
    DEFAULT_BROKER_URL,
    VARIABLES,
    ConfigError,
    Settings,
    check_run_id,
    env_value,
    redact_url,
)

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_empty_values_count_as_unset() -> None:
    s = Settings.from_env({"HFGAN_BROKER_URL": "", "HFGAN_RUN_ID": ""})
    assert s == Settings()
    assert s.broker_url_or_default == DEFAULT_BROKER_URL and s.data_dir_or_default == "data"


def test_every_variable_fills_its_field() -> None:
    env = {}
    for var in VARIABLES:
        env[var.name] = {bool: "yes", float: "2.5", int: "9464", str: f"value-of-{var.field}"}[var.kind]
    s = Settings.from_env(env)
    for var in VARIABLES:
        assert getattr(s, var.field) == {bool: True, float: 2.5, int: 9464, str: f"value-of-{var.field}"}[var.kind], (
            var.name
        )


def test_typed_values_are_checked() -> None:
    with pytest.raises(ConfigError, match="HFGAN_HEARTBEAT_S='x' is not a number"):
        Settings.from_env({"HFGAN_HEARTBEAT_S": "x"})
    with pytest.raises(ConfigError, match="HFGAN_LEASE_TTL_S must be positive"):
        Settings.from_env({"HFGAN_LEASE_TTL_S": "0"})
    with pytest.raises(ConfigError, match="HFGAN_NO_UTILITY: expected"):
        Settings.from_env({"HFGAN_NO_UTILITY": "maybe"})
    assert Settings.from_env({"HFGAN_NO_UTILITY": "FALSE", "HFGAN_STANDBY_OK": "True"}).standby_ok
    assert not Settings.from_env({"HFGAN_NO_UTILITY": "FALSE"}).no_utility


def test_file_variant_reads_the_value_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "broker_url"
    secret.write_text("amqp://server:s3cret@rabbitmq:5672/%2F\n")
    s = Settings.from_env({"HFGAN_BROKER_URL_FILE": str(secret)})
    assert s.broker_url == "amqp://server:s3cret@rabbitmq:5672/%2F"
    (tmp_path / "t").write_text("7\n")
    assert WorkerSettings.from_env({"HFGAN_CONNECT_TIMEOUT_S_FILE": str(tmp_path / "t")}).connect_timeout_s == 7.0


def test_file_variant_errors_are_one_line_and_never_quote_the_value(tmp_path: Path) -> None:
    secret = tmp_path / "url"
    secret.write_text("amqp://u:hunter2@h/")
    with pytest.raises(ConfigError, match="both HFGAN_BROKER_URL and HFGAN_BROKER_URL_FILE") as both:
        env_value({"HFGAN_BROKER_URL": "amqp://u:other@h/", "HFGAN_BROKER_URL_FILE": str(secret)}, "HFGAN_BROKER_URL")
    assert "hunter2" not in str(both.value) and "other" not in str(both.value)
    with pytest.raises(ConfigError, match=r"HFGAN_STATE_URL_FILE: cannot read .*missing: No such file"):
        Settings.from_env({"HFGAN_STATE_URL_FILE": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="HFGAN_STATE_URL_FILE: cannot read"):
        Settings.from_env({"HFGAN_STATE_URL_FILE": str(tmp_path)})  # a directory


def test_apply_env_overrides_the_runtime_section(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("redis://:pw@redis:6379/0\n")
    cfg = apply_env(RunConfig(), {"HFGAN_RUN_ID": "r1", "HFGAN_STATE_URL_FILE": str(tmp_path / "state")})
    assert cfg.runtime.run_id == "r1" and cfg.runtime.state_url == "redis://:pw@redis:6379/0"
    assert apply_env(RunConfig(), {}) == RunConfig()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/%2F", "amqp://guest:***@127.0.0.1:5672/%2F"),
        ("redis://:p%40ss@redis:6379/0", "redis://:***@redis:6379/0"),
        ("redis://default:pw@[::1]:6379/0", "redis://default:***@[::1]:6379/0"),
        ("amqp://client-{slot}:client-{slot}-dev@h:5672/%2F", "amqp://client-{slot}:***@h:5672/%2F"),
        ("amqp://user@host/", "amqp://user@host/"),
        ("memory://", "memory://"),
        ("redis://u:pa:ss@h:99999999/0", "redis://u:***@h:99999999/0"),  # an invalid port: still redacted
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_written_configs_and_reprs_carry_no_password() -> None:
    cfg = RunConfig().with_overrides(
        "runtime", broker_url="amqp://server:topsecret@h:5672/%2F", state_url="redis://:alsosecret@h:6379/0"
    )
    text = dump_toml(cfg.redacted())
    assert "topsecret" not in text and "alsosecret" not in text and "amqp://server:***@h:5672/%2F" in text
    assert cfg.redacted().digest() == cfg.digest()
    shown = repr(Settings(broker_url="amqp://a:topsecret@h/", provision_secret="alsosecret"))
    assert "topsecret" not in shown and "alsosecret" not in shown


def test_run_id_rule() -> None:
    assert check_run_id("exp-7.a_b") == "exp-7.a_b"
    for bad in ("", "a/b", "x" * 129, "a b"):
        with pytest.raises(ConfigError, match="run id"):
            check_run_id(bad)


def test_nothing_else_reads_hfgan_variables() -> None:
    """settings.py is the only reader of HFGAN_* variables in the library, the workers and the bench."""
    res = subprocess.run(
        ["git", "grep", "-n", "-E", r"environ(\.get)?[\[(]\s*['\"]HFGAN_", "--", "hfgan_core", "workers", "bench"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    hits = [line for line in res.stdout.splitlines() if not line.startswith("hfgan_core/settings.py")]
    assert hits == []
