"""The compose stack, built and run end to end in containers (podman; no Docker engine needed).

Builds the API and worker images from docker/*.Dockerfile, starts redis, postgres, api and one
worker-cpu the way docker-compose.yml describes them (`--profile cpu --scale worker-gpu0=0`; the
podman commands come from the file itself, tests/helpers/compose_podman.py says how and what differs from
`docker compose`), with the secrets an operator makes (`sh docker/make-secrets.sh`), waits for every
healthcheck, checks that no secret is in any container's command line or environment and that the API
is published on 127.0.0.1 only (the file's defaults), creates an API key with the documented command
(`rigl keys create` in the api container), submits a job with the client, restarts the worker
container mid-job (SIGTERM: checkpoint, requeue) and sees the job resume and succeed, downloads its
checkpoint, and tears everything down, this run's image tags included.

No registry is reachable where this runs, so the images come from local sources: a Debian bookworm
rootfs made by mmdebstrap (Python 3.11, cached as a podman image between runs) is the BASE_IMAGE of
both Dockerfiles, the Redis and PostgreSQL images are tests/stack/containers/*.Dockerfile (Debian's
packages, standing in for redis:7-alpine and postgres:16-alpine through REDIS_IMAGE / POSTGRES_IMAGE),
and pip inside a build uses this machine's pip configuration (its local wheel folders and indexes
mounted read-only, its CA bundle for the package index). Both images get the worker's torch (PyPI's
build) with the same build arguments, so they share every layer up to `USER rigl`.
The stack runs on its own bridge network, services by name as in compose; only the API is published,
on 127.0.0.1 (API_BIND's default) and a free port. The worker gets OMP_NUM_THREADS=1: with torch's two
threads on CI's two shared cores its OpenMP threads spin against the other jobs' processes and this small
job trains ~20 times slower (21 against 412 steps/s measured under load), which is what once stretched
its run to ~15 minutes. Needs a working podman and mmdebstrap (CI installs them:
.ci/containers.sh); without them this skips, unless RIGL_REQUIRE_CONTAINERS=1 (CI), where it fails.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from helpers.compose_podman import Stack, podman
from helpers.service import JOB, ROOT, free_port, job_history

REQUIRED = os.environ.get("RIGL_REQUIRE_CONTAINERS") == "1"
DOCKERFILES = Path(__file__).resolve().parent / "containers"  # the Redis and PostgreSQL images
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_IMAGE = f"localhost/rigl-test-base:bookworm-{hashlib.sha256(' '.join(BASE_PACKAGES).encode()).hexdigest()[:8]}"
RUN_TAG = f"test-{uuid.uuid4().hex[:8]}"  # this run's images: a second run on the same podman store has its own
REDIS_IMAGE, POSTGRES_IMAGE = f"localhost/rigl-test-redis:{RUN_TAG}", f"localhost/rigl-test-postgres:{RUN_TAG}"
# Bounded by its steps: 107 s from submission to success, restart included, with one torch thread at a load
# average of 9 on 2 cores (bench/results/compose_stack.md). The restart is triggered once the job reports a
# step past RESTART_AFTER_STEP and lands within seconds (the heartbeat that carries the step and the preempt
# flag beats every second): 150 steps later there, 1,500-1,800 steps later on an idle machine, far from the end.
LONG_JOB = {**JOB, "training": {"epochs": 500, "max_steps": 10_000, "batch_size": 64, "eval_every_epochs": 100}}
RESTART_AFTER_STEP = 100  # past the first periodic checkpoint (RIGL_CHECKPOINT_EVERY_STEPS=100 below)
STALL_SECONDS = 300  # the job is stuck when neither its status nor its step changed for this long, whatever the load

pytestmark = [pytest.mark.slow, pytest.mark.containers]


def _podman_missing() -> str | None:
    for tool in ("podman", "mmdebstrap"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    info = subprocess.run(["podman", "info"], capture_output=True, text=True, timeout=60)
    return None if info.returncode == 0 else f"podman does not work here: {info.stderr[-500:]}"


@pytest.fixture(scope="module")
def containers():
    """Podman, with CI's settings (.ci/containers.conf) unless CONTAINERS_CONF names others: without
    them no container starts on CI's machine (crun and the default rlimits are refused there)."""
    with pytest.MonkeyPatch.context() as patch:
        if "CONTAINERS_CONF" not in os.environ and shutil.which("runc"):
            patch.setenv("CONTAINERS_CONF", str(ROOT / ".ci" / "containers.conf"))
        missing = _podman_missing()
        if missing and REQUIRED:
            pytest.fail(f"RIGL_REQUIRE_CONTAINERS=1 but {missing}")
        if missing:
            pytest.skip(missing)
        yield


