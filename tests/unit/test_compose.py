"""compose.yaml and the Dockerfile: the stack's structure, checked on the configuration Compose itself resolves.

No Docker engine is needed: `docker-compose config` (Compose v2, or Debian's docker-compose 1.29, which
scripts/test.sh installs) validates the file against its schema and prints it resolved (anchors merged, `${VAR}`
defaults substituted). Without a compose CLI these tests fail: a stack nobody validated must not pass.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from hfgan_core import roles
from hfgan_core.cli import build_parser
from hfgan_core.transport.amqp import check_password_hash

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DEFINITIONS = ROOT / "broker_config" / "definitions.json"
# Every built-in role is a compose service (the role registry's; a test-only role registered later is not).
ROLES = roles.BUILTIN_ROLES
# The queue each role consumes; its broker user must be allowed to read it.
ROLE_QUEUE = {s.name: f"hfgan.{s.address()}" for s in roles.BUILTIN if s in tuple(roles.iter_broker_roles())}
_YAML_TO_JSON = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"


def _compose_cli() -> tuple[list[str], int]:
    """The compose command line and its major version; fails (never skips) when there is none."""
    exe = shutil.which("docker-compose")
    candidates = [[exe]] if exe else []
    if shutil.which("docker"):
        candidates.append([shutil.which("docker") or "docker", "compose"])
    for cmd in candidates:
        res = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True, timeout=60)
        m = re.match(r"v?(\d+)\.", res.stdout.strip())
        if res.returncode == 0 and m:
            return cmd, int(m.group(1))
    pytest.fail(
        "no compose CLI: install one to validate compose.yaml (as root: apt-get install -y docker-compose; "
        "scripts/test.sh does it)"
    )


def _yaml_to_data(text: str, cmd: list[str]) -> Any:
    """YAML -> Python. PyYAML is not a dependency of the project; docker-compose 1.x is a Python program that
    depends on it, so its interpreter parses YAML when this one cannot."""
    try:
        import yaml  # type: ignore[import-untyped]

        return yaml.safe_load(text)
    except ImportError:
        pass
    interpreter = sys.executable
    first = Path(cmd[0]).read_bytes()[:200].split(b"\n", 1)[0] if Path(cmd[0]).is_file() else b""
    if first.startswith(b"#!") and b"python" in first:
        interpreter = first[2:].decode().strip().split()[0]
    res = subprocess.run([interpreter, "-c", _YAML_TO_JSON], input=text, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        pytest.fail(f"cannot parse YAML (no PyYAML for {interpreter}): {res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout)


def _resolved(env: dict[str, str] | None = None, files: list[Path] | None = None) -> dict[str, Any]:
    """compose.yaml (and `files` over it) as Compose resolves it, with a clean HFGAN_* environment plus `env`."""
    cmd, major = _compose_cli()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HFGAN_", "COMPOSE_"))}
    clean.update(env or {})
    args = [*cmd]
    for f in files or [COMPOSE]:
        args += ["-f", str(f)]
    args += ["config"]
    if major >= 2:
        args += ["--format", "json"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=120, env=clean, cwd=ROOT)
    assert res.returncode == 0, f"compose rejected compose.yaml: {res.stderr.strip()}"
    return json.loads(res.stdout) if major >= 2 else _yaml_to_data(res.stdout, cmd)


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    return _resolved()


@pytest.fixture(scope="module")
def definitions() -> dict[str, Any]:
    return json.loads(DEFINITIONS.read_text())


def _depends(svc: dict[str, Any]) -> dict[str, str]:
    dep = svc.get("depends_on") or {}
    if isinstance(dep, list):  # the short form has no conditions
        return {name: "service_started" for name in dep}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in dep.items()}


def _env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _mounts(svc: dict[str, Any]) -> dict[str, str]:
    """target -> source of a service's volumes (long form in Compose v2, short strings in 1.x)."""
    out = {}
    for v in svc.get("volumes") or []:
        if isinstance(v, str):
            parts = v.split(":")
            out[parts[1]] = parts[0]
        else:
            out[v["target"]] = v["source"]
    return out


@pytest.mark.slow
def test_every_role_runs_its_worker_module(stack):
    services = stack["services"]
    for role in ROLES:
        assert role in services, f"no {role} service"
        assert services[role]["command"] == ["python", "-m", roles.get(role).worker_module]
    images = {services[r].get("image") for r in ROLES}
    assert len(images) == 1 and None not in images, f"the workers must share one image, not {images}"
    assert all(services[r].get("build") for r in ROLES), "every worker service can build the image"


@pytest.mark.slow
def test_workers_wait_for_healthy_broker_and_ledger(stack):
    for role in ROLES:
        deps = _depends(stack["services"][role])
        assert deps.get("rabbitmq") == "service_healthy", (role, deps)
        assert deps.get("redis") == "service_healthy", (role, deps)


