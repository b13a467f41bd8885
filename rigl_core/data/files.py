"""Datasets read from a data directory: MNIST / Fashion-MNIST (IDX files), CIFAR-10/100 (binary
version), and ImageFolder. No pickle is ever loaded: CIFAR is read from its binary release.

Downloads happen only when the spec asks (`download: true`) and the host has internet.
"""

from __future__ import annotations

import gzip
import shutil
import struct
import tarfile
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rigl_core.data.dataset import Dataset, DatasetError, channel_stats, split

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _data_dir(spec) -> Path:
    """The folder as given: `~` is the CLI's to expand (a spec the service ran never names a home folder)."""
    if spec.data_dir is None:
        raise DatasetError(f"dataset.data_dir: required for {spec.name!r}")
    root = Path(spec.data_dir)
    if not root.is_dir() and not spec.download:
        raise DatasetError(f"dataset.data_dir: {root} is not a directory (create it, or set dataset.download: "
                           "true to fetch the files into it)")
    return root


# ---------------------------------------------------------------- MNIST / Fashion-MNIST (IDX)
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def read_idx(path: Path) -> np.ndarray:
    """The IDX format: 2 zero bytes, a type code (0x08 = uint8), the rank, big-endian int32 dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"dataset.data_dir: {path.name} is not an unsigned-byte IDX file")
    rank = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank)
    if body.size != int(np.prod(dims)):
        raise DatasetError(f"dataset.data_dir: {path.name} is truncated")
    return body.reshape(dims)


def find_idx(root: Path, folder: str, stem: str) -> Path:
    for base in (root / folder / "raw", root / folder, root):
        for name in (stem, stem + ".gz"):
            if (base / name).is_file():
                return base / name
    raise DatasetError(f"dataset.data_dir: {stem} not found under {root} (looked in {folder}/raw, {folder}, .; "
                       "set dataset.download: true to fetch it, e.g. `rigl train --set dataset.download=true`)")


def idx_dataset(spec) -> Dataset:
    root = _data_dir(spec)
    folder = IDX_FOLDERS[spec.name]
    if spec.download:
        import torchvision

        cls = torchvision.datasets.MNIST if spec.name == "mnist" else torchvision.datasets.FashionMNIST
        for train in (True, False):
            cls(str(root), train=train, download=True)
    parts = {}
    for part, (images, labels) in IDX_FILES.items():
        x = read_idx(find_idx(root, folder, images))
        y = read_idx(find_idx(root, folder, labels))
        if len(x) != len(y):
            raise DatasetError(f"dataset.data_dir: {images} and {labels} differ in length")
        parts[part] = (torch.from_numpy(x.copy())[:, None], torch.from_numpy(y.astype(np.int64)))
    (xt, yt), (xv, yv) = parts["train"], parts["val"]
    mean, std = channel_stats(xt, 1 / 255)
    return Dataset(xt, yt, xv, yv, num_classes=10, scale=1 / 255, mean=mean, std=std)


# ---------------------------------------------------------------- CIFAR (binary version)
CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-bin",
        "train": [f"data_batch_{i}.bin" for i in range(1, 6)],
        "val": ["test_batch.bin"],
        "label_bytes": 1,
        "classes": 10,
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    },
    "cifar100": {
        "folder": "cifar-100-binary",
        "train": ["train.bin"],
        "val": ["test.bin"],
        "label_bytes": 2,  # coarse label, then fine label
        "classes": 100,
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    },
}


def read_cifar_binary(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of `label_bytes` label bytes then 3072 pixel bytes (R, G, B planes of 32×32)."""
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + 3072
    if raw.size % record:
        raise DatasetError(f"dataset.data_dir: {path.name} is not a CIFAR binary file")
    raw = raw.reshape(-1, record)
    return raw[:, label_bytes:].reshape(-1, 3, 32, 32), raw[:, label_bytes - 1].astype(np.int64)


def _download_cifar(root: Path, url: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    archive = root / url.rsplit("/", 1)[1]
    if not archive.exists():
        with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:  # noqa: S310
            shutil.copyfileobj(response, out)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")


def cifar_dataset(spec) -> Dataset:
    info = CIFAR[spec.name]
    root = _data_dir(spec)
    folder = root / info["folder"]
    if spec.download and not folder.is_dir():
        _download_cifar(root, info["url"])
    if not folder.is_dir():
        raise DatasetError(f"dataset.data_dir: {info['folder']}/ not found under {root} "
                           f"(the binary version of {spec.name}; set dataset.download: true to fetch it, "
                           "e.g. `rigl train --set dataset.download=true`)")
    parts = {}
    for part in ("train", "val"):
        xs, ys = [], []
        for name in info[part]:
            if not (folder / name).is_file():
                raise DatasetError(f"dataset.data_dir: {info['folder']}/{name} is missing")
            x, y = read_cifar_binary(folder / name, info["label_bytes"])
            xs.append(x)
            ys.append(y)
        parts[part] = (torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))
    (xt, yt), (xv, yv) = parts["train"], parts["val"]
    mean, std = channel_stats(xt, 1 / 255)
    augment = spec.augment in ("auto", "crop-flip")
    return Dataset(xt, yt, xv, yv, num_classes=info["classes"], scale=1 / 255, mean=mean, std=std, augment=augment)


