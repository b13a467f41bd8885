"""Optimizers (SGD, Nesterov, Adam, AdamW) and stateless LR schedules (a pure function of the step)."""

from __future__ import annotations

import bisect
import math

import torch
from torch import nn

from rigl_core.sparse.layers import kernel_parameters
from rigl_core.spec import TrainingSpec


def param_groups(model: nn.Module, weight_decay: float, kernels_only: bool) -> list[dict]:
    """Weight decay on kernels only (conv, linear, attention, RNN, GPT-2 Conv1D; not embeddings, as the TF
    reference's L2), or on everything."""
    if not kernels_only:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    kernel_ids = {id(p) for p in kernel_parameters(model)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if id(p) in kernel_ids else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, spec: TrainingSpec) -> torch.optim.Optimizer:
    groups = param_groups(model, spec.weight_decay, spec.weight_decay_kernels_only)
    if spec.optimizer in ("sgd", "nesterov"):
        nesterov = spec.optimizer == "nesterov"
        if nesterov and spec.momentum == 0:
            raise ValueError("training.momentum: Nesterov needs momentum > 0")
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=nesterov)
    if spec.optimizer == "adam":
        return torch.optim.Adam(groups, lr=spec.lr)
    return torch.optim.AdamW(groups, lr=spec.lr)


def lr_at(step: int, total_steps: int, steps_per_epoch: int, spec: TrainingSpec) -> float:
    """LR at a step: optional linear warm-up, then constant, step milestones or cosine to 0."""
    warmup = int(round(spec.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return spec.lr * (step + 1) / warmup
    if spec.lr_schedule == "constant":
        return spec.lr
    if spec.lr_schedule == "step":
        progress = step / max(1, total_steps)
        return spec.lr * spec.gamma ** bisect.bisect_right(spec.milestones, progress)
    span = max(1, total_steps - warmup)
    return spec.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / span))
