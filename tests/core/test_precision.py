"""Mixed precision: `training.precision`, bf16/fp16 autocast, and a GradScaler the sparsifier honours.

fp16 autocast and `torch.amp.GradScaler("cpu")` are both supported on CPU by this torch, so the fp16
tests below run the real scaler path (real overflow, real skip), not a stand-in.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from helpers.sparse import (OPTIMIZERS, MaskWatch, backward, batch, check_invariants_every_update, check_state_zero,
                            setup_sparsifier)
from helpers.specs import small_spec
from rigl_core.spec import JobSpec, format_validation_error
from rigl_core.training.trainer import Callback, Trainer, resolve_precision

MASKED_METHODS = ["rigl", "set", "snfs", "gmp", "snip", "static"]


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _all_finite(model):
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ----------------------------------------------------------------------------- the spec field
def test_auto_resolves_to_fp32_on_cpu():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    trainer = Trainer(small_spec(training__device="cpu"))
    assert trainer.spec.training.precision == "auto"
    assert trainer.precision == "fp32" and trainer.autocast_dtype is None and trainer.scaler is None


@pytest.mark.parametrize("value", ["fp8", "float16", "", 16, None])
def test_precision_validation_names_the_field(value):
    tree = small_spec().model_dump()
    tree["training"]["precision"] = value
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(tree)
    assert format_validation_error(info.value).startswith("training.precision:")


# ----------------------------------------------------------------------------- bf16 autocast
def test_bf16_autocast_trains_and_masks_stay_exact():
    spec = small_spec(training__precision="bf16", training__epochs=6, model__hidden_sizes=[300, 100])
    watch = MaskWatch()
    trainer = Trainer(spec, callbacks=[watch])
    assert trainer.autocast_dtype is torch.bfloat16 and trainer.scaler is None
    report = trainer.fit()
    assert report["precision"] == "bf16" and report["leak_check"]["ok"]
    assert watch.updates > 3
    assert sum(watch.losses[-3:]) / 3 < 0.5 * sum(watch.losses[:3]) / 3  # loss decreases
    assert report["final_metrics"]["val_accuracy"] > 0.8
    assert _all_finite(trainer.model)


def _bf16_backward(model, opt, data, target, step):
    x, y = batch(data, target, step)
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_rigl_invariants_hold_under_bf16_autocast(optimizer):
    """The full per-update invariant test (drop smallest |w|, grow largest |g|, nnz constant,
    inactive weights and optimizer state exactly 0) with the forward pass under bf16 autocast."""
    check_invariants_every_update(optimizer, backward=_bf16_backward)


# ----------------------------------------------------------------------------- fp16 + GradScaler
def _fp16_loop(method, overflow_steps, steps=12):
    """A user loop as docs/guide/library.md shows it: fp16 autocast, GradScaler, `sparsifier.step(step, scaler=...)`.
    Batches at `overflow_steps` are scaled past fp16's range, so their gradients are inf/NaN."""
    model, opt, sp, data, target = setup_sparsifier(method=method, delta_t=4, t_end=40)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    events = []
    for step in range(steps):
        x, y = batch(data, target, step)
        if step in overflow_steps:
            x = x * 1e6  # > 65504: inf in fp16
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        before, masks_before, scale_before = _params(model), {k: v.clone() for k, v in sp.masks.items()}, scaler.get_scale()
        update = sp.step(step, scaler=scaler)
        scaler.update()
        events.append({"step": step, "update": update, "before": before, "after": _params(model),
                       "masks_before": masks_before, "masks_after": {k: v.clone() for k, v in sp.masks.items()},
                       "scale_before": scale_before, "scale_after": scaler.get_scale()})
        assert _all_finite(model), f"step {step}: non-finite weights"
        check_state_zero(opt, sp)
    return model, opt, sp, events


@pytest.mark.parametrize("method", MASKED_METHODS)
def test_fp16_overflow_batch_is_skipped_and_the_mask_update_postponed(method):
    """Overflow at step 0 (a mask-update step for every method here) and at step 2 (an ordinary
    step): both are skipped whole (weights and masks untouched, the scale backs off); the update due
    at step 0 happens at step 1 on finite gradients; the weights stay finite throughout."""
    _, _, sp, events = _fp16_loop(method, overflow_steps={0, 2})
    for step in (0, 2):
        e = events[step]
        assert e["update"] is None
        assert all(torch.equal(a, b) for a, b in zip(e["before"], e["after"])), "optimizer step not skipped"
        assert all(torch.equal(e["masks_before"][k], e["masks_after"][k]) for k in sp.masks)
        assert e["scale_after"] < e["scale_before"]
    assert sp.skipped_steps == 2 and not sp.pending_update
    if method != "static":
        assert events[1]["update"] is not None  # the postponed update, on finite gradients
    if method not in ("static", "snip"):
        assert events[4]["update"] is not None  # and the schedule goes on as before
    if method in ("rigl", "set", "snfs", "snip"):
        for layer in sp.layers:
            assert int(sp.masks[layer.name].sum()) == sp.target_active[layer.name]
    # ordinary finite steps do move the weights
    assert not all(torch.equal(a, b) for a, b in zip(events[3]["before"], events[3]["after"]))


