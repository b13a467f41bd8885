"""Receiving a raw upload body: streamed to a temp file under a cap, hashed on the way, removed on exit.

Dataset and weights uploads share it; each then inspects the file and moves it into place."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from api.errors import ApiError

log = logging.getLogger("rigl.uploads")


@dataclass
class Upload:
    path: Path  # the temp file; moved into place by the caller, removed on exit if it is still there
    sha256: str
    size: int


async def place_upload(ctx, tmp: Path, key: str, undo: Callable[[], object], keep_local: bool = True) -> None:
    """Move a checked upload to its storage key (and into the bucket, when there is one). A store that
    can't take it undoes the record (`undo`) and answers 503, so no record points at a missing file."""
    try:
        await run_in_threadpool(ctx.artifacts.place, tmp, key, keep_local)
    except Exception as error:  # noqa: BLE001 - the store's own error names its bucket: not shown
        if not ctx.artifacts.remote:
            raise
        try:
            await run_in_threadpool(undo)
        except Exception:  # noqa: BLE001 - the record stays; jobs naming it fail with a clear message
            log.exception("could not undo the record of an upload the artifact store refused")
        raise ApiError(503, "storage_unavailable", "the artifact store did not take the upload; retry later",
                       None, headers={"Retry-After": "30"}) from error


@asynccontextmanager
async def streamed_upload(request: Request, folder: Path, suffix: str, cap: int, empty_code: str
                          ) -> AsyncIterator[Upload]:
    """413 past `cap` bytes (checked while streaming, never after), 422 `empty_code` for an empty body."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".upload-{uuid.uuid4().hex}{suffix}"
    digest, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    raise ApiError(413, "too_large", f"upload over {cap} bytes", "body")
                digest.update(chunk)
                await run_in_threadpool(f.write, chunk)  # a disk write can block: not on the event loop
        if size == 0:
            raise ApiError(422, empty_code, "empty upload", "body")
        yield Upload(tmp, digest.hexdigest(), size)
    finally:
        tmp.unlink(missing_ok=True)
