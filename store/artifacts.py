"""Artifact paths, always built on the server from ids and checked to stay inside the root.

The root is this node's artifact folder. With the local store (the default) it is the store itself;
with an S3 bucket (RIGL_ARTIFACT_URL) it is this node's cache: files are written here, then uploaded
(`upload`, `replace`), and read from here once fetched (`fetch`). Both are named by the same storage
keys ("jobs/<id>/<file>", "datasets/<id>.<fmt>", "weights/<id>.safetensors", "programs/<id>.pt2"), which
is what stored specs hold: never a node's absolute path.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from store.object_store import LocalStore, ObjectStore, check_key

ID_PATTERN = re.compile(r"^[a-z]+_[0-9a-f]{20}$")
UPLOAD_FOLDERS = ("datasets", "weights", "programs")
# the keys a resolved spec may name: an uploaded dataset, uploaded weights, a job's dense export
DATASET_KEY = re.compile(r"^datasets/ds_[0-9a-f]{20}\.(npz|safetensors)$")
WEIGHTS_KEY = re.compile(r"^(weights/w_[0-9a-f]{20}\.safetensors|jobs/job_[0-9a-f]{20}/model\.safetensors)$")
PROGRAM_KEY = re.compile(r"^programs/arch_[0-9a-f]{20}\.pt2$")  # an uploaded torch.export program


class MissingArtifact(FileNotFoundError):
    """A key the store does not hold (deleted meanwhile, or never uploaded)."""


def issued_id(value: str) -> bool:
    """Shaped like an id this server hands out. Anything else can't exist, and is refused before it reaches
    the database (PostgreSQL raises on a NUL byte in a text value: a 500)."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