def test_infrastructure_images_and_healthchecks(stack):
    rabbit, redis = stack["services"]["rabbitmq"], stack["services"]["redis"]
    # The transport's chunk reassembly relies on RabbitMQ 3.x (global QoS); management serves the HTTP API.
    assert re.fullmatch(r"rabbitmq:3\.\d+-management(-alpine)?", rabbit["image"]), rabbit["image"]
    assert redis["image"].startswith("redis:7"), redis["image"]
    for name, svc, probe in (("rabbitmq", rabbit, "rabbitmq-diagnostics"), ("redis", redis, "redis-cli")):
        test = svc.get("healthcheck", {}).get("test")
        assert test and probe in " ".join(test), f"{name} healthcheck {test!r}"
    # Published: AMQP over TLS (any interface) and the management UI on 127.0.0.1 only; plain AMQP and Redis only
    # on the compose network.
    published = {_port_target(p): _port_host_ip(p) for p in rabbit.get("ports", [])}
    assert published == {"5671": "", "15672": "127.0.0.1"}, published
    assert not redis.get("ports"), "Redis must not be published on the host"
    mounts = _mounts(rabbit)
    for name in ("rabbitmq.conf", "enabled_plugins", "definitions.json"):
        assert Path(mounts[f"/etc/rabbitmq/{name}"]).resolve() == (ROOT / "broker_config" / name).resolve()
    assert Path(_mounts(redis)["/usr/local/etc/redis/redis.conf"]).resolve() == ROOT / "broker_config/redis.conf"
    assert "/usr/local/etc/redis/redis.conf" in redis["command"]
    # Redis loads the ACL users state-users generated into the secrets volume (the default user is off); its
    # health check logs in as `observer`.
    aclfile = redis["command"][redis["command"].index("--aclfile") + 1]
    secrets_at = next(t for t, src in _mounts(redis).items() if src.endswith("secrets"))
    assert aclfile == f"{secrets_at}/redis/users.acl", redis["command"]
    probe = " ".join(redis["healthcheck"]["test"])
    assert "REDISCLI_AUTH" in probe and "--user observer" in probe and "redis/observer.password" in probe, probe
    gen = stack["services"]["state-users"]
    out_at = next(t for t, src in _mounts(gen).items() if src.endswith("secrets"))
    assert f"hfgan_core.state.acl generate --out {out_at}/redis " in " ".join(gen["command"]), gen["command"]
    assert _depends(redis).get("state-users") == "service_completed_successfully"
    # rabbitmq.conf must load the definitions from where they are mounted.
    conf = (ROOT / "broker_config" / "rabbitmq.conf").read_text()
    assert re.search(r"^load_definitions\s*=\s*/etc/rabbitmq/definitions\.json\s*$", conf, re.M)


def _port_target(p: Any) -> str:
    """Ports: "host:container" strings (1.x) or {target: container, published: host} maps (v2)."""
    return str(p["target"]) if isinstance(p, dict) else str(p).removesuffix("/tcp").rsplit(":", 1)[-1]


def _port_host_ip(p: Any) -> str:
    if isinstance(p, dict):
        return p.get("host_ip", "")
    parts = str(p).removesuffix("/tcp").split(":")
    return parts[0] if len(parts) == 3 else ""


def test_tls_for_clients_and_the_broker(stack):
    services = stack["services"]
    conf = (ROOT / "broker_config" / "rabbitmq.conf").read_text()
    assert re.search(r"^listeners\.ssl\.default\s*=\s*5671$", conf, re.M)
    certs = {m.group(1): m.group(2) for m in re.finditer(r"^ssl_options\.(\w+)\s*=\s*(\S+)$", conf, re.M)}
    tls_dir = next(t for t, src in _mounts(services["rabbitmq"]).items() if src.endswith("tls-server"))
    for key in ("cacertfile", "certfile", "keyfile"):
        assert certs[key].startswith(tls_dir + "/"), (key, certs[key])
    # Clients (and broker-setup, which checks each client user) connect with amqps:// and a CA file they have.
    for name in ("client", "broker-setup"):
        url = urllib.parse.urlsplit(_env(services[name])["HFGAN_BROKER_URL"].replace("{slot}", "0"))
        assert (url.scheme, url.port) == ("amqps", 5671), url
        cafile = dict(urllib.parse.parse_qsl(url.query))["cafile"]
        ca_mount = _mounts(services[name]).get(str(Path(cafile).parent), "")
        assert ca_mount.endswith("tls-ca"), (name, cafile)
    # dev-certs makes them before the broker starts.
    assert _depends(services["rabbitmq"]).get("dev-certs") == "service_completed_successfully"


