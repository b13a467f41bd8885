"""The `rigl` command: plan, train, and one-line errors that name the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rigl_core.cli import main


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["rigl", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.slow
def test_plan_json_console_script():
    proc = run_cli("plan", "--model", "resnet50", "--sparsity", "0.9", "--distribution", "erk", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["totals"]["inference_flops_ratio"] == pytest.approx(0.242, abs=0.01)
    assert len(plan["layers"]) == 54
    row = plan["layers"][0]
    assert {"name", "shape", "params", "density", "flops_dense", "flops_sparse"} <= row.keys()
    assert {"sparsity", "inference_flops_ratio", "training_flops_ratio"} <= plan["totals"].keys()


def test_plan_options(capsys):
    assert main(["plan", "--model", "mlp", "--sparsity", "0.9", "--distribution", "uniform", "--num-classes", "10",
                 "--input-shape", "1,8,8", "--method", "static", "--json"]) == 0
    captured = capsys.readouterr()
    plan = json.loads(captured.out)
    assert plan["layers"][0]["masked"] is False  # uniform keeps the first layer dense ...
    assert "whole-network sparsity" in captured.err  # ... and says so out loud
    assert plan["totals"]["training_flops_ratio"] == pytest.approx(plan["totals"]["inference_flops_ratio"])
    assert main(["plan", "--model", "mlp", "--sparsity", "0.9", "--distribution", "uniform",
                 "--no-dense-first-layer", "--input-shape", "1,8,8"]) == 0
    table = capsys.readouterr().out
    assert "fc1" in table and "sparsity 0.9000" in table


@pytest.mark.slow
def test_train_console_script_writes_outputs(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--model", "mlp", "--dataset", "digits", "--method", "rigl", "--sparsity", "0.9",
                   "--distribution", "erk", "--epochs", "2", "--batch-size", "64", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "step" in proc.stderr and "100%" in proc.stderr  # tqdm progress bar
    for name in ("report.json", "metrics.jsonl", "model.safetensors", "model.packed.safetensors"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["sparsity"] == pytest.approx(0.9, abs=0.002)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "eval", "mask_update"} <= {line["type"] for line in lines}


def test_train_with_config_file(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(
        "model: {name: mlp, hidden_sizes: [32]}\n"
        "dataset: {name: synthetic, input_shape: [16], num_samples: 256, num_classes: 4}\n"
        "sparsity: {method: set, sparsity: 0.8, distribution: uniform, schedule: {delta_t: 2}}\n"
        "training: {epochs: 1, batch_size: 32}\n"
    )
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "o"), "--no-progress",
                 "--sparsity", "0.7"]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["spec"]["sparsity"]["sparsity"] == 0.7  # flags override the file
    assert report["method"] == "set"


@pytest.mark.parametrize(
    "args,field",
    [
        (["--sparsity", "1.0"], "sparsity.sparsity"),
        (["--sparsity", "-0.1"], "sparsity.sparsity"),
        (["--model", "resnet9000"], "model.name"),
        (["--dataset", "imagenet"], "dataset.name"),
        (["--epochs", "-2"], "training.epochs"),
        (["--t-end", "1.5"], "sparsity.schedule.t_end"),
        (["--exclude", "fc*"], "sparsity"),
        (["--device", "tpu"], "training.device"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(tmp_path, capsys, args, field):
    base = {"--model": "mlp", "--dataset": "digits", "--epochs": "1"}
    merged = list(args)
    for flag, value in base.items():
        if flag not in args:
            merged += [flag, value]
    code = main(["train", *merged, "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("rigl: error: ")
    assert field in err
    assert "Traceback" not in err


def test_t_end_steps_after_training_and_bad_config(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": {"name": "mlp"}, "dataset": {"name": "digits"},
                                  "sparsity": {"schedule": {"t_end_steps": 100000}}, "training": {"epochs": 1}}))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "sparsity.schedule.t_end_steps" in capsys.readouterr().err
    config.write_text(json.dumps({"model": {"name": "mlp", "colour": "red"}, "dataset": {"name": "digits"}}))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "model.colour" in capsys.readouterr().err
    config.write_text("{not json")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "--config" in capsys.readouterr().err


def test_unknown_method_is_rejected_by_argparse():
    proc = subprocess.run([sys.executable, "-m", "rigl_core.cli", "plan", "--model", "mlp", "--method", "magic"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--method" in proc.stderr


def test_resume_from_cli_checkpoint(tmp_path, capsys):
    out = tmp_path / "o"
    base = ["train", "--model", "mlp", "--dataset", "digits", "--epochs", "2", "--no-progress", "--out", str(out),
            "--checkpoint-every", "10"]
    assert main(base) == 0
    first = json.loads((out / "report.json").read_text())
    assert (out / "checkpoint.pt").exists()
    out2 = tmp_path / "o2"
    assert main([*base[:-3], str(out2), "--resume", str(out / "checkpoint.pt")]) == 0
    second = json.loads((out2 / "report.json").read_text())
    assert second["final_metrics"] == first["final_metrics"]


def test_set_reaches_any_jobspec_field(tmp_path):
    from rigl_core.cli import build_parser, spec_from_args

    args = build_parser().parse_args([
        "train", "--model", "mlp", "--dataset", "digits", "--out", str(tmp_path), "--delta-t", "50",
        "--set", "sparsity.schedule.delta_t=25", "--set", "dataset.val_fraction=0.25",
        "--set", "training.milestones=[0.5, 0.8]", "--set", "sparsity.schedule.decay=linear",
        "--set", "model.hidden_sizes=[32,16]"])
    spec = spec_from_args(args)
    assert spec.sparsity.schedule.delta_t == 25  # --set comes after the named flags
    assert spec.dataset.val_fraction == 0.25 and spec.training.milestones == [0.5, 0.8]
    assert spec.sparsity.schedule.decay == "linear" and spec.model.hidden_sizes == [32, 16]


@pytest.mark.parametrize(("assignment", "message"), [
    ("sparsity.schedule.delta_t", "--set: expected FIELD=VALUE"),
    ("=3", "--set: expected FIELD=VALUE"),
    ("training.no_such_field=1", "training.no_such_field"),
    ("sparsity.sparsity=1.5", "sparsity.sparsity"),
])
def test_bad_set_names_the_field(tmp_path, capsys, assignment, message):
    from rigl_core.cli import main

    code = main(["train", "--model", "mlp", "--dataset", "digits", "--out", str(tmp_path), "--set", assignment])
    assert code == 2 and message in capsys.readouterr().err


def test_plan_takes_set_for_sparsity_and_model_fields_only(capsys):
    from rigl_core.cli import main

    base = ["plan", "--model", "mlp", "--input-shape", "1,8,8", "--json"]
    assert main([*base, "--set", "model.hidden_sizes=[20,10]", "--set", "sparsity.sparsity=0.8",
                 "--set", "sparsity.distribution=uniform"]) == 0
    plan = json.loads(capsys.readouterr().out)
    shapes = {layer["name"]: layer["shape"] for layer in plan["layers"]}
    assert shapes["fc1"] == [20, 64] and shapes["fc2"] == [10, 20]
    assert plan["distribution"] == "uniform" and abs(plan["totals"]["sparsity"] - 0.8) < 0.01
    assert main([*base, "--set", "training.epochs=3"]) == 2
    assert "--set: training.epochs does not apply here" in capsys.readouterr().err
    assert main([*base, "--set", "sparsity.sparsity=2"]) == 2
    assert "sparsity.sparsity" in capsys.readouterr().err


def test_fields_lists_every_jobspec_field_the_readme_documents(capsys):
    from rigl_core.cli import main
    from rigl_core.docs import fields

    assert main(["fields"]) == 0
    out = capsys.readouterr().out
    names = [row[0] for row in fields()]
    assert "dataset.download" in names and "sparsity.schedule.delta_t" in names and len(names) > 50
    listed = [line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")]
    assert listed == names
    reference = (Path(__file__).resolve().parents[2] / "docs" / "reference" / "jobspec.md").read_text()
    assert all(f"| `{name}` |" in reference for name in names)  # one source of truth with the reference
    assert main(["fields", "dataset."]) == 0
    assert all(line.split()[0].startswith("dataset.") for line in capsys.readouterr().out.splitlines()
               if line and not line.startswith(" "))
    assert main(["fields", "nope."]) == 2
