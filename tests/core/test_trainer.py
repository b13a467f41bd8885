"""End-to-end training per method, reports, schedules and exact resume."""

from __future__ import annotations

import pytest
import torch

from helpers.specs import small_spec
from rigl_core.sparse.schedules import UpdateSchedule, gmp_sparsity, resolve_t_end
from rigl_core.training.trainer import Callback, Trainer


class Recorder(Callback):
    def __init__(self):
        self.steps, self.evals, self.updates = [], [], []

    def on_step(self, trainer, metrics):
        self.steps.append(metrics)

    def on_eval(self, trainer, metrics):
        self.evals.append(metrics)

    def on_mask_update(self, trainer, update):
        self.updates.append(update)


@pytest.mark.parametrize("method", ["dense", "static", "set", "snfs", "rigl", "gmp", "snip"])
def test_every_method_trains_to_target_sparsity(method):
    spec = small_spec(sparsity__method=method, training__epochs=10, model__hidden_sizes=[300, 100])
    rec = Recorder()
    trainer = Trainer(spec, callbacks=[rec])
    report = trainer.fit()
    totals = report["totals"]
    assert report["leak_check"]["ok"], report["leak_check"]
    assert report["steps"] == trainer.total_steps == 10 * trainer.steps_per_epoch
    assert report["final_metrics"]["val_accuracy"] > 0.85  # chance is 0.1
    assert len(rec.evals) == 10
    if method == "dense":
        assert totals["sparsity"] == 0.0 and totals["inference_flops_ratio"] == 1.0
        assert totals["training_flops_ratio"] == 1.0
        return
    assert totals["sparsity"] == pytest.approx(0.9, abs=0.005)
    for row in report["layers"]:
        assert row["nnz"] == round(row["target_density"] * row["params"])
        assert 0 < row["flops_sparse"] <= row["flops_dense"]
    # inactive weights really are zero in the model
    for layer in trainer.sparsifier.layers:
        nonzero = int(torch.count_nonzero(layer.weight))
        assert nonzero <= int(trainer.sparsifier.masks[layer.name].sum())
    if method in ("rigl", "set", "snfs"):
        assert rec.updates and rec.updates[-1].step < trainer.schedule.t_end
        assert any(u.churn > 0 for u in rec.updates)
    if method == "gmp":
        assert totals["training_flops_ratio"] > totals["inference_flops_ratio"]
    if method == "snip":
        assert [u.step for u in rec.updates] == [0]


def test_training_flops_ratio_orders_methods():
    ratios = {}
    for method in ("static", "rigl", "snfs", "dense"):
        ratios[method] = Trainer(small_spec(sparsity__method=method)).plan.training_flops_ratio()
    assert ratios["static"] < ratios["rigl"] < ratios["snfs"] < ratios["dense"] == 1.0


@pytest.mark.parametrize("method,t_end_steps", [("rigl", 5), ("gmp", 20)])
def test_training_flops_ratio_follows_t_end_steps(method, t_end_steps):
    """T_end given in steps (of 46) changes the training FLOPs as the fraction it stands for."""
    default = Trainer(small_spec(sparsity__method=method))
    early = Trainer(small_spec(sparsity__method=method, sparsity__schedule__t_end_steps=t_end_steps))
    same = Trainer(small_spec(sparsity__method=method,
                              sparsity__schedule__t_end=(t_end_steps + 0.5) / default.total_steps))
    r_default, r_early = default.plan.training_flops_ratio(), early.plan.training_flops_ratio()
    assert r_early != pytest.approx(r_default)
    # RigL: fewer dense-gradient steps, so cheaper; GMP: reaches its final sparsity sooner, so cheaper too
    assert r_early < r_default
    assert r_early == pytest.approx(same.plan.training_flops_ratio())
    assert early.plan.to_dict()["totals"]["training_flops_ratio"] == pytest.approx(r_early)


