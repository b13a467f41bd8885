"""`training.compile: true`: torch.compile (inductor, on CPU here) around the model, masks exact.

The sparsifier masks the weights in place between steps; the compiled graph reads them as inputs,
so drop/grow must show through without recompiling into stale weights. One compiled run is compared
with the eager run of the same spec: same masks after every update, weights within float rounding.
"""

from __future__ import annotations

import pytest
import torch
from helpers.specs import small_spec

from rigl_core.training.trainer import Callback, Trainer

pytestmark = pytest.mark.slow  # inductor compiles C++ for the first steps: ~30 s on 2 cores


class MaskLog(Callback):
    def __init__(self):
        self.masks = []
        self.leaks = []

    def on_mask_update(self, trainer, update):
        self.masks.append({n: m.clone() for n, m in trainer.sparsifier.masks.items()})
        self.leaks.append(trainer.leak_check()["ok"])


def test_compiled_training_keeps_masks_exact(tmp_path):
    runs = {}
    for compiled in (False, True):
        log = MaskLog()
        trainer = Trainer(small_spec(training__device="cpu", training__compile=compiled, training__epochs=1),
                          callbacks=[log])
        report = trainer.fit()
        runs[compiled] = (trainer, log, report)
    (eager, eager_log, _), (fast, fast_log, report) = runs[False], runs[True]
    assert report["compile"] is True and report["leak_check"]["ok"] and all(fast_log.leaks)
    assert len(fast_log.masks) == len(eager_log.masks) >= 3
    for a, b in zip(eager_log.masks, fast_log.masks):
        assert all(torch.equal(a[name], b[name]) for name in a)
    assert fast.nnz() == eager.nnz()
    for (name, a), b in zip(eager.model.state_dict().items(), fast.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    # checkpoints and exports name the plain model's parameters, not the compiled wrapper's
    fast.save_checkpoint(tmp_path / "ck.pt")
    state = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert set(state["model"]) == set(eager.model.state_dict())
