"""docker-compose.yml without a Docker engine: structure, GPU reservations, healthchecks, and every
command and RIGL_ variable it uses checked against the code (the worker command run here on Redis)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid

import pytest
import yaml

from rigl_core.cli import build_parser
from helpers.service import (JOB, REDIS, ROOT, cleanup_redis_queue, postgres_available, redis_available, stop,
                            temporary_postgres_database, wait_for)
from store.settings import Settings

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
ENV_EXAMPLE = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))


def test_services_and_profiles():
    assert {"redis", "postgres", "api", "worker-gpu0", "worker-cpu", "flower"} <= set(SERVICES)
    assert SERVICES["worker-cpu"]["profiles"] == ["cpu"]
    assert SERVICES["flower"]["profiles"] == ["flower"]
    assert "--basic-auth=${FLOWER_BASIC_AUTH:?set FLOWER_BASIC_AUTH in .env}" in SERVICES["flower"]["command"]


def test_redis_is_durable_private_and_authenticated():
    redis = SERVICES["redis"]
    command = " ".join(redis["command"])
    for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction", "--requirepass"):
        assert flag in command
    assert "ports" not in redis
    assert "redisdata:/data" in redis["volumes"]
    assert "ping" in " ".join(redis["healthcheck"]["test"])


def test_postgres_api_and_healthchecks():
    postgres = SERVICES["postgres"]
    assert "pgdata:/var/lib/postgresql/data" in postgres["volumes"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    api = SERVICES["api"]
    assert api["depends_on"] == {"redis": {"condition": "service_healthy"},
                                 "postgres": {"condition": "service_healthy"}}
    assert "artifacts:/data" in api["volumes"]
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    for name in ("api", "worker-gpu0", "worker-cpu"):
        assert any(v.endswith(":/datasets:ro") for v in SERVICES[name]["volumes"]), name


def test_gpu_worker_reservation_and_shutdown():
    worker = SERVICES["worker-gpu0"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    assert worker["stop_grace_period"] == "3m" and worker["shm_size"] == "2gb"
    assert "inspect ping" in " ".join(worker["healthcheck"]["test"])
    assert "deploy" not in SERVICES["worker-cpu"]


def _active(profile: str | None) -> dict:
    """The services `docker compose [--profile P] up` starts: those without profiles, and P's."""
    return {name: s for name, s in SERVICES.items() if not s.get("profiles") or profile in s["profiles"]}


def _gpus(service: dict) -> list[str]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    for device in devices:
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], device
    return [gpu for device in devices for gpu in device["device_ids"]]


def _bytes(size: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kmg]?)b?", str(size).lower()).groups()
    return int(number) * 1024 ** " kmg".index(unit or " ")


def test_an_8_gpu_node_runs_eight_1_gpu_workers_or_one_8_gpu_worker():
    """gpu-8x1: eight workers owning one GPU each, disjoint; gpu-1x8 (worker-gpu0 scaled to 0, as the header
    says): one worker owning all eight, with the shared memory and memlock DDP/NCCL need in a container."""
    eight = {name: _gpus(s) for name, s in _active("gpu-8x1").items() if _gpus(s)}
    assert sorted(eight) == [f"worker-gpu{i}" for i in range(8)]
    assert sorted(gpu for gpus in eight.values() for gpu in gpus) == [str(i) for i in range(8)]
    assert all(len(gpus) == 1 for gpus in eight.values())
    one = {name: _gpus(s) for name, s in _active("gpu-1x8").items() if _gpus(s) and name != "worker-gpu0"}
    assert one == {"worker-8gpu": [str(i) for i in range(8)]}
    assert "--profile gpu-1x8 up -d --scale worker-gpu0=0" in (ROOT / "docker-compose.yml").read_text()
    big = SERVICES["worker-8gpu"]
    assert big.get("ipc") == "host" or _bytes(big["shm_size"]) >= 8 * _bytes(SERVICES["worker-gpu1"]["shm_size"])
    assert big["ulimits"]["memlock"] == -1
    assert set(_active(None)) == {"redis", "postgres", "api", "worker-gpu0"}  # the default stack
    for name, service in SERVICES.items():  # every GPU worker owns exactly the GPUs it reserves
        if _gpus(service):
            assert service["environment"]["RIGL_WORKER_DEVICES"] == str(len(_gpus(service))), name
            assert service["command"] == SERVICES["worker-gpu0"]["command"], name
            assert service["stop_grace_period"] == "3m" and "inspect ping" in " ".join(service["healthcheck"]["test"])
            assert service["environment"]["RIGL_DATABASE_URL"] == SERVICES["api"]["environment"]["RIGL_DATABASE_URL"]


