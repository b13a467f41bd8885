"""Receiving a raw upload body: streamed to a temp file under a cap, hashed on the way, removed on exit.

Dataset and weights uploads share it; each then inspects the file and moves it into place."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from api.errors import ApiError


@dataclass
class Upload:
    path: Path  # the temp file; moved into place by the caller, removed on exit if it is still there
    sha256: str
    size: int


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