def test_workers_have_a_heartbeat_health_check(stack):
    for role in ROLES:
        svc = stack["services"][role]
        assert svc["healthcheck"]["test"] == ["CMD", "python", "-m", "workers.health"], role
        health_file = _env(svc)["HFGAN_HEALTH_FILE"]
        # In the container's own filesystem: on a shared volume another replica's beats would count.
        assert not any(health_file.startswith(t.rstrip("/") + "/") for t in _mounts(svc)), (role, health_file)


def test_local_images_override_only_images(stack):
    local = _resolved(files=[COMPOSE, ROOT / "deploy" / "compose.local.yaml"])
    for name, svc in stack["services"].items():
        other = dict(local["services"][name])
        assert other.pop("image") != svc["image"] or name not in ("rabbitmq", "redis", *ROLES), name
        mine = {k: v for k, v in svc.items() if k != "image"}
        if "build" in mine:  # the local build differs in its arguments only
            assert other["build"].get("args") and mine["build"].get("args") in (None, {}), name
            other.pop("build"), mine.pop("build")
        for svc_doc in (other, mine):  # the merge may reorder mounts
            svc_doc["volumes"] = sorted(map(str, svc_doc.get("volumes", [])))
        assert other == mine, f"{name}: deploy/compose.local.yaml changes more than the image"


def test_workers_are_scalable(stack):
    for role in ROLES:
        svc = stack["services"][role]
        assert "container_name" not in svc, f"{role}: container_name prevents --scale"
        assert not svc.get("ports"), f"{role}: a fixed host port prevents --scale"
        assert "deploy" not in svc, f"{role}: --scale, not deploy.replicas"


def test_shared_environment_and_volumes(stack):
    data_source = runs_source = None
    for role in ROLES:
        svc = stack["services"][role]
        env, mounts = _env(svc), _mounts(svc)
        assert env["HFGAN_CONFIG"] == "quickstart"
        assert env["HFGAN_RUN_ID"] == "compose"
        assert "HFGAN_STATE_URL" not in env
        if role == "client":
            # Clients hold no Redis credential: no state URL, no secrets volume.
            assert "HFGAN_STATE_URL_FILE" not in env and not any(s.endswith("secrets") for s in mounts.values())
        else:
            # Each infrastructure role logs in to Redis as its own ACL user, its URL from the secrets volume.
            state_file = env["HFGAN_STATE_URL_FILE"]
            secrets_at = next(t for t, src in mounts.items() if src.endswith("secrets"))
            assert state_file == f"{secrets_at}/redis/{role}.url", (role, state_file)
        assert urllib.parse.urlsplit(env["HFGAN_BROKER_URL"]).hostname == "rabbitmq"
        assert env["HFGAN_DEVICE"] == "cpu"
        # Datasets and the run directory are shared volumes mounted where the environment points.
        assert mounts.get(env["HFGAN_DATA_DIR"]), f"{role}: nothing mounted at {env['HFGAN_DATA_DIR']}"
        runs_mount = next((t for t in mounts if env["HFGAN_RUN_DIR"].startswith(t.rstrip("/") + "/")), None)
        assert runs_mount, f"{role}: HFGAN_RUN_DIR {env['HFGAN_RUN_DIR']} is on no volume"
        data_source = data_source or mounts[env["HFGAN_DATA_DIR"]]
        runs_source = runs_source or mounts[runs_mount]
        assert mounts[env["HFGAN_DATA_DIR"]] == data_source and mounts[runs_mount] == runs_source, role
    named = set(stack.get("volumes") or {})
    assert {"data", "runs"} <= {n.split("_", 1)[-1] for n in named} | named, named


@pytest.mark.slow
def test_preset_and_run_id_come_from_the_environment():
    stack = _resolved({"HFGAN_CONFIG": "s3_lite", "HFGAN_RUN_ID": "exp-7"})
    for role in ROLES:
        env = _env(stack["services"][role])
        assert env["HFGAN_CONFIG"] == "s3_lite" and env["HFGAN_RUN_ID"] == "exp-7", role
        assert env["HFGAN_RUN_DIR"].endswith("/exp-7"), env["HFGAN_RUN_DIR"]


def _user_and_password(url: str, slot: int) -> tuple[str, str]:
    p = urllib.parse.urlsplit(url.replace("{slot}", str(slot)))
    return urllib.parse.unquote(p.username or ""), urllib.parse.unquote(p.password or "")


