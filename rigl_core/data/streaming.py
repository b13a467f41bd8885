"""Image folders streamed from disk: DataLoader worker processes decode the files, nothing is held in RAM.

Why: ImageNet (1.28 M files) cannot be decoded into memory. Workers decode with PIL and apply the
standard recipe (torchvision transforms v2): training RandomResizedCrop + horizontal flip, evaluation
resize to size·8/7 then center crop. They ship uint8 tensors (a quarter of float32's bytes), pinned on
CUDA; the copy to the device is asynchronous and normalisation (ImageNet mean/std) runs on the device.
Batches come out N × 3 × H × W, channels_last in memory (PIL's layout, what conv nets on GPUs use).

Determinism: the sample order and the devices/accumulation split come from `BatchOrder`, exactly as for
`MemoryFeed`; each sample's augmentation is seeded from (seed, epoch, sample index) inside whichever
process decodes it. A run resumed mid-epoch therefore sees the batches an uninterrupted one would, and
the number of workers changes nothing.

augment: auto and random-resized-crop train on RandomResizedCrop(image_size) + flip; none trains on
the evaluation view; crop-flip resizes to image_size and takes a random crop of the image padded by
4 pixels (the padding is the ImageNet mean, which normalises to 0 as the in-memory loader's) + flip.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from rigl_core.data.dataset import DatasetError, split
from rigl_core.data.batches import BatchOrder, _share
from rigl_core.data.files import NO_IMAGE_LIMIT, imagefolder_base, imagefolder_layout, read_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VAL_BATCH = 256  # largest evaluation batch a worker decodes


def default_workers(world_size: int = 1) -> int:
    """min(8, CPUs per device - 1): one CPU per device stays for the training process itself."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(8, max(0, cpus // max(1, world_size) - 1))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch: a pure function, whoever decodes it."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % 2**63


def transforms(image_size: int, augment: str):
    """(training transform, evaluation transform), PIL image → PIL image of image_size²."""
    from torchvision.transforms import v2

    evaluate = v2.Compose([v2.Resize(round(image_size * 8 / 7), antialias=True), v2.CenterCrop(image_size)])
    if augment in ("auto", "random-resized-crop"):
        train = v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()])
    elif augment == "crop-flip":
        mean = tuple(round(255 * m) for m in IMAGENET_MEAN)
        train = v2.Compose([v2.Resize((image_size, image_size), antialias=True),
                            v2.RandomCrop(image_size, padding=4, fill=mean), v2.RandomHorizontalFlip()])
    elif augment == "none":
        train = evaluate
    else:
        raise DatasetError(f"dataset.augment: {augment!r} is not a streaming augmentation")
    return train, evaluate


class _Broken:
    """A file that failed to decode in a worker: only its message crosses back (no traceback, no path)."""

    def __init__(self, message: str):
        self.message = message


class ImageFiles(torch.utils.data.Dataset):
    """Files and labels as two flat arrays (ImageNet: about 55 MB): a list of (Path, label) takes about
    600 MB, and each forked worker would copy its pages as reference counts change. Items are
    (index, augmentation seed), the seed None for the deterministic transform; a sample is a uint8
    height × width × 3 tensor (PIL's own layout: batches stack with one copy, channels last)."""

    def __init__(self, base: Path, files: list[tuple[Path, int]], train, evaluate):
        self.base = str(base)
        self.names = np.array([os.fsencode(path.relative_to(base)) for path, _ in files])
        self.labels = np.array([label for _, label in files], dtype=np.int64)
        self.train, self.evaluate = train, evaluate

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple[int, int | None]):
        index, key = item
        base = Path(self.base)
        try:
            image = read_image(base / os.fsdecode(self.names[index]), base)
        except DatasetError as exc:
            return _Broken(str(exc))
        if key is None:
            image = self.evaluate(image)
        else:
            with torch.random.fork_rng(devices=[]):  # the transforms draw from the global generator
                torch.manual_seed(key)
                image = self.train(image)
        return torch.from_numpy(np.array(image, dtype=np.uint8)), int(self.labels[index])


