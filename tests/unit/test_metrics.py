"""Worker metrics (hfgan_core/runtime/metrics.py): the no-op default, the Prometheus names and labels, the HTTP
endpoint, the settings that turn it on, and the hooks in the role host."""

from __future__ import annotations

import urllib.request

import pytest

from hfgan_core.config import ConfigError
from hfgan_core.runtime.metrics import Metrics, PromMetrics, parse_text, reason_label, total
from hfgan_core.runtime.worker import WorkerSettings
from hfgan_core.state.base import ClientRecord


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return parse_text(resp.read().decode())


def test_the_default_metrics_do_nothing_and_need_no_registry():
    m = Metrics()
    assert not m.enabled
    m.message("out", "g_head_out", 10, 0.1)
    m.dead_letter("malformed: x")
    m.step(1.0)
    m.round_finished({0: ClientRecord("late", "x", 0.0)})
    m.observe(1, "training")
    m.aggregation_job("done")
    m.finished()
    m.close()


def test_prometheus_metrics_are_served_with_conventional_names():
    m = PromMetrics("client.3", "run-x")
    port = m.serve(0)
    try:
        m.message("out", "g_head_out", 1000, 0.002)
        m.message("out", "g_head_out", 500, 0.001)
        m.message("in", "g_mid_out", 700, 0.003)
        m.message("in", "Evil Kind {}", 5, 0.0)
        m.dead_letter("malformed: missing field 'x' in 123 bytes")
        m.dead_letter("malformed: other detail")
        m.step(0.5)
        m.step(0.25, dropped=True)
        m.round_finished(
            {
                0: ClientRecord("arrived", "", 0.0),
                1: ClientRecord("late", "late for 3 step(s); served later", 0.0),
                2: ClientRecord("late", "late for 5 step(s); served later", 0.0),
                3: ClientRecord("dropped", "missed the round deadline", 0.0),
            }
        )
        m.observe(2, "aggregating")
        m.aggregation_job("queued", 3)
        s = scrape(port)
    finally:
        m.close()
    assert s[("hfgan_worker_info", (("role", "client.3"), ("run", "run-x")))] == 1
    assert s[("hfgan_messages_total", (("direction", "out"), ("kind", "g_head_out")))] == 2
    assert s[("hfgan_message_bytes_total", (("direction", "out"), ("kind", "g_head_out")))] == 1500
    assert s[("hfgan_message_bytes_total", (("direction", "in"), ("kind", "g_mid_out")))] == 700
    # A kind that is not one of ours is never a label value.
    assert s[("hfgan_messages_total", (("direction", "in"), ("kind", "invalid")))] == 1
    assert s[("hfgan_encode_seconds_count", (("kind", "g_head_out"),))] == 2
    assert s[("hfgan_decode_seconds_count", (("kind", "g_mid_out"),))] == 1
    assert s[("hfgan_dead_letters_total", (("reason", "malformed"),))] == 2
    assert s[("hfgan_steps_total", (("outcome", "done"),))] == 1
    assert s[("hfgan_steps_total", (("outcome", "dropped"),))] == 1
    assert s[("hfgan_step_duration_seconds_sum", ())] == pytest.approx(0.75)
    assert s[("hfgan_rounds_total", ())] == 1
    assert total(s, "hfgan_clients_late_total") == 2
    assert len([k for k in s if k[0] == "hfgan_clients_late_total"]) == 1  # digits do not make new series
    assert s[("hfgan_clients_dropped_total", (("reason", "missed the round deadline"),))] == 1
    assert s[("hfgan_round", ())] == 2
    assert s[("hfgan_round_phase", (("hfgan_round_phase", "aggregating"),))] == 1
    assert s[("hfgan_round_phase", (("hfgan_round_phase", "training"),))] == 0
    assert s[("hfgan_aggregation_jobs_total", (("outcome", "queued"),))] == 3
    assert s[("hfgan_worker_state", (("hfgan_worker_state", "serving"),))] == 1
    # The worker's own registry: no process or platform collectors of the global default registry.
    assert all(name.startswith("hfgan_") for name, _ in s)


def test_two_workers_in_one_process_keep_separate_registries():
    a, b = PromMetrics("client.0", "r"), PromMetrics("client.1", "r")
    a.step(1.0)
    pa, pb = a.serve(0), b.serve(0)
    try:
        assert total(scrape(pa), "hfgan_steps_total") == 1
        assert total(scrape(pb), "hfgan_steps_total") == 0
    finally:
        a.close()
        b.close()


def test_reason_labels_are_bounded():
    assert reason_label("late: round_done of client 7 for round 12") == "late"
    assert reason_label("late for 12 step(s); served later") == "late for N step(s); served later"
    assert len(reason_label("x" * 500)) == 60
    assert reason_label("") == "unknown"


def test_metrics_settings_from_the_environment():
    assert WorkerSettings.from_env({}).metrics_port is None
    s = WorkerSettings.from_env(
        {"HFGAN_METRICS_PORT": "9464", "HFGAN_METRICS_ADDR": "0.0.0.0", "HFGAN_METRICS_LINGER_S": "15"}
    )
    assert (s.metrics_port, s.metrics_addr, s.metrics_linger_s) == (9464, "0.0.0.0", 15.0)
    for bad in (
        {"HFGAN_METRICS_PORT": "x"},
        {"HFGAN_METRICS_PORT": "70000"},
        {"HFGAN_METRICS_LINGER_S": "-1"},
        {"HFGAN_METRICS_PORT": "0"},
    ):
        with pytest.raises(ConfigError):
            WorkerSettings.from_env(bad)
