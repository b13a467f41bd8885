"""What both framework callbacks share: building `RigL` on a model that may hold a checkpoint's
weights, and skipping the framework's optimizer step on the steps RigL's mask update replaces."""

from __future__ import annotations

import torch
from torch import nn

from rigl_core.sparse.rigl import RigL, unwrap_optimizer


def create_rigl(model: nn.Module, optimizer, sparsity: float, total_steps: int, options: dict,
                state: dict | None = None) -> RigL:
    """`RigL(model, optimizer, ...)`, then `state` loaded when resuming.

    A framework restores the checkpoint's weights (and, for the Hugging Face Trainer, the optimizer
    state) before the callback can build RigL, and RigL's random initial masks would zero some of
    them: so on resume the current values are copied aside and put back before the checkpoint's
    masks are loaded (which re-masks the weights)."""
    saved = _snapshot(model, optimizer) if state is not None else None
    rigl = RigL(model, optimizer, sparsity=sparsity, total_steps=total_steps, **options)
    if state is not None:
        _restore(saved)
        rigl.load_state_dict(state)
    return rigl


def _snapshot(model: nn.Module, optimizer) -> list:
    """Copies of every matrix-or-larger parameter (the only ones RigL masks) and its optimizer state."""
    inner = unwrap_optimizer(optimizer)
    saved = []
    for param in model.parameters():
        if param.dim() > 1:
            slots = {k: v.detach().clone() for k, v in inner.state.get(param, {}).items() if torch.is_tensor(v)}
            saved.append((param, param.detach().clone(), inner.state.get(param), slots))
    return saved


def _restore(saved: list) -> None:
    with torch.no_grad():
        for param, value, state, slots in saved:
            param.copy_(value)
            for key, slot in slots.items():
                state[key].copy_(slot)


class StepGate:
    """Replaces `optimizer.step` on one optimizer object (an instance attribute, so the class and
    other optimizers are untouched) with a version that skips the parameter update when the last
    `rigl.step()` said so. `closure` (Lightning's automatic optimization passes one) runs first: it
    holds the backward, and RigL decides inside it (in the framework's before-step hook)."""

    def __init__(self, optimizer, on_skip=None):
        self.optimizer = optimizer
        self.take: bool | None = None  # rigl.step()'s answer for the step in progress; None: not asked
        self._on_skip = on_skip
        self._had_own = "step" in optimizer.__dict__  # e.g. an LR scheduler's step tracker
        self._original = optimizer.step

        def step(closure=None, **kwargs):
            return self._step(closure, **kwargs)

        if getattr(self._original, "_wrapped_by_lr_sched", False):
            step._wrapped_by_lr_sched = True  # the scheduler's tracker is still inside: keep it quiet
        self._installed = step
        optimizer.step = step

    def _step(self, closure=None, **kwargs):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        take, self.take = self.take, None
        if take is False:
            # torch's LR schedulers check that the optimizer stepped: a skipped step is still a step
            for opt in {self.optimizer, unwrap_optimizer(self.optimizer)}:
                opt._opt_called = True
            if self._on_skip is not None:
                self._on_skip()
            return loss
        result = self._original(**kwargs)
        return loss if closure is not None else result

    def remove(self) -> None:
        if self.optimizer.__dict__.get("step") is self._installed:
            if self._had_own:
                self.optimizer.step = self._original
            else:
                del self.optimizer.step
