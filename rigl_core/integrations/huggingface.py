"""`RigLCallback` for the Hugging Face `transformers.Trainer`.

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[RigLCallback(sparsity=0.9, delta_t=100)])

The Trainer steps its (Accelerate-prepared) optimizer itself; its hooks, per optimizer step, run
after the accumulated backward and gradient clipping (`on_pre_optimizer_step`) and after the step
(`on_optimizer_step`), and neither can cancel the step. The design:

- `on_train_begin` (the optimizer exists; on resume, the checkpoint's weights and optimizer state
  are loaded) builds `RigL(model, optimizer, total_steps=state.max_steps)` and gates the Trainer's
  optimizer: its `step` becomes an instance attribute that skips the update when told to;
- `on_pre_optimizer_step` calls `rigl.step(step=state.global_step, scaler=...)`: gradients masked
  (unscaled first with fp16), a due mask update made; when it returns False (RigL/SNFS/SNIP update
  steps, non-finite gradients) the gated step makes no parameter update (with fp16 it still calls
  `scaler.update()`), so nothing moves and no momentum or Adam moment changes at any position.

Gradient accumulation needs nothing more: the hooks only run on the optimizer steps, on the summed
gradients. The Trainer clips (`max_grad_norm`, 1.0 by default) before the hook, over the dense
gradients: the grow scores are scaled uniformly by it (their ranking is unchanged), and the norm also
counts the inactive positions' gradients, so clipping is a little stronger than on the masked ones.
Checkpoints: `on_save` writes the RigL state to `rigl_state.pt` (tensors only, loaded with
`weights_only=True`) in the checkpoint folder; `trainer.train(resume_from_checkpoint=...)` with a
checkpoint of `args.output_dir` finds it, or pass `RigLCallback(resume_from=folder)`.
"""

from __future__ import annotations

import os

import torch

from rigl_core.integrations.common import StepGate, create_rigl
from rigl_core.optional import require

require("transformers", "models", "rigl_core.integrations.huggingface")  # its Trainer also needs accelerate
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402
from rigl_core.sparse.rigl import RigL

STATE_FILE = "rigl_state.pt"


class RigLCallback(TrainerCallback):
    """Sparse training with RigL under the Hugging Face Trainer. Options as `RigL`'s (`method`,
    `delta_t`, `distribution`, `include`/`exclude`, ...); `total_steps` defaults to the Trainer's
    `max_steps`. After training, `callback.rigl` has the masks and `report()`."""

    def __init__(self, sparsity: float = 0.9, total_steps: int | None = None, resume_from: str | None = None,
                 **options):
        self.sparsity = sparsity
        self.total_steps = total_steps
        self.resume_from = resume_from
        self.options = options
        self.rigl: RigL | None = None
        self.update_steps: list[int] = []  # global steps at which the masks changed
        self.skipped_steps = 0  # parameter updates skipped (RigL updates, non-finite gradients)
        self._gate: StepGate | None = None
        self._optimizer = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise ValueError("RigLCallback: the Trainer passed no model or optimizer to on_train_begin")
        total = self.total_steps if self.total_steps is not None else state.max_steps
        saved = None
        if state.global_step > 0 or self.resume_from is not None:  # resuming: the checkpoint has our state
            folder = self.resume_from or os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            path = os.path.join(folder, STATE_FILE)
            if not os.path.isfile(path):
                raise ValueError(f"resume_from: no {STATE_FILE} in {folder}; pass RigLCallback(resume_from="
                                 f"<the checkpoint folder>) when it is not in output_dir")
            saved = torch.load(path, map_location="cpu", weights_only=True)
            self.update_steps = [int(s) for s in saved.pop("update_steps", [])]
        self.rigl = create_rigl(model, optimizer, self.sparsity, int(total), self.options, saved)
        self._optimizer = optimizer
        self._gate = StepGate(optimizer, on_skip=self._after_skip)

    def _after_skip(self) -> None:
        """A skipped step still ends the scaler's iteration (Accelerate runs `scaler.update()` only
        inside the step), or the next `unscale_` fails."""
        self.skipped_steps += 1
        scaler = getattr(self._optimizer, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scaler.update()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        scaler = getattr(self._optimizer, "scaler", None)  # Accelerate's GradScaler with fp16
        self._gate.take = self.rigl.step(step=state.global_step, scaler=scaler)

    def on_step_end(self, args, state, control, **kwargs):
        update = self.rigl.last_update  # RigL's in rigl.step(); SET/GMP's in the step's post-hook
        if update is not None and (not self.update_steps or self.update_steps[-1] != update.step):
            self.update_steps.append(update.step)

    def on_save(self, args, state, control, **kwargs):
        if self.rigl is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save({**self.rigl.state_dict(), "update_steps": list(self.update_steps)},
                   os.path.join(folder, STATE_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        """Un-gate the optimizer and detach RigL from it; the masks and `rigl` stay for inspection."""
        if self._gate is not None:
            self._gate.remove()
            self._gate = None
        if self.rigl is not None:
            self.rigl.remove()
