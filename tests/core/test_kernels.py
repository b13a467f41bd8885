"""Kernel settings (issue 12 item 1): `training.channels_last`, `training.tf32` and cudnn.benchmark.

channels_last is forced on CPU here (auto would leave it off without CUDA): a LeNet-5 on digits
trains under RigL at 90% sparsity with its conv weights in channels_last layout, and the masks, the
exports and the checkpoints must be exactly what the default layout gives.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from helpers.sparse import MaskWatch
from helpers.specs import small_spec

from rigl_core.export.packed import load_packed, save_dense, save_packed
from rigl_core.training.kernels import configure_kernels, resolve_channels_last, to_channels_last
from rigl_core.models.registry import build_model
from rigl_core.spec import JobSpec, format_validation_error
from rigl_core.training.trainer import Callback, Trainer

CL = torch.channels_last


def conv_spec(channels_last, **overrides):
    """LeNet-5 on 8×8 digits, RigL at 90% ERK, a mask update every 5 steps: ~0.1 s for 2 epochs."""
    return small_spec(model__name="lenet5", model__hidden_sizes=None, training__channels_last=channels_last,
                      training__device="cpu", **overrides)


def _conv_weights(model):
    return [(n, p) for n, p in model.named_parameters() if p.dim() == 4]


class LayoutWatch(MaskWatch):
    """MaskWatch (inactive weights exactly 0, nnz at target after every update) plus: the 4-D
    weights are channels_last at every logged step, and the masks after the first update are kept."""

    def __init__(self):
        super().__init__()
        self.layouts = []
        self.first_masks = None
        self.first_details = None

    def on_step(self, trainer, metrics):
        super().on_step(trainer, metrics)
        self.layouts.append(all(p.is_contiguous(memory_format=CL) for _, p in _conv_weights(trainer.model)))

    def on_mask_update(self, trainer, update):
        super().on_mask_update(trainer, update)
        if self.first_masks is None:
            self.first_masks = {k: v.clone() for k, v in trainer.sparsifier.masks.items()}
            self.first_details = trainer.sparsifier.last_details


def _run(channels_last, **overrides):
    watch = LayoutWatch()
    trainer = Trainer(conv_spec(channels_last, **overrides), callbacks=[watch])
    trainer.sparsifier.record_details = True
    report = trainer.fit()
    return trainer, watch, report


def test_channels_last_rigl_trains_with_exact_masks():
    trainer, watch, report = _run(True, training__epochs=6)
    assert trainer.channels_last and report["channels_last"] is True and report["tf32"] is False
    weights = _conv_weights(trainer.model)
    # features.3 (16×6×5×5) is genuinely channels_last, not merely ambiguous like a 1-channel kernel
    assert any(not p.is_contiguous() for _, p in weights)
    assert watch.layouts and all(watch.layouts)  # the layout survives every optimizer step and update
    assert watch.updates >= 4 and report["leak_check"]["ok"]
    for name, target in trainer.sparsifier.target_active.items():
        assert int(trainer.sparsifier.masks[name].sum()) == target
    assert report["final_metrics"]["val_accuracy"] > 0.6


def test_channels_last_matches_the_default_layout():
    """Same seed, both layouts: identical init and masks, identical drops (|w| is the same), the same
    nnz per layer, grown sets that agree up to float-rounding near-ties of |grad|, and close losses."""
    cl, cl_watch, cl_report = _run(True, training__epochs=1)
    plain, plain_watch, plain_report = _run(False, training__epochs=1)
    assert not plain.channels_last and plain_report["channels_last"] is False
    assert all(p.is_contiguous() for _, p in _conv_weights(plain.model))
    assert cl.nnz() == plain.nnz()
    for name, mask in plain_watch.first_masks.items():
        a, b = cl_watch.first_details[name], plain_watch.first_details[name]
        assert torch.equal(a["old"], b["old"])  # same random init masks
        assert torch.equal(a["kept"], b["kept"])  # drop by |w| on identical weights
        grown_a, grown_b = a["grown"], b["grown"]
        assert int(grown_a.sum()) == int(grown_b.sum())
        assert int((grown_a & grown_b).sum()) >= 0.9 * int(grown_b.sum())
        assert int(cl_watch.first_masks[name].sum()) == int(mask.sum())
    torch.testing.assert_close(torch.tensor(cl_watch.losses), torch.tensor(plain_watch.losses),
                               rtol=5e-3, atol=5e-3)


def test_channels_last_exports_load_strictly_into_a_fresh_model(tmp_path):
    trainer, _, _ = _run(True, training__epochs=1)
    dense = save_dense(trainer.model, tmp_path / "model.safetensors")
    packed = save_packed(trainer.model, trainer.sparsifier.masks, tmp_path / "packed.safetensors")
    fresh = build_model("lenet5", trainer.num_classes, trainer.input_shape)
    for path, state in ((dense, load_file(str(dense))), (packed, load_packed(packed))):
        assert all(t.is_contiguous() for t in state.values()), path
        fresh.load_state_dict(state, strict=True)
        for name, param in trainer.model.state_dict().items():
            assert torch.equal(fresh.state_dict()[name], param), (path, name)


def test_channels_last_checkpoint_is_contiguous_and_resume_is_exact(tmp_path):
    spec = conv_spec(True, training__optimizer="nesterov")

    class StopAt(Callback):
        def should_stop(self, trainer):
            return trainer.step == 13  # between mask updates (delta_t 5)

    first = Trainer(spec, callbacks=[StopAt()])
    first.fit()
    first.save_checkpoint(tmp_path / "ck.pt")
    state = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert all(t.is_contiguous() for t in state["model"].values())
    buffers = [v for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
    assert buffers and all(t.is_contiguous() for t in buffers)
    fresh = build_model("lenet5", first.num_classes, first.input_shape)
    fresh.load_state_dict(state["model"], strict=True)  # plain, strict, default layout
    resumed = Trainer(spec)
    resumed.load_checkpoint(tmp_path / "ck.pt")
    for _, p in _conv_weights(resumed.model):
        assert p.is_contiguous(memory_format=CL)
        for value in resumed.optimizer.state[p].values():
            if torch.is_tensor(value) and value.shape == p.shape:
                assert value.is_contiguous(memory_format=CL)
    resumed.fit()
    straight = Trainer(spec)
    straight.fit()
    assert resumed.step == straight.step
    for (name, a), b in zip(resumed.model.named_parameters(), straight.model.parameters()):
        assert torch.equal(a, b), name
    for name, mask in straight.sparsifier.masks.items():
        assert torch.equal(resumed.sparsifier.masks[name], mask)


def test_channels_last_with_bf16():
    trainer, watch, report = _run(True, training__precision="bf16", training__epochs=6)
    assert report["precision"] == "bf16" and report["channels_last"] is True
    assert all(watch.layouts) and watch.updates >= 4 and report["leak_check"]["ok"]
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    assert report["final_metrics"]["val_accuracy"] > 0.6


def test_inputs_are_converted_only_when_4d():
    x4, x2 = torch.randn(2, 3, 4, 4), torch.randn(2, 5)
    assert to_channels_last(x4).is_contiguous(memory_format=CL) and not to_channels_last(x4).is_contiguous()
    assert to_channels_last(x2) is x2


def test_auto_is_off_on_cpu_and_for_models_without_conv():
    conv = build_model("lenet5", 10, [1, 8, 8])
    mlp = build_model("mlp", 10, [64], [32])
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_channels_last(None, conv, cpu) is False
    assert resolve_channels_last(None, conv, cuda) is True
    assert resolve_channels_last(None, mlp, cuda) is False
    assert resolve_channels_last(True, mlp, cpu) is True and resolve_channels_last(False, conv, cuda) is False
    trainer = Trainer(conv_spec(None, training__epochs=1))
    assert trainer.spec.training.channels_last is None and trainer.channels_last is False
    assert all(p.is_contiguous() for p in trainer.model.parameters())


def test_configure_kernels_leaves_cpu_flags_untouched():
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,  # noqa: E731
                     torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())
    before = flags()
    for tf32 in (True, False):
        assert configure_kernels(torch.device("cpu"), tf32) is False
        assert flags() == before
    Trainer(conv_spec(True, training__tf32=False, training__epochs=1))
    Trainer(conv_spec(True, training__tf32=True, training__epochs=1))
    assert flags() == before


@pytest.mark.parametrize("field,value", [("channels_last", "maybe"), ("channels_last", 2),
                                         ("channels_last", [True]), ("tf32", "fast"), ("tf32", None)])
def test_bad_values_name_the_field(field, value):
    tree = small_spec().model_dump()
    tree["training"][field] = value
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(tree)
    assert format_validation_error(info.value).startswith(f"training.{field}:")


def test_defaults():
    t = small_spec().training
    assert t.channels_last is None and t.tf32 is True
