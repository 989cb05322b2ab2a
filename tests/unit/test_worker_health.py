"""The worker health probe (`python -m workers.health`): passes only on a recent beat written by the worker loop."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from hfgan_core.runtime.health import beat_problem, write_beat
from hfgan_core.runtime.worker import WorkerSettings


def test_fresh_beat_passes_and_stale_one_fails(tmp_path):
    f = tmp_path / "hb"
    write_beat(f, now=1000.0)
    assert beat_problem(f, 10.0, now=1005.0) is None
    problem = beat_problem(f, 10.0, now=1010.5)
    assert problem is not None and "10.5 s ago" in problem


def test_missing_garbled_and_future_files_fail(tmp_path):
    assert "missing" in beat_problem(tmp_path / "none", 10.0, now=0.0)
    (tmp_path / "bad").write_text("not a time\n")
    assert "no heartbeat time" in beat_problem(tmp_path / "bad", 10.0, now=0.0)
    (tmp_path / "empty").write_text("")
    assert "no heartbeat time" in beat_problem(tmp_path / "empty", 10.0, now=0.0)
    write_beat(tmp_path / "future", now=1000.0)
    assert "future" in beat_problem(tmp_path / "future", 10.0, now=900.0)


def test_touching_the_file_does_not_make_it_fresh(tmp_path):
    # The probe reads the time the worker wrote, not the file's mtime: touching a stale file proves nothing.
    f = tmp_path / "hb"
    write_beat(f, now=time.time() - 60)
    os.utime(f)
    assert beat_problem(f, 10.0) is not None


def test_settings_take_the_health_file_from_the_environment():
    assert WorkerSettings.from_env({}).health_file is None
    assert WorkerSettings.from_env({"HFGAN_HEALTH_FILE": "/tmp/x"}).health_file == "/tmp/x"


def _probe(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HFGAN_")} | env_extra
    return subprocess.run([sys.executable, "-m", "workers.health"], env=env, capture_output=True, text=True, timeout=60)


def test_probe_command_exit_codes(tmp_path):
    f = tmp_path / "hb"
    assert _probe({}).returncode == 2  # no file configured: a misconfigured check, not a healthy worker
    res = _probe({"HFGAN_HEALTH_FILE": str(f)})
    assert res.returncode == 1 and "missing" in res.stderr
    write_beat(f)
    assert _probe({"HFGAN_HEALTH_FILE": str(f)}).returncode == 0
    write_beat(f, now=time.time() - 30)
    res = _probe({"HFGAN_HEALTH_FILE": str(f), "HFGAN_HEARTBEAT_TTL_S": "20"})
    assert res.returncode == 1 and "limit 20 s" in res.stderr


def test_a_client_beating_over_the_broker_writes_its_health_file(tmp_path):
    """A client has no ledger: its beat goes to the coordinator over the broker, and the health file follows that
    beat (a client whose beats stopped, or whose publish failed, goes stale)."""
    from hfgan_core.config import RunConfig
    from hfgan_core.runtime.host import Role, RoleContext
    from hfgan_core.runtime.worker import StopFlag, WorkerLoop
    from hfgan_core.transport import MemoryTransport

    class Quiet(Role):
        name = "quiet"

        def addresses(self) -> list[str]:
            return []

    f = tmp_path / "hb"
    sent: list[str] = []

    def send_beat(info: str, leaving: bool) -> None:
        if len(sent) == 1:
            raise ConnectionError("broker gone")
        sent.append(info)

    ctx = RoleContext(run="r", cfg=RunConfig(), transport=MemoryTransport(), store=None)
    loop = WorkerLoop(Quiet(ctx), WorkerSettings(health_file=str(f)), StopFlag(), send_beat=send_beat)
    loop.beat()
    assert sent and beat_problem(f, 10.0) is None
    write_beat(f, now=time.time() - 60)
    try:
        loop.beat()
    except ConnectionError:
        pass
    assert beat_problem(f, 10.0) is not None  # the failed beat left the file stale
