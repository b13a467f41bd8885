"""Paths a user names, resolved once and confined to the folder the server allows.

Why: a job's `dataset.path` for `imagefolder` is user input that ends up opened by a worker. It is
resolved at submit time to a real path (symlinks followed) that must lie inside the server's
datasets directory, and every image file the loader will read must too; the resolved spec then
stores that real path relative to the directory (`@datasets/...`, no node's absolute path: each
worker puts its own datasets directory in front, `on_this_node`). The worker re-checks the same rules
against its own settings before loading anything, so a stored spec (old, edited, or built by a bug)
cannot read outside either.

Every rejection, including a folder that does not exist, raises the same message, which names no
server path and does not reveal whether anything exists.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from rigl_core.data.dataset import DatasetError

PATH_MESSAGE = ("must name a folder inside the server's datasets directory: relative segments of letters, "
                "digits, '.', '_', '-' and spaces, separated by '/'")
SEGMENT = re.compile(r"^[A-Za-z0-9._ -]{1,255}$")
MAX_SEGMENTS = 32
UPLOADED_FILE = re.compile(r"^ds_[0-9a-f]{20}\.(npz|safetensors)$")
UPLOADED_WEIGHTS_FILE = re.compile(r"^w_[0-9a-f]{20}\.safetensors$")
UPLOADED_PROGRAM_FILE = re.compile(r"^arch_[0-9a-f]{20}\.pt2$")
JOB_FOLDER = re.compile(r"^job_[0-9a-f]{20}$")


class UserPathError(DatasetError):
    """A user path that is malformed, escapes its root or does not exist; always the same message."""

    def __init__(self, field: str = "dataset.path"):
        super().__init__(f"{field}: {PATH_MESSAGE}")


def _real(path: Path | str) -> Path:
    return Path(os.path.realpath(path))


DATASETS_KEY = "@datasets"  # a resolved spec's name for "this node's datasets directory"


def datasets_key(real_path: Path | str, datasets_dir: Path | str) -> str:
    """`@datasets/<path inside the datasets directory>` for a checked real path inside it."""
    inside = Path(real_path).relative_to(_real(datasets_dir)).as_posix()
    return DATASETS_KEY if inside == "." else f"{DATASETS_KEY}/{inside}"


def on_this_node(resolved_spec: dict, settings) -> dict:
    """Turn the `@datasets` keys of a resolved spec into this node's datasets directory (in place).
    Specs stored before the keys hold absolute paths, left as they are for check_job_paths to judge."""
    dataset = resolved_spec.get("dataset") or {}
    root = settings.datasets_dir
    if root is None:
        return resolved_spec
    if dataset.get("data_dir") == DATASETS_KEY:
        dataset["data_dir"] = str(root)
    path = dataset.get("path")
    if dataset.get("name") == "imagefolder" and isinstance(path, str) and (
            path == DATASETS_KEY or path.startswith(DATASETS_KEY + "/")):
        inside = path[len(DATASETS_KEY):].lstrip("/")
        dataset["path"] = str(Path(root) / inside) if inside else str(root)
    return resolved_spec


def check_syntax(user_path: object) -> list[str]:
    """The segments of a relative path made only of allow-listed characters: no `~`, no absolute
    path, no `..` or other all-dot segment, no NUL or control characters, no unicode look-alikes."""
    if not isinstance(user_path, str) or not user_path or len(user_path) > 1024:
        raise UserPathError()
    segments = user_path.removesuffix("/").split("/")
    if len(segments) > MAX_SEGMENTS:
        raise UserPathError()
    for segment in segments:
        if not SEGMENT.fullmatch(segment) or not segment.strip("."):
            raise UserPathError()
    return segments


def resolve_folder(user_path: object, root: Path) -> Path:
    """The real path of the folder `user_path` names inside `root`, or UserPathError."""
    segments = check_syntax(user_path)
    real_root = _real(root)
    try:
        folder = _real(real_root.joinpath(*segments))
        if not folder.is_relative_to(real_root) or not folder.is_dir():
            raise UserPathError()
    except (OSError, ValueError):
        raise UserPathError() from None
    return folder


def links_stay_inside(folder: Path, root: Path, max_entries: int) -> None:
    """Every symlink under `folder` (and under the folders those links reach) resolves inside `root`:
    checked before the loader lists anything, so even a folder listing never comes from outside."""
    real_root = _real(root)
    pending, seen, entries = [_real(folder)], set(), 0
    while pending:
        top = pending.pop()
        if top in seen:
            continue
        seen.add(top)
        with os.scandir(top) as listing:
            for entry in listing:
                entries += 1
                if entries > max_entries:
                    raise DatasetError(f"dataset.path: the folder holds more than {max_entries:,} entries")
                if entry.is_symlink():
                    target = _real(entry.path)
                    if not target.is_relative_to(real_root):
                        raise UserPathError()
                    if target.is_dir():
                        pending.append(target)
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))


def confine_files(files: list[Path], root: Path) -> None:
    """Every file the loader will read must really lie inside `root` (a symlink may not lead out)."""
    real_root = _real(root)
    for path in files:
        if not _real(path).is_relative_to(real_root):
            raise UserPathError()


def imagefolder_layout(user_path: object, root: Path, limit: int):
    """Resolve and confine an `imagefolder` path; returns its ImageFolderLayout (files counted, none
    decoded). Loader errors (too few classes, too many images) pass through without server paths."""
    from rigl_core.data.files import imagefolder_layout as layout_of

    folder = resolve_folder(user_path, root)
    try:
        links_stay_inside(folder, root, max_entries=4 * limit + 10_000)
        layout = layout_of(folder, limit)
        confine_files([folder / name for name in layout.classes] + layout.files(), root)
    except OSError:  # unreadable, a link loop: the same answer as any other bad path
        raise UserPathError() from None
    return layout


def folder_limit(dataset: dict) -> int:
    """How many images an imagefolder job may list: max_samples when it is loaded into memory; no
    count for a streamed one (loader stream, or auto), whose files are confined all the same."""
    from rigl_core.data.files import NO_IMAGE_LIMIT

    if dataset.get("loader", "auto") == "memory":
        return int(dataset.get("max_samples") or 200_000)
    return NO_IMAGE_LIMIT


def check_job_paths(resolved_spec: dict, settings) -> None:
    """The worker's re-check of a stored resolved spec, against the worker's own settings, before
    anything is loaded: data_dir is the datasets directory, an imagefolder lies inside it, an
    uploaded tensors file is one of the server's uploads. Raises UserPathError."""
    check_weights_path((resolved_spec.get("model") or {}).get("weights"), settings)
    check_program_path((resolved_spec.get("model") or {}).get("program"), settings)
    dataset = resolved_spec.get("dataset") or {}
    name, path, data_dir = dataset.get("name"), dataset.get("path"), dataset.get("data_dir")
    datasets_dir, artifact_dir = settings.datasets_dir, settings.artifact_dir
    if data_dir is not None and (datasets_dir is None or _real(data_dir) != _real(datasets_dir)):
        raise UserPathError("dataset.data_dir")
    if name == "imagefolder":
        if not isinstance(path, str) or datasets_dir is None:
            raise UserPathError()
        relative = path
        if os.path.isabs(path):
            try:
                relative = str(Path(path).relative_to(_real(datasets_dir)))
            except ValueError:
                raise UserPathError() from None
        imagefolder_layout(relative, datasets_dir, folder_limit(dataset))
    elif name == "tensors":
        if (not isinstance(path, str) or artifact_dir is None or not UPLOADED_FILE.fullmatch(Path(path).name)
                or _real(path).parent != _real(Path(artifact_dir) / "datasets")):
            raise UserPathError()


def check_program_path(path: object, settings) -> None:
    """A resolved `model.program` is an uploaded program inside the artifact directory (programs/arch_….pt2)."""
    if path is None:
        return
    artifact_dir = settings.artifact_dir
    if not isinstance(path, str) or artifact_dir is None or not UPLOADED_PROGRAM_FILE.fullmatch(_real(path).name) \
            or _real(path).parent != _real(artifact_dir) / "programs":
        raise ValueError("model.program: not a program uploaded to this server")


def check_weights_path(path: object, settings) -> None:
    """A resolved `model.weights` is an uploaded weights file or a job's dense export, both inside the
    artifact directory (a stored spec naming any other file is refused before anything is read)."""
    if path is None:
        return
    artifact_dir = settings.artifact_dir
    refused = ValueError("model.weights: not an uploaded weights file or a job's export on this server")
    if not isinstance(path, str) or artifact_dir is None:
        raise refused
    real, root = _real(path), _real(artifact_dir)
    upload = UPLOADED_WEIGHTS_FILE.fullmatch(real.name) and real.parent == root / "weights"
    export = (real.name == "model.safetensors" and JOB_FOLDER.fullmatch(real.parent.name)
              and real.parent.parent == root / "jobs")
    if not (upload or export):
        raise refused
