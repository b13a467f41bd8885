"""Where artifacts live: a local folder (the embedded default) or an S3-compatible bucket.

Why: with a bucket, API and workers share no filesystem. Every artifact is named by a storage key
("jobs/job_…/model.safetensors", "datasets/ds_….npz", "weights/w_….safetensors"), never by a node's
absolute path; each node materialises what it needs into its own local folder (store/artifacts.py).

Keys are checked the same way for both stores: relative, '/'-separated segments of letters, digits,
'.', '_' and '-' that never start with '.', so no key is absolute, holds '..' or names a temp file.

boto3 (not obstore) talks to S3: its managed transfers do multipart uploads, ranged downloads and
multipart server-side copies of multi-GB checkpoints, it reads the standard AWS credential chain
(AWS_ACCESS_KEY_ID/…, profiles, instance roles) and it works against AWS S3, MinIO, Cloudflare R2 and
GCS's interoperability endpoint. obstore is faster for many small objects, but this service moves a
few large files per job, and its presigned URLs and error types would add a Rust wheel for no gain.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

KEY_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$")
MAX_KEY_CHARS = 1024
CHUNK = 1 << 20  # streamed downloads go out in 1 MiB pieces


class BadKey(ValueError):
    """A key that is absolute, empty, holds '..' or characters outside the allow-list."""


def check_key(key: object) -> str:
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS or key.startswith("/"):
        raise BadKey(f"bad storage key {str(key)[:100]!r}")
    for segment in key.split("/"):
        if not KEY_SEGMENT.fullmatch(segment):
            raise BadKey(f"bad storage key {key[:100]!r}")
    return key


def check_prefix(prefix: str) -> str:
    """A listing/deletion prefix: a key, optionally ending in '/'."""
    return check_key(prefix.removesuffix("/")) + ("/" if prefix.endswith("/") else "")


class ObjectStore(ABC):
    """The few operations artifacts need. `remote` is False where keys are files on this node."""

    remote = True

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def get_file(self, key: str, dest: Path) -> None:
        """Write the object to `dest` atomically (a temp file beside it, then renamed). FileNotFoundError
        when there is no such object."""

    @abstractmethod
    def open_chunks(self, key: str, chunk_size: int = CHUNK) -> tuple[int, Iterator[bytes]]:
        """(size, the bytes in chunks), read as they are sent. FileNotFoundError when missing."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """The object's size, None when there is none."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Missing objects are no error."""

    @abstractmethod
    def copy(self, source: str, dest: str) -> None: ...

    def presigned_url(self, key: str, filename: str, seconds: int) -> str | None:
        """A time-limited GET URL for the object, None where the store has none (a local folder)."""
        return None

    def read_bytes(self, key: str) -> bytes | None:
        try:
            _, chunks = self.open_chunks(key)
        except FileNotFoundError:
            return None
        return b"".join(chunks)

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)


class LocalStore(ObjectStore):
    """Keys are files under `root`; every path is checked to stay inside it and never to be a symlink."""

    remote = False

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def path(self, key: str) -> Path:
        path = self.root / check_key(key)
        if path.is_symlink():
            raise PermissionError(f"{key} is a symlink")
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise PermissionError(f"{key} escapes the artifact root")
        return resolved

    def put_file(self, key: str, path: Path) -> None:
        _copy_whole(Path(path), self.path(key), "put")

    def get_file(self, key: str, dest: Path) -> None:
        source = self.path(key)
        if not source.is_file():
            raise FileNotFoundError(key)
        _copy_whole(source, Path(dest), "get")

    def open_chunks(self, key: str, chunk_size: int = CHUNK) -> tuple[int, Iterator[bytes]]:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        f = open(path, "rb")

        def chunks() -> Iterator[bytes]:
            with f:
                yield from iter(lambda: f.read(chunk_size), b"")

        return os.fstat(f.fileno()).st_size, chunks()

    def size(self, key: str) -> int | None:
        path = self.path(key)
        return path.stat().st_size if path.is_file() else None

    def list(self, prefix: str) -> list[str]:
        prefix = check_prefix(prefix)
        folder, _, start = prefix.rpartition("/")
        base = self.path(folder) if folder else self.root
        if not base.is_dir():
            return []
        keys = []
        for path in base.rglob("*"):
            if path.is_file() and not path.is_symlink():
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix) and all(KEY_SEGMENT.fullmatch(s) for s in key.split("/")):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self.root / check_key(key)
        if not path.parent.resolve().is_relative_to(self.root):
            raise PermissionError(f"{key} escapes the artifact root")
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)  # a symlink itself, never its target

    def copy(self, source: str, dest: str) -> None:
        self.put_file(dest, self.path(source))