def _worker_init(_worker_id: int) -> None:
    """A worker ends on SIGTERM whatever handler the training process had installed when it forked
    (the Celery task's only asks the job to checkpoint), so DataLoader's shutdown can always stop it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _collate(samples: list) -> tuple[torch.Tensor, torch.Tensor] | _Broken:
    for sample in samples:
        if isinstance(sample, _Broken):
            return sample
    return torch.stack([x for x, _ in samples]), torch.tensor([y for _, y in samples], dtype=torch.int64)


class _TrainBatches:
    """The training loader's batch sampler: one item per micro-batch of this rank, from `start` to the
    end of the epoch, as lists of (index, seed). Runs in the training process; `aim` sets the epoch
    before each pass, so persistent workers serve every epoch."""

    def __init__(self) -> None:
        self.batch_order: BatchOrder | None = None
        self.order = torch.empty(0, dtype=torch.int64)
        self.epoch = self.start = 0

    def aim(self, batch_order: BatchOrder, order: torch.Tensor, epoch: int, start: int) -> None:
        self.batch_order, self.order, self.epoch, self.start = batch_order, order, epoch, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batch_order = self.batch_order
        if batch_order is None:
            return
        for batch in range(self.start, batch_order.steps_per_epoch):
            for micro in batch_order.step(self.order, batch):
                yield [(index, sample_seed(batch_order.seed, self.epoch, index)) for index in micro.index.tolist()]

    def __len__(self) -> int:
        if self.batch_order is None:
            return 0
        return max(0, self.batch_order.steps_per_epoch - self.start) * self.batch_order.accumulate_steps


class StreamFeed:
    """An image folder as a feed, decoded by worker processes; the same interface as `MemoryFeed`."""

    def __init__(self, spec, device: torch.device, world_size: int = 1):
        base = imagefolder_base(spec)
        layout = imagefolder_layout(base, NO_IMAGE_LIMIT)
        if layout.val is not None:
            train_files, val_files = layout.train, layout.val
        else:  # the memory loader's split: the same seed holds out the same files
            everything = torch.arange(len(layout.train))
            train_index, _, val_index, _ = split(everything, everything, spec.val_fraction, spec.split_seed)
            train_files = [layout.train[i] for i in train_index.tolist()]
            val_files = [layout.train[i] for i in val_index.tolist()]
        train, evaluate = transforms(spec.image_size, spec.augment)
        self._train_set = ImageFiles(base, train_files, train, evaluate)
        self._val_set = ImageFiles(base, val_files, train, evaluate)
        self.num_classes = len(layout.classes)
        del layout, train_files, val_files  # the arrays above are all the feed keeps

        self.device = device
        self.input_shape = [3, spec.image_size, spec.image_size]
        self.num_train = len(self._train_set)
        self.num_val = len(self._val_set)
        self.wait_seconds = 0.0  # time the training process spent blocked on the next training batch
        self.workers = spec.workers if spec.workers is not None else default_workers(world_size)
        self.prefetch = spec.prefetch
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self._scale = (1 / (255 * std)).to(device)  # x/255 - mean, over std, as one multiply-subtract
        self._shift = (mean / std).to(device)
        self._sampler = _TrainBatches()
        self._train_loader = self._loader(self._train_set, self._sampler, persistent=True)
        self._generation = 0

    def _loader(self, data: ImageFiles, batches, persistent: bool) -> DataLoader:
        workers = self.workers
        return DataLoader(data, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                          worker_init_fn=_worker_init if workers else None,
                          pin_memory=self.device.type == "cuda", prefetch_factor=self.prefetch if workers else None,
                          persistent_workers=persistent and workers > 0)

    def max_label(self) -> int:
        return int(max(self._train_set.labels.max(), self._val_set.labels.max(initial=0)))

    def _receive(self, batches: Iterator) -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(batches)
        if isinstance(batch, _Broken):
            raise DatasetError(batch.message)
        x, y = batch  # x: N × H × W × 3 uint8
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # NCHW, channels_last in memory
        x = x.float().mul_(self._scale).sub_(self._shift)
        return x, y.to(self.device, non_blocking=True)

    def train_steps(self, batch_order: BatchOrder, epoch: int, start_batch: int, first_step: int
                    ) -> Iterator[list[tuple[torch.Tensor, torch.Tensor, float]]]:
        """Per step from `start_batch` to the end of the epoch: this rank's micro-batches as
        (input, labels, weight). Augmentation depends on (seed, epoch, sample), not on `first_step`."""
        self._generation += 1
        generation = self._generation
        order = batch_order.order(epoch)
        self._sampler.aim(batch_order, order, epoch, start_batch)
        batches = iter(self._train_loader)  # persistent workers: the same processes, a fresh pass
        for batch in range(start_batch, batch_order.steps_per_epoch):
            micros = []
            for micro in batch_order.step(order, batch):
                if generation != self._generation:
                    raise RuntimeError("StreamFeed.train_steps: a later call took over the loader")
                started = time.perf_counter()
                x, y = self._receive(batches)
                self.wait_seconds += time.perf_counter() - started
                micros.append((x, y, micro.weight))
            yield micros

    def val_batches(self, rank: int = 0, world_size: int = 1, batch_size: int = 1024
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's contiguous share of the validation set, center-cropped, in batches of at most
        `batch_size` and VAL_BATCH images: prefetching then holds a bounded number of decoded images
        (workers × prefetch batches). Its workers live for one pass."""
        begin, end = _share(self.num_val, rank, world_size)
        size = max(1, min(batch_size, VAL_BATCH))
        chunks = [[(i, None) for i in range(start, min(end, start + size))] for start in range(begin, end, size)]
        batches = iter(self._loader(self._val_set, chunks, persistent=False))
        for _ in chunks:
            yield self._receive(batches)

    def close(self) -> None:
        """Stop the persistent workers now (DataLoader has no public call for it; its iterator's own
        shutdown is what garbage collection would run)."""
        loader = getattr(self, "_train_loader", None)
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
            loader._iterator = None

    def __enter__(self) -> "StreamFeed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the workers watch their parent and exit
            pass
