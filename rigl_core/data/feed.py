"""How samples reach the model: the batch order every loader shares, and the in-memory feed.

A step trains on one *global* batch of `batch_size` samples, drawn in the order `epoch_order(seed,
epoch)` gives. With `world_size` devices and `accumulate_steps` micro-batches, each rank takes its
contiguous share of the global batch and cuts it into micro-batches; every rank's loss is weighted by
its share so the all-reduced gradient is exactly the global batch's mean gradient, whatever the split.
A single-device run with the same global batch therefore computes the same step (within float
rounding), and a resumed run restarts mid-epoch at the very batch it stopped at.

Two feeds implement the same two methods, `train_steps` and `val_batches`:
- `MemoryFeed`: the dataset as tensors (on the GPU when it fits), normalised once up front;
- `StreamFeed` (streaming.py): files decoded by DataLoader worker processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from rigl_core.data.batches import BatchOrder, _share
from rigl_core.data.dataset import Dataset, DatasetError

PRENORMALIZE_MAX_BYTES = 2 * 1024**3  # keep normalised float copies of in-memory data up to this size


class MemoryFeed:
    """An in-memory `Dataset` as a feed: batches are gathered and prepared on the training device, or
    on the CPU and copied over when the data would take more than half of the GPU's free memory."""

    def __init__(self, data: Dataset, device: torch.device):
        raw = sum(t.numel() * t.element_size() for t in (data.x_train, data.y_train, data.x_val, data.y_val))
        normalized = 4 * (data.x_train.numel() + data.x_val.numel())
        prenormalize = normalized <= PRENORMALIZE_MAX_BYTES
        self.home = device  # where the samples live
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            if raw + (normalized if prenormalize else 0) > free // 2:
                self.home = torch.device("cpu")
        self.data = data.to(self.home)
        self.device = device
        self.num_classes = data.num_classes
        self.input_shape = data.input_shape
        self.num_train = len(data.x_train)
        self.num_val = len(data.x_val)
        # Normalise once instead of every step; augmentation (if any) still runs per batch.
        self._train = self._val = None
        if prenormalize:
            self._train = self.data.prepare(self.data.x_train, train=False)
            self._val = self.data.prepare(self.data.x_val, train=False)

    def max_label(self) -> int:
        return int(max(self.data.y_train.max(), self.data.y_val.max()))

    @property
    def tokens(self) -> bool:
        """Whether the samples are int64 token ids (passed to the model unchanged)."""
        return self.data.tokens

    def max_token(self) -> int:
        return int(max(self.data.x_train.max(), self.data.x_val.max()))

    def train_steps(self, batch_order: BatchOrder, epoch: int, start_batch: int, first_step: int
                    ) -> Iterator[list[tuple[torch.Tensor, torch.Tensor, float]]]:
        """Per step from `start_batch` to the end of the epoch: this rank's micro-batches as
        (input, labels, weight)."""
        order = batch_order.order(epoch, self.home)
        data, device, moved = self.data, self.device, self.home != self.device
        augment = data.augment and data.x_train.dim() == 4
        for batch in range(start_batch, batch_order.steps_per_epoch):
            step = first_step + batch - start_batch
            micros = []
            for number, micro in enumerate(batch_order.step(order, batch)):
                key = (step if batch_order.pieces == 1
                       else (step * batch_order.world_size + batch_order.rank) * 4096 + number)
                if self._train is not None:
                    x = self._train[micro.index]
                    if augment:
                        x = data.augment_batch(x, seed=batch_order.seed, step=key)
                else:
                    x = data.prepare(data.x_train[micro.index], train=True, seed=batch_order.seed, step=key)
                y = data.y_train[micro.index]
                if moved:
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                micros.append((x, y, micro.weight))
            yield micros

    def val_batches(self, rank: int = 0, world_size: int = 1, batch_size: int = 1024
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's contiguous share of the validation set."""
        begin, end = _share(self.num_val, rank, world_size)
        for start in range(begin, end, batch_size):
            stop = min(end, start + batch_size)
            if self._val is not None:
                x = self._val[start:stop]
            else:
                x = self.data.prepare(self.data.x_val[start:stop], train=False)
            yield x.to(self.device), self.data.y_val[start:stop].to(self.device)

    def close(self) -> None:
        pass


def uses_stream(spec) -> bool:
    """loader auto streams an imagefolder and keeps every other dataset in memory."""
    if spec.loader == "auto":
        return spec.name == "imagefolder"
    if spec.loader == "stream" and spec.name != "imagefolder":
        raise DatasetError(f"dataset.loader: stream reads image files; {spec.name!r} is loaded into memory")
    return spec.loader == "stream"


def open_feed(spec, device: torch.device, world_size: int = 1) -> "MemoryFeed":
    """The feed a DatasetSpec asks for: a StreamFeed for a streamed imagefolder, else a MemoryFeed.
    `world_size` (processes of the job on this node) shares the CPUs among the ranks' decoding workers."""
    if uses_stream(spec):
        from rigl_core.data.streaming import StreamFeed

        return StreamFeed(spec, device, world_size)
    from rigl_core.data.registry import load_dataset

    return MemoryFeed(load_dataset(spec), device)
