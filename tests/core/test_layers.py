"""Which weights are masked: conv/linear kernels only, with include/exclude/first-layer/depthwise rules."""

from __future__ import annotations

import pytest
from torch import nn

from rigl_core.sparse.layers import select_layers
from rigl_core.models.registry import build_model


def test_never_masks_bias_or_norm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LayerNorm(8 * 6 * 6),
                          nn.Linear(8 * 6 * 6, 10))
    layers = select_layers(model, "erk")
    assert [l.name for l in layers] == ["0", "4"]
    assert all(isinstance(l.module, (nn.Conv2d, nn.Linear)) for l in layers)


def test_conv1d_conv3d_linear_are_candidates():
    model = nn.ModuleDict({"a": nn.Conv1d(2, 4, 3), "b": nn.Conv3d(2, 4, 3), "c": nn.Linear(4, 2)})
    assert [l.name for l in select_layers(model, "erk")] == ["a", "b", "c"]


def test_first_layer_policy():
    model = build_model("lenet5", 10, [1, 8, 8])
    uniform = select_layers(model, "uniform")
    erk = select_layers(model, "erk")
    assert not uniform[0].masked and all(l.masked for l in uniform[1:])
    assert all(l.masked for l in erk)
    assert select_layers(model, "uniform", dense_first_layer=False)[0].masked
    assert not select_layers(model, "erk", dense_first_layer=True)[0].masked


def test_include_exclude_and_overrides():
    model = build_model("mlp", 10, [1, 8, 8])
    layers = select_layers(model, "erk", include=["fc*"], exclude=["fc3"], layer_density={"fc2": 0.5})
    state = {l.name: (l.masked, l.custom_density) for l in layers}
    assert state == {"fc1": (True, None), "fc2": (True, 0.5), "fc3": (False, None)}


def test_unknown_pattern_names_the_option():
    model = build_model("mlp", 10, [1, 8, 8])
    with pytest.raises(ValueError, match="sparsity.exclude"):
        select_layers(model, "erk", exclude=["conv*"])
    with pytest.raises(ValueError, match="sparsity.layer_density"):
        select_layers(model, "erk", layer_density={"nope": 0.5})


def test_depthwise_dense_option():
    model = build_model("mobilenet_v2", 10, [3, 32, 32], device="meta")
    dense_dw = select_layers(model, "erk")
    masked_dw = select_layers(model, "erk", dense_depthwise=False)
    dw = [l for l in dense_dw if l.reason == "depthwise dense"]
    assert len(dw) == 17
    assert all(l.masked for l in masked_dw)
