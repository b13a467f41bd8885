"""The public library API, `from rigl_core import RigL`: the three-line loop in which the caller steps
the optimizer, with the invariants that make it safe (inactive weights and optimizer state exactly 0
after every step), GradScaler skips, exact resume, and plan/report consistent with the Trainer's."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from helpers.specs import small_spec
from torch import nn

from rigl_core import RigL
from rigl_core.data.registry import load_dataset
from rigl_core.spec import DatasetSpec
from rigl_core.training.trainer import Trainer

BATCH = 64


@pytest.fixture(scope="module")
def digits():
    data = load_dataset(DatasetSpec(name="digits"))
    x = data.prepare(data.x_train, train=False)
    return x, data.y_train, data.prepare(data.x_val, train=False), data.y_val


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def _optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name in ("sgd", "nesterov"):
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=name == "nesterov",
                               weight_decay=1e-4)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    return torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)


def _batch(x, y, step):
    """A pure function of the step: a resumed loop sees the same batches."""
    idx = torch.arange(step * BATCH, (step + 1) * BATCH) % len(x)
    return x[idx], y[idx]


def _backward(model, optimizer, x, y, step):
    xb, yb = _batch(x, y, step)
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(xb), yb)
    loss.backward()
    return float(loss.detach())


def _check_exact(rigl: RigL, optimizer: torch.optim.Optimizer, where: str) -> None:
    """Inactive weights and every per-element optimizer state slot exactly 0."""
    for layer in rigl.sparsifier.layers:
        inactive = ~rigl.masks[layer.name]
        assert not layer.weight[inactive].any(), f"{where}: {layer.name} has nonzero inactive weights"
        for key, value in optimizer.state.get(layer.weight, {}).items():
            if torch.is_tensor(value) and value.shape == layer.weight.shape:
                assert not value[inactive].any(), f"{where}: {layer.name} optimizer state {key} leaks"


@pytest.mark.parametrize("opt_name", ["sgd", "nesterov", "adam", "adamw"])
def test_three_line_loop_trains_to_target_with_exact_masks(digits, opt_name):
    x, y, xv, yv = digits
    model = _mlp()
    optimizer = _optimizer(opt_name, model)
    total = 150
    rigl = RigL(model, optimizer, sparsity=0.9, total_steps=total, delta_t=10)
    updates, losses = 0, []
    for step in range(total):
        losses.append(_backward(model, optimizer, x, y, step))
        if rigl.step():
            optimizer.step()
        updates += rigl.last_update is not None
        _check_exact(rigl, optimizer, f"{opt_name} step {step}")
    assert rigl.step_count == total and updates == len(range(0, int(0.75 * total), 10))
    report = rigl.report()
    assert report["leak_check"] == {"ok": True, "leaked": {}}
    assert abs(report["totals"]["sparsity"] - 0.9) < 0.002
    for layer in rigl.sparsifier.layers:  # RigL keeps every layer's count through drop/grow
        assert int(rigl.masks[layer.name].sum()) == rigl.sparsifier.target_active[layer.name]
    assert report["totals"]["exploration"] > 1 - report["totals"]["sparsity"]  # grown somewhere new
    with torch.no_grad():
        accuracy = float((model(xv).argmax(1) == yv).float().mean())
    assert accuracy > 0.8 and sum(losses[-10:]) < 0.5 * sum(losses[:10])


@pytest.mark.parametrize("method", ["rigl", "snip"])
def test_step_returns_false_exactly_on_steps_the_update_replaces(digits, method):
    x, y, _, _ = digits
    model = _mlp()
    optimizer = _optimizer("sgd", model)
    rigl = RigL(model, optimizer, sparsity=0.8, total_steps=40, delta_t=5, method=method)
    for step in range(40):
        _backward(model, optimizer, x, y, step)
        before = [p.detach().clone() for p in model.parameters()]
        take = rigl.step()
        due = step == 0 if method == "snip" else (step % 5 == 0 and step < 30)
        assert take is (not due), f"step {step}"
        assert (rigl.last_update is not None) is due
        if take:
            optimizer.step()
        else:  # no optimizer step happened: biases (never masked) are untouched
            assert all(torch.equal(a, b) for a, b in zip(before[1::2], list(model.parameters())[1::2]))
            assert all(p.grad is None for p in model.parameters())  # an update step's gradients are spent


@pytest.mark.parametrize("method", ["set", "snfs", "gmp"])
def test_set_and_gmp_update_after_the_callers_optimizer_step(digits, method):
    """SET, SNFS and GMP drop by the magnitudes after the optimizer step (SNFS as the reference's
    SparseMomentumOptimizer, a SET subclass): RigL's step post-hook makes the update inside
    `optimizer.step()`, whoever calls it."""
    x, y, _, _ = digits
    model = _mlp()
    optimizer = _optimizer("adam", model)
    rigl = RigL(model, optimizer, sparsity=0.8, total_steps=40, delta_t=5, method=method, gmp_begin=0.0)
    seen = 0
    for step in range(40):
        _backward(model, optimizer, x, y, step)
        assert rigl.step() is True
        assert rigl.last_update is None  # nothing yet: the update waits for the step
        optimizer.step()
        seen += rigl.last_update is not None
        _check_exact(rigl, optimizer, f"{method} step {step}")
    assert seen >= 5
    assert abs(rigl.report()["totals"]["sparsity"] - 0.8) < 0.002


def test_snfs_update_step_takes_the_optimizer_step(digits):
    """On an SNFS update iteration the optimizer steps (the biases, never masked, move) and the
    mask update follows it."""
    x, y, _, _ = digits
    model = _mlp()
    optimizer = _optimizer("sgd", model)
    rigl = RigL(model, optimizer, sparsity=0.8, total_steps=40, delta_t=5, method="snfs")
    for step in range(6):
        _backward(model, optimizer, x, y, step)
        before = [p.detach().clone() for p in model.parameters()]
        assert rigl.step() is True
        optimizer.step()
    assert rigl.last_update is not None and rigl.last_update.step == 5
    assert not torch.equal(before[1], list(model.parameters())[1])  # the bias stepped on the update step
    _check_exact(rigl, optimizer, "snfs after update")


def test_optimizer_step_without_rigl_step_warns_and_remasks(digits):
    x, y, _, _ = digits
    model = _mlp()
    optimizer = _optimizer("sgd", model)
    rigl = RigL(model, optimizer, sparsity=0.9, total_steps=20, delta_t=5)
    _backward(model, optimizer, x, y, 1)
    with pytest.warns(RuntimeWarning, match="without rigl.step"):
        optimizer.step()  # unmasked gradients: would leak
    assert rigl.leak_check()["ok"]
    rigl.remove()
    _backward(model, optimizer, x, y, 2)
    optimizer.step()  # detached: no hook any more
    assert not rigl.leak_check()["ok"]


def _fp16_step(model, optimizer, rigl, scaler, x, y, step, overflow):
    xb, yb = _batch(x, y, step)
    if overflow:
        xb = xb * 1e6  # past fp16's range: inf/NaN gradients
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(xb), yb)
    scaler.scale(loss).backward()
    take = rigl.step(scaler=scaler)
    if take:
        scaler.step(optimizer)
    scaler.update()
    return take


def test_grad_scaler_overflow_skips_without_drop_or_grow(digits):
    x, y, _, _ = digits
    model = _mlp()
    optimizer = _optimizer("sgd", model)
    rigl = RigL(model, optimizer, sparsity=0.9, total_steps=40, delta_t=4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(4):  # ordinary steps, then an update step at 4 that overflows
        assert _fp16_step(model, optimizer, rigl, scaler, x, y, step, overflow=False) is (step != 0)
    weights = [p.detach().clone() for p in model.parameters()]
    masks = {k: v.clone() for k, v in rigl.masks.items()}
    scale = scaler.get_scale()
    assert _fp16_step(model, optimizer, rigl, scaler, x, y, 4, overflow=True) is False
    assert rigl.last_update is None and rigl.sparsifier.pending_update
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters())), "skipped step moved weights"
    assert all(torch.equal(masks[k], rigl.masks[k]) for k in masks), "drop/grow on an overflow"
    assert scaler.get_scale() < scale
    assert _fp16_step(model, optimizer, rigl, scaler, x, y, 5, overflow=False) is False  # the postponed update
    assert rigl.last_update is not None and rigl.last_update.step == 5
    assert not all(torch.equal(masks[k], rigl.masks[k]) for k in masks)
    assert _fp16_step(model, optimizer, rigl, scaler, x, y, 6, overflow=False) is True
    assert rigl.sparsifier.skipped_steps == 1 and rigl.leak_check()["ok"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_scores_without_a_scaler_postpone_the_update(digits):
    x, y, _, _ = digits
    model = _mlp()
    optimizer = _optimizer("sgd", model)
    rigl = RigL(model, optimizer, sparsity=0.9, total_steps=40, delta_t=4)
    _backward(model, optimizer, x, y, 0)
    model[1].weight.grad[0, 0] = float("nan")
    masks = {k: v.clone() for k, v in rigl.masks.items()}
    with pytest.warns(RuntimeWarning, match="non-finite gradients"):
        assert rigl.step() is False
    assert all(torch.equal(masks[k], rigl.masks[k]) for k in masks)
    _backward(model, optimizer, x, y, 1)
    assert rigl.step() is False and rigl.last_update.step == 1  # made on the next finite gradients


def _run(model, optimizer, rigl, x, y, steps):
    for step in steps:
        _backward(model, optimizer, x, y, step)
        if rigl.step():
            optimizer.step()


@pytest.mark.parametrize("method", ["rigl", "snfs", "set"])
def test_state_dict_round_trip_continues_identically(digits, method):
    """Stop mid-accumulation (RigL's summed scores and SNFS's EMA are alive), save the three state
    dicts through torch.save(weights_only load), load into fresh objects: the same continuation."""
    x, y, _, _ = digits
    options = dict(sparsity=0.9, total_steps=60, delta_t=10, method=method, grad_accumulation_n=3, seed=7)
    model = _mlp()
    optimizer = _optimizer("adamw", model)
    rigl = RigL(model, optimizer, **options)
    _run(model, optimizer, rigl, x, y, range(19))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rigl": rigl.state_dict()},
               buffer)
    _run(model, optimizer, rigl, x, y, range(19, 45))

    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    model2 = _mlp(seed=1)  # other initial weights and masks: everything must come from the state
    optimizer2 = _optimizer("adamw", model2)
    rigl2 = RigL(model2, optimizer2, **{**options, "seed": 8})
    model2.load_state_dict(state["model"])
    optimizer2.load_state_dict(state["optimizer"])
    rigl2.load_state_dict(state["rigl"])
    assert rigl2.step_count == 19
    _run(model2, optimizer2, rigl2, x, y, range(19, 45))
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(rigl.masks[k], rigl2.masks[k]) for k in rigl.masks)
    assert rigl.report() == rigl2.report()


def test_plan_and_report_match_the_trainers():
    spec = small_spec(training__seed=3)
    trainer = Trainer(spec)
    model = copy.deepcopy(trainer.model)
    rigl = RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.9, total_steps=trainer.total_steps,
                delta_t=5, seed=3, input_shape=trainer.input_shape)
    assert rigl.plan() == trainer.plan.to_dict()
    assert rigl.masks.keys() == trainer.sparsifier.masks.keys()
    assert all(torch.equal(rigl.masks[k], trainer.sparsifier.masks[k]) for k in rigl.masks)  # same seed
    mine, theirs = rigl.report(), trainer.report()
    assert mine["layers"] == theirs["layers"] and mine["totals"] == theirs["totals"]
    assert mine["leak_check"] == theirs["leak_check"] == {"ok": True, "leaked": {}}
    no_shape = RigL(copy.deepcopy(model), torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10).plan()
    assert no_shape["totals"]["flops_dense"] is None and no_shape["totals"]["nnz"] == rigl.plan()["totals"]["nnz"]


def test_trainer_steps_through_the_library_api():
    trainer = Trainer(small_spec())
    assert isinstance(trainer.rigl, RigL) and trainer.rigl.sparsifier is trainer.sparsifier
    report = trainer.fit()
    assert report["leak_check"]["ok"] and trainer.rigl.step_count == trainer.total_steps


@pytest.mark.parametrize("options, field", [
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": -0.1}, "sparsity"),
    ({"total_steps": 0}, "total_steps"),
    ({"total_steps": None}, "total_steps"),
    ({"distribution": "gaussian"}, "distribution"),
    ({"method": "magic"}, "method"),
    ({"delta_t": 0}, "delta_t"),
    ({"alpha": 1.5}, "alpha"),
    ({"t_end": 0.0}, "t_end"),
    ({"t_end_steps": 500}, "t_end_steps"),
    ({"grad_accumulation_n": 0}, "grad_accumulation_n"),
    ({"include": ["nope*"]}, "include"),
    ({"exclude": ["nope*"]}, "exclude"),
    ({"dense_first_layer": "maybe"}, "dense_first_layer"),
    ({"seed": -1}, "seed"),
    ({"input_shape": [0, 8]}, "input_shape"),
    ({"delta": 100}, "delta"),
    ({"init": "magnitude"}, "init"),
])
def test_bad_options_raise_value_error_naming_the_option(options, field):
    model = _mlp()
    kwargs = {"sparsity": 0.9, "total_steps": 100, **options}
    with pytest.raises(ValueError) as info:
        RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
    assert str(info.value).startswith(f"{field}:"), str(info.value)


def test_optimizer_must_be_a_torch_optimizer():
    model = _mlp()
    with pytest.raises(ValueError, match="^optimizer:"):
        RigL(model, object(), total_steps=10)


def test_wrapped_optimizer_is_unwrapped():
    """Accelerate's AcceleratedOptimizer keeps the torch optimizer in `.optimizer`: masks and the
    step hook go to the real one."""

    class Wrapper:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    model = _mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rigl = RigL(model, Wrapper(inner), total_steps=10)
    assert rigl.optimizer is inner
