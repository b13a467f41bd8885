"""From a SparsitySpec and a run's length to a ready sparsifier: the update schedule, the per-layer plan and
the method's sparsifier. The library's `RigL` and the service's Trainer both build theirs here, so a JobSpec
and the same library options train the same masks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from rigl_core.sparse.plan import Plan, make_plan
from rigl_core.sparse.schedules import update_schedule, with_delta_t
from rigl_core.sparse.sparsifier import SPARSIFIERS
from rigl_core.sparse.updater import Sparsifier
from rigl_core.spec import SparsitySpec


class BuiltSparsifier(NamedTuple):
    sparsifier: Sparsifier  # masks not yet made: call init_masks() (after a warm start sets initial_masks)
    plan: Plan
    warnings: list[str]  # what the schedule gets wrong (too few mask updates), for the run's report


def build_sparsifier(model: nn.Module, optimizer: torch.optim.Optimizer | None, sparsity: SparsitySpec,
                     total_steps: int, *, input_shape: Sequence[int] | None = None, seed: int = 0
                     ) -> BuiltSparsifier:
    """The sparsifier of `sparsity.method` over the layers `make_plan` masks, on the schedule of a run of
    `total_steps` steps. ValueError names the JobSpec field at fault (`sparsity.schedule.gmp_begin`)."""
    schedule, warnings = update_schedule(sparsity, total_steps)
    settings = sparsity.schedule
    gmp_begin = int(settings.gmp_begin * total_steps)
    if sparsity.method == "gmp" and gmp_begin >= schedule.t_end:
        raise ValueError("sparsity.schedule.gmp_begin: pruning must begin before T_end")
    plan = make_plan(model, input_shape, with_delta_t(sparsity, schedule.delta_t))
    sparsifier = SPARSIFIERS[sparsity.method](
        [lp.layer for lp in plan.masked], [lp.target_sparsity for lp in plan.masked], optimizer, schedule,
        seed=seed, grad_accumulation_n=settings.grad_accumulation_n, snfs_momentum=settings.snfs_momentum,
        gmp_begin=gmp_begin, pattern=sparsity.nm, ablation_threshold=sparsity.ablation_threshold,
        fan_in={lp.layer.name: lp.fan_in for lp in plan.masked} if sparsity.fan_in else None,
    )
    return BuiltSparsifier(sparsifier, plan, warnings)
