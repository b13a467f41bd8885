"""What a job may cost, checked at submit time, not only how big its model is.

Parameters and epochs alone let a small model run for 2^31 steps (overflowing the `total_steps`
column) or a large one run for months. So every job is also capped on its total optimizer steps,
its estimated training FLOPs (the plan's training FLOPs per example × examples seen) and, for
`synthetic` data, the values generated. Each cap is a Settings field and a 422 naming the field.
"""

from __future__ import annotations

import math

from rigl_core.spec import JobSpec
from rigl_core.data.epochs import planned_world_size, total_steps
from store.settings import Settings

from api.errors import ApiError


def planned_steps(spec: JobSpec, num_train: int) -> int:
    """The job's total steps as the Trainer will count them (rigl_core.training.length)."""
    return total_steps(spec.training, num_train, planned_world_size(spec.training))


def check_costs(spec: JobSpec, settings: Settings, num_train: int | None,
                training_flops_per_example: float | None) -> int:
    """Raise a 422 when the job would cost more than the settings allow; returns its total steps
    (0 when the training-set size is only known once the worker reads the data)."""
    dataset, training = spec.dataset, spec.training
    if dataset.name == "synthetic":
        values = dataset.num_samples * math.prod(dataset.input_shape)
        if values > settings.max_synthetic_values:
            raise ApiError(422, "too_large", f"num_samples × input_shape is {values:,} values, over the limit of "
                                             f"{settings.max_synthetic_values:,}", "dataset.num_samples")
    # Unknown size (an image folder is counted by the worker): bound it by the folder cap the job states.
    bound = num_train if num_train is not None else (dataset.max_samples if dataset.name == "imagefolder" else None)
    if bound is None and training.max_steps is None:
        return 0
    steps = planned_steps(spec, bound) if bound is not None else training.max_steps
    field = "training.max_steps" if training.max_steps else "training.epochs"
    if steps > settings.max_total_steps:
        raise ApiError(422, "too_large", f"{steps:,} training steps is over the limit of "
                                         f"{settings.max_total_steps:,}; lower {field}", field)
    if training_flops_per_example is not None:
        flops = training_flops_per_example * steps * training.batch_size
        if flops > settings.max_training_flops:
            raise ApiError(422, "too_large", f"an estimated {flops:.3g} training FLOPs is over the limit of "
                                             f"{settings.max_training_flops:.3g}; train fewer steps or a "
                                             "smaller or sparser model", "training")
    return planned_steps(spec, num_train) if num_train is not None else 0
