"""docker-compose.yml without a Docker engine: structure, GPU reservations, healthchecks, and every
command and RIGL_ variable it uses checked against the code (the worker command run here on Redis); and
its self-hosting defaults: secrets only in files (none shipped, none on a command line), the API on
loopback unless the operator opts in, TLS through the `tls` profile, start periods, memory limits and
log rotation, one healthcheck per image."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from rigl_core.cli import build_parser
from helpers.compose_podman import interpolate
from helpers.service import (JOB, REDIS, ROOT, cleanup_redis_queue, postgres_available, redis_available, stop,
                            temporary_postgres_database, wait_for)
from store.settings import Settings

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
ENV_EXAMPLE = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
SECRET_NAME = re.compile(r"PASSWORD|SECRET_|TOKEN|_AUTH\b|CREDENTIAL", re.I)
# What the file used to take from .env, and the S3 keys: none may reach a command line once interpolated
SECRET_VARIABLES = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "FLOWER_BASIC_AUTH", "GRAFANA_ADMIN_PASSWORD",
                    "RIGL_METRICS_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def test_services_and_profiles():
    assert {"redis", "postgres", "api", "worker-gpu0", "worker-cpu", "flower"} <= set(SERVICES)
    assert SERVICES["worker-cpu"]["profiles"] == ["cpu"]
    assert SERVICES["flower"]["profiles"] == ["flower"]
    assert SERVICES["flower"]["secrets"] == ["redis_password", "flower_basic_auth"]  # basic auth on, from its file
    assert 'FLOWER_BASIC_AUTH="$$(cat /run/secrets/flower_basic_auth)"' in SERVICES["flower"]["command"][0]


def test_redis_is_durable_private_and_authenticated():
    """Its password in a config file (`requirepass`, docker/make-secrets.sh writes it), not `--requirepass`."""
    redis = SERVICES["redis"]
    command = " ".join(redis["command"])
    for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert flag in command
    assert redis["command"][:2] == ["redis-server", "/run/secrets/redis_conf"] and "redis_conf" in redis["secrets"]
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
    return [gpu for device in devices
            for gpu in device.get("device_ids", ["all"] if device.get("count") == "all" else [])]


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
        if _gpus(service) and "ray" not in service.get("profiles", []):
            assert service["environment"]["RIGL_WORKER_DEVICES"] == str(len(_gpus(service))), name
            assert service["command"] == SERVICES["worker-gpu0"]["command"], name
            assert service["stop_grace_period"] == "3m" and "inspect ping" in " ".join(service["healthcheck"]["test"])
            assert service["environment"]["RIGL_DATABASE_URL"] == SERVICES["api"]["environment"]["RIGL_DATABASE_URL"]


def test_the_ray_profile_adds_a_head_and_a_gpu_node_from_the_worker_image():
    """Jobs on several nodes: the Ray cluster beside the service, from the image that has the ray extra;
    every worker and the API learn its address from RIGL_RAY_ADDRESS."""
    ray = {name: s for name, s in _active("ray").items() if "ray" in s.get("profiles", [])}
    assert sorted(ray) == ["ray-gpu-worker", "ray-head"]
    for service in ray.values():
        assert service["image"] == SERVICES["worker-gpu0"]["image"] and service["command"][:2] == ["ray", "start"]
        assert service["environment"]["RIGL_DATABASE_URL"] == SERVICES["api"]["environment"]["RIGL_DATABASE_URL"]
    head, node = ray["ray-head"], ray["ray-gpu-worker"]
    assert "--head" in head["command"] and "--ray-client-server-port=10001" in head["command"]
    assert "--num-gpus=0" in head["command"] and "ports" not in head  # the compose network only
    assert "--address=ray-head:6379" in node["command"] and _gpus(node) == ["all"]
    assert node["depends_on"]["ray-head"]["condition"] == "service_healthy"
    for name in ("api", "worker-gpu0", "worker-cpu"):
        assert SERVICES[name]["environment"]["RIGL_RAY_ADDRESS"] == "${RIGL_RAY_ADDRESS:-}"
    assert 'pip install ".[ray]"' in (ROOT / "docker" / "worker.Dockerfile").read_text()


IMAGE_VARIABLES = {"RIGL_VERSION", "RIGL_IMAGE_PREFIX"}  # compose's own: which released images it runs


def test_every_rigl_variable_is_a_setting_and_every_env_example_entry_is_used():
    fields = {f"RIGL_{name.upper()}" for name in Settings.model_fields}
    fields |= {f"{field}_FILE" for field in fields}  # any setting may be read from a file (store/secret_settings.py)
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"\b(RIGL_[A-Z0-9_]+)\s*:", text)) - IMAGE_VARIABLES
    assert used and used <= fields, used - fields
    referenced = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    assert set(ENV_EXAMPLE) <= referenced, set(ENV_EXAMPLE) - referenced
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    assert required <= set(ENV_EXAMPLE)


def test_no_secret_is_shipped_or_taken_from_variables():
    """.env.example holds no password or token (it shipped `change-me-…` ones, and a stack started with
    them); the compose file takes none from variables: each service gets its secrets as files that
    docker/make-secrets.sh writes at random, and only those it lists. The S3 keys are the exception:
    the operator's (blank by default), given as boto3's and MinIO's standard variables."""
    shipped = {key: value for key, value in ENV_EXAMPLE.items() if SECRET_NAME.search(key) and value}
    assert not shipped, shipped
    assert "change-me" not in (ROOT / ".env.example").read_text().lower()
    text = (ROOT / "docker-compose.yml").read_text()
    taken = {name for name in re.findall(r"\$\{([A-Z0-9_]+)", text) if SECRET_NAME.search(name)}
    assert taken <= {"AWS_SECRET_ACCESS_KEY"}, taken
    names = {"postgres_password", "redis_password", "redis_conf", "metrics_token", "flower_basic_auth",
             "grafana_admin_password"}
    assert set(COMPOSE["secrets"]) == names
    for name, secret in COMPOSE["secrets"].items():
        assert secret == {"file": f"${{SECRETS_DIR:-./secrets}}/{name.replace('_conf', '.conf')}"}, name
    for name in ("api", "worker-gpu0", "worker-cpu", "worker-8gpu"):
        assert {"postgres_password", "redis_password"} <= set(SERVICES[name]["secrets"]), name
        environment = SERVICES[name]["environment"]
        assert environment["RIGL_DATABASE_PASSWORD_FILE"] == "/run/secrets/postgres_password"
        assert environment["RIGL_BROKER_PASSWORD_FILE"] == "/run/secrets/redis_password"
        for url in interpolate([environment["RIGL_DATABASE_URL"], environment["RIGL_BROKER_URL"]], ENV_EXAMPLE):
            assert urlsplit(url).password is None, url
    assert SERVICES["api"]["environment"]["RIGL_METRICS_TOKEN_FILE"] == "/run/secrets/metrics_token"
    assert SERVICES["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    grafana = {"GF_SECURITY_ADMIN_PASSWORD__FILE": "/run/secrets/grafana_admin_password"}
    assert SERVICES["grafana"]["environment"] == grafana
    prometheus = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["authorization"] == {"credentials_file": "/run/secrets/metrics_token"}
    assert SERVICES["prometheus"]["secrets"] == ["metrics_token"]


def test_no_secret_on_any_command_line():
    """With every variable that ever held a secret set, none reaches a command, entrypoint or healthcheck
    (`--requirepass`, Flower's broker URL and basic auth, mc's keys all did: `ps` shows them to every user of
    the host), nor a shell variable there that would put one on a command line; and none of ours reaches
    an environment either."""
    env = {**ENV_EXAMPLE, **{name: f"leaked-{name.lower()}" for name in SECRET_VARIABLES}}
    for name, service in interpolate(SERVICES, env).items():
        for key in ("command", "entrypoint", "healthcheck"):
            text = json.dumps(service.get(key))
            assert "leaked-" not in text, (name, key, text)
            referenced = {ref for ref in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text) if SECRET_NAME.search(ref)}
            assert not referenced, (name, key, referenced)
        for key, value in (service.get("environment") or {}).items():
            s3 = key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
                         "MC_HOST_local")
            assert s3 or "leaked-" not in str(value), (name, key, value)


