"""Turn a submitted JobSpec into a runnable one, rejecting at submit time what could never run.

Uploaded architectures, programs and datasets are referenced by id and resolved to server-side content;
users never name server paths. The model is built on the meta device against the dataset's shape,
so impossible architectures/datasets fail here with a 422 naming the field, not later in a worker;
it is built in a bounded child process, after the spec's own layer counts were checked
(api/model_build.py), and its sparsity plan is kept with the job.
"""

from __future__ import annotations

import json

from rigl_core.data.holdout import training_size
from rigl_core.models.registry import resolve_task
from rigl_core.sparse.schedules import resolve_t_end
from rigl_core.spec import UPLOADED_ARCHITECTURE, UPLOADED_WEIGHTS, JobSpec
from store.artifacts import Artifacts
from store.jobs import JobStore
from store.settings import Settings
from store.uploads import program_of

from api.costs import check_costs, planned_steps
from api.errors import ApiError, from_value_error
from api.model_build import Bounds, measure
from api.server_datasets import resolve_server_dataset


def resolve(spec: JobSpec, store: JobStore, artifacts: Artifacts, settings: Settings, owner: str | None
            ) -> tuple[dict, int, dict | None]:
    """Returns (resolved spec as JSON, total training steps, the sparsity plan: per-layer rows and totals,
    None when the data's classes are only known to the worker) or raises ApiError."""
    tree = spec.model_dump(mode="json")
    model, dataset = tree["model"], tree["dataset"]
    if UPLOADED_ARCHITECTURE.match(model["name"]):
        record = store.uploads.get_architecture(model["name"], owner)
        if record is None:
            raise ApiError(422, "invalid_job", f"no uploaded architecture {model['name']!r}", "model.name")
        if program_of(record) is not None:
            raise ApiError(422, "invalid_job", f"{model['name']!r} is an uploaded program: name it in model.program",
                           "model.name")
        model["architecture"], model["name"] = record.spec, "custom"
    program_file = resolve_program(model, store, artifacts, owner)
    weights_field, weights_shapes = _resolve_weights(model, store, artifacts, settings, owner)
    mlflow_uri = ((tree.get("tracking") or {}).get("mlflow") or {}).get("uri")
    if mlflow_uri is not None and mlflow_uri.split(":", 1)[0].lower() not in ("http", "https"):
        raise ApiError(422, "invalid_job", "the service logs to an MLflow server: give an http(s):// tracking URI "
                                           "(a file or database URI would be opened on the worker)",
                       "tracking.mlflow.uri")
    if dataset.get("data_dir") is not None:
        raise ApiError(422, "invalid_job", "the server sets data_dir; leave it out", "dataset.data_dir")
    if dataset.get("download"):
        raise ApiError(422, "invalid_job", "the service does not download datasets; ask the operator to "
                                           "place them in the datasets directory", "dataset.download")
    num_train, num_classes, input_shape = None, None, None
    if dataset["name"] == "tensors":
        record = store.uploads.get_dataset(dataset["path"], owner)
        if record is None:
            raise ApiError(422, "invalid_job", f"no uploaded dataset {dataset['path']!r}", "dataset.path")
        dataset["path"] = artifacts.dataset_key(record.id, record.format)  # a storage key, not a path
        input_shape, num_classes = list(record.input_shape), record.num_classes
        num_train = record.num_samples if record.num_val else training_size(record.num_samples,
                                                                            spec.dataset.val_fraction)
    else:  # the datasets directory is their implicit data_dir; an imagefolder path is resolved and confined
        input_shape, num_classes, num_train = resolve_server_dataset(spec.dataset, dataset, settings)
    resolved = JobSpec.model_validate(tree)
    check_nodes(resolved, settings)
    num_classes = resolved.model.num_classes or num_classes
    plan = None
    try:
        flops_per_example = None
        if num_classes is not None:
            task = resolve_task(resolved.training.task, resolved.model.hf)
            run_steps = planned_steps(resolved, num_train) if num_train is not None else None
            checked = {**tree["model"], "program": program_file} if program_file else tree["model"]
            measured = measure(json.dumps(checked, sort_keys=True), json.dumps(input_shape), num_classes,
                               resolved.sparsity.model_dump_json(), task, run_steps, weights_field is not None,
                               model_bounds(settings))
            params, flops_per_example, plan = measured["params"], measured["flops_per_example"], measured["plan"]
            if params > settings.max_params:
                raise ApiError(422, "too_large", f"{params:,} parameters is over the limit of "
                                                 f"{settings.max_params:,}", "model")
            if weights_field is not None:  # names and shapes against the model, from the file's header
                from rigl_core.training.warm_start import check_matches

                check_matches(weights_shapes, measured["shapes"], weights_field, measured["tied"])
        if resolved.training.epochs > settings.max_epochs:
            raise ApiError(422, "invalid_job", f"at most {settings.max_epochs} epochs", "training.epochs")
        total_steps = check_costs(resolved, settings, num_train, flops_per_example)
        if num_train is not None:
            schedule = resolved.sparsity.schedule
            resolve_t_end(total_steps, schedule.t_end, schedule.t_end_steps)
    except ApiError:
        raise
    except (ValueError, RuntimeError, TypeError, OverflowError, MemoryError) as exc:
        raise from_value_error(exc) from None
    return tree, total_steps, plan


def model_bounds(settings: Settings) -> Bounds:
    """What checking one model may spend (api/model_build.py), from the settings."""
    return Bounds(settings.max_model_modules, settings.max_model_build_seconds, settings.max_model_build_bytes)


