"""Warm starts from the user's weights (issue 13 item 4): library, CLI and service API."""

from __future__ import annotations

import pickle

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from helpers.specs import small_spec
from rigl_core.export.packed import save_dense
from rigl_core.training.trainer import Trainer
from rigl_core.training.warm_start import read_header


@pytest.fixture(scope="module")
def dense_weights(tmp_path_factory):
    """A dense MLP trained on digits for a few epochs (~1 s), saved as a safetensors state_dict."""
    torch.set_num_threads(1)
    trainer = Trainer(small_spec(sparsity__method="dense", training__epochs=6))
    trainer.fit()
    path = tmp_path_factory.mktemp("weights") / "dense.safetensors"
    save_dense(trainer.model, path)
    return path, trainer.evaluate()["val_accuracy"]


def sparsity_of(trainer: Trainer) -> float:
    total = sum(layer.numel for layer in trainer.sparsifier.layers)
    zeros = sum(int((layer.weight == 0).sum()) for layer in trainer.sparsifier.layers)
    return zeros / total


# ------------------------------------------------------------------------------------------ library
def test_magnitude_init_starts_at_the_target_sparsity_and_keeps_what_the_dense_model_knew(dense_weights):
    path, dense_accuracy = dense_weights
    assert dense_accuracy > 0.9
    warm = Trainer(small_spec(model__weights=str(path), sparsity__init="magnitude", sparsity__sparsity=0.8))
    cold = Trainer(small_spec(sparsity__sparsity=0.8))
    for trainer in (warm, cold):  # exact per-layer counts either way
        assert trainer.nnz() == trainer.sparsifier.target_active
        assert sparsity_of(trainer) == pytest.approx(0.8, abs=0.01)
    warm_accuracy, cold_accuracy = warm.evaluate()["val_accuracy"], cold.evaluate()["val_accuracy"]
    assert warm_accuracy > 0.6 and cold_accuracy < 0.3, (warm_accuracy, cold_accuracy)
    # the kept weights are the largest of each layer, with their trained values
    from safetensors.torch import load_file

    dense = load_file(str(path))
    for layer in warm.sparsifier.layers:
        trained = dense[layer.param_name]
        kept = warm.sparsifier.masks[layer.name]
        assert torch.equal(layer.weight[kept], trained[kept])
        assert trained[kept].abs().min() >= trained[~kept].abs().max()


