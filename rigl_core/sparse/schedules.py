"""Mask-update schedule: which steps update masks and the drop fraction f(t) (paper §3(2))."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rigl_core.spec import SparsitySpec


@dataclass(frozen=True)
class UpdateSchedule:
    """Updates at t = 0, ΔT, 2ΔT, … while t < T_end; f(t) = α/2·(1 + cos(π t / T_end)) by default."""

    delta_t: int
    t_end: int
    alpha: float = 0.3
    decay: str = "cosine"

    def is_update_step(self, step: int) -> bool:
        return 0 <= step < self.t_end and step % self.delta_t == 0

    def drop_fraction(self, step: int) -> float:
        if not self.is_update_step(step):
            return 0.0
        progress = min(step, self.t_end) / self.t_end
        if self.decay == "cosine":
            return self.alpha / 2 * (1 + math.cos(math.pi * progress))
        if self.decay == "linear":
            return self.alpha * (1 - progress)
        if self.decay == "constant":
            return self.alpha
        raise ValueError(f"unknown decay {self.decay!r}")

    def update_steps(self) -> list[int]:
        return list(range(0, self.t_end, self.delta_t))

    def update_count(self) -> int:
        """How many steps update the masks, counted without listing them: a job the API refuses for its
        length (10^10 steps) must be refused at once, not after a list of 10^8 steps."""
        return len(range(0, self.t_end, self.delta_t))


def resolve_t_end(total_steps: int, t_end_fraction: float, t_end_steps: int | None) -> int:
    """T_end in steps; raises ValueError naming the field when it lies after the end of training."""
    if t_end_steps is not None:
        if t_end_steps > total_steps:
            raise ValueError(
                f"sparsity.schedule.t_end_steps: {t_end_steps} is after the end of training ({total_steps} steps)"
            )
        return t_end_steps
    return max(1, int(t_end_fraction * total_steps))


PAPER_DELTA_T = 100  # the paper's ΔT (§4.1)
AUTO_MIN_UPDATES = 10  # delta_t "auto": at least this many mask updates before T_end
FEW_UPDATES = 5  # fewer mask updates than this earn a warning
UPDATING_METHODS = ("set", "snfs", "rigl", "srigl")


def resolve_delta_t(delta_t: int | str, t_end: int) -> int:
    """ΔT in steps. "auto" is the paper's 100 when T_end ≥ 1000 steps, else T_end // 10 (at least 1),
    so short runs still make ≥ 10 mask updates; an integer is used as given."""
    if delta_t == "auto":
        return max(1, min(PAPER_DELTA_T, t_end // AUTO_MIN_UPDATES))
    return int(delta_t)


def few_updates_warning(method: str, delta_t: int, t_end: int, total_steps: int) -> str | None:
    """A warning when a drop/grow method makes fewer than FEW_UPDATES mask updates: a very sparse net
    trained with one or two updates is close to static sparse training, and a newcomer cannot tell why."""
    if method not in UPDATING_METHODS:
        return None
    updates = UpdateSchedule(delta_t, t_end).update_count()
    if updates >= FEW_UPDATES:
        return None
    suggested = resolve_delta_t("auto", t_end)
    return (f"sparsity.schedule.delta_t: {updates} mask update(s) before T_end (step {t_end} of {total_steps}) "
            f"with delta_t {delta_t}; set delta_t to {suggested} or \"auto\", or train for more steps, "
            f"so {method} can move its masks")


def update_schedule(sparsity: "SparsitySpec", total_steps: int) -> tuple[UpdateSchedule, list[str]]:
    """The mask-update schedule of a run of `total_steps` steps (T_end in steps, GMP's T_end clamped so its
    last pruning step happens, ΔT with "auto" resolved) and the warnings it earns. The one place this is
    worked out: training (`build_sparsifier`), the plan's FLOPs, `rigl plan` and the API's job warnings all
    call it; torch-free, so the API and the client CLI can. ValueError names the field at fault."""
    schedule = sparsity.schedule
    t_end = resolve_t_end(total_steps, schedule.t_end, schedule.t_end_steps)
    if sparsity.method == "gmp":
        t_end = min(t_end, total_steps - 1)  # the last pruning step must happen
    delta_t = resolve_delta_t(schedule.delta_t, t_end)  # "auto" scales ΔT to the run's length
    warning = few_updates_warning(sparsity.method, delta_t, t_end, total_steps)
    return UpdateSchedule(delta_t, t_end, schedule.alpha, schedule.decay), [warning] if warning else []


def with_delta_t(sparsity: "SparsitySpec", delta_t: int) -> "SparsitySpec":
    """`sparsity` with ΔT in steps (its "auto" resolved by `update_schedule`), as the plan counts FLOPs."""
    return sparsity.model_copy(update={"schedule": sparsity.schedule.model_copy(update={"delta_t": delta_t})})


def gmp_sparsity(step: int, final_sparsity: float, begin: int, end: int) -> float:
    """Zhu & Gupta cubic schedule: s_t = s_f·(1 − (1 − (t − t0)/(t1 − t0))³), dense before t0."""
    if step < begin:
        return 0.0
    if step >= end or end <= begin:
        return final_sparsity
    progress = (step - begin) / (end - begin)
    return final_sparsity * (1 - (1 - progress) ** 3)
