"""The Lightning and Hugging Face Trainer callbacks (rigl_core/integrations): the framework steps
the optimizer, yet masks stay exact (inactive weights and optimizer state 0), the mask updates come
on schedule, the parameter update is skipped exactly on RigL's update steps, and resume is exact."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ["HF_HUB_OFFLINE"] = "1"  # models come from configs: nothing may be downloaded

L = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from rigl_core.integrations import huggingface as rigl_hf  # noqa: E402
from rigl_core.integrations import lightning as rigl_lightning  # noqa: E402


def _check_exact(rigl, optimizer) -> None:
    """Inactive weights and every per-element optimizer slot exactly 0; each layer at its target count."""
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    for layer in rigl.sparsifier.layers:
        inactive = ~rigl.masks[layer.name]
        assert not layer.weight[inactive].any(), f"{layer.name}: nonzero inactive weights"
        for key, value in inner.state.get(layer.weight, {}).items():
            if torch.is_tensor(value) and value.shape == layer.weight.shape:
                assert not value[inactive].any(), f"{layer.name}: optimizer state {key} leaks"
        assert int(rigl.masks[layer.name].sum()) == rigl.sparsifier.target_active[layer.name]


# ---------------------------------------------------------------------------------------- Lightning
class MLP(L.LightningModule):
    """Records, from a post-hook on the torch optimizer, the global step of every real parameter update."""

    def __init__(self, scheduler: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 4))
        self.scheduler = scheduler
        self.updated_at: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        # inside the step, Lightning has not yet counted it: global_step is the step's index
        optimizer.register_step_post_hook(lambda *_: self.updated_at.append(self.trainer.global_step))
        if not self.scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 5, 0.9)  # steps on skipped steps too
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _loader(batches: int, batch: int = 16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batches * batch, 32, generator=g)
    y = (x[:, :4].argmax(1)).long()  # learnable
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def _lightning_trainer(max_steps: int, callback, **kwargs):
    return L.Trainer(max_steps=max_steps, callbacks=[callback], accelerator="cpu", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_lightning_callback_masks_exact_and_skips_exactly_the_update_steps(precision):
    """fp16 on CPU: Lightning would turn "16-mixed" into bf16, so its fp16 plugin (with a GradScaler,
    which RigL unscales through) is passed explicitly."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    module = MLP()
    callback = rigl_lightning.RigLCallback(sparsity=0.9, delta_t=5)
    precision = ({"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**8))]}
                 if precision == "16-mixed" else {"precision": precision})
    trainer = _lightning_trainer(30, callback, accumulate_grad_batches=2, **precision)
    trainer.fit(module, _loader(64))
    rigl = callback.rigl
    assert rigl.total_steps == 30 == trainer.global_step  # from estimated_stepping_batches
    expected = [0, 5, 10, 15, 20]  # every delta_t steps before T_end = 0.75 · 30
    assert callback.update_steps == expected
    assert module.updated_at == [s for s in range(30) if s not in expected]  # one real update per other step
    assert callback.skipped_steps == len(expected)
    _check_exact(rigl, trainer.optimizers[0])
    report = rigl.report()
    assert report["leak_check"]["ok"] and abs(report["totals"]["sparsity"] - 0.9) < 0.005
    assert report["totals"]["exploration"] > 1 - report["totals"]["sparsity"]  # drop/grow moved weights
    assert "step" not in trainer.optimizers[0].__dict__  # the gate is removed after fit
    if "plugins" in precision:  # the scaler went through every step (skipped ones too) without an overflow
        scaler = trainer.precision_plugin.scaler
        assert scaler is not None and scaler.get_scale() == 2.0**8 and rigl.sparsifier.skipped_steps == 0


def test_lightning_checkpoint_resume_gives_the_same_masks_and_weights(tmp_path):
    """20 steps straight vs 10 steps, a checkpoint, and 10 more in a fresh module and callback (one
    full batch per epoch: Lightning's data position on resume cannot change what a step sees)."""
    straight = MLP(scheduler=True)
    reference = rigl_lightning.RigLCallback(sparsity=0.9, delta_t=4)
    _lightning_trainer(20, reference).fit(straight, _loader(1, 160))

    first = rigl_lightning.RigLCallback(sparsity=0.9, delta_t=4, total_steps=20)  # stopped half way
    trainer = _lightning_trainer(10, first)
    trainer.fit(MLP(scheduler=True), _loader(1, 160))
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed_module = MLP(scheduler=True)
    resumed = rigl_lightning.RigLCallback(sparsity=0.9, delta_t=4)
    trainer = _lightning_trainer(20, resumed)
    trainer.fit(resumed_module, _loader(1, 160), ckpt_path=tmp_path / "half.ckpt")

    assert resumed.update_steps == reference.update_steps == [0, 4, 8, 12]
    assert resumed_module.updated_at == [s for s in range(10, 20) if s != 12]
    for name, mask in reference.rigl.masks.items():
        assert torch.equal(mask, resumed.rigl.masks[name]), name
    for a, b in zip(straight.parameters(), resumed_module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    _check_exact(resumed.rigl, trainer.optimizers[0])


def test_lightning_callback_refuses_manual_optimization():
    class Manual(MLP):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            return None

    with pytest.raises(ValueError, match="automatic optimization"):
        _lightning_trainer(2, rigl_lightning.RigLCallback()).fit(Manual(), _loader(2))


# -------------------------------------------------------------------------- Hugging Face Trainer
class TokenData(torch.utils.data.Dataset):
    """Random token ids with a learnable label (is token 1 present), as the Trainer's dict samples."""

    def __init__(self, n: int = 64, length: int = 16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, 100, (n, length), generator=g)
        self.ids[: n // 2, 3] = 1
        self.labels = (self.ids == 1).any(1).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def _bert():
    config = transformers.AutoConfig.for_model(
        "bert", vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_config(config)


def _hf_trainer(model, callback, out, max_steps: int, **kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True, learning_rate=1e-3,
        dataloader_num_workers=0, seed=0, **kwargs)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=[callback])
    trainer.create_optimizer_and_scheduler(num_training_steps=max_steps)
    updated_at: list[int] = []  # global step of every real parameter update (the Trainer counts after it)
    trainer.optimizer.register_step_post_hook(lambda *_: updated_at.append(trainer.state.global_step))
    return trainer, updated_at


def test_hf_trainer_callback_masks_bert_exactly_with_accumulation(tmp_path):
    model = _bert()
    callback = rigl_hf.RigLCallback(sparsity=0.9, delta_t=4)
    trainer, updated_at = _hf_trainer(model, callback, tmp_path, 20, save_strategy="no")
    trainer.train()
    rigl = callback.rigl
    expected = [0, 4, 8, 12]  # T_end = 0.75 · 20
    assert rigl.total_steps == 20 and callback.update_steps == expected
    assert updated_at == [s for s in range(20) if s not in expected] and callback.skipped_steps == 4
    masked = set(rigl.masks)
    for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"):
        assert f"bert.encoder.layer.1.{part}" in masked, part
    assert "classifier" in masked
    _check_exact(rigl, trainer.optimizer)  # AdamW's moments included
    report = rigl.report()
    assert report["leak_check"]["ok"] and abs(report["totals"]["sparsity"] - 0.9) < 0.005
    assert report["totals"]["exploration"] > 1 - report["totals"]["sparsity"]


@pytest.mark.slow
def test_hf_trainer_checkpoint_resume_gives_the_same_masks(tmp_path):
    reference = rigl_hf.RigLCallback(sparsity=0.9, delta_t=4)
    _hf_trainer(_bert(), reference, tmp_path / "straight", 16, save_strategy="no")[0].train()

    first = rigl_hf.RigLCallback(sparsity=0.9, delta_t=4)  # killed after its checkpoint at step 8
    _hf_trainer(_bert(), first, tmp_path / "run", 16, save_strategy="steps", save_steps=8)[0].train()
    assert (tmp_path / "run" / "checkpoint-8" / rigl_hf.STATE_FILE).is_file()
    resumed = rigl_hf.RigLCallback(sparsity=0.9, delta_t=4)
    trainer, updated_at = _hf_trainer(_bert(), resumed, tmp_path / "run", 16, save_strategy="no")
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-8"))
    assert resumed.update_steps == reference.update_steps == [0, 4, 8]
    assert updated_at == [s for s in range(8, 16) if s != 8]
    for name, mask in reference.rigl.masks.items():
        assert torch.equal(mask, resumed.rigl.masks[name]), name
    _check_exact(resumed.rigl, trainer.optimizer)


# ----------------------------------------------------------------- docs/guide/integrations.md
def _readme_block(marker: str) -> str:
    from helpers.doc_pages import block

    return block("python", "guide/integrations.md", marker)


@pytest.mark.parametrize("marker", ["rigl_core.integrations.lightning", "rigl_core.integrations.huggingface"])
def test_readme_callback_snippets_run(marker, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    exec(compile(_readme_block(marker), f"docs/guide/integrations.md {marker}", "exec"), namespace)
    callback = namespace["callback"]
    assert callback.update_steps and callback.rigl.leak_check()["ok"]
    assert abs(callback.rigl.report()["totals"]["sparsity"] - 0.9) < 0.01