def test_magnitude_masks_break_ties_deterministically(tmp_path):
    spec = small_spec(model__hidden_sizes=[8], sparsity__init="magnitude", sparsity__distribution="uniform",
                      sparsity__dense_first_layer=False, model__weights=str(tmp_path / "w.safetensors"))
    from rigl_core.models.registry import build_model

    model = build_model("mlp", 10, [1, 8, 8], [8])
    save_file({k: torch.ones_like(v) for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    first, second = Trainer(spec), Trainer(spec)
    for name, mask in first.sparsifier.masks.items():
        assert torch.equal(mask, second.sparsifier.masks[name])
        flat = mask.reshape(-1)  # all ties: the lowest flat indices win
        assert flat[: int(flat.sum())].all()


def test_random_init_with_weights_keeps_loaded_values_under_random_masks(dense_weights):
    path, _ = dense_weights
    trainer = Trainer(small_spec(model__weights=str(path), sparsity__method="static"))
    from safetensors.torch import load_file

    dense = load_file(str(path))
    for layer in trainer.sparsifier.layers:
        mask = trainer.sparsifier.masks[layer.name]
        assert torch.equal(layer.weight[mask], dense[layer.param_name][mask])
        assert not layer.weight[~mask].any()
    biases = {k: v for k, v in trainer.model.state_dict().items() if k.endswith("bias")}
    assert biases and all(torch.equal(v, dense[k]) for k, v in biases.items())


def test_gmp_from_dense_weights_keeps_them_until_pruning_starts(dense_weights):
    path, dense_accuracy = dense_weights
    spec = small_spec(model__weights=str(path), sparsity__method="gmp", sparsity__sparsity=0.9,
                      training__lr=1e-9, training__momentum=0.0, training__weight_decay=0.0,
                      sparsity__schedule__gmp_begin=0.5)
    trainer = Trainer(spec)
    from safetensors.torch import load_file

    dense = load_file(str(path))
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, dense[name]), name
    assert trainer.evaluate()["val_accuracy"] == pytest.approx(dense_accuracy)

    class StopBeforePruning:
        def on_step(self, t, metrics): ...
        def on_eval(self, t, metrics): ...
        def on_mask_update(self, t, update): ...
        def should_stop(self, t):
            return t.step >= t.sparsifier.gmp_begin - 1

    trainer.callbacks.append(StopBeforePruning())
    trainer.fit()
    assert trainer.step < trainer.sparsifier.gmp_begin
    assert sparsity_of(trainer) == 0.0  # nothing pruned yet: every weight still the loaded one (lr ≈ 0)
    for layer in trainer.sparsifier.layers:
        assert torch.allclose(layer.weight, dense[layer.param_name], atol=1e-6)


def test_wrong_names_or_shapes_raise_value_error_naming_model_weights_and_the_parameter(dense_weights, tmp_path):
    from safetensors.torch import load_file

    dense = load_file(str(dense_weights[0]))
    renamed = {("layer0.weight" if k == "fc1.weight" else k): v for k, v in dense.items()}
    first = next(iter(dense))
    cases = {
        "missing": ({k: v for k, v in dense.items() if k != first}, f"missing '{first}'"),
        "unexpected": ({**dense, "extra.weight": torch.zeros(3)}, "unexpected 'extra.weight'"),
        "shape": ({**dense, first: torch.zeros(3, 3)}, f"'{first}' has shape [3, 3]"),
    }
    if "fc1.weight" in dense:
        cases["renamed"] = (renamed, "missing 'fc1.weight'")
    for case, (state, expected) in cases.items():
        path = tmp_path / f"{case}.safetensors"
        save_file(state, str(path))
        with pytest.raises(ValueError) as info:
            Trainer(small_spec(model__weights=str(path), sparsity__init="magnitude"))
        assert str(info.value).startswith("model.weights: ") and expected in str(info.value), (case, info.value)


def test_non_finite_and_non_safetensors_files_are_refused(dense_weights, tmp_path):
    from safetensors.torch import load_file

    dense = load_file(str(dense_weights[0]))
    first = next(k for k, v in dense.items() if v.is_floating_point())
    bad = tmp_path / "nan.safetensors"
    save_file({**dense, first: torch.full_like(dense[first], float("nan"))}, str(bad))
    with pytest.raises(ValueError, match=f"model.weights: '{first}' holds inf or NaN"):
        Trainer(small_spec(model__weights=str(bad)))
    pickled = tmp_path / "model.pt"
    torch.save(dense, pickled)
    raw = tmp_path / "model.pkl"
    raw.write_bytes(pickle.dumps({"x": 1}))
    for path in (pickled, raw):
        with pytest.raises(ValueError, match="model.weights: not a safetensors file"):
            read_header(path)


def test_spec_rules_name_the_field():
    def error(**overrides) -> str:
        with pytest.raises(ValidationError) as info:
            small_spec(**overrides)
        from rigl_core.spec import format_validation_error

        return format_validation_error(info.value)

    assert error(sparsity__init="magnitude").startswith("sparsity.init: magnitude prunes trained weights")
    assert error(sparsity__init="magnitude", model__weights="w.safetensors",
                 sparsity__method="gmp").startswith("sparsity.init: magnitude needs a method")
    assert error(model__init_from_job="job_1").startswith("model.init_from_job:")
    assert error(model__weights="a", model__init_from_job="job_" + "0" * 20).startswith("model.init_from_job:")
    with pytest.raises(ValueError, match="model.init_from_job: only the service"):
        Trainer(small_spec(model__init_from_job="job_" + "0" * 20))


def test_cli_train_with_weights(dense_weights, tmp_path):
    from rigl_core.cli import main

    out = tmp_path / "out"
    code = main(["train", "--model", "mlp", "--hidden-sizes", "64,32", "--dataset", "digits", "--max-steps", "2",
                 "--weights", str(dense_weights[0]), "--init", "magnitude", "--sparsity", "0.8", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    import json

    report = json.loads((out / "report.json").read_text())
    assert report["spec"]["model"]["weights"] == str(dense_weights[0])
    assert report["spec"]["sparsity"]["init"] == "magnitude"


@pytest.mark.slow
def test_readme_warm_start_commands_run(tmp_path):
    """docs/guide/warm-start.md's three local commands (dense → magnitude prune + RigL, GMP from dense), shortened."""
    import re
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    section = (Path(__file__).resolve().parents[2] / "docs" / "guide" / "warm-start.md").read_text()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S) if "rigl train" in b]
    lines = [line for line in block.splitlines() if line.startswith("rigl train")]
    assert len(lines) == 3
    for line in lines:
        args = shlex.split(line)[1:] + ["--epochs", "2", "--no-progress"]
        done = subprocess.run([sys.executable, "-m", "rigl_core.cli", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, (line, done.stderr[-2000:])
    import json

    pruned = json.loads((tmp_path / "runs/prune-rigl/report.json").read_text())
    gmp = json.loads((tmp_path / "runs/gmp/report.json").read_text())
    assert pruned["spec"]["sparsity"]["init"] == "magnitude" and gmp["spec"]["sparsity"]["method"] == "gmp"


def test_tied_weights_saved_once_load_into_both_names(tmp_path):
    """safetensors' save_model stores a tied parameter (embedding = output layer) once."""
    from safetensors.torch import save_model

    from rigl_core.training.warm_start import load_weights

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(5, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    source, target = Tied(), Tied()
    save_model(source, str(tmp_path / "tied.safetensors"))
    assert len(read_header(tmp_path / "tied.safetensors")) == 1
    load_weights(target, tmp_path / "tied.safetensors")
    assert torch.equal(target.head.weight, source.embed.weight) and target.head.weight is target.embed.weight