class Artifacts:
    def __init__(self, root: Path, store: ObjectStore | None = None):
        self.root = Path(root).resolve()
        self.store = store or LocalStore(self.root)

    @classmethod
    def from_settings(cls, settings) -> "Artifacts":
        from store.object_store import open_store

        return cls(settings.artifact_dir, open_store(settings))

    @property
    def remote(self) -> bool:
        """True when the store is a bucket and this root only a cache of it."""
        return self.store.remote

    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise PermissionError(f"{path} escapes the artifact root")
        return resolved

    def job_dir(self, job_id: str) -> Path:
        if not ID_PATTERN.match(job_id):
            raise ValueError(f"bad job id {job_id!r}")
        path = self._inside(self.root / "jobs" / job_id)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def remove_job_dir(self, job_id: str) -> None:
        """Delete a job's artifact directory and everything in it (symlinks are removed, not followed)."""
        if not ID_PATTERN.match(job_id):
            raise ValueError(f"bad job id {job_id!r}")
        self.release_job(job_id, force=True)
        if self.remote:
            self.store.delete_prefix(f"jobs/{job_id}/")

    def release_job(self, job_id: str, force: bool = False) -> None:
        """Drop this node's copy of a job's folder: with a bucket the store holds everything (a worker
        calls it when a run ends); with the local store only when `force` (it is the store)."""
        if not (self.remote or force):
            return
        if not ID_PATTERN.match(job_id):
            raise ValueError(f"bad job id {job_id!r}")
        path = self.root / "jobs" / job_id
        if path.is_symlink():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)

    def remove_orphan_uploads(self, older_than_seconds: float) -> int:
        """Remove `.upload-*` temp files an interrupted upload left behind (a crash or kill mid-upload);
        only those older than `older_than_seconds`, so an upload in progress is never hit."""
        cutoff, removed = time.time() - older_than_seconds, 0
        folders = [self.root / name for name in UPLOAD_FOLDERS if (self.root / name).is_dir()]
        for path in [path for folder in folders for path in folder.glob(".upload-*")]:
            try:
                if (path.is_symlink() or path.is_file()) and path.lstat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def job_file(self, job_id: str, filename: str) -> Path:
        if "/" in filename or "\\" in filename or filename.startswith("."):
            raise ValueError(f"bad artifact name {filename!r}")
        path = self._inside(self.root / "jobs" / job_id / filename)
        if path.is_symlink():
            raise PermissionError(f"{path} is a symlink")
        return path

    def dataset_file(self, dataset_id: str, fmt: str) -> Path:
        if not ID_PATTERN.match(dataset_id) or fmt not in ("npz", "safetensors"):
            raise ValueError(f"bad dataset id {dataset_id!r}")
        folder = self._inside(self.root / "datasets")
        folder.mkdir(parents=True, exist_ok=True)
        return self._inside(folder / f"{dataset_id}.{fmt}")


    def weights_file(self, weights_id: str) -> Path:
        """Uploaded weights: `weights/w_<20 hex>.safetensors`."""
        if not ID_PATTERN.match(weights_id) or not weights_id.startswith("w_"):
            raise ValueError(f"bad weights id {weights_id!r}")
        folder = self._inside(self.root / "weights")
        folder.mkdir(parents=True, exist_ok=True)
        return self._inside(folder / f"{weights_id}.safetensors")


    # ------------------------------------------------------------------ keys and the store
    @staticmethod
    def job_key(job_id: str, filename: str) -> str:
        if not ID_PATTERN.match(job_id) or "/" in filename or filename.startswith("."):
            raise ValueError(f"bad artifact {job_id!r}/{filename!r}")
        return check_key(f"jobs/{job_id}/{filename}")

    @staticmethod
    def dataset_key(dataset_id: str, fmt: str) -> str:
        if not ID_PATTERN.match(dataset_id) or fmt not in ("npz", "safetensors"):
            raise ValueError(f"bad dataset id {dataset_id!r}")
        return f"datasets/{dataset_id}.{fmt}"

    @staticmethod
    def weights_key(weights_id: str) -> str:
        if not ID_PATTERN.match(weights_id) or not weights_id.startswith("w_"):
            raise ValueError(f"bad weights id {weights_id!r}")
        return f"weights/{weights_id}.safetensors"

    @staticmethod
    def program_key(architecture_id: str) -> str:
        """An uploaded torch.export program: `programs/arch_<20 hex>.pt2`."""
        if not ID_PATTERN.match(architecture_id) or not architecture_id.startswith("arch_"):
            raise ValueError(f"bad architecture id {architecture_id!r}")
        return f"programs/{architecture_id}.pt2"

    def key_of(self, path: Path) -> str:
        """The storage key of a file under the root (PermissionError outside it)."""
        return check_key(self._inside(Path(path)).relative_to(self.root).as_posix())

    def path_of(self, key: str) -> Path:
        """Where a key lives on this node (checked to stay inside the root, never a symlink)."""
        path = self._inside(self.root / check_key(key))
        if (self.root / key).is_symlink():
            raise PermissionError(f"{key} is a symlink")
        return path

    def spec_key(self, value: object, pattern: re.Pattern) -> str | None:
        """The key a resolved spec's file field names, or None when it names none this store serves.
        Specs stored before keys held absolute paths under the root: those map to their key."""
        if not isinstance(value, str):
            return None
        if os.path.isabs(value):
            try:
                value = Path(os.path.realpath(value)).relative_to(self.root).as_posix()
            except ValueError:
                return None
        return value if pattern.fullmatch(value) else None

    def upload(self, path: Path) -> str:
        """Publish a file written under the root to the store (nothing to do for the local store)."""
        key = self.key_of(path)
        if self.remote:
            self.store.put_file(key, path)
        return key

    def place(self, tmp: Path, key: str, keep_local: bool = True) -> Path:
        """Move a finished temp file (an upload) to `key`, then publish it. A bucket keeps the only copy
        unless `keep_local`."""
        path = self.path_of(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)
        if self.remote:
            try:
                self.store.put_file(key, path)
            finally:
                if not keep_local:
                    path.unlink(missing_ok=True)
        return path

    def replace(self, tmp: Path, final: Path) -> Path:
        """os.replace(tmp, final), in the store too: a server-side copy of the temp key `upload` wrote,
        then its deletion, so readers never see a half-written object."""
        os.replace(tmp, final)
        if self.remote:
            tmp_key, final_key = self.key_of(tmp), self.key_of(final)
            self.store.copy(tmp_key, final_key)
            self.store.delete(tmp_key)
        return final

    def fetch(self, key: str, size: int | None = None) -> Path:
        """The local path of `key`, downloaded into this node's cache first when the store is a bucket
        (again when the cached copy's size is not `size`). MissingArtifact when the store lacks it."""
        path = self.path_of(key)
        if not self.remote:
            if not path.is_file():
                raise MissingArtifact(f"{key}: not in the artifact store")
            return path
        if path.is_file() and (size is None or path.stat().st_size == size):
            return path
        try:
            self.store.get_file(key, path)
        except FileNotFoundError:
            raise MissingArtifact(f"{key}: not in the artifact store") from None
        return path

    def remove(self, key: str) -> None:
        """Delete a key from the store and this node's copy."""
        path = self.root / check_key(key)
        self._inside(path.parent)  # a folder on the way may not lead out of the root
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)  # a symlink itself, never its target
        if self.remote:
            self.store.delete(key)

    def list_job(self, job_id: str, start: str = "") -> list[str]:
        """File names of a job's artifacts in the store that begin with `start`."""
        prefix = self.job_key(job_id, start) if start else self.job_key(job_id, "x")[:-1]
        return [key.rsplit("/", 1)[1] for key in self.store.list(prefix)]

    def open_chunks(self, key: str) -> tuple[int, Iterator[bytes]]:
        """(size, chunks) of a stored artifact, read as it is sent. MissingArtifact when absent."""
        try:
            return self.store.open_chunks(key)
        except FileNotFoundError:
            raise MissingArtifact(f"{key}: not in the artifact store") from None

    def read_bytes(self, key: str) -> bytes | None:
        return self.store.read_bytes(key)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
