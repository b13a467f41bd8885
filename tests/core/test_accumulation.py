"""Gradient accumulation (`training.accumulate_steps`) and clipping (`training.clip_grad_norm`).

Accumulating A micro-batches must compute the same step as one batch of the same global size: the
same masks after every RigL update, the same weights within float rounding.
"""

from __future__ import annotations

import pytest
import torch
from helpers.specs import small_spec
from pydantic import ValidationError

from rigl_core.data.batches import BatchOrder
from rigl_core.spec import JobSpec, TrainingSpec, format_validation_error
from rigl_core.training.trainer import Callback, Trainer, resolve_accumulation


class Updates(Callback):
    def __init__(self):
        self.masks, self.losses, self.metrics = [], [], []

    def on_step(self, trainer, metrics):
        self.losses.append(metrics["loss"])
        self.metrics.append(metrics)

    def on_mask_update(self, trainer, update):
        self.masks.append({name: mask.clone() for name, mask in trainer.sparsifier.masks.items()})


def _train(**overrides):
    watch = Updates()
    trainer = Trainer(small_spec(training__device="cpu", **overrides), callbacks=[watch])
    trainer.fit()
    return trainer, watch


@pytest.mark.parametrize("steps", [2, 4])
def test_accumulation_matches_one_big_batch(steps):
    # 1797 digits → 1437 training samples: the last batch of each epoch (29 samples) is split unevenly,
    # which the per-micro-batch weights must still turn into the global mean.
    one, one_watch = _train(training__batch_size=64)
    many, many_watch = _train(training__batch_size=64, training__accumulate_steps=steps)
    assert many.accumulate_steps == steps and many.total_steps == one.total_steps
    assert len(one_watch.masks) == len(many_watch.masks) >= 5
    for a, b in zip(one_watch.masks, many_watch.masks):
        assert all(torch.equal(a[name], b[name]) for name in a)
    for (name, a), b in zip(one.model.state_dict().items(), many.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert many_watch.losses == pytest.approx(one_watch.losses, rel=1e-4)


def test_accumulation_resume_is_exact(tmp_path):
    class StopAt(Callback):
        def should_stop(self, trainer):
            return trainer.step == 13

    spec = small_spec(training__device="cpu", training__accumulate_steps=4)
    first = Trainer(spec, callbacks=[StopAt()])
    first.fit()
    first.save_checkpoint(tmp_path / "ck.pt")
    resumed = Trainer(spec)
    resumed.load_checkpoint(tmp_path / "ck.pt")
    resumed.fit()
    straight = Trainer(spec)
    straight.fit()
    for a, b in zip(resumed.model.state_dict().values(), straight.model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("batch", "world", "most", "expected"),
                         [(4096, 1, 256, 16), (4096, 8, 256, 2), (4096, 8, 1024, 1), (98, 1, 30, 7),
                          (128, 2, 64, 1), (128, 1, 1000, 1)])
def test_auto_accumulation(batch, world, most, expected):
    spec = TrainingSpec(batch_size=batch, accumulate_steps="auto", max_device_batch=most)
    steps = resolve_accumulation(spec, world)
    assert steps == expected
    assert batch % (world * steps) == 0 and batch // (world * steps) <= most


def test_batch_order_splits_the_global_batch_exactly():
    order = torch.randperm(102, generator=torch.Generator().manual_seed(0))
    ranks = [BatchOrder(102, 32, seed=0, world_size=2, rank=r, accumulate_steps=3) for r in (0, 1)]
    assert ranks[0].steps_per_epoch == 4  # 3 full batches; the last 6 samples still feed all 6 micro-batches
    for batch in range(ranks[0].steps_per_epoch):
        micros = [m for batch_order in ranks for m in batch_order.step(order, batch)]
        together = torch.cat([m.index for m in micros])
        assert torch.equal(together, order[batch * 32 : (batch + 1) * 32])
        assert sum(m.weight for m in micros) == pytest.approx(1.0)
        assert all(len(m.index) > 0 for m in micros)
    # too few samples left over for every micro-batch: that partial batch is dropped
    assert BatchOrder(101, 32, seed=0, world_size=2, accumulate_steps=4).steps_per_epoch == 3


@pytest.mark.parametrize(("training", "field"), [
    ({"batch_size": 64, "accumulate_steps": 3}, "training.batch_size"),
    ({"batch_size": 64, "devices": 3}, "training.batch_size"),
    ({"accumulate_steps": 0}, "training.accumulate_steps"),
    ({"accumulate_steps": "many"}, "training.accumulate_steps"),
    ({"devices": "some"}, "training.devices"),
    ({"devices": 2, "device": "cuda:1"}, "training.device"),
    ({"clip_grad_norm": 0}, "training.clip_grad_norm"),
    ({"clip_grad_norm": -1.0}, "training.clip_grad_norm"),
])
def test_bad_splits_name_the_field(training, field):
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate({"model": {"name": "mlp"}, "dataset": {"name": "digits"}, "training": training})
    assert format_validation_error(info.value).startswith(field + ":")


def test_clip_grad_norm_bounds_every_update():
    """Plain SGD without momentum or decay: a step moves the weights by lr × the clipped gradient,
    so no step moves them further than lr × clip_grad_norm."""
    clip, lr = 0.01, 0.5
    spec = small_spec(training__device="cpu", training__clip_grad_norm=clip, training__lr=lr,
                      training__lr_schedule="constant", training__momentum=0.0, training__weight_decay=0.0,
                      training__log_every_steps=1, sparsity__method="static", training__epochs=1)
    moves = []

    class Moves(Callback):
        def __init__(self):
            self.before = None

        def on_step(self, trainer, metrics):
            after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
            if self.before is not None:
                moves.append((float((after - self.before).norm()), metrics["grad_norm"]))
            self.before = after

    trainer = Trainer(spec, callbacks=[Moves()])
    trainer.fit()
    assert moves and all(move <= lr * clip * (1 + 1e-4) for move, _ in moves)
    assert all(norm > clip for _, norm in moves)  # the gradients really were larger: clipping did work
    unclipped = Trainer(small_spec(training__device="cpu", sparsity__method="static", training__epochs=1))
    assert unclipped.sparsifier.clip_grad_norm is None


def test_clip_with_fp16_scaler_and_accumulation():
    """The scaler unscales once per step (after the last micro-batch), then clipping sees true gradients."""
    trainer, watch = _train(training__precision="fp16", training__accumulate_steps=2, training__clip_grad_norm=1.0,
                            training__log_every_steps=1)
    norms = [m["grad_norm"] for m in watch.metrics if "grad_norm" in m]
    assert norms and all(torch.isfinite(torch.tensor(n)) for n in norms)
    assert trainer.report()["leak_check"]["ok"]
    assert max(norms) < 1e3  # unscaled: a scaled norm would be ~65536× larger
