"""Packaging: `pip install rigl-service` brings six packages, the rest are extras, and the library's
own path (import, `rigl train` on synthetic data) works without any extra installed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from rigl_core.optional import MissingExtra, require

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CORE = {"torch", "torchvision", "pydantic", "safetensors", "numpy", "tqdm"}
# Packages of the extras that library users must not get, and what stands for them in sys.modules.
BLOCKED = ["fastapi", "celery", "sqlalchemy", "sklearn", "matplotlib", "httpx", "yaml", "uvicorn",
           "pydantic_settings", "mnist1d", "starlette", "psycopg", "alembic", "redis", "kombu", "boto3",
           "botocore", "prometheus_client", "mlflow", "optuna", "ray", "opentelemetry"]


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower().replace("_", "-")


def _extra(name: str, seen: frozenset = frozenset()) -> set[str]:
    """The package names an extra brings, following `rigl-service[a,b]` self-references."""
    names = set()
    for requirement in PROJECT["optional-dependencies"][name]:
        if _name(requirement) == PROJECT["name"]:
            for inner in re.search(r"\[(.*)\]", requirement).group(1).split(","):
                assert inner.strip() not in seen, f"extra {name!r} refers to itself"
                names |= _extra(inner.strip(), seen | {name})
        else:
            names.add(_name(requirement))
    return names


def test_core_dependencies_are_exactly_the_six():
    assert {_name(r) for r in PROJECT["dependencies"]} == CORE


def test_extras_cover_the_rest_and_test_brings_them_all():
    extras = PROJECT["optional-dependencies"]
    for name in ("datasets", "report", "client", "service", "models", "lightning", "otel", "test"):
        assert name in extras, name
    assert {"scikit-learn", "mnist1d"} <= _extra("datasets")
    assert "matplotlib" in _extra("report")
    assert {"httpx", "pyyaml"} <= _extra("client")
    assert {"fastapi", "celery", "sqlalchemy", "uvicorn", "httpx"} <= _extra("service")
    assert _extra("datasets") | _extra("report") | _extra("client") <= _extra("service")
    assert {"opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http"} <= _extra("otel")
    wanted = _extra("service") | _extra("report") | _extra("datasets") | _extra("client") | _extra("otel")
    assert wanted <= _extra("test"), wanted - _extra("test")
    assert "build" in _extra("test")  # CI builds the wheel and sdist with it
    assert _extra("ray") == {"ray"} and "ray" in _extra("test")  # the multi-node tests run in CI
    assert not CORE & _extra("test"), "an extra pins a core package again"


def test_python_and_torch_ranges_match_what_runs_here():
    from importlib.metadata import version

    assert PROJECT["requires-python"] == ">=3.11,<3.14"
    for minor in (11, 12, 13):
        assert f"Programming Language :: Python :: 3.{minor}" in PROJECT["classifiers"]
    assert sys.version_info[:2] in {(3, 11), (3, 12), (3, 13)}
    specs = {_name(r): SpecifierSet(r[len(_name(r)):].split(";")[0].split("#")[0].strip())
             for r in PROJECT["dependencies"]}
    for package in ("torch", "torchvision"):
        installed = version(package).split("+")[0]
        assert specs[package].contains(installed), f"{package} {installed} is outside {specs[package]}"
        assert all(s.operator != "==" for s in specs[package]), package  # a range, not one release
    assert not specs["torch"].contains("2.15.0")  # an untested major change is never admitted


def test_require_names_the_extra_to_install():
    with pytest.raises(MissingExtra) as info:
        require("rigl_no_such_package.sub", "datasets", "dataset 'x'")
    message = str(info.value)
    assert message.startswith("dataset 'x' needs the 'datasets' extra")
    assert 'pip install "rigl-service[datasets]"' in message
    assert isinstance(info.value, ImportError)  # plugin loaders that catch ImportError still do
    assert require("json", "client", "json").dumps([]) == "[]"


CORE_ONLY = r"""
import contextlib, io, json, sys, tempfile
for name in BLOCKED:
    sys.modules[name] = None  # what an absent package looks like to `import` and to find_spec

import rigl_core
import rigl_core.training.trainer
from rigl_core.training.trainer import Trainer
from rigl_core.cli import main

def run(*argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return code, err.getvalue().strip().splitlines()[-1:] if err.getvalue().strip() else []

out = tempfile.mkdtemp()
result = {
    "train": run("train", "--model", "mlp", "--dataset", "synthetic", "--epochs", "1", "--out", out,
                 "--set", "dataset.num_samples=256", "--set", "training.batch_size=64"),
    "digits": run("train", "--model", "mlp", "--dataset", "digits", "--epochs", "1", "--out", out + "/d"),
    "report": run("report", out, "--png", out + "/r.png"),
    "serve": run("serve", "--help"),
    "status": run("status", "job_0123"),
    "loaded": sorted(n for n in BLOCKED if sys.modules.get(n) is not None),
}
print(json.dumps(result))
"""


@pytest.mark.slow
def test_library_path_works_with_only_the_core_dependencies(tmp_path):
    """Hides the extras' packages as if not installed: import, training and the hints still work."""
    script = f"BLOCKED = {BLOCKED!r}\n" + CORE_ONLY
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["train"][0] == 0, result["train"]
    assert result["loaded"] == []
    hints = {"digits": "datasets", "report": "report", "serve": "service", "status": "client"}
    for command, extra in hints.items():
        code, lines = result[command]
        assert code == 2, (command, result[command])
        assert len(lines) == 1 and f'pip install "rigl-service[{extra}]"' in lines[0], (command, lines)
