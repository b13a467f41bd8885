"""Declarative JSON architectures: shape inference, errors that point at the layer, caps, schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from rigl_core.models.architecture import Architecture, ArchitectureError, Limits, architecture_json_schema
from rigl_core.models.build import build_architecture, infer
from rigl_core.spec import JobSpec, format_validation_error

ROOT = Path(__file__).resolve().parents[2]

CNN = {
    "input_shape": [3, 16, 16],
    "layers": [
        {"type": "conv2d", "out_channels": 8, "kernel_size": 3, "padding": "same", "name": "stem"},
        {"type": "batchnorm2d"},
        {"type": "relu"},
        {"type": "residual", "projection": True, "layers": [
            {"type": "conv2d", "out_channels": 16, "kernel_size": 3, "stride": 2, "padding": 1},
            {"type": "batchnorm2d"},
            {"type": "gelu"},
            {"type": "conv2d", "out_channels": 16, "kernel_size": 3, "padding": 1},
        ]},
        {"type": "residual", "layers": [{"type": "conv2d", "out_channels": 16, "kernel_size": 1}, {"type": "tanh"}]},
        {"type": "maxpool", "kernel_size": 2},
        {"type": "avgpool", "kernel_size": 2, "stride": 1},
        {"type": "adaptive-avg-pool", "output_size": 1},
        {"type": "flatten"},
        {"type": "layernorm"},
        {"type": "dropout", "p": 0.2},
        {"type": "linear", "out_features": 32},
        {"type": "batchnorm1d"},
        {"type": "sigmoid"},
        {"type": "linear", "out_features": 5, "name": "head"},
    ],
}


def test_shapes_are_inferred_and_the_model_runs():
    arch = Architecture.model_validate(CNN)
    _, out_shape, params = infer(arch)
    assert out_shape == (5,)
    model = build_architecture(arch, num_classes=5)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.randn(4, 3, 16, 16)).shape == (4, 5)
    names = [n for n, _ in model.named_modules()]
    assert "stem" in names and "head" in names and "residual3.projection" in names


def test_conv1d_model():
    arch = Architecture.model_validate({"input_shape": [1, 40], "layers": [
        {"type": "conv1d", "out_channels": 8, "kernel_size": 5, "stride": 2},
        {"type": "relu"}, {"type": "maxpool", "kernel_size": 2}, {"type": "flatten"},
        {"type": "linear", "out_features": 10}]})
    model = build_architecture(arch, num_classes=10)
    assert model(torch.randn(2, 1, 40)).shape == (2, 10)


@pytest.mark.parametrize(
    "layers,where",
    [
        ([{"type": "conv2d", "out_channels": 4, "kernel_size": 3}], "layers[0]"),  # conv2d on a flat input
        ([{"type": "flatten"}, {"type": "linear", "out_features": 4},
          {"type": "residual", "layers": [{"type": "linear", "out_features": 3}]}], "layers[2]"),
        ([{"type": "linear", "out_features": 4, "bias": "maybe"}], "layers.0.linear.bias"),
        ([{"type": "linear", "out_features": 0}], "layers.0.linear.out_features"),
        ([{"type": "convolution", "out_channels": 4}], "layers.0"),
        ([{"type": "linear", "out_features": 4, "colour": 1}], "layers.0.linear.colour"),
        ([{"type": "flatten"}, {"type": "linear", "out_features": 99_999}], "layers[1].out_features"),
    ],
)
def test_errors_point_at_layer_and_field(layers, where):
    tree = {"input_shape": [12], "layers": layers}
    with pytest.raises((ValidationError, ArchitectureError)) as info:
        infer(Architecture.model_validate(tree))
    text = format_validation_error(info.value) if isinstance(info.value, ValidationError) else str(info.value)
    assert where in text


def test_kernel_larger_than_input_and_mismatched_residual_in_jobspec():
    bad = {"input_shape": [1, 8, 8], "layers": [{"type": "conv2d", "out_channels": 4, "kernel_size": 9},
                                                 {"type": "flatten"}, {"type": "linear", "out_features": 10}]}
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate({"model": {"architecture": bad}, "dataset": {"name": "digits"}})
    message = format_validation_error(info.value)
    assert "architecture.layers[0].kernel_size" in message
    mismatch = {"input_shape": [1, 8, 8], "layers": [
        {"type": "residual", "layers": [{"type": "conv2d", "out_channels": 4, "kernel_size": 3, "padding": 1}]},
        {"type": "flatten"}, {"type": "linear", "out_features": 10}]}
    with pytest.raises(ValidationError, match=r"architecture.layers\[0\]: the block maps"):
        JobSpec.model_validate({"model": {"architecture": mismatch}, "dataset": {"name": "digits"}})


def test_caps():
    wide = {"input_shape": [100], "layers": [{"type": "linear", "out_features": 10_000},
                                              {"type": "linear", "out_features": 10_000}]}
    with pytest.raises(ArchitectureError, match="parameters"):
        infer(Architecture.model_validate(wide), Limits(max_params=50_000_000))
    deep = {"input_shape": [4], "layers": [{"type": "relu"}] * 20}
    with pytest.raises(ArchitectureError, match="layers"):
        infer(Architecture.model_validate(deep), Limits(max_depth=10))


def test_wrong_number_of_outputs():
    arch = Architecture.model_validate({"input_shape": [4], "layers": [{"type": "linear", "out_features": 3}]})
    with pytest.raises(ArchitectureError, match="3 outputs but there are 10 classes"):
        build_architecture(arch, num_classes=10)


def test_published_json_schema_is_current():
    published = json.loads((ROOT / "rigl_core" / "schemas" / "architecture.schema.json").read_text())
    assert published == architecture_json_schema()
    assert "residual" in json.dumps(published)


def test_custom_architecture_trains_end_to_end(tmp_path):
    from rigl_core.training.trainer import Trainer

    arch = {"input_shape": [1, 8, 8], "layers": [
        {"type": "conv2d", "out_channels": 16, "kernel_size": 3, "padding": 1}, {"type": "relu"},
        {"type": "flatten"}, {"type": "linear", "out_features": 64}, {"type": "relu"},
        {"type": "linear", "out_features": 10}]}
    spec = JobSpec.model_validate({"model": {"architecture": arch}, "dataset": {"name": "digits"},
                                   "sparsity": {"sparsity": 0.8, "schedule": {"delta_t": 10}},
                                   "training": {"epochs": 4, "batch_size": 64}})
    report = Trainer(spec).fit()
    assert report["leak_check"]["ok"]
    assert report["totals"]["sparsity"] == pytest.approx(0.8, abs=0.002)
    assert report["final_metrics"]["val_accuracy"] > 0.8


def test_plan_with_architecture_file(tmp_path, capsys):
    from rigl_core.cli import main

    path = tmp_path / "arch.json"
    path.write_text(json.dumps(CNN))
    assert main(["plan", "--architecture", str(path), "--sparsity", "0.9", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"] == "custom" and plan["num_classes"] == 5
    assert plan["totals"]["sparsity"] == pytest.approx(0.9, abs=0.002)
    path.write_text("[1, 2]")
    assert main(["plan", "--architecture", str(path)]) == 2
    assert "--architecture" in capsys.readouterr().err