def test_each_role_logs_in_as_its_own_broker_user(stack, definitions):
    users = {u["name"]: u for u in definitions["users"]}
    perms = {p["user"]: p for p in definitions["permissions"] if p["vhost"] == "/"}
    seen = set()
    for role, queue in ROLE_QUEUE.items():
        user, password = _user_and_password(_env(stack["services"][role])["HFGAN_BROKER_URL"], 0)
        assert user == role, f"{role} logs in as {user!r}"
        assert user in users, f"{user} is not in definitions.json"
        assert check_password_hash(password, users[user]["password_hash"]), f"{user}: wrong development password"
        assert "administrator" not in users[user]["tags"]
        assert re.fullmatch(perms[user]["read"], queue), f"{user} may not read {queue}"
        for other in set(ROLE_QUEUE.values()) - {queue} - ({"hfgan.coordinator"} if role == "coordinator" else set()):
            assert not re.fullmatch(perms[user]["read"], other), f"{user} may read {other}"
        seen.add(user)
    assert len(seen) == len(ROLE_QUEUE)


def test_clients_log_in_as_the_user_of_their_slot(stack, definitions):
    url = _env(stack["services"]["client"])["HFGAN_BROKER_URL"]
    assert "{slot}" in url, "clients claim their slot at start: the URL must name it"
    users = {u["name"]: u for u in definitions["users"]}
    perms = {p["user"]: p for p in definitions["permissions"] if p["vhost"] == "/"}
    for k in range(4):  # definitions.json ships client-0..3; broker-setup provisions the rest of a config's slots
        user, password = _user_and_password(url, k)
        assert user == f"client-{k}" and user in users, user
        assert check_password_hash(password, users[user]["password_hash"]), f"{user}: wrong development password"
        assert re.fullmatch(perms[user]["read"], f"hfgan.client.{k}")
        assert not re.fullmatch(perms[user]["read"], f"hfgan.client.{(k + 1) % 4}")
    guest = [
        s
        for s, svc in stack["services"].items()
        if _user_and_password(_env(svc).get("HFGAN_BROKER_URL", "amqp://x@h"), 0)[0] == "guest"
    ]
    assert not guest, f"guest does not exist when definitions load at boot: {guest}"


def test_client_users_are_provisioned_before_clients_start(stack):
    setup = stack["services"]["broker-setup"]
    assert _depends(stack["services"]["client"]).get("broker-setup") == "service_completed_successfully"
    assert _depends(setup).get("rabbitmq") == "service_healthy"
    command = setup["command"]
    assert command[:3] == ["hfgan", "broker", "provision-clients"], command
    args = build_parser().parse_args(command[1:])  # what the image's `hfgan` will parse
    assert args.dev_passwords and args.clients is None, "client count from $HFGAN_CONFIG, development passwords"
    assert _env(setup)["HFGAN_CONFIG"] and _env(setup)["HFGAN_BROKER_URL"].startswith("amqps://")
    admin = urllib.parse.urlsplit(_env(setup)["HFGAN_ADMIN_URL"])
    assert (admin.hostname, admin.port, admin.username) == ("rabbitmq", 15672, "hfgan-admin")


def test_dockerfile_installs_cpu_torch_first_and_drops_root():
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    # The base image and torch's source are build arguments whose defaults are Docker Hub's and PyTorch's.
    assert lines[0] == "ARG BASE_IMAGE=python:3.11-slim"
    assert 'ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"' in lines
    torch_at = next(i for i, ln in enumerate(lines) if "torch==2.13.0" in ln)
    assert "${TORCH_PIP_ARGS}" in lines[torch_at]
    project_at = next(i for i, ln in enumerate(lines) if re.search(r"pip install (--[\w-]+ )*\.(\s|$)", ln))
    assert torch_at < project_at, "torch (CPU build) must be installed before the project"
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), users
    assert any(ln.startswith("WORKDIR ") for ln in lines)
    assert lines[-1].startswith("CMD ") and "--help" in lines[-1]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "runs", "data", ".git"} <= set(ignored)


def test_dockerfile_keeps_the_dependency_layers_cached_across_source_changes():
    """A source change (or an edit of pyproject.toml's tool settings) must not reinstall torch and the dependencies:
    the stages that install them see only the wheels and the extracted dependency lists."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    stages = [i for i, ln in enumerate(lines) if ln.startswith("FROM ")] + [len(lines)]
    deps = next(lines[a:b] for a, b in zip(stages, stages[1:]) if lines[a].endswith(" AS deps"))
    copies = [ln for ln in deps if ln.startswith("COPY ")]
    assert copies and all("pyproject.toml" not in ln and "hfgan_core" not in ln for ln in copies), copies
    assert any("--from=requirements" in ln and "requirements.txt" in ln for ln in copies), copies
    final = lines[stages[-2] :]
    venv_at = next(i for i, ln in enumerate(final) if ln.startswith("COPY --from=deps"))
    source_at = min(i for i, ln in enumerate(final) if ln.startswith("COPY ") and "--from" not in ln)
    assert venv_at < source_at, "the venv comes before the source"
    assert any("--no-build-isolation" in ln for ln in final[source_at:]), "no build environment download per build"
