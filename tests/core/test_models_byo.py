"""Models by name, offline: timm models, Hugging Face models from a config (sequence classification and
causal LM over int64 token ids), planned with integer dummy inputs. Nothing is downloaded: the hub is
switched off for the whole module."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # any hub access fails instead of downloading
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from rigl_core.cli import main  # noqa: E402
from rigl_core.spec import JobSpec, format_validation_error  # noqa: E402
from rigl_core.training.trainer import Trainer  # noqa: E402

VOCAB, L = 64, 16
BERT = {"model_type": "bert", "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": L}
GPT2 = {"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": L}


def _tokens(tmp_path, labels: bool) -> str:
    """Sequences whose class is decided by their first token (learnable), or a repeating pattern (LM)."""
    rng = np.random.default_rng(0)
    if labels:
        x = rng.integers(2, VOCAB, size=(192, L)).astype(np.int64)
        y = rng.integers(0, 2, size=192).astype(np.int64)
        x[:, 0] = y  # token 0 or 1 names the class
    else:
        start = rng.integers(0, VOCAB, size=(192, 1))
        x = ((start + np.arange(L)) % VOCAB).astype(np.int64)  # next token = this token + 1
        y = np.zeros(192, np.int64)
    path = tmp_path / "tokens.npz"
    np.savez(path, x=x, y=y)
    return str(path)


def _job(tmp_path, model: dict, task: str, steps: int = 6) -> JobSpec:
    return JobSpec.model_validate({
        "model": model,
        "dataset": {"name": "tensors", "path": _tokens(tmp_path, task != "causal-lm")},
        "sparsity": {"method": "rigl", "sparsity": 0.8, "schedule": {"delta_t": 2, "t_end": 0.9}},
        "training": {"task": task, "max_steps": steps, "batch_size": 32, "optimizer": "adam", "lr": 3e-3,
                     "device": "cpu", "log_every_steps": 2, "epochs": 2},
    })


def _assert_masks_exact(trainer: Trainer) -> None:
    assert trainer.leak_check() == {"ok": True, "leaked": {}}
    masks = trainer.sparsifier.masks
    for lp in trainer.plan.masked:
        assert int(masks[lp.layer.name].sum()) == lp.target_active  # the planned count, exactly


def test_bert_sequence_classification_trains_with_attention_masked(tmp_path):
    trainer = Trainer(_job(tmp_path, {"hf": BERT}, "sequence-classification", steps=12))
    masked = {lp.layer.name for lp in trainer.plan.masked}
    for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
        assert f"hf.bert.encoder.layer.0.{part}" in masked
    report = trainer.fit()
    assert report["task"] == "sequence-classification" and report["model"] == "hf"
    assert report["completed"]
    metrics = report["final_metrics"]
    assert math.isfinite(metrics["val_loss"]) and "val_perplexity" not in metrics
    assert 0.0 <= metrics["val_accuracy"] <= 1.0
    _assert_masks_exact(trainer)
    assert abs(report["totals"]["sparsity"] - 0.8) < 0.01


def test_gpt2_causal_lm_trains_reports_perplexity(tmp_path):
    trainer = Trainer(_job(tmp_path, {"hf": GPT2}, "causal-lm", steps=10))
    masked = {lp.layer.name for lp in trainer.plan.masked}
    assert {"hf.transformer.h.0.attn.c_attn", "hf.transformer.h.0.attn.c_proj", "hf.transformer.h.1.mlp.c_fc",
            "hf.transformer.h.1.mlp.c_proj"} <= masked  # GPT-2's Conv1D layers
    before = trainer.evaluate()
    assert before["val_loss"] == pytest.approx(math.log(VOCAB), rel=0.2)  # untrained: about uniform
    report = trainer.fit()
    metrics = report["final_metrics"]
    assert math.isfinite(metrics["val_perplexity"])
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert metrics["val_loss"] < before["val_loss"]  # the +1 pattern is being learned
    _assert_masks_exact(trainer)
    assert trainer.num_classes == VOCAB


def test_token_ids_reach_the_model_unchanged(tmp_path):
    trainer = Trainer(_job(tmp_path, {"hf": GPT2}, "causal-lm"))
    steps = trainer.feed.train_steps(trainer.batch_order, 0, 0, 0)
    x, _y, _w = next(steps)[0]
    assert x.dtype == torch.int64
    raw = trainer.feed.data.x_train
    assert any(torch.equal(x[0], row) for row in raw)  # not normalised, not cast


def test_timm_resnet_trains_with_exact_masks(tmp_path):
    spec = JobSpec.model_validate({
        "model": {"name": "timm/resnet10t"},
        "dataset": {"name": "synthetic", "num_samples": 64, "input_shape": [3, 16, 16], "num_classes": 4},
        "sparsity": {"method": "rigl", "sparsity": 0.9, "schedule": {"delta_t": 2}},
        "training": {"max_steps": 4, "batch_size": 16, "device": "cpu", "log_every_steps": 2},
    })
    trainer = Trainer(spec)
    report = trainer.fit()
    assert report["completed"] and math.isfinite(report["final_metrics"]["val_loss"])
    _assert_masks_exact(trainer)


def test_timm_vit_takes_the_data_image_size(tmp_path):
    spec = JobSpec.model_validate({
        "model": {"name": "timm/vit_tiny_patch16_224"},
        "dataset": {"name": "synthetic", "num_samples": 32, "input_shape": [3, 32, 32], "num_classes": 3},
        "sparsity": {"method": "rigl", "sparsity": 0.8, "schedule": {"delta_t": 2}},
        "training": {"max_steps": 2, "batch_size": 16, "device": "cpu", "log_every_steps": 1},
    })
    trainer = Trainer(spec)
    assert any(lp.layer.name == "blocks.0.attn.qkv" for lp in trainer.plan.masked)
    trainer.fit()
    _assert_masks_exact(trainer)


@pytest.mark.parametrize("hf, task, masked", [
    (BERT, "sequence-classification", "hf.bert.encoder.layer.1.attention.self.value"),
    (GPT2, "causal-lm", "hf.transformer.h.1.attn.c_attn"),
])
def test_rigl_plan_with_hf_config(capsys, hf, task, masked):
    assert main(["plan", "--hf", json.dumps(hf), "--task", task, "--input-shape", str(L), "--sparsity", "0.9",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    row = next(r for r in plan["layers"] if r["name"] == masked)
    assert row["masked"] and row["flops_dense"] == 2 * row["params"] * L  # every token, counted
    assert plan["totals"]["flops_dense"] > 0


def test_timm_plan(capsys):
    assert main(["plan", "--model", "timm/resnet10t", "--input-shape", "3,32,32", "--num-classes", "10",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["totals"]["flops_dense"] > 0 and abs(plan["totals"]["sparsity"] - 0.9) < 0.01


@pytest.mark.parametrize("model, message", [
    ({"name": "timm/no_such_net"}, "model.name: timm has no model 'no_such_net'"),
    ({"hf": {"model_type": "no_such_type"}}, "model.hf.model_type: transformers has no model type"),
    ({"hf": {"vocab_size": 10}}, "model.hf.model_type: required"),
    ({"hf": {"model_type": "bert", "vocab_size": "many"}}, "model.hf.vocab_size: must be an integer"),
    ({"name": "mlp", "hf": BERT}, "model.hf: give either model.name or model.hf"),
])
def test_bad_model_names_the_field(model, message):
    with pytest.raises(ValueError) as info:
        JobSpec.model_validate({"model": model, "dataset": {"name": "synthetic"}})
    assert message in format_validation_error(info.value)


def test_task_must_fit_the_model(tmp_path):
    with pytest.raises(ValueError, match="training.task: causal-lm needs a token model"):
        JobSpec.model_validate({"model": {"name": "mlp"}, "dataset": {"name": "synthetic"},
                                "training": {"task": "causal-lm"}})
    spec = _job(tmp_path, {"hf": {**GPT2, "vocab_size": 8}}, "causal-lm")
    with pytest.raises(ValueError, match="model.hf.vocab_size: 8 but the dataset has token ids up to"):
        Trainer(spec)
    long = _job(tmp_path, {"hf": {**GPT2, "n_positions": 8}}, "causal-lm")
    with pytest.raises(ValueError, match="model.input_shape: sequence length 16 exceeds"):
        Trainer(long)


def test_spec_import_stays_light():
    import subprocess
    import sys

    code = "import sys, rigl_core.spec; print('timm' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_readme_token_jobspecs_train(tmp_path):
    """docs/guide/models.md's BERT and GPT-2 JobSpecs validate and train (a few steps) on token data."""
    import re
    from pathlib import Path

    import yaml

    page = (Path(__file__).resolve().parents[2] / "docs" / "guide" / "models.md").read_text()
    examples = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", page, flags=re.S) if "hf:" in b]
    assert [e["model"]["hf"]["model_type"] for e in examples] == ["bert", "gpt2"]
    for example in examples:
        task = example["training"]["task"]
        example["dataset"]["path"] = _tokens(tmp_path, task != "causal-lm")
        example["training"].update(max_steps=3, device="cpu")
        report = Trainer(JobSpec.model_validate(example)).fit()
        assert report["task"] == task and report["leak_check"]["ok"]
        assert math.isfinite(report["final_metrics"]["val_loss"])


