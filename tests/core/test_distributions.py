"""Per-layer sparsity distributions against the paper's ResNet-50 numbers (docs/algorithm.md, "Sparsity distributions" and "FLOPs")."""

from __future__ import annotations

import math

import pytest

from rigl_core.sparse.distributions import active_count, layer_sparsities, zeros_count
from rigl_core.models.registry import build_model
from rigl_core.sparse.plan import make_plan
from rigl_core.spec import SparsitySpec


@pytest.fixture(scope="module")
def resnet50():
    return build_model("resnet50", 1000, [3, 224, 224], device="meta")


@pytest.mark.parametrize(
    "distribution,sparsity,expected",
    [("erk", 0.8, 0.414), ("erk", 0.9, 0.242), ("uniform", 0.8, 0.223), ("uniform", 0.9, 0.126)],
)
def test_resnet50_inference_flops_match_paper(resnet50, distribution, sparsity, expected):
    plan = make_plan(resnet50, [3, 224, 224], SparsitySpec(sparsity=sparsity, distribution=distribution)).to_dict()
    totals = plan["totals"]
    assert totals["inference_flops_ratio"] == pytest.approx(expected, abs=0.01)
    assert totals["flops_dense"] == pytest.approx(8.18e9, rel=0.01)  # paper: 8.2e9
    assert totals["sparsity"] == pytest.approx(sparsity, abs=1e-4)


def test_resnet50_erk_forced_dense_layers(resnet50):
    """At 80% ERK the exact loop densifies 8 layers (spec §1 sanity numbers); first conv 0.143 sparse."""
    plan = make_plan(resnet50, [3, 224, 224], SparsitySpec(sparsity=0.8, distribution="erk")).to_dict()
    dense = [r["name"] for r in plan["layers"] if r["masked"] and r["density"] == 1.0]
    assert len(dense) == 8
    by_name = {r["name"]: r for r in plan["layers"]}
    assert 1 - by_name["conv1"]["density"] == pytest.approx(0.143, abs=0.001)
    assert 1 - by_name["fc"]["density"] == pytest.approx(0.852, abs=0.001)
    plan90 = make_plan(resnet50, [3, 224, 224], SparsitySpec(sparsity=0.9, distribution="erk")).to_dict()
    assert [r["name"] for r in plan90["layers"] if r["density"] == 1.0] == ["layer1.0.conv1"]


def test_uniform_keeps_first_layer_dense_and_erk_masks_it(resnet50):
    uniform = make_plan(resnet50, [3, 224, 224], SparsitySpec(sparsity=0.9, distribution="uniform")).to_dict()
    erk = make_plan(resnet50, [3, 224, 224], SparsitySpec(sparsity=0.9, distribution="erk")).to_dict()
    assert uniform["layers"][0]["masked"] is False and uniform["layers"][0]["reason"] == "first layer dense"
    assert erk["layers"][0]["masked"] is True
    # every masked uniform layer has exactly floor(S·N) zeros
    for row in uniform["layers"][1:]:
        assert row["params"] - row["nnz"] == math.floor(0.9 * row["params"] + 1e-9)


def test_erk_budget_is_exact():
    shapes = [(64, 3, 3, 3), (128, 64, 3, 3), (256, 128, 3, 3), (10, 256)]
    for s in (0.5, 0.8, 0.9, 0.95, 0.99):
        sparsities = layer_sparsities(shapes, s, "erk")
        zeros = sum(zeros_count(math.prod(sh), sl) for sh, sl in zip(shapes, sparsities))
        total = sum(math.prod(sh) for sh in shapes)
        assert abs(zeros / total - s) < 1e-3, s
        assert all(0.0 <= sl < 1.0 for sl in sparsities)


def test_erk_densities_follow_kernel_formula():
    shapes = [(20, 30, 3, 3), (40, 20, 3, 3), (10, 40)]
    sparsities = layer_sparsities(shapes, 0.9, "erk")
    ratios = [(1 - sl) / (sum(sh) / math.prod(sh)) for sh, sl in zip(shapes, sparsities)]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)  # density ∝ (Σdims/Πdims)


def test_er_ignores_kernel_dims():
    sparsities = layer_sparsities([(20, 30, 3, 3), (20, 30, 5, 5)], 0.5, "er")
    # same (n_out, n_in): ER density per weight is the same
    assert sparsities[0] == pytest.approx(sparsities[1])


def test_erk_power_scale_zero_is_uniform():
    shapes = [(20, 30, 3, 3), (40, 20, 3, 3), (10, 40)]
    assert layer_sparsities(shapes, 0.8, "erk", erk_power_scale=0.0) == pytest.approx([0.8, 0.8, 0.8])


def test_custom_density_is_outside_budget():
    shapes = [(100, 100), (100, 100), (10, 100)]
    sparsities = layer_sparsities(shapes, 0.9, "erk", custom=[0.5, None, None])
    assert sparsities[0] == pytest.approx(0.5)
    zeros = sum(zeros_count(math.prod(sh), sl) for sh, sl in zip(shapes[1:], sparsities[1:]))
    assert zeros / sum(math.prod(sh) for sh in shapes[1:]) == pytest.approx(0.9, abs=1e-3)


def test_counts_are_floor_of_sparsity():
    assert zeros_count(1000, 0.9) == 900
    assert active_count(1000, 0.9) == 100
    assert zeros_count(7, 0.5) == 3


def test_erk_capped_layers_say_so_in_the_plan(resnet50):
    """A masked layer ERK left at density 1.0 carries the reason, in the rows and the printed table."""
    from rigl_core.cli import format_plan_table

    plan = make_plan(resnet50, [3, 224, 224], SparsitySpec(sparsity=0.9, distribution="erk")).to_dict()
    capped = [r for r in plan["layers"] if r["masked"] and r["target_density"] == 1.0]
    assert [r["name"] for r in capped] == ["layer1.0.conv1"]
    assert capped[0]["reason"] == "ERK density capped at 1"
    assert all(r["reason"] == "masked" for r in plan["layers"] if r["masked"] and r["target_density"] < 1.0)
    line = next(l for l in format_plan_table(plan).splitlines() if l.startswith("layer1.0.conv1 "))
    assert line.endswith("ERK density capped at 1")
    conv1 = next(l for l in format_plan_table(plan).splitlines() if l.startswith("conv1 "))
    assert conv1.rstrip().endswith("99,147,776")  # an ordinary masked layer: no note


def test_gmp_defaults_to_the_papers_uniform_with_dense_first_layer(resnet50):
    """GMP without `distribution`: uniform + dense first layer (the paper's pruning baseline); a
    `distribution` the user sets is kept, and other methods still default to ERK."""
    gmp = SparsitySpec(method="gmp")
    assert gmp.distribution == "uniform" and SparsitySpec.model_validate(gmp.model_dump()).distribution == "uniform"
    assert SparsitySpec(method="gmp", distribution="erk").distribution == "erk"
    assert SparsitySpec(method="rigl").distribution == "erk"
    rows = make_plan(resnet50, [3, 224, 224], gmp).to_dict()["layers"]
    assert rows[0]["masked"] is False and rows[0]["reason"] == "first layer dense"
    assert make_plan(resnet50, [3, 224, 224], SparsitySpec(method="gmp", distribution="erk")).to_dict()[
        "layers"][0]["masked"] is True
