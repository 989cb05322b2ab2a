"""The compose stack as a user runs it: `docker-compose` with compose.yaml, in containers, on this machine.

Images: the local ones (deploy/compose.local.yaml, built by scripts/compose-images.sh, which scripts/test.sh runs
first), or Docker Hub's with HFGAN_COMPOSE_IMAGES=hub. Each test brings up its own Compose project (own network,
containers and volumes) and removes it with its volumes afterwards (HFGAN_COMPOSE_KEEP=1 keeps it for a look).
Without a Docker engine these tests fail: a stack nobody ran must not pass.

Waits are bounded by generous limits that only guard against a hang: nothing here asserts how fast this host is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = Path(__file__).resolve().parent / "configs"
# A hang guard for one whole run (up to the coordinator's exit), far beyond what the small configs need.
RUN_LIMIT_S = float(os.environ.get("HFGAN_COMPOSE_RUN_LIMIT_S", "1500"))


def compose_files() -> list[str]:
    files = ["compose.yaml"]
    if os.environ.get("HFGAN_COMPOSE_IMAGES", "local") != "hub":
        files.append("deploy/compose.local.yaml")
    return files


def free_host_ports() -> dict[str, str]:
    """Every host port compose.yaml publishes, set to 0 (any free port). Read from the file, so that a port added
    later cannot collide with the user's own stack or another test project: CI failed on a fixed 9090 once."""
    names = set(re.findall(r"\$\{(HFGAN_\w+_PORT)\b", (ROOT / "compose.yaml").read_text()))
    return {name: "0" for name in sorted(names)}


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {res.stderr.strip()[-2000:]}")
    return res


