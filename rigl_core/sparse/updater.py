"""The one update loop every sparse-training method runs (dense, static, SET, SNFS, RigL, GMP, SNIP, N:M).

A Sparsifier owns the masks. The public way to use one is `rigl_core.RigL` (rigl_core/sparse/rigl.py), which
lets the caller (or a framework: AMP, Accelerate, Lightning) call `optimizer.step()` itself. Here the
step is split so that nothing in the decision calls the optimizer:

    decision = sparsifier.prepare_step(step, scaler)   # masks grads; says whether the optimizer may step
    if decision.take_step: optimizer.step()            # or scaler.step(optimizer)
    if decision.update_after_step: sparsifier.finish_step(step)   # SET/SNFS/GMP drop after the step

`sparsifier.step(step, scaler=scaler)` still does all three (the older one-call form).

The methods (rigl_core/sparse/sparsifier.py) differ only in when masks change and which scores drop and
grow (docs/algorithm.md "Drop and grow"): each overrides the timing and score hooks below, never the loop.
"""

from __future__ import annotations

import warnings

import torch

from rigl_core.sparse.drop_grow import DropGrowUpdate
from rigl_core.sparse.layers import Layer
from rigl_core.sparse.schedules import UpdateSchedule
from rigl_core.sparse.updates import MaskUpdate, StepDecision


