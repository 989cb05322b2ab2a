"""The compose stack's monitoring: every worker serves metrics where monitoring/prometheus.yml looks for them, the
Prometheus service mounts that file, and RabbitMQ's Prometheus plugin is enabled. Checked on the configuration
Compose itself resolves (the `stack` fixture of test_compose.py: no Docker engine needed)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.unit.test_compose import ROLES, _compose_cli, _env, _mounts, _yaml_to_data, stack  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "monitoring" / "prometheus.yml"


def _seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)", text)
    assert m, text
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def scrape_config() -> dict:
    cmd, _ = _compose_cli()
    return _yaml_to_data(PROMETHEUS.read_text(), cmd)


def test_rabbitmq_serves_its_prometheus_metrics():
    text = (ROOT / "broker_config" / "enabled_plugins").read_text()
    assert "rabbitmq_prometheus" in re.fullmatch(r"\[([\w,]+)\]\.\n", text).group(1).split(",")
    jobs = {j["job_name"]: j for j in scrape_config()["scrape_configs"]}
    assert jobs["rabbitmq"]["static_configs"][0]["targets"] == ["rabbitmq:15692"]


def test_every_worker_service_is_discovered_on_the_port_it_serves(stack):  # noqa: F811 - the fixture
    services = stack["services"]
    cfg = scrape_config()
    job = {j["job_name"]: j for j in cfg["scrape_configs"]}["hfgan"]
    (dns,) = job["dns_sd_configs"]
    # DNS discovery of the service names: a scaled service's new containers become targets by themselves.
    assert dns["type"] == "A" and set(dns["names"]) == set(ROLES)
    interval = _seconds(cfg["global"]["scrape_interval"])
    for role in ROLES:
        env = _env(services[role])
        assert int(env["HFGAN_METRICS_PORT"]) == dns["port"], role
        assert env["HFGAN_METRICS_ADDR"] == "0.0.0.0", role
        # A finished worker stays up long enough for one more scrape of its final numbers.
        assert float(env["HFGAN_METRICS_LINGER_S"]) > interval, role


def test_the_prometheus_service_reads_the_scrape_config(stack):  # noqa: F811 - the fixture
    prom = stack["services"]["prometheus"]
    assert str(prom["image"]).startswith("prom/prometheus:")
    mounts = _mounts(prom)
    assert Path(mounts["/etc/prometheus/prometheus.yml"]).resolve() == PROMETHEUS.resolve()
    ports = prom.get("ports") or []
    published = [
        p if isinstance(p, str) else f"{p.get('host_ip', '')}:{p.get('published')}:{p['target']}" for p in ports
    ]
    # The UI on this machine only, like the management UI.
    assert published and all(p.startswith("127.0.0.1:") for p in published), published
