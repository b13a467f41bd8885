"""Paper recipes fill a JobSpec with the paper's numbers (docs/algorithm.md, "Paper recipes") and the user's fields win."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from rigl_core.cli import main
from rigl_core.models.registry import build_model
from rigl_core.sparse.plan import make_plan
from rigl_core.data.epochs import steps_per_epoch, total_steps
from rigl_core.sparse.schedules import resolve_t_end
from rigl_core.training.optim import lr_at
from rigl_core.training.recipes import RECIPES, recipe_names
from rigl_core.spec import JobSpec, format_validation_error

IMAGENET = {"recipe": "rigl-imagenet-resnet50", "dataset": {"path": "/data/imagenet"}}
CIFAR = {"recipe": "rigl-cifar10-wrn22-2"}


def test_imagenet_recipe_has_the_papers_numbers():
    spec = JobSpec.model_validate(IMAGENET)
    m, d, s, t = spec.model, spec.dataset, spec.sparsity, spec.training
    assert (m.name, m.zero_init_residual) == ("resnet50", True)
    assert (d.name, d.path, d.image_size, d.loader, d.augment) == (
        "imagefolder", "/data/imagenet", 224, "stream", "random-resized-crop")
    assert (s.method, s.sparsity, s.distribution, s.erk_power_scale, s.dense_first_layer) == (
        "rigl", 0.9, "erk", 1.0, False)  # ERK masks the first conv of ResNet-50 (google-research/rigl README's first_layer_sparsity=-1)
    assert (s.schedule.delta_t, s.schedule.alpha, s.schedule.decay) == (100, 0.3, "cosine")
    assert s.schedule.t_end == pytest.approx(25_000 / 32_000) and s.schedule.t_end_steps is None
    assert (t.optimizer, t.momentum, t.batch_size, t.accumulate_steps, t.max_device_batch) == (
        "nesterov", 0.9, 4096, "auto", 256)
    assert t.lr == pytest.approx(0.1 * 4096 / 256) == pytest.approx(1.6)
    assert (t.lr_schedule, t.warmup_epochs, t.gamma, t.epochs, t.max_steps) == ("step", 0, 0.1, 103, 32_000)
    assert (t.weight_decay, t.weight_decay_kernels_only, t.label_smoothing, t.precision) == (1e-4, True, 0.1, "auto")


def test_cifar_recipe_has_the_papers_numbers():
    spec = JobSpec.model_validate(CIFAR)
    s, t = spec.sparsity, spec.training
    assert (spec.model.name, spec.dataset.name, spec.dataset.augment) == ("wrn-22-2", "cifar10", "auto")
    assert (s.method, s.sparsity, s.distribution, s.dense_first_layer) == ("rigl", 0.9, "erk", True)
    assert (s.schedule.delta_t, s.schedule.alpha, s.schedule.decay) == (100, 0.3, "cosine")
    assert s.schedule.t_end == pytest.approx(75_000 / 97_656)
    assert (t.optimizer, t.momentum, t.lr, t.batch_size, t.epochs, t.max_steps) == ("nesterov", 0.9, 0.1, 128, 250,
                                                                                      97_656)
    assert t.lr_schedule == "step" and t.gamma == 0.2 and t.warmup_epochs == 0
    assert (t.weight_decay, t.label_smoothing) == (5e-4, 0.0)


# The official code's numbers (google-research/rigl): imagenet_resnet/imagenet_train_eval.py and
# cifar_resnet/resnet_train_eval.py. LR drops: the first step run at the lower LR.
OFFICIAL = [
    (IMAGENET, 1_281_167, 32_000, 25_000, (9_384, 21_895, 28_151), 1.6, 0.1),
    (CIFAR, 50_000, 97_656, 75_000, (30_001, 60_001, 90_001), 0.1, 0.2),
]


@pytest.mark.parametrize(("raw", "images", "steps", "t_end", "drops", "lr", "gamma"), OFFICIAL)
def test_recipes_resolve_to_the_official_steps_t_end_lr_drops_and_no_warmup(raw, images, steps, t_end, drops, lr,
                                                                             gamma):
    spec = JobSpec.model_validate(raw)
    t, schedule = spec.training, spec.sparsity.schedule
    total = total_steps(t, images, 1)
    assert total == steps == total_steps(t, images, 8)  # on 1 GPU or 8
    assert resolve_t_end(total, schedule.t_end, schedule.t_end_steps) == t_end
    rates = [lr_at(step, total, steps_per_epoch(images, t.batch_size), t) for step in range(total)]
    assert rates[0] == pytest.approx(lr)  # no warm-up: the full LR from the first step
    changes = [step for step in range(1, total) if rates[step] != rates[step - 1]]
    assert changes == list(drops)
    assert [rates[step] for step in changes] == pytest.approx([lr * gamma ** k for k in (1, 2, 3)])


def test_user_fields_win_at_every_depth():
    spec = JobSpec.model_validate({
        **IMAGENET, "training": {"lr": 0.4, "milestones": [0.5]}, "model": {"num_classes": 100},
        "sparsity": {"sparsity": 0.8, "schedule": {"alpha": 0.5, "delta_t": 800}},
    })
    assert (spec.training.lr, spec.training.milestones, spec.training.batch_size) == (0.4, [0.5], 4096)
    assert (spec.model.name, spec.model.num_classes, spec.model.zero_init_residual) == ("resnet50", 100, True)
    schedule = spec.sparsity.schedule
    assert (spec.sparsity.sparsity, schedule.alpha, schedule.delta_t) == (0.8, 0.5, 800)
    assert schedule.t_end == pytest.approx(25_000 / 32_000) and schedule.decay == "cosine"  # siblings still filled
    explicit_null = JobSpec.model_validate({**IMAGENET, "model": {"zero_init_residual": None}})
    assert explicit_null.model.zero_init_residual is None


def test_naming_another_model_or_dataset_drops_that_section_of_the_recipe():
    spec = JobSpec.model_validate({**IMAGENET, "model": {"name": "mlp"}, "dataset": {"name": "digits"}})
    assert spec.model.zero_init_residual is None  # resnet50's setting would be refused for an mlp
    assert (spec.dataset.loader, spec.dataset.augment, spec.dataset.image_size) == ("auto", "auto", 32)
    assert spec.training.batch_size == 4096 and spec.sparsity.schedule.delta_t == 100  # the rest still applies


def test_unknown_recipe_is_refused_naming_the_field():
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate({"recipe": "rigl-imagenet-resnet5", "model": {"name": "mlp"},
                                "dataset": {"name": "digits"}})
    message = format_validation_error(info.value)
    assert message.startswith("recipe: unknown recipe 'rigl-imagenet-resnet5'")
    assert all(name in message for name in recipe_names())


@pytest.mark.parametrize("raw", [IMAGENET, CIFAR, {**CIFAR, "dataset": {"name": "digits"},
                                                   "sparsity": {"schedule": {"alpha": 0.1}}}])
def test_revalidating_a_dumped_spec_is_idempotent(raw):
    spec = JobSpec.model_validate(raw)
    for dumped in (spec.model_dump(), json.loads(spec.model_dump_json())):
        again = JobSpec.model_validate(dumped)
        assert again == spec and again.model_dump() == spec.model_dump()


def test_zero_init_residual_zeroes_the_last_bn_of_every_resnet50_block():
    torch.manual_seed(0)
    model = build_model("resnet50", 10, [3, 64, 64], zero_init_residual=True)
    blocks = [m for m in model.modules() if type(m).__name__ == "Bottleneck"]
    assert len(blocks) == 16
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)
    assert all(torch.all(b.bn2.weight == 1) for b in blocks)  # only the block's last BN starts at 0
    plain = build_model("resnet50", 10, [3, 64, 64])
    assert all(torch.all(m.bn3.weight == 1) for m in plain.modules() if type(m).__name__ == "Bottleneck")


def test_zero_init_residual_for_declarative_blocks_and_refused_where_meaningless():
    arch = {"input_shape": [1, 8, 8], "layers": [
        {"type": "conv2d", "out_channels": 4, "kernel_size": 3, "padding": 1},
        {"type": "residual", "layers": [{"type": "conv2d", "out_channels": 4, "kernel_size": 3, "padding": 1},
                                        {"type": "batchnorm2d"}]},
        {"type": "flatten"}, {"type": "linear", "out_features": 10}]}
    spec = JobSpec.model_validate({"model": {"architecture": arch, "zero_init_residual": True},
                                   "dataset": {"name": "digits"}})
    model = build_model("custom", 10, [1, 8, 8], architecture=spec.model.architecture, zero_init_residual=True)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 1 and torch.count_nonzero(norms[0].weight) == 0
    for name in ("wrn-22-2", "mlp"):  # pre-activation WRN: a zero γ before a ReLU would never learn
        with pytest.raises(ValidationError, match="model.zero_init_residual"):
            JobSpec.model_validate({"model": {"name": name, "zero_init_residual": True}, "dataset": {"name": "digits"}})


def test_cifar_recipe_keeps_the_wrn_first_conv_dense_and_hits_the_target():
    spec = JobSpec.model_validate(CIFAR)
    model = build_model(spec.model.name, 10, [3, 32, 32], device="meta")
    plan = make_plan(model, [3, 32, 32], spec.sparsity).to_dict()
    rows = {row["name"]: row for row in plan["layers"]}
    first = next(name for name, m in model.named_modules() if isinstance(m, nn.Conv2d))
    assert first == "conv1" and not rows["conv1"]["masked"] and rows["conv1"]["density"] == 1.0
    assert all(row["masked"] for name, row in rows.items() if name != "conv1")
    assert plan["totals"]["sparsity"] == pytest.approx(0.9, abs=1e-3)


def test_imagenet_recipe_plan_matches_the_papers_erk_flops():
    spec = JobSpec.model_validate(IMAGENET)
    model = build_model("resnet50", 1000, [3, 224, 224], device="meta", zero_init_residual=True)
    plan = make_plan(model, [3, 224, 224], spec.sparsity).to_dict()
    assert plan["layers"][0]["name"] == "conv1" and plan["layers"][0]["masked"]
    assert plan["totals"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert plan["totals"]["inference_flops_ratio"] == pytest.approx(0.242, abs=0.01)  # docs/algorithm.md "FLOPs": the paper's 0.24×


def test_rigl_recipes_lists_names_descriptions_and_fields(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name, recipe in RECIPES.items():
        assert name in out and recipe.description in out
    assert "training.lr = 1.6" in out and "sparsity.schedule.delta_t = 100" in out
    assert main(["recipes", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["rigl-cifar10-wrn22-2"]["defaults"]["training"]["weight_decay"] == 5e-4


def test_cli_unknown_recipe_exits_2_naming_it(capsys, tmp_path):
    assert main(["train", "--recipe", "nope", "--out", str(tmp_path)]) == 2
    assert "rigl: error: recipe: unknown recipe 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_recipe_job_trains_with_flags_overriding_it(recipe, tmp_path):
    """The recipe's optimizer, LR schedule and smoothing run; flags shrink it to seconds (and give the
    ImageNet LR of 1.6, which the official code starts at step 0, a 1-epoch warm-up on this small MLP)."""
    out = tmp_path / "run"
    assert main(["train", "--recipe", recipe, "--model", "mlp", "--hidden-sizes", "32", "--dataset", "digits",
                 "--epochs", "3", "--batch-size", "64", "--delta-t", "5", "--no-progress",
                 "--set", "training.warmup_epochs=1", "--out", str(out)]) == 0
    ran = json.loads((out / "spec.json").read_text())
    defaults = RECIPES[recipe].defaults
    assert ran["recipe"] == recipe and ran["model"]["name"] == "mlp" and ran["dataset"]["name"] == "digits"
    training, schedule = ran["training"], ran["sparsity"]["schedule"]
    assert (training["epochs"], training["batch_size"], schedule["delta_t"]) == (3, 64, 5)
    for key in ("optimizer", "lr", "lr_schedule", "milestones", "gamma", "weight_decay", "label_smoothing"):
        assert ran["training"][key] == pytest.approx(defaults["training"][key])
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 3 * 23 and report["totals"]["sparsity"] == pytest.approx(0.9, abs=0.005)
    assert report["final_metrics"]["val_accuracy"] > 0.5  # it learns (chance is 0.1)


@pytest.fixture()
def api(make_api):
    return make_api(reaper=True)


def test_api_job_with_a_recipe_stores_the_filled_spec_with_the_override(api):
    response = api.post("/v1/jobs", json={"recipe": "rigl-cifar10-wrn22-2", "dataset": {"name": "digits"},
                                          "training": {"epochs": 2, "lr": 0.05}})
    assert response.status_code == 201, response.text
    job = api.get(f"/v1/jobs/{response.json()['id']}").json()
    spec = job["spec"]
    assert spec["recipe"] == "rigl-cifar10-wrn22-2" and spec["model"]["name"] == "wrn-22-2"
    assert (spec["training"]["lr"], spec["training"]["epochs"]) == (0.05, 2)  # the user's
    assert (spec["training"]["batch_size"], spec["training"]["optimizer"], spec["training"]["weight_decay"]) == (
        128, "nesterov", 5e-4)  # the recipe's
    assert spec["sparsity"]["dense_first_layer"] is True and spec["sparsity"]["schedule"]["delta_t"] == 100
    assert job["progress"]["total_steps"] == 2 * 12  # 1437 digits at the recipe's batch 128
    bad = api.post("/v1/jobs", json={"recipe": "nope", "model": {"name": "mlp"}, "dataset": {"name": "digits"}})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "recipe"
    assert "rigl-imagenet-resnet50" in bad.json()["error"]["message"]


def test_the_trainer_builds_the_recipes_model_with_zero_residual_bn():
    from rigl_core.training.trainer import Trainer

    spec = JobSpec.model_validate({**IMAGENET, "model": {"input_shape": [3, 32, 32]},
                                   "dataset": {"name": "synthetic", "num_samples": 64, "input_shape": [3, 32, 32]},
                                   "training": {"batch_size": 16, "epochs": 1, "device": "cpu"}})
    assert spec.model.zero_init_residual  # the recipe's model section kept: the dataset changed, not the model
    trainer = Trainer(spec)
    blocks = [m for m in trainer.model.modules() if type(m).__name__ == "Bottleneck"]
    assert blocks and all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)


@pytest.mark.parametrize(("count", "batches", "optimizer_steps"), [(True, 46, 39), (False, 53, 46)])
def test_update_iterations_count_sets_how_many_optimizer_steps_a_run_makes(count, batches, optimizer_steps):
    # 46 steps, T_end 34, ΔT 5: RigL updates at steps 0, 5, ..., 30 (7), each in place of an optimizer step.
    # Counted (the default), they are 7 of the 46 steps; not counted (the official code), 7 extra batches.
    from helpers.specs import small_spec
    from rigl_core.training.trainer import Callback, Trainer

    class Updates(Callback):
        steps = []

        def on_mask_update(self, trainer, update):
            self.steps.append(update.step)

    watch = Updates()
    spec = small_spec(training__device="cpu", sparsity__schedule__update_iterations_count=count)
    trainer = Trainer(spec, callbacks=[watch])
    taken, seen = [], []
    trainer.optimizer.register_step_post_hook(lambda *args: taken.append(trainer.step))
    step = trainer._train_step
    trainer._train_step = lambda micros: seen.append(trainer.step) or step(micros)
    report = trainer.fit()
    assert report["steps"] == report["total_steps"] == 46 and watch.steps == [0, 5, 10, 15, 20, 25, 30]
    assert (len(seen), len(taken)) == (batches, optimizer_steps)
    if not count:  # the update's step comes again and then steps the optimizer: every step steps once
        assert taken == list(range(46)) and seen.count(5) == 2


def test_recipes_follow_the_official_code_in_not_counting_update_iterations():
    assert not JobSpec.model_validate(IMAGENET).sparsity.schedule.update_iterations_count
    assert not JobSpec.model_validate(CIFAR).sparsity.schedule.update_iterations_count
    assert JobSpec.model_validate({"model": {"name": "mlp"}, "dataset": {"name": "digits"}}
                                  ).sparsity.schedule.update_iterations_count