class Sparsifier(DropGrowUpdate):
    """The step loop around the mask update (rigl_core/sparse/drop_grow.py). Hooks a method overrides here:
    timing (`is_update_step`, `replaces_step_on_update`, `starts_dense`) and the gradients its scores read
    (`observe_gradients`, `_score_inputs`). By default masks change every ΔT until T_end (SET, SNFS, RigL)."""

    replaces_step_on_update = False  # RigL/SNIP skip the optimizer step on update iterations
    sparse = True  # False (dense): no masks at all, plain optimizer steps

    def __init__(self, layers: list[Layer], sparsities: list[float], optimizer: torch.optim.Optimizer | None,
                 schedule: UpdateSchedule, seed: int = 0, grad_accumulation_n: int = 1, snfs_momentum: float = 0.9,
                 gmp_begin: int = 0, pattern: tuple[int, int] | None = None, fan_in: dict[str, int] | None = None,
                 ablation_threshold: float | None = None):
        super().__init__(layers if self.sparse else [], sparsities if self.sparse else [], optimizer, schedule,
                         seed, pattern, fan_in, ablation_threshold)
        self.grad_accumulation_n = grad_accumulation_n
        self.snfs_momentum = snfs_momentum
        self.gmp_begin = gmp_begin
        self.pending_update = False  # a due mask update postponed by non-finite gradients
        self.skipped_steps = 0  # steps skipped because the scaler found inf/NaN gradients
        # Clip the global norm of the gradients the optimizer applies (masked, unscaled) to this;
        # `last_grad_norm` holds the norm before clipping (a 0-d tensor: reading it syncs the GPU).
        self.clip_grad_norm: float | None = None
        self.last_grad_norm: torch.Tensor | None = None

    # ----------------------------------------------------------------- hooks: timing and gradients
    def is_update_step(self, step: int) -> bool:
        return self.schedule.is_update_step(step)

    def observe_gradients(self, step: int) -> None:
        """Read dense gradients before they are masked (SNFS EMA, RigL accumulation)."""

    def _score_inputs(self) -> list[torch.Tensor]:
        """The tensors the grow scores are computed from (this step's dense gradients by default)."""
        return [layer.weight.grad for layer in self.layers if layer.weight.grad is not None]

    # ----------------------------------------------------------------- the step
    def step(self, step: int, scaler: torch.amp.GradScaler | None = None) -> MaskUpdate | None:
        """The one-call form: prepare_step, the optimizer step (through the scaler when one is given)
        and finish_step. Returns the mask update made at this step, if any."""
        decision = self.prepare_step(step, scaler)
        if decision.take_step:
            if scaler is not None and scaler.is_enabled():
                scaler.step(self.optimizer)  # already unscaled and finite: a plain optimizer.step()
            else:
                self.optimizer.step()
        return self.finish_step(step) if decision.update_after_step else decision.update

    def prepare_step(self, step: int, scaler: torch.amp.GradScaler | None = None,
                     may_update: bool = True) -> StepDecision:
        """Everything before the optimizer step, without calling it: observe the dense gradients,
        make a due RigL/SNIP update (those skip the optimizer step), else mask and clip the
        gradients. `take_step` says whether the caller may step the optimizer now.

        Non-finite gradients never reach the masks:

        - With an enabled `scaler`, the gradients are unscaled first (`scaler.unscale_`), so grow
          scores are true gradients, and a step whose gradients hold inf/NaN is skipped whole: no
          optimizer step, no gradient observation (SNFS EMA, RigL accumulation) and no drop/grow. A
          mask update due at a skipped step is postponed to the next step with finite gradients
          (with the drop fraction of the step it was due at), so SNIP's one update and GMP's last
          pruning step are never lost. The caller still calls `scaler.update()` afterwards.
        - Without a scaler nothing is checked on ordinary steps (no per-step cost), but a mask
          update refuses non-finite scores: if any masked layer's gradient (or accumulated score)
          is non-finite, it warns and postpones the update as above, and its optimizer step is
          skipped if the method would take it at that step. Non-finite weights raise
          FloatingPointError: training has already diverged.
        - Dense training has no masks to protect: `scaler.step` skips inf/NaN steps itself. To clip,
          it unscales first (the scaler does not unscale twice) so the true gradients are clipped.

        `may_update=False` (the step after an update iteration that did not count as a step): the
        update due at `step` is already made; this is its optimizer step, whose gradient scores nothing.
        """
        if not self.sparse:
            if scaler is not None and scaler.is_enabled() and self.clip_grad_norm is not None:
                scaler.unscale_(self.optimizer)
            self._clip()
            return StepDecision(True)
        scheduled = may_update and self.is_update_step(step)
        if scaler is not None and scaler.is_enabled() and _unscale_found_inf(scaler, self.optimizer):
            self.skipped_steps += 1
            if scheduled:
                self.pending_update = True
            return self._skip_step()
        due = self.pending_update or scheduled
        if due and not self._scores_finite(step):
            self.pending_update = True
            return self._skip_step()
        if may_update:
            self.observe_gradients(step)
        if self.replaces_step_on_update and due:
            self.pending_update = False
            update = self.update_masks(step)
            self._zero_grads()
            return StepDecision(False, update=update)
        self.mask_gradients()
        self._clip()
        if due:  # SET/SNFS/GMP: pending until finish_step, so a step the caller never takes keeps it due
            self.pending_update = True
        return StepDecision(True, update_after_step=due)

    def finish_step(self, step: int) -> MaskUpdate | None:
        """After the optimizer step: the SET/SNFS/GMP mask update prepare_step found due."""
        if not self.pending_update or self.replaces_step_on_update:
            return None
        self.pending_update = False
        return self.update_masks(step)

    def _skip_step(self) -> StepDecision:
        """No optimizer step and no update; score state a skipped step may have made non-finite is
        dropped (RigL's sums keep their finite part, SNFS's EMA restarts from the next finite gradient)."""
        for name in [n for n, v in self.score_state.items() if not bool(torch.isfinite(v).all())]:
            del self.score_state[name]
        self._zero_grads()
        return StepDecision(False)

    def _clip(self) -> None:
        if self.clip_grad_norm is None or self.optimizer is None:
            return
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.last_grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm, foreach=True)

    def _scores_finite(self, step: int) -> bool:
        """Checked only on mask-update steps: weights and grow scores of every masked layer, read back
        with one synchronisation (a per-layer check costs a sync per layer on a GPU)."""
        weights = [layer.weight for layer in self.layers]
        finite = _all_finite(weights + self._score_inputs())
        if all(finite):
            return True
        for layer, ok in zip(self.layers, finite):
            if not ok:
                raise FloatingPointError(
                    f"step {step}: layer {layer.name} has non-finite weights, training has diverged "
                    "(with fp16, pass a torch.amp.GradScaler: rigl.step(scaler=scaler))")
        warnings.warn(f"step {step}: non-finite gradients, mask update postponed to the next "
                      "step with finite gradients (no drop or grow on non-finite scores)",
                      RuntimeWarning, stacklevel=3)
        return False

    def _zero_grads(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    # ----------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {**super().state_dict(), "pending_update": self.pending_update, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.pending_update = bool(state.get("pending_update", False))
        self.skipped_steps = int(state.get("skipped_steps", 0))


def _all_finite(tensors: list[torch.Tensor]) -> list[bool]:
    """Per tensor, whether every entry is finite; one device synchronisation for all of them."""
    if not tensors:
        return []
    return torch.stack([torch.isfinite(t).all() for t in tensors]).tolist()


def _unscale_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Unscale the optimizer's gradients in place (unless the caller already did, e.g. to clip) and
    say whether the scaler found inf/NaN in them, i.e. whether `scaler.step` would skip this step."""
    from torch.amp.grad_scaler import OptState

    if scaler._per_optimizer_states[id(optimizer)]["stage"] is not OptState.UNSCALED:
        scaler.unscale_(optimizer)
    found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    return any(bool(v.item()) for v in found.values())