def check_nodes(spec: JobSpec, settings: Settings) -> None:
    """A job on several nodes runs on the deployment's Ray cluster, its ranks sharing no folder: without a
    Ray cluster and a bucket it could never start, so it is refused now (422), naming what to configure."""
    nodes = spec.training.nodes
    if nodes <= 1:
        return
    missing = [name for name, value in (("RIGL_RAY_ADDRESS", settings.ray_address),
                                        ("RIGL_ARTIFACT_URL", settings.artifact_url)) if not value]
    if missing:
        raise ApiError(422, "invalid_job", f"training.nodes: {nodes} nodes need a Ray cluster and a shared "
                                           f"artifact bucket, and this service has no {' and no '.join(missing)} "
                                           "configured (docs: operations/multi-node); submit with nodes: 1",
                       "training.nodes")


def resolve_program(model: dict, store: JobStore, artifacts: Artifacts, owner: str | None) -> str | None:
    """`model.program` (an uploaded program's `arch_…` id) becomes the file's storage key; returns this
    node's copy of the file (to build the model from at submit time), None without a program."""
    program_id = model.get("program")
    if program_id is None:
        return None
    if not UPLOADED_ARCHITECTURE.fullmatch(program_id):
        raise ApiError(422, "invalid_job", "give the id (arch_…) of a program uploaded with "
                                           "POST /v1/architectures/program", "model.program")
    program = program_of(store.uploads.get_architecture(program_id, owner))
    if program is None:
        raise ApiError(422, "invalid_job", f"no uploaded program {program_id!r}", "model.program")
    model["program"] = artifacts.program_key(program_id)
    return _local_copy(artifacts, model["program"], program["size"], "model.program")


def _resolve_weights(model: dict, store: JobStore, artifacts: Artifacts, settings: Settings, owner: str | None
                     ) -> tuple[str | None, dict[str, tuple[int, ...]] | None]:
    """`model.weights` (an uploaded `w_…` id) or `model.init_from_job` (a succeeded job's dense export)
    becomes the file's storage key in `model.weights`; returns (the field it came from, the file's
    {name: shape}), (None, None) without. Uploaded weights' shapes come from the index stored at upload
    (their header is never parsed again here); a job's export is the server's own file, read from its
    header. A user never names a server path, and someone else's weights or job are as good as missing."""
    if model.get("weights") is not None:
        weights_id = model["weights"]
        if not UPLOADED_WEIGHTS.fullmatch(weights_id):
            raise ApiError(422, "invalid_job", "give the id (w_…) of weights uploaded with POST /v1/weights",
                           "model.weights")
        record = store.uploads.get_weights(weights_id, owner)
        if record is None:
            raise ApiError(422, "invalid_job", f"no uploaded weights {weights_id!r}", "model.weights")
        model["weights"] = artifacts.weights_key(record.id)
        return "model.weights", _uploaded_shapes(store, artifacts, settings, record)
    job_id = model.get("init_from_job")
    if job_id is None:
        return None, None
    job = store.get_job(job_id, owner)
    if job is None:
        raise ApiError(422, "invalid_job", f"no job {job_id!r}", "model.init_from_job")
    export = store.checkpoints.latest_checkpoint(job.id, "dense") if job.status == "succeeded" else None
    if export is None:
        raise ApiError(422, "invalid_job", f"job {job_id!r} is {job.status}; only a succeeded job's dense "
                                           "export can be started from", "model.init_from_job")
    model["weights"], model["init_from_job"] = artifacts.job_key(job.id, export.filename), None
    path = _local_copy(artifacts, model["weights"], export.size, "model.init_from_job")
    return "model.init_from_job", _header_shapes(path, "model.init_from_job", settings)


def _uploaded_shapes(store: JobStore, artifacts: Artifacts, settings: Settings, record
                     ) -> dict[str, tuple[int, ...]]:
    """{name: shape} of uploaded weights from their stored index. Weights uploaded before the index was
    kept (revision 0008) have their header read once, within today's caps, and their index stored."""
    index = store.uploads.tensor_index(record.id)
    if index is None:
        from rigl_core.training.warm_start import read_tensor_index

        path = _local_copy(artifacts, artifacts.weights_key(record.id), record.size, "model.weights")
        try:
            found = read_tensor_index(path, "model.weights", settings.max_weights_header_bytes,
                                      settings.max_weights_tensors)
        except ValueError as exc:
            raise from_value_error(exc) from None
        index = {name: [dtype, list(shape)] for name, (dtype, shape) in found.items()}
        store.uploads.set_tensor_index(record.id, index)
    return {name: tuple(shape) for name, (_dtype, shape) in index.items()}


def _header_shapes(path: str, field: str, settings: Settings) -> dict[str, tuple[int, ...]]:
    from rigl_core.training.warm_start import read_header

    try:
        return read_header(path, field, settings.max_weights_header_bytes, settings.max_weights_tensors)
    except ValueError as exc:
        raise from_value_error(exc) from None


def _local_copy(artifacts: Artifacts, key: str, size: int, field: str) -> str:
    """This node's copy of a stored file (fetched from a bucket once, then cached), for its header."""
    from store.artifacts import MissingArtifact

    try:
        return str(artifacts.fetch(key, size))
    except MissingArtifact:
        raise ApiError(422, "invalid_job", "the file is no longer in the artifact store", field) from None
