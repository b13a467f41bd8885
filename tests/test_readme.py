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


def test_quick_start_command_trains(tmp_path):
    run_command = commands()[0]
    assert run_command.startswith("pip install -e . && rigl train")
    train = run_command.split("&& ", 1)[1].replace("--epochs 20", "--epochs 2").replace("runs/first", str(tmp_path / "first"))
    proc = subprocess.run(train, shell=True, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "first" / "report.json").read_text())
    assert abs(report["totals"]["sparsity"] - 0.9) < 0.002


def test_plan_command_in_readme(tmp_path):
    plan = commands()[2]
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