class Stack:
    """One Compose project of compose.yaml: its own containers, network and volumes."""

    def __init__(self, name: str, env: dict[str, str]):
        self.project = f"hfgan-t-{name}-{uuid.uuid4().hex[:6]}"
        # A loaded host's dockerd may take minutes to answer: Compose's 60 s HTTP timeout failed `up` here.
        timeouts = {"COMPOSE_HTTP_TIMEOUT": "600", "DOCKER_CLIENT_TIMEOUT": "600"}
        self.env = dict(os.environ) | timeouts | env | {"COMPOSE_PROJECT_NAME": self.project}
        self.run_id = env["HFGAN_RUN_ID"]
        self.files = compose_files()

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"]
        for f in self.files:
            cmd += ["-f", str(ROOT / f)]
        res = subprocess.run([*cmd, *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} (rc {res.returncode}): {res.stderr.strip()[-3000:]}")
        return res

    def up(self, *scale: str) -> None:
        flags = [f"--scale={s}" for s in scale]
        self.compose("up", "-d", "--no-build", *flags)

    def containers(self, service: str, all_: bool = False) -> list[str]:
        flt = ["--filter", f"label=com.docker.compose.project={self.project}"]
        flt += ["--filter", f"label=com.docker.compose.service={service}"]
        res = docker("ps", "-q", *(["-a"] if all_ else []), *flt)
        return sorted(res.stdout.split())

    def inspect(self, container: str) -> dict[str, Any]:
        return json.loads(docker("inspect", container).stdout)[0]

    def logs(self, container: str) -> str:
        res = docker("logs", container, check=False, timeout=60)
        return res.stdout + res.stderr

    def run(self, *command: str, service: str = "coordinator", timeout: float = 300) -> subprocess.CompletedProcess:
        """A command in a fresh container of `service` (its image, environment, volumes and entry point)."""
        return self.compose("run", "--rm", "-T", "--no-deps", service, *command, timeout=timeout, check=False)

    def read(self, path: str) -> str:
        res = self.run("cat", path)
        assert res.returncode == 0, f"cannot read {path}: {res.stderr[-1000:]}"
        return res.stdout

    def ledger_round(self) -> tuple[int, str]:
        """The run's (round, phase) from Redis, through redis-cli in the redis container (no host port), as the
        read-only-in-practice `observer` ACL user."""
        (redis,) = self.containers("redis")
        key = f"hfgan:{{{self.run_id}}}:round"
        auth = 'REDISCLI_AUTH="$(cat /run/hfgan/secrets/redis/observer.password)" redis-cli --user observer'
        script = f'{auth} --raw HMGET "{key}" round phase'
        res = docker("exec", redis, "sh", "-c", script, check=False, timeout=30)
        parts = res.stdout.split()
        if res.returncode != 0 or len(parts) != 2 or not parts[0].isdigit():
            return 0, "none"
        return int(parts[0]), parts[1]

    def wait(self, what: str, done: Callable[[], bool], limit_s: float = RUN_LIMIT_S, every_s: float = 2.0) -> float:
        """Poll `done` until true; returns the seconds it took. Fails with the workers' logs after `limit_s`."""
        t0 = time.monotonic()
        while not done():
            if time.monotonic() - t0 > limit_s:
                raise AssertionError(f"{self.project}: {what} not reached within {limit_s:.0f} s\n{self.tail_logs()}")
            time.sleep(every_s)
        return time.monotonic() - t0

    def wait_round(self, r: int, phase: str = "training") -> float:
        def reached() -> bool:
            cur, ph = self.ledger_round()
            return cur > r or (cur == r and (ph == phase or phase == "training" and ph != "admitting"))

        return self.wait(f"round {r} {phase}", reached)

    def coordinator_exit(self) -> int | None:
        """The coordinator's exit code once it stopped for good (not while Docker restarts it), else None."""
        states = [self.inspect(c)["State"] for c in self.containers("coordinator", all_=True)]
        if states and all(s["Status"] == "exited" for s in states):
            return max(s["ExitCode"] for s in states)
        return None

    def wait_finished(self) -> float:
        took = self.wait("the coordinator's exit", lambda: self.coordinator_exit() is not None, every_s=3.0)
        code = self.coordinator_exit()
        assert code == 0, f"the coordinator exited with {code}\n{self.tail_logs()}"
        return took

    def health(self, container: str) -> str:
        return (self.inspect(container)["State"].get("Health") or {}).get("Status", "none")

    def crash(self, container: str) -> None:
        """SIGKILL the container's main process from the host: to Docker this is a crash (an OOM kill looks the
        same), so the restart policy applies. `docker kill` would count as a deliberate stop, which Docker never
        restarts."""
        pid = self.inspect(container)["State"]["Pid"]
        assert pid > 0, f"{container} is not running"
        os.kill(pid, 9)

    def tail_logs(self) -> str:
        res = self.compose("logs", "--no-color", "--tail=40", timeout=120, check=False)
        return res.stdout[-12000:]

    def down(self, volumes: bool) -> None:
        self.compose("down", "--remove-orphans", *(["-v"] if volumes else []), timeout=300)


def _need_docker() -> None:
    if shutil.which("docker") is None:
        pytest.fail("docker is not installed: scripts/test.sh installs docker.io and starts dockerd")
    res = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        pytest.fail(f"no Docker engine answers (start dockerd): {res.stderr.strip()[-500:]}")
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed (apt-get install docker-compose)")
    if os.environ.get("HFGAN_COMPOSE_IMAGES", "local") != "hub":
        for image in (
            "hfgan:local",
            "hfgan-local/rabbitmq:3.10-management",
            "hfgan-local/redis:7",
            "hfgan-local/prometheus",
        ):
            if docker("image", "inspect", image, check=False).returncode != 0:
                pytest.fail(f"image {image} is missing: run scripts/compose-images.sh")


@pytest.fixture
def stack_factory():
    _need_docker()
    made: list[Stack] = []

    def make(name: str, config: str, run_id: str, **env: str) -> Stack:
        base = {
            "HFGAN_CONFIG": f"/etc/hfgan/configs/{config}",
            "HFGAN_CONFIG_DIR": str(CONFIGS),
            "HFGAN_RUN_ID": run_id,
            "HFGAN_NO_UTILITY": "1",
            # Any free host ports: tests run next to the user's own stack and other test projects.
            **free_host_ports(),
            "HFGAN_HEALTH_INTERVAL": "3s",
            # Slots and the coordinator's lease outlive a worker that a busy host starves for a while (a client
            # that could not beat within 10 s of its claim was seen to lose its slot on a loaded machine).
            "HFGAN_HEARTBEAT_TTL_S": "30",
            "HFGAN_LEASE_TTL_S": "45",
        }
        stack = Stack(name, base | env)
        made.append(stack)
        return stack

    yield make
    if os.environ.get("HFGAN_COMPOSE_KEEP") != "1":
        for stack in made:
            stack.down(volumes=True)
