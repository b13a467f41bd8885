"""Datasets read from the server's datasets directory (mnist, cifar, imagefolder), checked at submit time.

Why: the user names at most a folder inside the datasets directory; the server resolves it once to a
real path that must stay inside (symlinks included) and counts what it holds (capped, nothing decoded).
The resolved spec stores no node's path: data_dir is the key `@datasets` and an image folder
`@datasets/<its real path inside the directory>`, which each worker turns into its own datasets
directory (`store.user_paths.on_this_node`), where every node mounts the same files, and re-checks
(`store.user_paths.check_job_paths`). Error messages carry no server path.
"""

from __future__ import annotations

from rigl_core.data.dataset import DatasetError
from rigl_core.data.describe import describe
from rigl_core.data.feed import uses_stream
from rigl_core.data.holdout import training_size
from store.scrub import scrub_paths
from store.settings import Settings
from store.user_paths import DATASETS_KEY, datasets_key, folder_limit, imagefolder_layout

from api.errors import ApiError, from_value_error

SERVER_DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder")


def resolve_server_dataset(spec, tree: dict, settings: Settings) -> tuple[list[int], int | None, int | None]:
    """Fill `tree` (the dataset part of the resolved spec) with server paths; returns (input shape,
    classes, training samples), None where unknown. Raises ApiError naming the field."""
    name = tree["name"]
    if name in SERVER_DATASETS:
        tree["data_dir"] = DATASETS_KEY
    shape = describe(spec)
    input_shape, num_classes, num_train = shape.input_shape, shape.num_classes, shape.num_train
    try:
        if name == "imagefolder":
            num_classes, num_train = _imagefolder(spec, tree, settings)
        elif name in SERVER_DATASETS:
            _check_present(spec, settings)
    except ApiError:
        raise
    except DatasetError as exc:
        raise from_value_error(scrub_paths(str(exc), settings)) from None
    return input_shape, num_classes, num_train


def _imagefolder(spec, tree: dict, settings: Settings) -> tuple[int, int]:
    """Resolve, confine and count the folder. The image-count and decoded-bytes caps bound the memory
    loader; a streamed folder (loader stream or auto) holds any number of images, its files confined
    all the same."""
    if uses_stream(spec):
        layout = imagefolder_layout(tree["path"], settings.datasets_dir, folder_limit(tree))
        tree["path"] = datasets_key(layout.base, settings.datasets_dir)
        return _counts(spec, layout)
    server_cap = settings.max_imagefolder_images
    try:
        layout = imagefolder_layout(tree["path"], settings.datasets_dir, min(spec.max_samples, server_cap))
    except DatasetError as exc:
        if str(exc).startswith("dataset.max_samples") and server_cap < spec.max_samples:
            raise ApiError(422, "too_large", f"the folder holds more than {server_cap:,} images, the server's "
                                             "limit", "dataset.path") from None
        raise
    images = len(layout.train) + len(layout.val or [])
    if images > server_cap:
        raise ApiError(422, "too_large", f"the folder holds {images:,} images, over the server's limit of "
                                         f"{server_cap:,}", "dataset.path")
    decoded = images * 3 * spec.image_size ** 2
    if decoded > settings.max_imagefolder_bytes:
        raise ApiError(422, "too_large", f"{images:,} images of {spec.image_size}×{spec.image_size} take "
                                         f"{decoded:,} bytes, over the server's limit of "
                                         f"{settings.max_imagefolder_bytes:,}", "dataset.image_size")
    tree["path"] = datasets_key(layout.base, settings.datasets_dir)  # the checked real path; the worker re-checks it
    return _counts(spec, layout)


def _counts(spec, layout) -> tuple[int, int]:
    """(classes, training samples) of a listed folder."""
    if layout.val is not None:
        return len(layout.classes), len(layout.train)
    num_train = training_size(len(layout.train), spec.val_fraction)
    if num_train < 1:
        raise ApiError(422, "invalid_job", "leaves no training samples", "dataset.val_fraction")
    return len(layout.classes), num_train


def _check_present(spec, settings: Settings) -> None:
    """mnist/cifar: the files the loader needs exist, so a job does not fail later in a worker."""
    from rigl_core.data import files

    root = settings.datasets_dir
    try:
        if spec.name in files.IDX_FOLDERS:
            for stem in files.IDX_FILES["train"] + files.IDX_FILES["val"]:
                files.find_idx(root, files.IDX_FOLDERS[spec.name], stem)
        else:
            info = files.CIFAR[spec.name]
            if not all((root / info["folder"] / n).is_file() for n in info["train"] + info["val"]):
                raise DatasetError("missing")
    except (DatasetError, OSError):
        raise ApiError(422, "invalid_job", f"the server has no {spec.name} files; ask the operator to place "
                                           "them in the datasets directory", "dataset.name") from None