def test_published_ports_are_loopback_unless_the_operator_opts_in():
    """The API (and Flower, Prometheus, Grafana) on 127.0.0.1; API_BIND=0.0.0.0 publishes the API on every
    interface, plain HTTP; the tls profile's Caddy is what serves other machines. The API answers named
    hosts only (localhost, `api` on the compose network), no longer any (`*`)."""
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            if name == "caddy":
                assert port.startswith("${TLS_BIND:-0.0.0.0}:") and port.split(":")[-1] in ("443", "80"), port
            else:
                assert port.startswith(("127.0.0.1:", "${API_BIND:-127.0.0.1}:")), (name, port)
    assert interpolate(SERVICES["api"]["ports"], ENV_EXAMPLE) == ["127.0.0.1:8000:8000"]
    assert interpolate(SERVICES["api"]["ports"], {}) == ["127.0.0.1:8000:8000"]  # no .env at all
    assert interpolate(SERVICES["api"]["ports"], {**ENV_EXAMPLE, "API_BIND": "0.0.0.0"}) == ["0.0.0.0:8000:8000"]
    for env in (ENV_EXAMPLE, {}):
        hosts = interpolate(SERVICES["api"]["environment"]["RIGL_ALLOWED_HOSTS"], env).split(",")
        assert hosts == ["localhost", "api"], hosts