def test_cosine_schedule_and_t_end():
    s = UpdateSchedule(delta_t=100, t_end=1000, alpha=0.3)
    assert s.drop_fraction(0) == pytest.approx(0.3)
    assert s.drop_fraction(500) == pytest.approx(0.15)
    assert s.drop_fraction(50) == 0.0  # not an update step
    assert s.update_steps() == list(range(0, 1000, 100))
    assert not s.is_update_step(1000)
    assert UpdateSchedule(100, 1000, 0.3, "linear").drop_fraction(500) == pytest.approx(0.15)
    assert UpdateSchedule(100, 1000, 0.3, "constant").drop_fraction(900) == pytest.approx(0.3)
    assert resolve_t_end(1000, 0.75, None) == 750
    with pytest.raises(ValueError, match="sparsity.schedule.t_end_steps"):
        resolve_t_end(1000, 0.75, 2000)
    assert gmp_sparsity(0, 0.9, 10, 110) == 0.0
    assert gmp_sparsity(60, 0.9, 10, 110) == pytest.approx(0.9 * (1 - 0.5**3))
    assert gmp_sparsity(200, 0.9, 10, 110) == 0.9


def test_t_end_after_training_is_rejected():
    with pytest.raises(ValueError, match="t_end_steps"):
        Trainer(small_spec(sparsity__schedule__t_end_steps=10_000))


def test_config_masking_nothing_is_rejected():
    with pytest.raises(ValueError, match="masks no layer"):
        Trainer(small_spec(sparsity__exclude=["fc*"]))


def test_num_classes_too_small_is_rejected():
    with pytest.raises(ValueError, match="model.num_classes"):
        Trainer(small_spec(model__num_classes=5))


def test_lenet5_and_optimizers_train():
    for optimizer, lr in (("nesterov", 0.05), ("adam", 1e-3), ("adamw", 1e-3)):
        spec = small_spec(model__name="lenet5", model__hidden_sizes=None, training__optimizer=optimizer,
                          training__lr=lr, training__lr_schedule="step", training__warmup_epochs=0.5,
                          training__label_smoothing=0.1, training__epochs=5, sparsity__sparsity=0.5)
        report = Trainer(spec).fit()
        assert report["leak_check"]["ok"]
        assert report["final_metrics"]["val_accuracy"] > 0.5, optimizer


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def should_stop(self, trainer):
        return trainer.step >= self.step


@pytest.mark.parametrize("method,optimizer", [("rigl", "sgd"), ("snfs", "adam"), ("gmp", "nesterov"), ("srigl", "adamw")])
def test_resume_is_bitwise_identical(tmp_path, method, optimizer):
    # grad accumulation and an odd stop step put the interruption inside an accumulation window
    spec = small_spec(sparsity__method=method, training__optimizer=optimizer, training__epochs=3,
                      training__lr=0.05 if optimizer != "adam" else 1e-3,
                      sparsity__schedule__grad_accumulation_n=2 if method == "rigl" else 1)
    straight = Trainer(spec)
    straight.fit()

    first = Trainer(spec, callbacks=[StopAt(14)])
    first.fit()
    assert first.stopped_early and first.step == 14
    ckpt = first.save_checkpoint(tmp_path / "ckpt.pt")

    resumed = Trainer(spec)
    resumed.load_checkpoint(ckpt)
    assert resumed.step == 14
    resumed.fit()
    assert resumed.step == straight.step
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    for name, mask in straight.sparsifier.masks.items():
        assert torch.equal(mask, resumed.sparsifier.masks[name])
    assert straight.eval_history[-1]["val_accuracy"] == resumed.eval_history[-1]["val_accuracy"]


def test_checkpoint_for_another_spec_is_refused(tmp_path):
    trainer = Trainer(small_spec(), callbacks=[StopAt(3)])
    trainer.fit()
    path = trainer.save_checkpoint(tmp_path / "c.pt")
    other = Trainer(small_spec(training__seed=1))
    with pytest.raises(ValueError, match="different job spec"):
        other.load_checkpoint(path)