def test_every_rigl_variable_is_a_setting_and_every_env_example_entry_is_used():
    fields = {f"RIGL_{name.upper()}" for name in Settings.model_fields}
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"\b(RIGL_[A-Z0-9_]+)\s*:", text))
    assert used and used <= fields, used - fields
    referenced = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    assert set(ENV_EXAMPLE) <= referenced, set(ENV_EXAMPLE) - referenced
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    assert required <= set(ENV_EXAMPLE)


def test_commands_parse_with_our_cli():
    parser = build_parser()
    for name in ("api", "worker-gpu0", "worker-cpu"):
        command = SERVICES[name]["command"]
        assert command[0] == "rigl"
        args = parser.parse_args(command[1:])
        assert args.handler is not None and args.command in ("serve", "worker")
    for dockerfile in ("api.Dockerfile", "worker.Dockerfile"):
        text = (ROOT / "docker" / dockerfile).read_text()
        assert "torch==2.14.1" in text and "USER rigl" in text and "HEALTHCHECK" in text
        assert 'RUN pip install ".[service]"' in text  # `rigl serve` / `rigl worker` need the extra
        cmd = re.search(r'^CMD (\[.*\])', text, flags=re.M).group(1)
        assert parser.parse_args(yaml.safe_load(cmd)[1:]).handler is not None


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose not installed")
def test_docker_compose_config_accepts_the_file(tmp_path):
    result = subprocess.run(["docker-compose", "--env-file", ".env.example", "--profile", "cpu", "--profile",
                             "flower", "config", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for profile, workers in (("gpu-8x1", {f"worker-gpu{i}" for i in range(8)}), ("gpu-1x8", {"worker-8gpu"})):
        result = subprocess.run(["docker-compose", "--env-file", ".env.example", "--profile", profile, "config",
                                 "--services"], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert workers <= set(result.stdout.split()), (profile, result.stdout)
    broken = (ROOT / "docker-compose.yml").read_text().replace("capabilities: [gpu]", "capabilitys: [gpu]")
    (tmp_path / "docker-compose.yml").write_text(broken)
    result = subprocess.run(["docker-compose", "-f", str(tmp_path / "docker-compose.yml"), "--project-directory",
                             str(ROOT), "--env-file", str(ROOT / ".env.example"), "config", "-q"],
                            capture_output=True, text=True)
    assert result.returncode != 0  # a misspelt key is rejected, so the check above means something


@pytest.mark.slow
@pytest.mark.skipif(not (postgres_available() and redis_available()) and not os.environ.get("CI"), reason="needs PostgreSQL and Redis")
def test_compose_worker_command_runs_a_job_on_real_redis(tmp_path):
    """The worker service's command and environment, with the compose hosts pointed at this machine."""
    from api.context import celery_enqueue
    from api.submission import resolve
    from rigl_core.spec import JobSpec
    from store.artifacts import Artifacts
    from store.jobs import JobStore

    worker = SERVICES["worker-gpu0"]
    queue = f"rigl-compose-{uuid.uuid4().hex[:8]}"
    with temporary_postgres_database() as database_url:
        env = {**os.environ}
        for key, value in worker["environment"].items():
            if key.startswith("RIGL_") and "${" not in str(value):
                env[key] = str(value)
        env.update({"RIGL_DATABASE_URL": database_url, "RIGL_BROKER_URL": REDIS, "RIGL_QUEUE": queue,
                    "RIGL_DATA_DIR": str(tmp_path), "RIGL_ARTIFACT_DIR": str(tmp_path / "artifacts"),
                    "RIGL_DATASETS_DIR": str(tmp_path / "datasets")})
        log = open(tmp_path / "worker.log", "wb")
        process = subprocess.Popen(worker["command"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            settings = Settings(data_dir=tmp_path, database_url=database_url, broker_url=REDIS, queue=queue,
                                artifact_dir=tmp_path / "artifacts").resolved()
            store = JobStore(database_url)
            spec = JobSpec.model_validate(JOB)
            resolved, total = resolve(spec, store, Artifacts(settings.artifact_dir), settings, None)
            job = store.create_job(JOB, resolved, total)
            celery_enqueue(settings)(job.id)
            done = wait_for(lambda: (lambda j: j if j.status in ("succeeded", "failed") else None)(
                store.get_job(job.id)), 120, what="the job")
            assert done.status == "succeeded", done.error_message
            health = " ".join(SERVICES["worker-gpu0"]["healthcheck"]["test"][1:]).replace("$$", "$")
            assert "rigl@$(uname -n)" in health  # the node name of `--name rigl@%h`
            probe = subprocess.run(["sh", "-c", health],
                                   env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert probe.returncode == 0, probe.stdout + probe.stderr
        finally:
            stop(process)
            cleanup_redis_queue(queue)


def test_api_and_worker_images_share_their_layers():
    """Word for word from FROM to `USER rigl`, so built with the same arguments (the stack test builds both
    with the worker's torch) the worker image reuses every layer of the API image; and both take their
    base image as a build argument that compose passes from PYTHON_IMAGE."""
    def shared(name: str) -> str:
        text = (ROOT / "docker" / name).read_text()
        steps = [line for line in text.splitlines() if line and not line.startswith("#")]
        start = next(i for i, line in enumerate(steps) if line.startswith("FROM "))
        return "\n".join(steps[start:steps.index("USER rigl") + 1])

    assert shared("api.Dockerfile") == shared("worker.Dockerfile")
    assert shared("api.Dockerfile").startswith("FROM ${BASE_IMAGE}\nARG TORCH_INDEX_URL\nARG TORCH\n")
    for name in ("api", "worker-cpu"):
        assert SERVICES[name]["build"]["args"] == {"BASE_IMAGE": "${PYTHON_IMAGE:-python:3.11-slim}"}
    for dockerfile in ("api.Dockerfile", "worker.Dockerfile"):
        assert "ARG BASE_IMAGE=python:3.11-slim\n" in (ROOT / "docker" / dockerfile).read_text()
    assert SERVICES["redis"]["image"] == "${REDIS_IMAGE:-redis:7-alpine}"
    assert SERVICES["postgres"]["image"] == "${POSTGRES_IMAGE:-postgres:16-alpine}"


def test_images_ship_the_dashboard_assets():
    """The API image does `COPY api` + `pip install .`: package data must name every dashboard file."""
    import fnmatch
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["api"]
    assets = [p.relative_to(ROOT / "api").as_posix() for p in (ROOT / "api" / "static").rglob("*") if p.is_file()]
    assert {"static/index.html", "static/app.js", "static/charts.js", "static/style.css"} <= set(assets)
    assert all(any(fnmatch.fnmatch(a, pattern) for pattern in patterns) for a in assets), (assets, patterns)
    dockerfile = (ROOT / "docker" / "api.Dockerfile").read_text()
    assert "COPY api ./api" in dockerfile and 'RUN pip install ".[service]"' in dockerfile
