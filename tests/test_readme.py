"""README stays true: its two set-up commands, its code blocks, and CI calling the test command."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def commands() -> list[str]:
    return [line for block in blocks("bash") for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readme_test_command():
    test_command = commands()[1]
    assert test_command == 'pip install -e ".[test]" && pytest'
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def test_quick_start_serve_command_and_curl_submit(tmp_path):
    """Runs README's service command (on a free port and a temporary data dir) and its curl line."""
    import os
    import signal
    import sys
    import time

    sys.path.insert(0, str(ROOT / "tests"))
    from service_helpers import free_port, wait_for

    run_command = commands()[0]
    assert run_command == "pip install -e . && rigl serve"
    port = free_port()
    serve = run_command.split("&& ", 1)[1] + f" --port {port} --data-dir {tmp_path / 'data'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIGL_")}
    server = subprocess.Popen(serve, shell=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def ready():
            probe = subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/readyz"], capture_output=True)
            return probe.returncode == 0

        wait_for(ready, 60, what="rigl serve")
        curl = commands()[2].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        job = json.loads(subprocess.run(curl, shell=True, capture_output=True, text=True, check=True).stdout)
        assert job["status"] == "queued"

        def finished():
            out = subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/v1/jobs/{job['id']}"],
                                 capture_output=True, text=True).stdout
            return json.loads(out)["status"] in ("succeeded", "failed") and json.loads(out)

        assert wait_for(finished, 120, what="the job")["status"] == "succeeded"
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=30)
        time.sleep(0.1)


def test_local_train_command_trains(tmp_path):
    train = commands()[3]
    assert train.startswith("rigl train")
    train = train.replace("--epochs 20", "--epochs 2").replace("runs/first", str(tmp_path / "first"))
    proc = subprocess.run(train, shell=True, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "first" / "report.json").read_text())
    assert abs(report["totals"]["sparsity"] - 0.9) < 0.002


def test_plan_command_in_readme(tmp_path):
    plan = commands()[4]
    assert plan.startswith("rigl plan")
    proc = subprocess.run(plan, shell=True, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert abs(json.loads(proc.stdout)["totals"]["inference_flops_ratio"] - 0.242) < 0.01


def test_readme_numpy_reader_and_library_example(tmp_path):
    python_blocks = blocks("python")
    reader, example = python_blocks[0], python_blocks[1]
    scope: dict = {}
    exec(example, scope)  # trains 2 epochs
    report = scope["report"]
    assert report["totals"]["sparsity"] > 0.89
    from rigl_core.run import run_training
    from rigl_core.spec import JobSpec

    spec = JobSpec.model_validate({"model": {"name": "mlp", "hidden_sizes": [32]}, "dataset": {"name": "digits"},
                                   "training": {"epochs": 1}})
    run_training(spec, tmp_path)
    exec(reader, scope)
    arrays = scope["read_packed"](tmp_path / "model.packed.safetensors")
    dense = load_file(str(tmp_path / "model.safetensors"))
    assert set(arrays) == set(dense)
    for name, tensor in dense.items():
        np.testing.assert_array_equal(arrays[name], tensor.numpy())
    assert torch.is_tensor(dense["fc1.weight"])


def test_readme_architecture_example_is_valid(tmp_path):
    from rigl_core.cli import main

    (example,) = blocks("json")
    path = tmp_path / "arch.json"
    path.write_text(example)
    assert main(["plan", "--architecture", str(path), "--sparsity", "0.9", "--json"]) == 0
