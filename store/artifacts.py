"""Artifact paths, always built on the server from ids and checked to stay inside the root."""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from pathlib import Path

ID_PATTERN = re.compile(r"^[a-z]+_[0-9a-f]{20}$")
UPLOAD_FOLDERS = ("datasets", "weights")


def issued_id(value: str) -> bool:
    """Shaped like an id this server hands out. Anything else can't exist, and is refused before it reaches
    the database (PostgreSQL raises on a NUL byte in a text value: a 500)."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


class Artifacts:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
