"""Uploaded weights: a user's trained model (safetensors state_dict) that jobs start from.

Why a route of its own: a warm start (`model.weights: "w_…"`) needs the user's file on the server.
The body is streamed to a temp file under a byte cap, then only its JSON header is parsed (sizes,
dtypes, offsets that tile the file exactly: a pickle or torch.save file is refused from its first 8
bytes, a header over RIGL_MAX_WEIGHTS_HEADER_BYTES too, and one of more than RIGL_MAX_WEIGHTS_TENSORS
entries before any entry is checked) and its float values are checked for inf/NaN in 1 MiB chunks;
nothing is ever unpickled. The header is parsed here only: its {name: [dtype, shape]} is stored with
the record, and a job that names the weights checks its model against that (api/submission.py).
Each upload counts against its owner's weights quota (store/quotas.py).
"""

from __future__ import annotations

import math

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool

from api.context import Context, get_context
from api.errors import ApiError, from_value_error
from api.quotas import limits, quota_error, refuse_upload_early
from api.schemas import weights_json
from api.uploads import place_upload, streamed_upload
from store import deletion
from store.quotas import QuotaExceeded

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
    await refuse_upload_early(request, ctx, "weights")
    async with streamed_upload(request, ctx.artifacts.root / "weights", ".safetensors",
                               ctx.settings.max_weights_bytes, "invalid_weights") as upload:
        index = await run_in_threadpool(_inspect, upload.path, ctx.settings)
        try:
            row = await run_in_threadpool(ctx.store.uploads.add_weights, limits(ctx)["weights"], name=name,
                                          size=upload.size, sha256=upload.sha256, owner=ctx.principal,
                                          tensors=len(index), params=sum(math.prod(s) for _, s in index.values()),
                                          tensor_index=index)
        except QuotaExceeded as exc:
            raise quota_error(exc) from None
        await place_upload(ctx, upload.path, ctx.artifacts.weights_key(row.id),
                           undo=lambda: deletion.delete_weights(ctx.store, ctx.artifacts, row.id))
        return weights_json(row)


def _inspect(path, settings) -> dict[str, list]:
    """{name: [dtype, shape]} of a checked upload (header within the caps, values finite)."""
    from rigl_core.training.warm_start import check_values, read_tensor_index

    try:
        index = read_tensor_index(path, "body", settings.max_weights_header_bytes, settings.max_weights_tensors)
        check_values(path, field="body")
    except ValueError as exc:
        raise from_value_error(exc, code="invalid_weights") from None
    return {name: [dtype, list(shape)] for name, (dtype, shape) in index.items()}
