"""A test-only sixth role (tests/sixth_role.py), registered through the role registry's public API, runs through
`hfgan up` as a worker process of its own next to the five built-in roles, over the real RabbitMQ and Redis, and
sees every round event. Nothing but its module and its registration was added for it."""

from __future__ import annotations

import json

import pytest

from hfgan_core import roles
from hfgan_core.cli import build_parser, load_run_config
from hfgan_core.runtime import up
from tests import sixth_role
from tests.e2e.test_workers import e2e  # noqa: F401 - the fixture (namespace, run id, cleanup)
from tests.integration.conftest import amqp_url, redis_url  # noqa: F401 - fixtures

pytestmark = pytest.mark.e2e

CONFIG = """
[scenario]
name = "sixth-role"
synthetic_train_per_class = 50
[[scenario.domains]]
dataset = "synthetic"
clients = 2
samples_per_client = 32

[train]
rounds = 1
local_epochs = 1
steps_per_epoch = 1
batch_size = 16
cuts = [[0, 0, 0, 0], [1, 1, 1, 1]]
score_samples = 50
utility_samples = 50
utility_epochs = 1

[runtime]
step_deadline_s = 60.0
round_deadline_s = 300.0
"""


def test_a_registered_sixth_role_runs_through_hfgan_up(e2e, monkeypatch):  # noqa: F811
    e2e["config"].write_text(CONFIG)
    for var in ("HFGAN_CONFIG", "HFGAN_RUN_ID", "HFGAN_BROKER_URL", "HFGAN_STATE_URL", "HFGAN_RUN_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HFGAN_CLASSIFIER_DIR", str(e2e["tmp"] / "classifiers"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_dir = e2e["tmp"] / "run"
    spec = sixth_role.register()
    try:
        args = build_parser().parse_args(
            [
                "up",
                *("--config", str(e2e["config"]), "--clients", "2", "--aggregators", "1"),
                *("--broker", e2e["amqp"], "--state", e2e["redis"], "--namespace", e2e["namespace"]),
                *("--run-dir", str(run_dir), "--run-id", e2e["run"], "--data-dir", str(e2e["tmp"] / "data")),
                *("--no-utility", "--quiet"),
            ]
        )
        code = up.run(args, load_run_config)
    finally:
        roles.unregister(spec.name)
    assert code == 0, (run_dir / "logs" / "coordinator.log").read_text()[-3000:]
    log = (run_dir / "logs" / "observer.log").read_text()  # `up` started it from its registry entry
    seen = json.loads((run_dir / "observer.json").read_text())
    # Subscriptions start when the process is up, so the first events may precede it; a round's end does not.
    assert seen["events"].get("done") == 1 and 1 in seen["rounds"], log[-2000:]
    assert "rejected" not in log