def test_tls_profile_puts_caddy_in_front_of_the_api():
    """Validated here and by `docker-compose config` (no registry to pull Caddy from on this machine)."""
    caddy = SERVICES["caddy"]
    assert caddy["profiles"] == ["tls"] and caddy["image"].startswith("${CADDY_IMAGE:-caddy:2")
    assert "./docker/Caddyfile:/etc/caddy/Caddyfile:ro" in caddy["volumes"]
    assert "caddydata:/data" in caddy["volumes"]  # its certificates survive a restart
    assert caddy["depends_on"] == {"api": {"condition": "service_healthy"}}
    assert caddy["environment"] == {"TLS_DOMAIN": "${TLS_DOMAIN:-localhost}"}
    site = [line.strip() for line in (ROOT / "docker" / "Caddyfile").read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    assert site[0] == "{$TLS_DOMAIN} {" and "reverse_proxy api:8000" in site and site[-1] == "}"
    assert ENV_EXAMPLE["TLS_DOMAIN"] == "localhost"


def test_start_periods_memory_limits_and_log_rotation():
    """Healthchecks give a starting service time (failures in start_period don't count); every
    long-running service has a memory limit; every container's log rotates by size."""
    for name, service in SERVICES.items():
        if "healthcheck" in service:
            assert "start_period" in service["healthcheck"], name
        logging = service["logging"]
        assert logging["driver"] == "json-file" and set(logging["options"]) == {"max-size", "max-file"}, name
        if service.get("restart") != "no":
            assert "mem_limit" in service, name
    limits = interpolate({name: s["mem_limit"] for name, s in SERVICES.items() if "mem_limit" in s}, ENV_EXAMPLE)
    assert _bytes(limits["worker-8gpu"]) >= 8 * _bytes(limits["worker-gpu1"])
    assert _bytes(limits["api"]) >= 2 * 1024**3 and _bytes(limits["redis"]) >= 512 * 1024**2
    assert interpolate(SERVICES["api"]["logging"]["options"], ENV_EXAMPLE) == {"max-size": "20m", "max-file": "5"}


def _image_healthcheck(dockerfile: str) -> tuple[dict[str, str], str]:
    """A Dockerfile's HEALTHCHECK: its options and its (shell-form) command."""
    text = (ROOT / "docker" / dockerfile).read_text().replace("\\\n", " ")
    line = re.search(r"^HEALTHCHECK (.*)$", text, flags=re.M).group(1)
    options, _, command = line.partition(" CMD ")
    return dict(re.findall(r"--([a-z-]+)=(\S+)", options)), command.strip()


def test_image_and_compose_run_the_same_healthcheck():
    """One probe per image: compose's healthcheck is the image's HEALTHCHECK (the API's was /healthz in the
    image and /readyz in compose), with the same timings."""
    for dockerfile, service in (("api.Dockerfile", "api"), ("worker.Dockerfile", "worker-gpu0")):
        options, command = _image_healthcheck(dockerfile)
        check = SERVICES[service]["healthcheck"]
        assert check["test"] == ["CMD-SHELL", command.replace("$", "$$")], (dockerfile, check["test"], command)
        assert options == {"interval": check["interval"], "timeout": check["timeout"],
                           "retries": str(check["retries"]), "start-period": check["start_period"]}, dockerfile
    assert "/readyz" in _image_healthcheck("api.Dockerfile")[1]


def _make_secrets(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(ROOT / "docker" / "make-secrets.sh")], capture_output=True, text=True,
                          env={**os.environ, "SECRETS_DIR": str(folder)}, timeout=60)


