"""`RigLCallback` for PyTorch Lightning (`lightning.pytorch`, automatic optimization).

    trainer = L.Trainer(max_steps=1000, callbacks=[RigLCallback(sparsity=0.9, delta_t=100)])

Lightning calls `optimizer.step(closure=...)` itself and runs the backward inside that closure, so
no hook outside the step sees the gradients before the update. The design:

- at `on_fit_start` (the optimizer exists, the model is on its device) the callback builds
  `RigL(module, optimizer, total_steps=trainer.estimated_stepping_batches)`;
- `on_before_optimizer_step` runs inside the closure, after the (accumulated) backward and
  AMP unscaling and before gradient clipping: there `rigl.step(step=trainer.global_step,
  scaler=...)` masks the gradients and makes a due mask update;
- the torch optimizer's `step` is gated (`StepGate`, an instance attribute): it runs the closure,
  then makes the parameter update only if `rigl.step()` returned True. On RigL/SNFS/SNIP update
  steps and on non-finite gradients the update is skipped; Lightning still counts the step
  (`global_step` advances, the LR scheduler steps), as the schedule expects.

With `accumulate_grad_batches`, Lightning runs the hook once per optimizer step, on the summed
gradients. With `precision="16-mixed"` the plugin's GradScaler is passed to `rigl.step`; an
overflowing step makes no drop/grow. The RigL state (masks, scores, step) is the callback's
`state_dict`, saved in Lightning checkpoints and restored on `ckpt_path=` resume.
"""

from __future__ import annotations

import math

from rigl_core.integrations.common import StepGate, create_rigl
from rigl_core.optional import require
from rigl_core.sparse.rigl import RigL, unwrap_optimizer

pl = require("lightning.pytorch", "lightning", "rigl_core.integrations.lightning")


class RigLCallback(pl.Callback):
    """Sparse training with RigL under a Lightning Trainer. Options as `RigL`'s (`method`,
    `delta_t`, `alpha`, `distribution`, ...); `total_steps` defaults to the Trainer's
    `estimated_stepping_batches`. After `fit`, `callback.rigl` has the masks and `report()`."""

    def __init__(self, sparsity: float = 0.9, total_steps: int | None = None, **options):
        self.sparsity = sparsity
        self.total_steps = total_steps
        self.options = options
        self.rigl: RigL | None = None
        self.update_steps: list[int] = []  # global steps at which the masks changed
        self.skipped_steps = 0  # parameter updates skipped in this fit (RigL updates, non-finite gradients)
        self._gate: StepGate | None = None
        self._state: dict | None = None  # a checkpoint's RigL state, restored before RigL exists

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not pl_module.automatic_optimization:
            raise ValueError("RigLCallback: needs automatic optimization; with manual optimization call "
                             "rigl.step() before optimizer.step() in training_step yourself")
        if len(trainer.optimizers) != 1:
            raise ValueError(f"RigLCallback: needs exactly one optimizer, got {len(trainer.optimizers)}")
        total = self.total_steps if self.total_steps is not None else trainer.estimated_stepping_batches
        if not isinstance(total, int) and (not isinstance(total, float) or not math.isfinite(total)):
            raise ValueError("total_steps: the Trainer's length is unknown (max_steps=-1 with an infinite "
                             "loader); pass RigLCallback(total_steps=...)")
        optimizer = unwrap_optimizer(trainer.optimizers[0])
        self.rigl = create_rigl(pl_module, optimizer, self.sparsity, int(total), self.options, self._state)
        self._state = None
        self.skipped_steps = 0
        self._gate = StepGate(optimizer, on_skip=self._count_skip)

    def _count_skip(self) -> None:
        self.skipped_steps += 1

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # 16-mixed; None for bf16 and 32
        self._gate.take = self.rigl.step(step=trainer.global_step, scaler=scaler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        update = self.rigl.last_update  # RigL's in rigl.step(); SET/GMP's in the optimizer step's post-hook
        if update is not None and (not self.update_steps or self.update_steps[-1] != update.step):
            self.update_steps.append(update.step)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Un-gate the optimizer and detach RigL from it; the masks and `rigl` stay for inspection."""
        if self._gate is not None:
            self._gate.remove()
            self._gate = None
        if self.rigl is not None:
            self.rigl.remove()

    def state_dict(self) -> dict:
        if self.rigl is not None:
            return {"rigl": self.rigl.state_dict(), "update_steps": list(self.update_steps)}
        return {"rigl": self._state} if self._state is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        state = state_dict.get("rigl")
        if state is None:
            return
        self.update_steps = list(state_dict.get("update_steps", []))
        if self.rigl is not None and self._gate is not None:  # restored after setup (some strategies)
            self.rigl.load_state_dict(state)
        else:
            self._state = state
