"""A loaded `torch.export` program is an ordinary trainable model (rigl_core.models.program).

It computes what the user's module computes, in train and in eval mode; trains to the same weights
step for step; keeps the module's parameter and buffer names (its state_dict loads into the user's
class); masks its linear and convolution weights, attention projections included; and plans FLOPs from
its graph: a torchvision ResNet-18 exported this way plans exactly as the built-in `resnet18`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers.programs import DIGITS, AttentionBlock, GatedResidualMLP, SmallCNN, WithBuffers, export
from rigl_core.models.program import load_program
from rigl_core.sparse.plan import make_plan
from rigl_core.spec import JobSpec, SparsitySpec

MODELS = {"cnn": (SmallCNN, DIGITS), "attention": (AttentionBlock, [8, 16]), "buffers": (WithBuffers, DIGITS),
          "gated-residual-mlp": (GatedResidualMLP, DIGITS)}


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """name -> (the user's module, its program file)."""
    folder = tmp_path_factory.mktemp("programs")
    made = {}
    for name, (cls, shape) in MODELS.items():
        torch.manual_seed(0)
        module = cls()
        made[name] = (module, export(module, shape, folder / f"{name}.pt2"))
    return made


@pytest.mark.parametrize("name", MODELS)
def test_computes_what_the_module_computes_in_both_modes(programs, name):
    module, path = programs[name]
    program = load_program(path)
    x = torch.randn(5, *MODELS[name][1])
    for mode in (False, True):
        module.train(mode), program.train(mode)
        torch.manual_seed(1)
        expected = module(x)
        torch.manual_seed(1)  # the same dropout draws
        assert torch.allclose(program(x), expected, atol=1e-6), f"train={mode}"
    module.eval()


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_has_the_modules_names_and_loads_back_into_its_class(programs, name):
    module, path = programs[name]
    program = load_program(path)
    assert list(program.state_dict()) == list(module.state_dict())
    fresh = MODELS[name][0]()
    fresh.load_state_dict(program.state_dict())  # strict: the dense export is exactly this
    x = torch.randn(3, *MODELS[name][1])
    assert torch.allclose(fresh.eval()(x), program.eval()(x), atol=1e-6)


def test_trains_to_the_same_weights_as_the_module(programs):
    _, path = programs["cnn"]
    program = load_program(path).train()
    module = SmallCNN().train()
    module.load_state_dict(program.state_dict())  # the same start, running statistics included
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (module, program)]
    for step in range(3):
        x, y = torch.randn(16, *DIGITS), torch.randint(0, 10, (16,))
        for model, optimizer in zip((module, program), optimizers):
            torch.manual_seed(step)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    for (name, expected), (_, got) in zip(module.state_dict().items(), program.state_dict().items()):
        assert torch.allclose(got.float(), expected.float(), atol=1e-5), name


def test_buffers_keep_their_persistence_and_move_with_the_model(programs):
    module, path = programs["buffers"]
    program = load_program(path)
    assert set(program.state_dict()) == set(module.state_dict())  # `scale` is not persistent
    assert "scale" in dict(program.named_buffers())
    on_meta = copy.deepcopy(program).to("meta")
    assert all(b.device.type == "meta" for b in on_meta.buffers())
    assert on_meta(torch.empty(2, *DIGITS, device="meta")).shape == (2, 10)


def test_attention_projections_are_masked_and_planned_as_the_native_module(programs):
    module, path = programs["attention"]
    spec = SparsitySpec(sparsity=0.8, distribution="erk")
    got = make_plan(load_program(path, device="meta"), [8, 16], spec).to_dict()
    expected = make_plan(copy.deepcopy(module).to("meta"), [8, 16], spec).to_dict()
    rows = {r["name"]: (r["masked"], r["params"], r["flops_dense"], r["flops_sparse"]) for r in got["layers"]}
    assert rows == {r["name"]: (r["masked"], r["params"], r["flops_dense"], r["flops_sparse"])
                    for r in expected["layers"]}
    assert set(rows) == {"attn.in_proj", "attn.out_proj", "head"}
    assert got["totals"]["flops_attention"] == expected["totals"]["flops_attention"] == 4 * 8 * 8 * 16


def test_resnet18_plans_exactly_as_the_builtin(tmp_path):
    """FLOPs from the graph equal the built-in plan's, layer by layer by name (224×224, ERK 90%)."""
    import torchvision

    from rigl_core.models.registry import build_model

    path = export(torchvision.models.resnet18(num_classes=1000), [3, 224, 224], tmp_path / "resnet18.pt2")
    spec = SparsitySpec(sparsity=0.9, distribution="erk")
    got = make_plan(load_program(path, device="meta"), [3, 224, 224], spec).to_dict()
    expected = make_plan(build_model("resnet18", 1000, [3, 224, 224], device="meta"), [3, 224, 224], spec).to_dict()
    assert [(r["name"], r["flops_dense"], r["flops_sparse"], r["nnz"]) for r in got["layers"]] == \
        [(r["name"], r["flops_dense"], r["flops_sparse"], r["nnz"]) for r in expected["layers"]]
    assert len(got["layers"]) == 21
    assert got["totals"]["flops_dense"] == expected["totals"]["flops_dense"] == 3_628_146_688


def test_weights_used_outside_linear_and_conv_are_named_in_the_plan(tmp_path):
    class Bilinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Parameter(torch.randn(64, 64))
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(x.flatten(1) @ self.mix)

    program = load_program(export(Bilinear(), DIGITS, tmp_path / "bilinear.pt2"), device="meta")
    plan = make_plan(program, DIGITS, SparsitySpec(sparsity=0.5))
    assert [lp.layer.name for lp in plan.layers] == ["fc"]
    assert "mix [64, 64] stays dense: used by aten.matmul.default" in plan.warnings()


def test_a_job_trains_it_and_refuses_data_of_another_shape(programs):
    from rigl_core.training.trainer import Trainer

    _, path = programs["cnn"]
    body = {"model": {"program": str(path)}, "dataset": {"name": "digits"},
            "sparsity": {"method": "rigl", "sparsity": 0.8},
            "training": {"epochs": 1, "max_steps": 6, "batch_size": 32, "device": "cpu"}}
    trainer = Trainer(JobSpec.model_validate(body))
    report = trainer.fit()
    assert report["leak_check"]["ok"] and report["steps"] == 6
    assert [row["name"] for row in report["layers"] if row["masked"]] == ["conv", "fc", "head"]
    other = {**body, "dataset": {"name": "synthetic", "input_shape": [3, 8, 8], "num_samples": 64}}
    with pytest.raises(ValueError, match=r"model.program: the program was exported for samples of shape \[1, 8, 8\], "
                                         r"the dataset's samples have shape \[3, 8, 8\]"):
        Trainer(JobSpec.model_validate(other))