def test_make_secrets_writes_random_secrets_once_and_refuses_placeholders(tmp_path):
    """Every file the compose file's `secrets:` name, random and distinct, in a folder only its owner
    enters; a second run keeps them (PostgreSQL keeps the password it started with); a placeholder is refused."""
    folder = tmp_path / "secrets"
    made = _make_secrets(folder)
    assert made.returncode == 0, made.stderr
    files = {path.name: path.read_text() for path in folder.iterdir()}
    assert set(files) == {Path(secret["file"]).name for secret in COMPOSE["secrets"].values()}
    values = [value.strip().removeprefix("admin:") for name, value in files.items() if name != "redis.conf"]
    assert len(set(values)) == len(values) and all(re.fullmatch(r"[0-9a-f]{64}", value) for value in values)
    assert files["redis.conf"] == f"requirepass {files['redis_password'].strip()}\n"
    assert files["flower_basic_auth"].startswith("admin:")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    again = _make_secrets(folder)
    assert again.returncode == 0 and {path.name: path.read_text() for path in folder.iterdir()} == files
    (folder / "postgres_password").write_text("change-me-postgres\n")
    refused = _make_secrets(folder)
    assert refused.returncode != 0 and "placeholder" in refused.stderr


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
        # `rigl serve` / `rigl worker` need the service extra; otel: traces when OTEL_* asks (docs/operations/tracing.md)
        assert 'RUN pip install ".[service,otel]"' in text
        cmd = re.search(r'^CMD (\[.*\])', text, flags=re.M).group(1)
        assert parser.parse_args(yaml.safe_load(cmd)[1:]).handler is not None


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose not installed")
def test_docker_compose_config_accepts_the_file(tmp_path):
    result = subprocess.run(["docker-compose", "--env-file", ".env.example", "--profile", "cpu", "--profile",
                             "flower", "--profile", "tls", "--profile", "monitoring", "--profile", "s3", "config"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]
    published = {name: [str(port) for port in service.get("ports", [])] for name, service in resolved.items()}
    assert {name for name, ports in published.items() if ports} == {"api", "flower", "prometheus", "grafana", "caddy"}
    for name, ports in published.items():  # loopback, but for the TLS proxy's HTTPS (and its redirect)
        expected = ("0.0.0.0:443:443/tcp", "0.0.0.0:80:80/tcp") if name == "caddy" else ()
        assert all(port.startswith("127.0.0.1:") or port in expected for port in ports), (name, ports)
    assert resolved["caddy"]["depends_on"] == {"api": {"condition": "service_healthy"}}
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
        for key, value in worker["environment"].items():  # the secret files are compose's: not here
            if key.startswith("RIGL_") and "${" not in str(value) and not key.endswith("_FILE"):
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
            resolved, total, plan = resolve(spec, store, Artifacts(settings.artifact_dir), settings, None)
            job = store.create_job(JOB, resolved, total, plan=plan)
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
    assert "COPY api ./api" in dockerfile and 'RUN pip install ".[service,otel]"' in dockerfile


def test_worker_metrics_ports_stay_on_the_compose_network_and_want_the_token():
    """Workers listen on 127.0.0.1 by default; compose opens their port to its own network only (no `ports:`),
    hands them the metrics token, and Prometheus sends it to them as to the API."""
    for name in ("worker-gpu0", "worker-gpu1", "worker-cpu", "worker-8gpu"):
        service = SERVICES[name]
        assert service["environment"]["RIGL_WORKER_METRICS_HOST"] == "0.0.0.0", name
        assert service["environment"]["RIGL_METRICS_TOKEN_FILE"] == "/run/secrets/metrics_token", name
        assert "metrics_token" in service["secrets"] and "ports" not in service, name
    assert Settings().worker_metrics_host == "127.0.0.1"
    prometheus = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    worker_job = next(job for job in prometheus["scrape_configs"] if job["job_name"] == "rigl-worker")
    assert worker_job["authorization"] == {"credentials_file": "/run/secrets/metrics_token"}
