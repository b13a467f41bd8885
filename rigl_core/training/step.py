"""One optimizer step of the Trainer: forward and backward over this rank's micro-batches (gradient
accumulation, DDP's no_sync, autocast and the fp16 scaler), then the sparsifier's masking, clipping or
mask update, then the optimizer step it allows."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from rigl_core.training.kernels import to_channels_last
from rigl_core.training.optim import lr_at


def layout(trainer, x: torch.Tensor) -> torch.Tensor:
    """The input in the model's memory format (channels_last or as it is)."""
    return to_channels_last(x) if trainer.channels_last else x


def train_step(trainer, micros: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches. Each micro-batch's loss is weighted by
    its share of the global batch (× world size, which DDP's averaging divides back out), so the
    summed gradient is the global batch's mean gradient. Returns this rank's weighted loss."""
    lr = lr_at(trainer.step, trainer.total_steps, trainer.steps_per_epoch, trainer.spec.training)
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr
    trainer.optimizer.zero_grad(set_to_none=True)
    total = _forward_backward(trainer, micros)
    _optimizer_step(trainer)
    return total / trainer.world_size if trainer.world_size > 1 else total


def _forward_backward(trainer, micros) -> torch.Tensor:
    """Backward of every micro-batch; DDP syncs gradients on the last one only. Returns the summed loss."""
    model, scaler, dtype = trainer.forward_model, trainer.scaler, trainer.autocast_dtype
    last = len(micros) - 1
    total = None
    for number, (x, y, weight) in enumerate(micros):
        scale = weight * trainer.world_size
        sync = nullcontext() if number == last or trainer.group is None else model.no_sync()
        with sync:
            if dtype is None:  # fp32: exactly the plain loop
                loss = trainer.task.loss(model(layout(trainer, x)), x, y)
            else:
                with torch.autocast(trainer.device.type, dtype=dtype):
                    loss = trainer.task.loss(model(layout(trainer, x)), x, y)
            if scale != 1.0:
                loss = loss * scale
            (loss if scaler is None else scaler.scale(loss)).backward()
        loss = loss.detach()
        total = loss if total is None else total + loss
    return total


def _optimizer_step(trainer) -> None:
    """As a library user's loop: rigl.step() masks (and clips) the gradients or makes a RigL update
    that replaces the step; SET/GMP updates run in rigl's optimizer step post-hook."""
    scaler, tracer = trainer.scaler, trainer.tracer
    started = tracer.now() if tracer is not None else 0  # a mask update's span starts with its step
    # the step after an update iteration that did not count (update_iterations_count false) only steps
    if trainer.rigl.step(trainer.step, scaler=scaler, may_update=trainer.update_made_at != trainer.step):
        if scaler is not None:
            scaler.step(trainer.optimizer)  # already unscaled and finite: a plain optimizer.step()
        else:
            trainer.optimizer.step()
    if scaler is not None:
        scaler.update()
    update = trainer.rigl.last_update
    if update is not None:
        if tracer is not None:
            tracer.mask_update(update, started)
        for cb in trainer.callbacks if trainer.rank == 0 else ():
            cb.on_mask_update(trainer, update)
