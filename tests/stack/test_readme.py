"""README stays true: every command block runs here, in order, against a real `rigl serve`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers.service import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def commands(block: str) -> list[str]:
    return [line for line in block.splitlines() if line and not line.startswith("#")]


BASH = blocks("bash")
PYTHON = blocks("python")
SERVE, TEST, CURL, LOCAL_TRAIN, TUTORIAL, PLAN, TRAIN_LENET = BASH[:7]
REPORT = next(block for block in BASH if "rigl report runs/" in block)
OWN_LOOP = next(block for block in PYTHON if "from rigl_core import RigL" in block)
OWN_LOOP_FP16 = next(block for block in PYTHON if "rigl.step(scaler=scaler)" in block)
ACCELERATE = next(block for block in PYTHON if "accelerator.prepare" in block)


def test_two_setup_commands_and_ci():
    assert commands(SERVE) == ['pip install -e ".[service]" && rigl serve']
    assert commands(TEST) == ['pip install -e ".[test]" && pytest']
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands(TEST)[0] in ci


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """README's service command, on a free port and a temporary data dir."""
    root = tmp_path_factory.mktemp("readme")
    port = free_port()
    serve = commands(SERVE)[0].split("&& ", 1)[1] + f" --port {port} --data-dir {root / 'data'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIGL_")}
    server = subprocess.Popen(serve, shell=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)

    def ready():
        return subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/readyz"], capture_output=True).returncode == 0

    try:
        wait_for(ready, 60, what="rigl serve")
        yield port, {**env, "RIGL_API_URL": f"http://127.0.0.1:{port}"}, root
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=30)


