"""`rigl plan --program` and `rigl train --program`: a `.pt2` planned and trained locally, with every
export written; the dense export loads into the user's own class, the ONNX export computes what the
trained program computes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers.programs import DIGITS, SmallCNN, export
from rigl_core.cli import main


def test_plan_takes_the_programs_shapes_and_names(tmp_path, capsys):
    path = export(SmallCNN(), DIGITS, tmp_path / "cnn.pt2")
    assert main(["plan", "--program", str(path), "--sparsity", "0.9", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"] == "program" and plan["input_shape"] == DIGITS and plan["num_classes"] == 10
    assert [row["name"] for row in plan["layers"]] == ["conv", "fc", "head"]
    conv = plan["layers"][0]
    assert conv["flops_dense"] == 2 * 8 * 1 * 3 * 3 * 8 * 8  # 2 · weights · output positions


@pytest.mark.slow  # trains and writes every export (the fast service test covers training and the dense export)
def test_train_writes_every_export_and_the_dense_one_loads_into_the_class(tmp_path):
    from rigl_core.export.onnx import run_onnx
    from rigl_core.models.program import load_program

    path = export(SmallCNN(), DIGITS, tmp_path / "cnn.pt2")
    out = tmp_path / "run"
    assert main(["train", "--program", str(path), "--dataset", "digits", "--method", "srigl", "--sparsity", "0.8",
                 "--max-steps", "4", "--batch-size", "32", "--out", str(out), "--no-progress",
                 "--set", "export.latency=false"]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "model.packed.safetensors", "model.compressed.safetensors",
            "model.condensed.safetensors", "model.onnx", "report.json"} <= files
    trained = SmallCNN().eval()
    trained.load_state_dict(load_file(out / "model.safetensors"))  # strict, the class's own names
    assert (trained.fc.weight == 0).float().mean() > 0.5  # sparse
    x = torch.randn(4, *DIGITS)
    program = load_program(path)
    program.load_state_dict(trained.state_dict())
    with torch.no_grad():
        assert torch.allclose(program.eval()(x), trained(x), atol=1e-5)
        assert np.allclose(run_onnx(out / "model.onnx", x.numpy()), trained(x).numpy(), atol=1e-4)
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "program" and report["leak_check"]["ok"]
