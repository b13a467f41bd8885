"""How long a job trains: steps per epoch and total optimizer steps, one rule for the Trainer's batch
plan, the API's cost cap and the CLI. Torch-free, so the API server and the client CLI can plan a job
without loading torch.
"""

from __future__ import annotations

from rigl_core.spec import TrainingSpec


def resolve_accumulation(t: TrainingSpec, world_size: int) -> int:
    """accumulate_steps as given, or (auto) the fewest micro-batches that keep each device's micro-batch
    within max_device_batch and split the global batch evenly."""
    if t.batch_size % world_size:
        raise ValueError(f"training.batch_size: {t.batch_size} is not divisible by the {world_size} devices")
    if t.accumulate_steps != "auto":
        if t.batch_size % (world_size * t.accumulate_steps):
            raise ValueError(f"training.batch_size: {t.batch_size} is not divisible by devices × accumulate_steps "
                             f"({world_size} × {t.accumulate_steps})")
        return t.accumulate_steps
    per_device = t.batch_size // world_size
    steps = -(-per_device // t.max_device_batch)
    while per_device % steps:
        steps += 1
    return steps


def steps_per_epoch(num_samples: int, batch_size: int, micro_batches: int = 1) -> int:
    """Full batches, plus the last partial one when each of its `micro_batches` (devices ×
    accumulate_steps) gets at least one sample; a smaller tail is dropped."""
    full, rest = divmod(num_samples, batch_size)
    return full + (1 if rest >= micro_batches else 0)


def planned_world_size(t: TrainingSpec) -> int:
    """The ranks a job asks for (nodes × devices); `all` counts as 1 where the GPUs are not known (the API
    server): with one micro-batch per step every tail counts, so the planned length is an upper bound."""
    return (t.devices if isinstance(t.devices, int) else 1) * t.nodes


def total_steps(t: TrainingSpec, num_train: int, world_size: int) -> int:
    """epochs × steps per epoch, or `max_steps` when that is shorter."""
    micro_batches = world_size * resolve_accumulation(t, world_size)
    steps = t.epochs * steps_per_epoch(num_train, t.batch_size, micro_batches)
    return min(steps, t.max_steps) if t.max_steps else steps


# Epochs to start from on a built-in dataset when the user has not chosen (GET /v1/datasets offers them, the
# dashboard's New-job form fills them in); any other dataset starts from TrainingSpec's default (20).
# digits: the default, ~0.97 at 90% sparsity with 10 mask updates (bench/results/quickstart.md);
# mnist1d: bench/methods.py's length (its MLP at 90%: 0.50 validation accuracy after 20 epochs, 0.63 after 60).
SUGGESTED_EPOCHS = {"mnist1d": 60}


def suggested_epochs(dataset: str) -> int:
    return SUGGESTED_EPOCHS.get(dataset, TrainingSpec.model_fields["epochs"].default)