class S3Store(ObjectStore):
    """An S3-compatible bucket through boto3; keys live under `prefix` in `bucket`."""

    def __init__(self, bucket: str, prefix: str = "", client=None, **client_options):
        import boto3
        from boto3.s3.transfer import TransferConfig

        self.bucket, self.prefix = bucket, prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = client or boto3.session.Session().client("s3", **client_options)
        self.transfer = TransferConfig(multipart_threshold=64 * 1024**2, multipart_chunksize=64 * 1024**2,
                                       max_concurrency=4)

    def _full(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._full(key), Config=self.transfer)

    def get_file(self, key: str, dest: Path) -> None:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".get-{uuid.uuid4().hex}")
        try:
            self.client.download_file(self.bucket, self._full(key), str(tmp), Config=self.transfer)
            os.replace(tmp, dest)
        except Exception as error:
            if _not_found(error):
                raise FileNotFoundError(key) from None
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def open_chunks(self, key: str, chunk_size: int = CHUNK) -> tuple[int, Iterator[bytes]]:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
        except Exception as error:
            if _not_found(error):
                raise FileNotFoundError(key) from None
            raise
        body = response["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(chunk_size)
            finally:
                body.close()

        return response["ContentLength"], chunks()

    def size(self, key: str) -> int | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._full(key))["ContentLength"]
        except Exception as error:
            if _not_found(error):
                return None
            raise

    def list(self, prefix: str) -> list[str]:
        full = self.prefix + check_prefix(prefix)
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys += [item["Key"][len(self.prefix):] for item in page.get("Contents", [])]
        return sorted(keys)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._full(key))

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self.prefix + k} for k in keys[start:start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)

    def copy(self, source: str, dest: str) -> None:
        """Server-side (multipart past 64 MiB, so objects over 5 GB copy too): nothing passes this node."""
        self.client.copy({"Bucket": self.bucket, "Key": self._full(source)}, self.bucket, self._full(dest),
                         Config=self.transfer)

    def presigned_url(self, key: str, filename: str, seconds: int) -> str | None:
        return self.client.generate_presigned_url(
            "get_object", ExpiresIn=seconds,
            Params={"Bucket": self.bucket, "Key": self._full(key),
                    "ResponseContentDisposition": f'attachment; filename="{filename}"',
                    "ResponseContentType": "application/octet-stream"})


def _not_found(error: Exception) -> bool:
    response = getattr(error, "response", None) or {}
    code = str((response.get("Error") or {}).get("Code", ""))
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code in ("404", "NoSuchKey", "NotFound") or status == 404


def is_store_outage(error: BaseException) -> bool:
    """The bucket could not be reached or answered 5xx/throttling after boto3's own retries: worth
    skipping a periodic checkpoint for, not worth failing a job."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - boto3 is a dependency of the service
        return False
    if isinstance(error, ClientError):
        status = (error.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0
        return status >= 500 or status == 429 or error.response.get("Error", {}).get("Code") in (
            "SlowDown", "RequestTimeout", "Throttling")
    return isinstance(error, BotoCoreError)


def parse_artifact_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix` → (bucket, prefix). ValueError naming the setting otherwise."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc or parsed.query or parsed.fragment:
        raise ValueError("RIGL_ARTIFACT_URL: must be s3://bucket[/prefix]")
    prefix = parsed.path.strip("/")
    if prefix and not all(KEY_SEGMENT.fullmatch(s) for s in prefix.split("/")):
        raise ValueError("RIGL_ARTIFACT_URL: the prefix must be '/'-separated letters, digits, '.', '_', '-'")
    return parsed.netloc, prefix


def open_store(settings) -> ObjectStore:
    """The store the settings name: the local artifact folder, or the bucket of RIGL_ARTIFACT_URL."""
    if not settings.artifact_url:
        return LocalStore(settings.artifact_dir)
    from botocore.config import Config

    bucket, prefix = parse_artifact_url(settings.artifact_url)
    config = Config(signature_version="s3v4", retries={"mode": "standard", "max_attempts": settings.s3_max_attempts},
                    s3={"addressing_style": settings.s3_addressing_style})
    return S3Store(bucket, prefix, endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
                   config=config)


def _copy_whole(source: Path, dest: Path, what: str) -> None:
    """Copy through a temp file renamed into place: a reader never sees half a file (a no-op when
    both name the same file)."""
    if source.resolve() == dest.resolve():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{what}-{uuid.uuid4().hex}")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
