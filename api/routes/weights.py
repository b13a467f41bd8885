"""Uploaded weights: a user's trained model (safetensors state_dict) that jobs start from.

Why a route of its own: a warm start (`model.weights: "w_…"`) needs the user's file on the server.
The body is streamed to a temp file under a byte cap, then only its JSON header is parsed (sizes,
dtypes, offsets that tile the file exactly: a pickle or torch.save file is refused from its first 8
bytes) and its float values are checked for inf/NaN in 1 MiB chunks; nothing is ever unpickled.
Names and shapes are checked against the model when a job refers to it (api/submission.py).
"""

from __future__ import annotations

import math

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool

from api.context import Context, get_context
from api.errors import ApiError, from_value_error
from api.schemas import weights_json
from api.uploads import place_upload, streamed_upload
from store import deletion

router = APIRouter(prefix="/v1", tags=["resources"])


@router.get("/weights")
def list_weights(ctx: Context = Depends(get_context)) -> dict:
    return {"object": "list", "data": [weights_json(w) for w in ctx.store.uploads.list_weights(ctx.owner)]}


@router.get("/weights/{weights_id}")
def get_weights(weights_id: str, ctx: Context = Depends(get_context)) -> dict:
    row = ctx.store.uploads.get_weights(weights_id, ctx.owner)
    if row is None:
        raise ApiError(404, "not_found", f"no weights {weights_id!r}", "weights_id")
    return weights_json(row)


@router.delete("/weights/{weights_id}")
def delete_weights(weights_id: str, ctx: Context = Depends(get_context)) -> dict:
    """Deletes the file and its record. 409 while a queued or running job starts from them."""
    try:
        deleted = deletion.delete_weights(ctx.store, ctx.artifacts, weights_id, ctx.owner)
    except deletion.InUse as exc:
        raise ApiError(409, "in_use", f"weights {weights_id!r} are used by active job {exc.job_id!r}; cancel it "
                                      "or wait for it to finish", "weights_id") from None
    if not deleted:
        raise ApiError(404, "not_found", f"no weights {weights_id!r}", "weights_id")
    return {"id": weights_id, "object": "weights", "deleted": True}


@router.post("/weights", status_code=201)
async def upload_weights(request: Request, name: str = Query(..., min_length=1, max_length=200),
                         ctx: Context = Depends(get_context)) -> dict:
    """Raw body: a .safetensors state_dict (e.g. `safetensors.torch.save_file(model.state_dict(), f)`)."""
    async with streamed_upload(request, ctx.artifacts.root / "weights", ".safetensors",
                               ctx.settings.max_weights_bytes, "invalid_weights") as upload:
        shapes = await run_in_threadpool(_inspect, upload.path)
        row = await run_in_threadpool(ctx.store.uploads.add_weights, name=name, size=upload.size, sha256=upload.sha256,
                                      owner=ctx.principal, tensors=len(shapes),
                                      params=sum(math.prod(s) for s in shapes.values()))
        await place_upload(ctx, upload.path, ctx.artifacts.weights_key(row.id),
                           undo=lambda: deletion.delete_weights(ctx.store, ctx.artifacts, row.id))
        return weights_json(row)


def _inspect(path) -> dict:
    from rigl_core.training.warm_start import check_values, read_header

    try:
        shapes = read_header(path, field="body")
        check_values(path, field="body")
    except ValueError as exc:
        raise from_value_error(exc, code="invalid_weights") from None
    return shapes
