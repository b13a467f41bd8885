"""Uploaded `torch.export` programs: any PyTorch model as an architecture, without running its code.

Why a route of its own: a program is a file (`.pt2`), not JSON. The body is streamed to a temp file
under `max_program_bytes`, then checked by rigl_core.models.program.inspect_program in the threadpool:
the archive as an untrusted zip (members, inflated size and ratio: the upload limits), the sample
inputs' pickle proven to rebuild tensors only (never unpickled), the graph's operators (ATen only),
names and symbolic sizes, the weights' descriptions and values, a dynamic batch dimension, and one
forward on the meta device at two batch sizes. Only then is it recorded (an architecture whose spec is
the check's summary) and stored under `programs/<id>.pt2`. Jobs name it with `model.program`.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool

from api.context import Context, get_context
from api.errors import ApiError
from api.schemas import architecture_json
from api.uploads import place_upload, streamed_upload
from store import deletion

router = APIRouter(prefix="/v1", tags=["resources"])


@router.post("/architectures/program", status_code=201)
async def upload_program(request: Request, name: str = Query(..., min_length=1, max_length=200),
                         ctx: Context = Depends(get_context)) -> dict:
    """Raw body: a `.pt2` from `torch.export.save(torch.export.export(model, (x,), dynamic_shapes=...))`."""
    async with streamed_upload(request, ctx.artifacts.root / "programs", ".pt2", ctx.settings.max_program_bytes,
                               "invalid_program") as upload:
        summary = await run_in_threadpool(_inspect, upload.path, ctx.settings)
        if summary.params > ctx.settings.max_params:
            raise ApiError(422, "too_large", f"{summary.params:,} parameters is over the limit of "
                                             f"{ctx.settings.max_params:,}", "body")
        spec = {"program": {"input_shape": summary.input_shape, "num_classes": summary.num_classes,
                            "kernels": summary.kernels, "notes": summary.notes, "operators": summary.operators,
                            "size": upload.size, "sha256": upload.sha256}}
        row = await run_in_threadpool(ctx.store.uploads.add_architecture, name, spec, summary.params,
                                      owner=ctx.principal)
        await place_upload(ctx, upload.path, ctx.artifacts.program_key(row.id),
                           undo=lambda: deletion.delete_architecture(ctx.store, ctx.artifacts, row.id))
        return architecture_json(row)


def _inspect(path, settings):
    from rigl_core.models.program import ArchiveLimits, ProgramError, inspect_program

    limits = ArchiveLimits(max_inflated=settings.max_upload_inflated_bytes,
                           max_ratio=settings.max_upload_compression_ratio)
    try:
        return inspect_program(path, limits)
    except ProgramError as exc:
        raise ApiError(422, "invalid_program", str(exc), "body") from None