def run_shell(script: str, port: int, env: dict, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    script = script.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    result = subprocess.run(["bash", "-e", "-c", script], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


@pytest.mark.slow
def test_quick_start_curl_submits(served, tmp_path):
    port, env, _ = served
    job = json.loads(run_shell(CURL, port, env, tmp_path).stdout)
    assert job["status"] == "queued" and job["spec"]["sparsity"]["sparsity"] == 0.9


@pytest.mark.slow
def test_quick_start_job_reaches_93_percent_with_several_mask_updates(tmp_path):
    """Issue 14: the first job a newcomer runs must show RigL working, not one mask update and 25%."""
    from rigl_core.training.run import run_training
    from rigl_core.spec import JobSpec

    spec = JobSpec.model_validate(json.loads(re.search(r"-d '(\{.*\})'", CURL).group(1)))
    assert spec.sparsity.method == "rigl" and spec.sparsity.sparsity == 0.9
    report = run_training(spec, tmp_path / "quick", progress=False)
    updates = len(range(0, report["t_end"], report["delta_t"]))
    assert report["final_metrics"]["val_accuracy"] >= 0.93 and updates >= 5, (report["final_metrics"], updates)
    assert report["schedule_warnings"] == [] and abs(report["totals"]["sparsity"] - 0.9) < 0.002
    assert report["train_seconds"] < 30


@pytest.mark.slow
def test_tutorial_end_to_end(served, tmp_path):
    """plan → submit → watch → report → download in bash, then the plain-PyTorch loader and the client."""
    port, env, _ = served
    result = run_shell(TUTORIAL, port, env, tmp_path)
    assert "fc1" in result.stdout and '"final": true' in result.stdout  # plan table, final report
    assert (tmp_path / "model.safetensors").exists()
    loader = subprocess.run([sys.executable, "-c", PYTHON[0]], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert loader.returncode == 0, loader.stderr
    assert "sparsity 0.900" in loader.stdout and "torch.Size([1, 10])" in loader.stdout
    client = subprocess.run([sys.executable, "-c", PYTHON[1] + "\nprint(types[0], types[-1])"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert client.returncode == 0, client.stderr
    assert client.stdout.split()[-2:] == ["status", "status"]
    assert (tmp_path / "model.packed.safetensors").exists()


@pytest.mark.slow
def test_local_train_plan_and_lenet_commands(tmp_path):
    for block in (LOCAL_TRAIN, TRAIN_LENET):
        script = block.replace("--epochs 20", "--epochs 2").replace("--epochs 10", "--epochs 2")
        script = script.replace("runs/", f"{tmp_path}/")
        run_shell(script, 0, dict(os.environ), ROOT)
    report = json.loads((tmp_path / "first" / "report.json").read_text())
    assert abs(report["totals"]["sparsity"] - 0.9) < 0.002
    assert (tmp_path / "lenet" / "model.packed.safetensors").exists()
    plan = run_shell(PLAN, 0, dict(os.environ), ROOT)
    assert abs(json.loads(plan.stdout)["totals"]["inference_flops_ratio"] - 0.242) < 0.01


@pytest.mark.slow
def test_report_command_draws_the_png(tmp_path):
    script = REPORT.replace("--epochs 10", "--epochs 2").replace("runs/", f"{tmp_path}/")
    assert "rigl report" in script
    run_shell(script, 0, dict(os.environ), ROOT)
    from PIL import Image

    with Image.open(tmp_path / "digits" / "report.png") as image:
        assert image.width >= 1200 and len(image.convert("RGB").getcolors(maxcolors=1 << 24)) > 50


def test_readme_numpy_reader_and_library_example(tmp_path):
    reader, example = PYTHON[2], PYTHON[3]
    scope: dict = {}
    exec(example, scope)  # trains 2 epochs
    assert scope["report"]["totals"]["sparsity"] > 0.89
    from rigl_core.training.run import run_training
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


def test_readme_own_training_loop(tmp_path, monkeypatch):
    """The three-line RigL loop trains to the target sparsity leak-free, resumes from its checkpoint,
    and goes on under fp16 with a GradScaler."""
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(OWN_LOOP, scope)
    rigl, report = scope["rigl"], scope["report"]
    assert abs(report["totals"]["sparsity"] - 0.9) < 0.002 and report["leak_check"]["ok"]
    assert rigl.step_count == scope["epochs"] * scope["steps_per_epoch"]
    assert (tmp_path / "checkpoint.pt").exists()
    exec(OWN_LOOP_FP16, scope)
    assert rigl.report()["leak_check"]["ok"] and all(torch.isfinite(p).all() for p in scope["model"].parameters())


def test_readme_accelerate_loop_runs_with_accumulation():
    """README's Accelerate loop, run as written on CPU with 2 accumulation micro-batches: masks exact."""
    from accelerate import Accelerator
    from torch import nn

    from rigl_core import RigL

    torch.manual_seed(0)
    x, y = torch.randn(256, 20), torch.randint(0, 4, (256,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    scope = {"accelerator": Accelerator(cpu=True, gradient_accumulation_steps=2), "model": model,
             "optimizer": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "loader": loader,
             "loss_fn": nn.functional.cross_entropy, "num_optimizer_steps": len(loader) // 2, "RigL": RigL}
    exec(ACCELERATE, scope)
    report = scope["rigl"].report()
    assert report["leak_check"]["ok"] and abs(report["totals"]["sparsity"] - 0.9) < 0.01
    assert scope["rigl"].step_count == len(loader) // 2  # one rigl.step() per optimizer step


def test_readme_architecture_example_is_valid(tmp_path):
    from rigl_core.cli import main

    (example,) = blocks("json")
    path = tmp_path / "arch.json"
    path.write_text(example)
    assert main(["plan", "--architecture", str(path), "--sparsity", "0.9", "--json"]) == 0


def test_jobspec_reference_is_generated_and_current():
    from rigl_core.docs import END, START, reference

    section = README[README.index(START): README.index(END) + len(END)]
    assert section == reference(), "run `python -m rigl_core.docs` to refresh README"
    assert "`sparsity.schedule.delta_t`" in section and "`training.device`" in section