def test_fp16_grow_scores_are_unscaled_gradients():
    """RigL grows by the true |gradient|: the scaled one divided by the scale (scaler.unscale_)."""
    model, _, sp, data, target = setup_sparsifier(method="rigl", delta_t=4, t_end=40)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = batch(data, target, 0)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaled = {l.name: l.weight.grad.clone() for l in sp.layers}
    seen = {}
    original = sp.grow_score

    def spy(index, layer):
        seen[layer.name] = original(index, layer).clone()
        return seen[layer.name]

    sp.grow_score = spy
    assert sp.step(0, scaler=scaler) is not None
    for name, g in scaled.items():
        torch.testing.assert_close(seen[name], (g / 2.0**8).abs())


def test_dense_method_honours_the_scaler():
    _, _, _, events = _fp16_loop("dense", overflow_steps={1})
    assert all(torch.equal(a, b) for a, b in zip(events[1]["before"], events[1]["after"]))
    assert not all(torch.equal(a, b) for a, b in zip(events[2]["before"], events[2]["after"]))


class Overflow(Callback):
    """Scales the input of chosen training steps past fp16's range (a forward pre-hook)."""

    def __init__(self, trainer, steps):
        self.steps = set(steps)
        trainer.model.register_forward_pre_hook(
            lambda module, args: (args[0] * 1e6,) if module.training and trainer.step in self.steps else None)


def test_fp16_trainer_survives_overflow_batches():
    spec = small_spec(training__precision="fp16", training__epochs=6, model__hidden_sizes=[300, 100])
    watch = MaskWatch()
    trainer = Trainer(spec, callbacks=[watch])
    Overflow(trainer, steps=[0, 3, 10])  # 0 and 10 are mask-update steps (delta_t 5)
    assert trainer.autocast_dtype is torch.float16 and trainer.scaler is not None
    report = trainer.fit()
    assert report["precision"] == "fp16" and report["leak_check"]["ok"]
    assert trainer.sparsifier.skipped_steps >= 3  # the injected ones (plus any the scaler backs off from)
    assert _all_finite(trainer.model)
    assert watch.updates > 3
    assert report["final_metrics"]["val_accuracy"] > 0.8


def test_fp16_resume_is_exact(tmp_path):
    spec = small_spec(training__precision="fp16", training__epochs=2)

    class StopAt(Callback):
        def should_stop(self, trainer):
            return trainer.step == 13

    first = Trainer(spec, callbacks=[StopAt()])
    first.fit()
    first.save_checkpoint(tmp_path / "ck.pt")
    resumed = Trainer(spec)
    resumed.load_checkpoint(tmp_path / "ck.pt")
    assert resumed.scaler.get_scale() == first.scaler.get_scale()
    resumed.fit()
    straight = Trainer(spec)
    straight.fit()
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(a, b)
    assert resumed.scaler.get_scale() == straight.scaler.get_scale()


# ----------------------------------------------------------------------------- fp32 user loops, no scaler
def test_no_scaler_update_refuses_non_finite_scores():
    """Without a scaler, nothing is checked on ordinary steps, but a mask update on NaN/inf gradients
    warns and is postponed (no drop or grow on non-finite scores), then happens on the next finite step."""
    model, opt, sp, data, target = setup_sparsifier(method="rigl", delta_t=4, t_end=40)
    for step in range(4):
        backward(model, opt, data, target, step)
        sp.step(step)
    backward(model, opt, data, target, 4)
    sp.layers[0].weight.grad[0, 0] = float("nan")
    before, masks = _params(model), {k: v.clone() for k, v in sp.masks.items()}
    with pytest.warns(RuntimeWarning, match="non-finite gradients"):
        assert sp.step(4) is None
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model)))
    assert all(torch.equal(masks[k], sp.masks[k]) for k in masks)
    backward(model, opt, data, target, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sp.step(5) is not None  # the postponed update
    assert _all_finite(model)
    for layer in sp.layers:
        assert int(sp.masks[layer.name].sum()) == sp.target_active[layer.name]


def test_no_scaler_non_finite_weights_raise_at_the_update():
    model, opt, sp, data, target = setup_sparsifier(method="rigl", delta_t=4, t_end=40)
    backward(model, opt, data, target, 1)
    sp.step(1)
    with torch.no_grad():
        sp.layers[1].weight.fill_(float("inf"))
    backward(model, opt, data, target, 4)
    with pytest.raises(FloatingPointError, match="non-finite weights"):
        sp.step(4)