def test_hf_jobs_and_plans_through_the_api(make_api, tmp_path):
    """The service takes model.hf jobs over an uploaded token dataset, and plans them (causal LM too)."""
    import io

    api = make_api(reaper=True)
    buffer = io.BytesIO()
    with np.load(_tokens(tmp_path, labels=True)) as data:
        np.savez(buffer, x=data["x"], y=data["y"])
    dataset = api.post("/v1/datasets?name=tokens&format=npz", content=buffer.getvalue())
    assert dataset.status_code == 201, dataset.text
    job = api.post("/v1/jobs", json={"model": {"hf": BERT}, "dataset": {"name": "tensors", "path":
                                     dataset.json()["id"]}, "training": {"epochs": 1, "batch_size": 32}})
    assert job.status_code == 201, job.text
    assert api.sent == [job.json()["id"]]
    plan = api.post("/v1/plan", json={"model": {"hf": GPT2}, "input_shape": [L], "task": "causal-lm",
                                      "sparsity": {"sparsity": 0.8}})
    assert plan.status_code == 200, plan.text
    assert plan.json()["totals"]["sparsity"] == pytest.approx(0.8, abs=0.001)
    bad = api.post("/v1/jobs", json={"model": {"hf": {**BERT, "max_position_embeddings": L // 2}},
                                     "dataset": {"name": "tensors", "path": dataset.json()["id"]}})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "model.input_shape", bad.text