def base_image(tmp_path: Path) -> float:
    """The bookworm base (cached under a tag naming its package list); seconds spent making it."""
    if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return 0.0
    start = time.monotonic()
    rootfs = tmp_path / "rootfs.tar"
    subprocess.run(["mmdebstrap", "--variant=minbase", "--quiet", f"--include={','.join(BASE_PACKAGES)}",
                    "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
                    "--dpkgopt=path-exclude=/usr/share/locale/*", "bookworm", str(rootfs)],
                   check=True, capture_output=True, timeout=600)
    podman("import", str(rootfs), BASE_IMAGE)
    rootfs.unlink()
    return time.monotonic() - start


def pip_build_setup(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """Build-time mounts that give pip in a build this machine's pip settings (local wheel folders and
    indexes, the CA bundle), and the build args of both images: the worker's torch (PyPI's build, its
    Dockerfile default; a local CPU torch wheel has no matching torchvision here, PyPI's torchvision
    needs the CUDA libraries to load, and PyTorch's CPU index may be unreachable) for the API image too,
    so the two share every layer up to `USER rigl` and the second build takes seconds."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    config = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        config[key.rsplit(".", 1)[-1]] = value.strip().strip("'\"")
    mounts, lines = [], ["[global]"]
    if Path(config.get("cert", "")).is_file():
        mounts.append(f"{config['cert']}:/run/rigl-host-ca.crt:ro")
        lines.append("cert = /run/rigl-host-ca.crt")
    find_links = [p for p in config.get("find-links", "").split() if Path(p).is_dir()]
    indexes = [u for u in config.get("extra-index-url", "").split() if u.startswith("file://")]
    for folder in find_links + [str(Path(u.removeprefix("file://")).parent) for u in indexes]:
        mounts.append(f"{folder}:{folder}:ro")
    if find_links:
        lines.append(f"find-links = {' '.join(find_links)}")
    if indexes:
        lines.append(f"extra-index-url = {' '.join(indexes)}")
    (tmp_path / "pip.conf").write_text("\n".join(lines) + "\n")
    mounts.append(f"{tmp_path / 'pip.conf'}:/etc/pip.conf:ro")
    worker = (ROOT / "docker" / "worker.Dockerfile").read_text()
    return mounts, {"TORCH_INDEX_URL": re.search(r"^ARG TORCH_INDEX_URL=(\S+)", worker, re.M).group(1)}


def stack_images(stack: Stack) -> list[str]:
    return [image for image in (BASE_IMAGE, REDIS_IMAGE, POSTGRES_IMAGE, *stack.built_images)
            if podman("image", "exists", image, check=False).returncode == 0]


def follow(client, job_id: str, until, what: str) -> dict:
    """Poll the job until `until(its data)`; fail only if it makes no progress (status, attempt or step)
    for STALL_SECONDS: a loaded machine is slow, not stuck."""
    seen, moved = None, time.monotonic()
    while True:
        data = client.get(job_id).data
        if until(data):
            return data
        now = (data["status"], data.get("attempt"), (data.get("progress") or {}).get("step"))
        if now != seen:
            seen, moved = now, time.monotonic()
        elif time.monotonic() - moved > STALL_SECONDS:
            raise AssertionError(f"no progress for {STALL_SECONDS} s waiting for {what}: {data}")
        time.sleep(0.5)


def make_secrets(folder: Path) -> dict[str, str]:
    """The stack's secrets as an operator makes them (docker/make-secrets.sh); name → value."""
    made = subprocess.run(["sh", str(ROOT / "docker" / "make-secrets.sh")], capture_output=True, text=True,
                          env={**os.environ, "SECRETS_DIR": str(folder)}, timeout=60)
    assert made.returncode == 0, made.stderr
    return {path.name: path.read_text().strip() for path in folder.iterdir()}


def assert_no_secret_exposed(stack: Stack, secrets: dict[str, str]) -> None:
    """No password or token in what `podman inspect` shows of a container (its command, entrypoint,
    environment, healthcheck) nor in the command line of its main process: they are files in /run/secrets."""
    for name in stack.services:
        inspected = podman("inspect", stack.container(name)).stdout
        assert "/run/secrets/" in inspected, name  # it was given its secrets, as files
        shown = inspected + podman("exec", stack.container(name), "cat", "/proc/1/cmdline").stdout
        leaked = [secret for secret, value in secrets.items() if value in shown]
        assert not leaked, (name, leaked)


def image_mb(image: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip()) // 10**6


@pytest.mark.timeout(1800)  # only a hang reaches it (cold: the base rootfs and every image built from nothing)
def test_compose_stack_trains_restarts_and_serves_a_job(containers, tmp_path):
    from rigl_core.client import TERMINAL, Client

    timings = {"base image": base_image(tmp_path)}
    mounts, torch = pip_build_setup(tmp_path)
    for image, dockerfile in ((REDIS_IMAGE, "redis"), (POSTGRES_IMAGE, "postgres")):
        start = time.monotonic()
        podman("build", "--format", "docker", "-f", str(DOCKERFILES / f"{dockerfile}.Dockerfile"),
               f"--build-arg=BASE_IMAGE={BASE_IMAGE}", "-t", image, str(ROOT))
        timings[f"{dockerfile} image"] = time.monotonic() - start

    env = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in (ROOT / ".env.example").read_text().splitlines()
           if line and not line.startswith("#")}
    (tmp_path / "datasets").mkdir()
    port = free_port()
    env.update({"SECRETS_DIR": str(tmp_path / "secrets"), "API_PORT": str(port),
                "DATASETS_HOST_DIR": str(tmp_path / "datasets"),
                "PYTHON_IMAGE": BASE_IMAGE, "REDIS_IMAGE": REDIS_IMAGE, "POSTGRES_IMAGE": POSTGRES_IMAGE,
                "RIGL_CHECKPOINT_EVERY_STEPS": "100", "RIGL_CHECKPOINT_MIN_SECONDS": "0"})
    secrets = make_secrets(tmp_path / "secrets")
    stack = Stack(ROOT / "docker-compose.yml", env, f"rigl-{RUN_TAG}", profiles=("cpu",),
                  scale_zero=("worker-gpu0",), image_tag=RUN_TAG,
                  extra_environment={"worker-cpu": {"OMP_NUM_THREADS": "1"}})
    assert set(stack.services) == {"redis", "postgres", "api", "worker-cpu"}
    try:
        for name, took in stack.build({image: torch for image in stack.built_images}, mounts).items():
            timings[f"{name} build"] = took
        healthy = stack.up()
        timings["up, until every service is healthy"] = max(healthy.values())
        assert_no_secret_exposed(stack, secrets)
        published = podman("port", stack.container("api")).stdout.split()
        assert published == ["8000/tcp", "->", f"127.0.0.1:{port}"], published
        worker = stack.container("worker-cpu")
        key = stack.exec("api", "rigl", "keys", "create", "--owner", "compose-test").split()[-1]
        assert key.startswith("rigl_key_"), key
        with Client(f"http://127.0.0.1:{port}", api_key=key) as client:
            submitted = time.monotonic()
            job = client.submit(LONG_JOB)
            seen = follow(client, job.id, lambda data: (data.get("progress") or {}).get("step", 0) > RESTART_AFTER_STEP
                          or data["status"] in TERMINAL, "training in the worker container")
            assert seen["status"] == "running", seen  # still training: the restart lands mid-job
            restart = time.monotonic()
            podman("restart", worker, timeout=300)  # SIGTERM within stop_grace_period, then the same container
            timings["worker restart"] = time.monotonic() - restart
            done = follow(client, job.id, lambda data: data["status"] in TERMINAL, "the job to finish")
            timings["job, submitted to succeeded"] = time.monotonic() - submitted
            assert done["status"] == "succeeded", (done.get("error"), stack.logs("worker-cpu"))
            statuses, resumed, _ = job_history(client.http, job.id)
            assert statuses == ["queued", "running", "requeued", "running", "succeeded"], statuses
            assert resumed and resumed[0] > 0 and done["attempt"] == 2, (resumed, done["attempt"])
            assert done["progress"]["total_steps"] == LONG_JOB["training"]["max_steps"], done["progress"]
            checkpoint = client.download(job.id, path=tmp_path)

        from safetensors.torch import load_file

        weights = [t for t in load_file(checkpoint).values() if t.dim() == 2]
        zeros = sum(int((t == 0).sum()) for t in weights) / sum(t.numel() for t in weights)
        assert zeros > 0.8, zeros  # sparsity 0.9 over the layers RigL masks
        print(f"\ncompose stack: restart triggered at step {seen['progress']['step']}, the job resumed from step "
              f"{resumed[0]} of {done['progress']['total_steps']}; healthy after up (s): "
              + ", ".join(f"{k} {v:.1f}" for k, v in healthy.items()))
    except BaseException:
        for name in stack.services:
            print(f"\n--- {name} (last lines of its log)\n{stack.logs(name, tail=200)}")
        raise
    finally:
        print(f"\ncompose stack: images (MB): {({image: image_mb(image) for image in stack_images(stack)})}")
        down = time.monotonic()
        stack.down()
        timings["down"] = time.monotonic() - down
        for image in (REDIS_IMAGE, POSTGRES_IMAGE, *stack.built_images):  # this run's tags; the layers stay cached
            podman("untag", image, image, check=False)
        print("compose stack: seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    for image in (REDIS_IMAGE, POSTGRES_IMAGE, *stack.built_images):
        assert podman("image", "exists", image, check=False).returncode != 0, f"{image} still tagged"
    leftover = podman("ps", "-aq", "--filter", f"label=rigl.stack={stack.project}").stdout.strip()
    assert not leftover and re.search(stack.project, podman("volume", "ls", "-q").stdout) is None