# ---------------------------------------------------------------- ImageFolder
MAX_IMAGE_PIXELS = 4096 * 4096  # per image, checked from the header before decoding (no decompression bombs)
NO_IMAGE_LIMIT = 2**62  # a streamed folder's listing: not capped by image count (max_samples is for memory)


@dataclass
class ImageFolderLayout:
    """What an image folder holds, found without decoding an image: the service counts and confines
    exactly the files the loader will read."""

    base: Path
    classes: list[str]
    train: list[tuple[Path, int]]  # (file, label)
    val: list[tuple[Path, int]] | None  # None: no train/ + val/ split; split by val_fraction

    def files(self) -> list[Path]:
        return [p for p, _ in self.train + (self.val or [])]


def _image_files(folder: Path, classes: list[str], limit: int) -> list[tuple[Path, int]]:
    files = []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).rglob("*")):
            if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
                continue
            if len(files) >= limit:
                raise DatasetError(f"dataset.max_samples: the folder holds more than {limit} images")
            files.append((path, label))
    if not files:
        raise DatasetError("dataset.path: no images in the folder's class subfolders")
    return files


def imagefolder_layout(base: Path, limit: int) -> ImageFolderLayout:
    """`base` holds one subfolder per class, or `train/` and `val/` that do. Messages name no server path."""
    if not base.is_dir():
        raise DatasetError("dataset.path: not a directory")
    has_split = (base / "train").is_dir() and (base / "val").is_dir()
    train_dir = base / "train" if has_split else base
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DatasetError(f"dataset.path: {'train/ ' if has_split else 'the folder '}needs at least two class "
                           "subfolders")
    train = _image_files(train_dir, classes, limit)
    val = None
    if has_split:
        missing = [c for c in sorted(p.name for p in (base / "val").iterdir() if p.is_dir()) if c not in classes]
        if missing:
            raise DatasetError(f"dataset.path: val/ has classes {missing} that train/ lacks")
        val = _image_files(base / "val", classes, limit)
    return ImageFolderLayout(base, classes, train, val)


def read_image(path: Path, base: Path):
    """One image decoded as RGB (PIL), after checking its pixel count from the header (no decompression
    bombs). Shared by the in-memory and the streaming loader; errors name the file relative to `base`."""
    from PIL import Image

    name = path.relative_to(base)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise DatasetError(f"dataset.path: image {name} has {width}×{height} pixels, over the "
                                       f"{MAX_IMAGE_PIXELS:,}-pixel limit")
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DatasetError(f"dataset.path: image {name} is over the pixel limit (a decompression bomb?)") from None
    except DatasetError:
        raise
    except OSError as exc:
        raise DatasetError(f"dataset.path: cannot read image {name}: {_no_paths(exc)}") from None
    except (SyntaxError, ValueError, EOFError, struct.error) as exc:  # what some PIL decoders raise on bad data
        raise DatasetError(f"dataset.path: cannot read image {name}: {type(exc).__name__}") from None


def _load_images(files: list[tuple[Path, int]], base: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    images = []
    for path, _ in files:
        img = read_image(path, base).resize((size, size), Image.BILINEAR)
        images.append(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(images)), torch.tensor([label for _, label in files], dtype=torch.int64)


def _no_paths(exc: OSError) -> str:
    """An OSError's reason without the file name it carries (PIL puts the full path in some)."""
    return exc.strerror if exc.strerror else str(exc).split(" '/")[0].split(' "/')[0]


def imagefolder_base(spec) -> Path:
    """The folder a spec names: `path`, under `data_dir` when relative."""
    if not spec.path:
        raise DatasetError("dataset.path: required for imagefolder")
    base = Path(spec.path)  # `~` is the CLI's to expand, never the service's
    if not base.is_absolute() and spec.data_dir:
        base = Path(spec.data_dir) / base
    return base


def imagefolder_dataset(spec) -> Dataset:
    """`path` (under `data_dir` if relative) holds one subfolder per class, or `train/` and `val/` that do."""
    base = imagefolder_base(spec)  # DatasetSpec refuses random-resized-crop here: it needs the source images
    layout = imagefolder_layout(base, spec.max_samples)
    x, y = _load_images(layout.train, base, spec.image_size)
    if layout.val is not None:
        xt, yt = x, y
        xv, yv = _load_images(layout.val, base, spec.image_size)
    else:
        xt, yt, xv, yv = split(x, y, spec.val_fraction, spec.split_seed)
    mean, std = channel_stats(xt, 1 / 255)
    augment = spec.augment == "crop-flip"
    return Dataset(xt, yt, xv, yv, num_classes=len(layout.classes), scale=1 / 255, mean=mean, std=std,
                   augment=augment)
