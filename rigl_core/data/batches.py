"""Which samples each rank and micro-batch trains on at each step: the batch order of a job, shared by
the in-memory and the streamed feeds so both see exactly the same batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rigl_core.data.dataset import DatasetError, epoch_order
from rigl_core.data.epochs import steps_per_epoch


@dataclass(frozen=True)
class Micro:
    """One micro-batch of this rank: sample indices and the share of the global batch they weigh."""

    index: torch.Tensor
    weight: float  # len(index) / global batch size


@dataclass(frozen=True)
class BatchOrder:
    """Which samples each rank and micro-batch trains on at each step of an epoch."""

    num_samples: int
    batch_size: int  # global: across devices and micro-batches
    seed: int
    world_size: int = 1
    rank: int = 0
    accumulate_steps: int = 1

    def __post_init__(self) -> None:
        if self.num_samples < self.pieces:
            raise DatasetError(f"dataset: {self.num_samples} training samples cannot fill {self.pieces} "
                               "micro-batches (devices × accumulate_steps)")

    @property
    def pieces(self) -> int:
        return self.world_size * self.accumulate_steps

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.num_samples, self.batch_size, self.pieces)

    def order(self, epoch: int, device: torch.device | None = None) -> torch.Tensor:
        order = epoch_order(self.num_samples, self.seed, epoch)
        return order if device is None else order.to(device)

    def step(self, order: torch.Tensor, batch: int) -> list[Micro]:
        """This rank's micro-batches of batch `batch` of the epoch whose sample order is `order`."""
        chunk = order[batch * self.batch_size : (batch + 1) * self.batch_size]
        total = len(chunk)
        if self.pieces == 1:
            return [Micro(chunk, 1.0)]
        mine = torch.tensor_split(chunk, self.world_size)[self.rank]
        return [Micro(part, len(part) / total) for part in torch.tensor_split(mine, self.accumulate_steps)]


def _share(count: int, rank: int, world_size: int) -> tuple[int, int]:
    base, extra = divmod(count, world_size)
    begin = rank * base + min(rank, extra)
    return begin, begin + base + (1 if rank < extra else 0)
