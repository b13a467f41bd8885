"""sparsity.pattern "N:M": validation, exactly N active per group through training, group-local drop/grow,
and the semi-structured export's CPU path (rigl_core/sparse/nm.py, rigl_core/export/nm.py)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from api.schemas import JobSubmission
from rigl_core import RigL
from rigl_core.export.nm import to_semi_structured
from rigl_core.sparse.layers import select_layers
from rigl_core.sparse.nm import group_counts, nm_drop_and_grow
from rigl_core.sparse.plan import make_plan
from rigl_core.sparse.schedules import UpdateSchedule
from rigl_core.sparse.sparsifier import SPARSIFIERS
from rigl_core.spec import JobSpec, SparsitySpec, format_validation_error


def _job(**sparsity):
    return {"model": {"name": "mlp", "hidden_sizes": [32]}, "dataset": {"name": "mnist1d"}, "sparsity": sparsity}


@pytest.mark.parametrize("sparsity, field", [
    ({"pattern": "4:4"}, "sparsity.pattern"),
    ({"pattern": "0:4"}, "sparsity.pattern"),
    ({"pattern": "2:64"}, "sparsity.pattern"),
    ({"pattern": "two:four"}, "sparsity.pattern"),
    ({"pattern": 124}, "sparsity.pattern"),  # YAML 1.1 reads an unquoted 2:4 so
    ({"pattern": "2:4", "method": "gmp"}, "sparsity.pattern"),
    ({"pattern": "2:4", "method": "snip"}, "sparsity.pattern"),
    ({"pattern": "2:4", "sparsity": 0.9}, "sparsity.sparsity"),
    ({"pattern": "2:4", "layer_density": {"0": 0.3}}, "sparsity.layer_density"),
])
def test_bad_patterns_name_the_field(sparsity, field):
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(_job(**sparsity))
    assert format_validation_error(info.value).startswith(field + ":")


def test_sparsity_follows_the_pattern():
    assert SparsitySpec(pattern="2:4").sparsity == 0.5
    assert SparsitySpec(pattern="1:4").sparsity == 0.75
    assert SparsitySpec(pattern="2:4", sparsity=0.5).nm == (2, 4)
    assert SparsitySpec().nm is None
    # a dumped spec validates again unchanged (the worker re-reads stored specs)
    spec = JobSpec.model_validate(_job(pattern="2:8"))
    assert JobSpec.model_validate(spec.model_dump()).sparsity.sparsity == 0.75


def test_undivisible_layers_stay_dense_with_a_reason():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))  # conv: 3·3·3 = 27
    plan = make_plan(model, [3, 6, 6], SparsitySpec(pattern="2:4", distribution="erk"))
    rows = {r["name"]: r for r in plan.to_dict()["layers"]}
    assert not rows["0"]["masked"] and "not divisible by M=4" in rows["0"]["reason"]
    assert rows["2"]["masked"] and rows["2"]["target_density"] == 0.5


def _setup(method, pattern=(2, 4), seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))
    layers = [layer for layer in select_layers(model, "erk") if layer.masked]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    schedule = UpdateSchedule(delta_t=3, t_end=30, alpha=0.3, decay="constant")
    n, m = pattern
    sp = SPARSIFIERS[method](layers, [1 - n / m] * len(layers), opt, schedule, seed=seed, pattern=pattern)
    sp.init_masks()
    sp.record_details = True
    data = torch.randn(256, 16)
    return model, opt, sp, data, data[:, :4].argmax(1)


def _check_groups(sp, n, m):
    for layer in sp.layers:
        mask = sp.masks[layer.name]
        assert mask.dtype == torch.bool
        assert bool((group_counts(mask, m) == n).all()), layer.name
        assert int(torch.count_nonzero(layer.weight.detach() * ~mask)) == 0
        momentum = sp.optimizer.state.get(layer.weight, {}).get("momentum_buffer")
        if momentum is not None:
            assert int(torch.count_nonzero(momentum * ~mask)) == 0


@pytest.mark.parametrize("method", ["rigl", "set", "snfs", "static"])
@pytest.mark.parametrize("pattern", [(2, 4), (1, 8)])
def test_every_group_keeps_exactly_n_active(method, pattern):
    model, opt, sp, data, target = _setup(method, pattern)
    n, m = pattern
    _check_groups(sp, n, m)
    initial = {k: v.clone() for k, v in sp.masks.items()}
    updates = 0
    for step in range(30):
        x, y = data[(step * 32) % 256:][:32], target[(step * 32) % 256:][:32]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        before = {k: v.clone() for k, v in sp.masks.items()}
        update = sp.step(step)
        _check_groups(sp, n, m)
        if update is None or method == "static":
            continue
        updates += 1
        for layer in sp.layers:
            old, new = before[layer.name].reshape(-1, m), sp.masks[layer.name].reshape(-1, m)
            details = sp.last_details[layer.name]
            dropped = (old & ~details["kept"].view(-1, m)).sum(1)
            grown = details["grown"].view(-1, m)
            assert torch.equal(grown.sum(1), dropped)  # each group grows exactly what it dropped
            assert not bool((grown.any(1) & (dropped == 0)).any())  # growth only in groups that dropped
            assert update.layers[layer.name].dropped == int(dropped.sum()) > 0
            grown_new = grown & ~old
            assert bool((layer.weight.detach().reshape(-1, m)[grown_new] == 0).all())  # grown start at 0
            assert torch.equal(old.sum(1), new.sum(1))
    if method == "static":
        assert all(torch.equal(initial[k], sp.masks[k]) for k in initial)
    else:
        assert updates >= 5
        assert any(not torch.equal(initial[k], sp.masks[k]) for k in initial)


def test_drop_and_grow_is_group_local():
    torch.manual_seed(1)
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 1]], dtype=torch.bool)
    weight = torch.tensor([[0.1, 5.0, 0.0, 0.0, 3.0, 0.2, 0.0, 4.0]]) * mask
    grad = torch.tensor([[0.0, 0.0, 9.0, 1.0, 0.0, 0.0, 8.0, 0.0]])
    result = nm_drop_and_grow(mask, weight, grad.abs(), k=2, m=4)
    # drops 0.1 (group 0) and 0.2 (group 1); each group regrows its own best-gradient free position
    assert result.new_mask.int().tolist() == [[0, 1, 1, 0, 0, 0, 1, 1]]


def test_library_rejects_a_mismatched_sparsity_by_name():
    model = nn.Sequential(nn.Linear(8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="^sparsity: must be 1 - N/M"):
        RigL(model, opt, 0.9, total_steps=10, pattern="2:4")
    rigl = RigL(model, opt, 0.5, total_steps=10, pattern="2:4", distribution="uniform", dense_first_layer=False)
    assert bool((group_counts(rigl.masks["0"], 4) == 2).all())


def test_trainer_runs_2_4():
    from rigl_core.training.trainer import Trainer

    spec = JobSpec.model_validate({
        "model": {"name": "mlp", "hidden_sizes": [32]}, "dataset": {"name": "mnist1d"},
        "sparsity": {"pattern": "2:4", "schedule": {"delta_t": 5}},
        "training": {"max_steps": 30, "epochs": 1, "batch_size": 64, "device": "cpu", "eval_every_epochs": 1}})
    trainer = Trainer(spec)
    trainer.fit()
    assert trainer.rigl.leak_check()["ok"]
    for name, mask in trainer.sparsifier.masks.items():
        assert bool((group_counts(mask, 4) == 2).all()), name
    ever = trainer.sparsifier.ever_active_counts()  # drop/grow happened: positions active once and not now
    assert any(ever[name] > int(mask.sum()) for name, mask in trainer.sparsifier.masks.items())


def test_semi_structured_export_explains_why_it_did_nothing_on_cpu():
    model = nn.Sequential(nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(64, 16))
    before = model[0].weight.detach().clone()
    out, report = to_semi_structured(model)
    assert out is model and torch.equal(model[0].weight, before)
    assert report["converted"] == []
    if not torch.cuda.is_available():
        assert "no CUDA device" in report["reason"]


@pytest.mark.parametrize("sparsity, field", [({"pattern": "3:3"}, "sparsity.pattern"),
                                             ({"pattern": "2:4", "method": "gmp"}, "sparsity.pattern"),
                                             ({"pattern": "2:4", "sparsity": 0.8}, "sparsity.sparsity")])
def test_api_answers_422_naming_the_field(sparsity, field):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from api.errors import install

    app = FastAPI()
    install(app)

    @app.post("/jobs")
    def submit(job: JobSubmission) -> dict:
        return {"ok": True}

    client = TestClient(app)
    response = client.post("/jobs", json=_job(**sparsity))
    assert response.status_code == 422
    assert response.json()["error"]["field"] == field, response.json()
    assert client.post("/jobs", json=_job(pattern="2:4")).status_code == 200


def test_packed_export_round_trips_a_2_4_model(tmp_path):
    from rigl_core.export.packed import load_packed, save_packed

    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    rigl = RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.5, total_steps=10, pattern="2:4",
                dense_first_layer=False)
    path = save_packed(model, rigl.masks, tmp_path / "m.packed.safetensors")
    state = load_packed(path)
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
    assert bool((group_counts(state["0.weight"] != 0, 4) <= 2).all())


def test_sparsifier_refuses_a_layer_whose_rows_do_not_split_into_groups():
    model = nn.Sequential(nn.Linear(6, 4))  # 24 weights, but rows of 6: groups of 4 would straddle rows
    layers = [layer for layer in select_layers(model, "erk") if layer.masked]
    with pytest.raises(ValueError, match="^sparsity.pattern: layer '0' cannot be masked 2:4"):
        SPARSIFIERS["rigl"](layers, [0.5], None, UpdateSchedule(delta_t=2, t_end=10, alpha=0.3), pattern=(2, 4))


def test_conv_groups_run_along_input_channels_at_each_kernel_position():
    """The layout of GPU 2:4 conv kernels: 4 consecutive input channels at one (kh, kw), never a run of the
    flattened C·kh·kw (which mixes kernel positions)."""
    from rigl_core.export.nm import conv_weight_channels_last, is_2_4
    from rigl_core.sparse.nm import from_groups, groups_of, nm_random_mask

    generator = torch.Generator().manual_seed(0)
    mask = nm_random_mask((6, 8, 3, 3), 2, 4, generator, "conv")
    per_position = mask.permute(0, 2, 3, 1).reshape(6, 3, 3, 2, 4).sum(-1)  # [out, kh, kw, channel group]
    assert bool((per_position == 2).all())
    assert torch.equal(from_groups(groups_of(mask, 4, "conv"), (6, 8, 3, 3), "conv"), mask)
    assert is_2_4(mask.float()) and bool((conv_weight_channels_last(mask).reshape(-1, 4).sum(1) == 2).all())
    flattened_ok = bool((mask.reshape(-1, 4).sum(1) == 2).all())
    assert not flattened_ok  # the old layout's groups are not what this trains


def test_conv_2_4_training_keeps_channel_groups_and_names_unfit_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rigl = RigL(model, opt, 0.5, total_steps=30, pattern="2:4", delta_t=3, input_shape=[3, 6, 6])
    plan = rigl.plan()
    assert any(w.startswith("0 (216 weights") and "stays dense: N:M: 3 input channels not divisible by M=4" in w
               for w in plan["warnings"]), plan["warnings"]
    x, y = torch.randn(30, 16, 3, 6, 6), torch.randint(0, 10, (30, 16))
    before = rigl.masks["2"].clone()
    for step in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[step]), y[step]).backward()
        if rigl.step():
            opt.step()
        assert bool((group_counts(rigl.masks["2"], 4, "conv") == 2).all())
    assert not torch.equal(before, rigl.masks["2"])
    from rigl_core.export.nm import is_2_4

    assert is_2_4(model[2].weight.detach()) and is_2_4(model[5].weight.detach())


def test_every_layer_a_pattern_leaves_dense_is_named_in_the_plan_warnings():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(256, 64), *[nn.Linear(64, 64) for _ in range(30)])
    plan = make_plan(model, [3, 10, 10], SparsitySpec(pattern="2:4", distribution="erk")).to_dict()  # conv: 0.08%
    assert plan["layers"][0]["masked"] is False
    assert any(w.startswith("0 (108 weights)") and "N:M" in w for w in plan["warnings"]), plan["warnings"]
