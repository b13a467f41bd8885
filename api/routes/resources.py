"""Architectures (built-in list, upload declarative JSON), datasets (list, upload tensors), plan."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.context import Context, get_context
from api.errors import ApiError, from_value_error
from api.quotas import limits, quota_error, refuse_upload_early
from api.schemas import architecture_json, dataset_json
from api.uploads import place_upload, streamed_upload
from rigl_core.models.architecture import Architecture, ArchitectureError, Limits
from rigl_core.data.epochs import suggested_epochs
from rigl_core.models.build import infer
from rigl_core.models.registry import BUILTIN_MODELS, default_input_shape, default_num_classes, resolve_task
from rigl_core.spec import DATASETS, DatasetSpec, ModelSpec, SparsitySpec
from store import deletion
from store.uploads import program_of
from store.quotas import QuotaExceeded

router = APIRouter(prefix="/v1", tags=["resources"])


class ArchitectureUpload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    architecture: Architecture


class PlanRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: ModelSpec
    sparsity: SparsitySpec = Field(default_factory=SparsitySpec)
    input_shape: list[Annotated[int, Field(ge=1, le=65_536)]] | None = Field(None, min_length=1, max_length=4)
    num_classes: int | None = Field(None, ge=2, le=100_000)
    dataset: DatasetSpec | None = Field(None, description="Plan against this dataset's input shape and classes.")
    task: Literal["auto", "classification", "sequence-classification", "causal-lm"] = Field(
        "auto", description="As training.task: the head of a model.hf model.")


@router.get("/architectures")
def list_architectures(ctx: Context = Depends(get_context)) -> dict:
    return {"object": "list", "builtin": list(BUILTIN_MODELS), "torchvision": "any torchvision classification "
            "model name, e.g. resnet18", "data": [architecture_json(a) for a in ctx.store.uploads.list_architectures(ctx.owner)]}


@router.post("/architectures", status_code=201)
def upload_architecture(body: ArchitectureUpload, ctx: Context = Depends(get_context)) -> dict:
    try:
        _, out_shape, params = infer(body.architecture, Limits(max_params=ctx.settings.max_params))
    except ArchitectureError as exc:
        raise ApiError(422, "invalid_architecture", exc.message, f"architecture.{exc.field}") from None
    if len(out_shape) != 1:
        raise ApiError(422, "invalid_architecture", f"must end in a flat vector of logits, got {list(out_shape)}",
                       "architecture.layers")
    row = ctx.store.uploads.add_architecture(body.name, body.architecture.model_dump(mode="json", exclude_none=True),
                                     params, owner=ctx.principal)
    return architecture_json(row)


@router.get("/architectures/{arch_id}")
def get_architecture(arch_id: str, ctx: Context = Depends(get_context)) -> dict:
    row = ctx.store.uploads.get_architecture(arch_id, ctx.owner)
    if row is None:
        raise ApiError(404, "not_found", f"no architecture {arch_id!r}", "arch_id")
    return architecture_json(row)


@router.delete("/architectures/{arch_id}")
def delete_architecture(arch_id: str, ctx: Context = Depends(get_context)) -> dict:
    """409 while a queued or running job was submitted with it; finished jobs keep their own copy (of
    declarative layers: an uploaded program's file is deleted with it)."""
    try:
        deleted = deletion.delete_architecture(ctx.store, ctx.artifacts, arch_id, ctx.owner)
    except deletion.InUse as exc:
        raise ApiError(409, "in_use", f"architecture {arch_id!r} is used by active job {exc.job_id!r}; cancel "
                                      "it or wait for it to finish", "arch_id") from None
    if not deleted:
        raise ApiError(404, "not_found", f"no architecture {arch_id!r}", "arch_id")
    return {"id": arch_id, "object": "architecture", "deleted": True}


@router.get("/datasets")
def list_datasets(ctx: Context = Depends(get_context)) -> dict:
    """Built-in names with the epochs to start from on each (`suggested_epochs`; what the dashboard's form
    fills in), and this owner's uploads."""
    builtin = [d for d in DATASETS if d != "tensors"]
    return {"object": "list", "builtin": builtin, "suggested_epochs": {d: suggested_epochs(d) for d in builtin},
            "data": [dataset_json(d) for d in ctx.store.uploads.list_datasets(ctx.owner)]}


@router.delete("/datasets/{dataset_id}")
def delete_dataset(dataset_id: str, ctx: Context = Depends(get_context)) -> dict:
    """Deletes the uploaded file and its record. 409 while a queued or running job reads it."""
    try:
        deleted = deletion.delete_dataset(ctx.store, ctx.artifacts, dataset_id, ctx.owner)
    except deletion.InUse as exc:
        raise ApiError(409, "in_use", f"dataset {dataset_id!r} is used by active job {exc.job_id!r}; cancel it "
                                      "or wait for it to finish", "dataset_id") from None
    if not deleted:
        raise ApiError(404, "not_found", f"no dataset {dataset_id!r}", "dataset_id")
    return {"id": dataset_id, "object": "dataset", "deleted": True}


@router.post("/datasets", status_code=201)
async def upload_dataset(request: Request, name: str = Query(..., min_length=1, max_length=200),
                         format: str = Query("npz", pattern="^(npz|safetensors)$"),
                         ctx: Context = Depends(get_context)) -> dict:
    """Raw body: a .npz or .safetensors file with x, y (optionally x_val, y_val). Never unpickled. Counts
    against the owner's datasets quota."""
    await refuse_upload_early(request, ctx, "datasets")
    async with streamed_upload(request, ctx.artifacts.root / "datasets", f".{format}", ctx.settings.max_upload_bytes,
                               "invalid_dataset") as upload:
        meta = await run_in_threadpool(_inspect_upload, upload.path, ctx.settings)
        # a database call: in the threadpool, never on the event loop (this route is async for the stream)
        try:
            row = await run_in_threadpool(ctx.store.uploads.add_dataset, limits(ctx)["datasets"], name=name,
                                          format=format, size=upload.size, sha256=upload.sha256,
                                          owner=ctx.principal, **meta)
        except QuotaExceeded as exc:
            raise quota_error(exc) from None
        await place_upload(ctx, upload.path, ctx.artifacts.dataset_key(row.id, format), keep_local=False,
                           undo=lambda: deletion.delete_dataset(ctx.store, ctx.artifacts, row.id))
        return dataset_json(row)


def _inspect_upload(path, settings) -> dict:
    """Headers first, then values streamed in small chunks: an upload is never inflated in the API
    (a 1 MB zip declaring 1 GiB is refused from its directory)."""
    from rigl_core.data.dataset import DatasetError
    from rigl_core.data.safe_archive import inspect_tensor_file

    try:
        summary = inspect_tensor_file(path, settings.max_upload_inflated_bytes, settings.max_upload_compression_ratio)
    except DatasetError as exc:
        raise from_value_error(exc, code="invalid_dataset") from None
    return {"num_samples": summary.num_samples, "num_val": summary.num_val, "input_shape": summary.input_shape,
            "num_classes": summary.num_classes}


def _dataset_shape(dataset: DatasetSpec | None, ctx: Context) -> tuple[list[int] | None, int | None]:
    """A dataset's sample shape and classes, built-in or uploaded (by id), without loading it."""
    if dataset is None:
        return None, None
    if dataset.name == "tensors":
        row = ctx.store.uploads.get_dataset(dataset.path or "", ctx.owner)
        if row is None:
            raise ApiError(422, "invalid_request", f"no uploaded dataset {dataset.path!r}", "dataset.path")
        return list(row.input_shape), row.num_classes
    from rigl_core.data.describe import describe

    shape = describe(dataset)
    return (shape.input_shape, shape.num_classes) if shape else (None, None)


@router.post("/plan")
def plan(body: PlanRequest, ctx: Context = Depends(get_context)) -> dict:
    """The same plan as `rigl plan`: per-layer densities and FLOPs, without training. The model is built in a
    bounded child process, as at submission (api/model_build.py)."""
    from api.model_build import plan as bounded_plan
    from api.submission import model_bounds
    from rigl_core.spec import UPLOADED_ARCHITECTURE

    model = body.model
    architecture = model.architecture
    if UPLOADED_ARCHITECTURE.match(model.name):
        row = ctx.store.uploads.get_architecture(model.name, ctx.owner)
        if row is None:
            raise ApiError(422, "invalid_request", f"no uploaded architecture {model.name!r}", "model.name")
        if program_of(row) is not None:
            raise ApiError(422, "invalid_request", f"{model.name!r} is an uploaded program: name it in model.program",
                           "model.name")
        architecture = Architecture.model_validate(row.spec)
    name = "custom" if architecture is not None else model.name
    spec = {"name": name, "hidden_sizes": model.hidden_sizes, "hf": model.hf,
            "architecture": architecture.model_dump(mode="json", exclude_none=True) if architecture else None}
    if model.program is not None:  # its example input and its logits fix both shapes (in the child)
        from api.submission import resolve_program

        data_shape, data_classes = _dataset_shape(body.dataset, ctx)
        spec.update(name="program", program=resolve_program({"program": model.program}, ctx.store, ctx.artifacts,
                                                            ctx.owner))
        input_shape, num_classes = body.input_shape or data_shape, body.num_classes or model.num_classes or data_classes
    elif architecture is not None:
        input_shape = architecture.input_shape
        num_classes = body.num_classes or model.num_classes or infer(architecture)[1][-1]
    else:
        data_shape, data_classes = _dataset_shape(body.dataset, ctx)
        input_shape = body.input_shape or model.input_shape or data_shape or default_input_shape(name)
        num_classes = body.num_classes or model.num_classes or data_classes or default_num_classes(name)
    try:
        task = resolve_task(body.task, model.hf)
        built = bounded_plan(spec, input_shape, num_classes, body.sparsity.model_dump_json(), task,
                             model_bounds(ctx.settings))
    except (ValueError, RuntimeError, TypeError, OverflowError, MemoryError) as exc:
        raise from_value_error(exc, code="invalid_request") from None
    input_shape, num_classes, result = built["input_shape"], built["num_classes"], built["plan"]
    return {"object": "plan", "model": name, "input_shape": input_shape, "num_classes": num_classes, **result}
