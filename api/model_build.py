"""Build a job's model outside the API's process, bounded in time and memory, and measure it once.

Why: checking a job builds its model (on the meta device), runs one forward and plans its sparsity.
That is CPU and memory the API spends on the user's say-so: a Hugging Face config of 5,000 tiny layers
held a request for 292 s, 20,000 layers took the process past 1.8 GB, and concurrent ones slowed every
other owner's requests. The spec's own layer counts refuse most such models before anything is built
(rigl_core/models/budget.py); what is built is built here, in a child of a fork server (a clean process
with torch already imported, not a fork of the API's threads), under RLIMIT_AS and a deadline. A child
that runs out of either is killed and the job refused with 422 `model_too_costly` naming `model`.

What the child measures is all a submission needs, so the model is built once per distinct model:
parameters, FLOPs, module count, the state_dict shapes (for warm starts) and the sparsity plan the
`GET /v1/jobs/{id}/sparsity` route serves (stored with the job, never rebuilt).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import multiprocessing
import os
import threading

from api.errors import ApiError

_context_lock = threading.Lock()
_context = None


@dataclasses.dataclass(frozen=True)
class Bounds:
    """What one build may spend: modules (counted once built), seconds (wall clock) and bytes (address space
    the child may add to what the fork server already had)."""

    max_modules: int
    seconds: float
    memory_bytes: int


def measure(model_json: str, input_shape_json: str, num_classes: int | None, sparsity_json: str, task: str,
            total_steps: int | None, shapes: bool, bounds: Bounds) -> dict:
    """{params, flops_per_example, modules, plan (layers and totals, as the sparsity route serves them),
    shapes and tied (the state_dict's, when `shapes`)} of the model, built in a bounded child. Raises
    ValueError naming the field (a model that does not fit), or ApiError 422 model_too_costly. Cached:
    sweeps resubmit one model many times."""
    from rigl_core.models.budget import check_estimate

    check_estimate(json.loads(model_json), bounds.max_modules)  # before any process is started
    return _measured(model_json, input_shape_json, num_classes, sparsity_json, task, total_steps, shapes, bounds)


@functools.lru_cache(maxsize=256)
def _measured(*args) -> dict:
    return run_bounded(_measure, args[:-1], args[-1])


def _measure(model_json: str, input_shape_json: str, num_classes: int | None, sparsity_json: str, task: str,
             total_steps: int | None, shapes: bool, max_modules: int) -> dict:
    """In the child: build on the meta device, count, check one forward, plan."""
    from rigl_core.models.budget import check_built
    from rigl_core.models.registry import build_model, check_model
    from rigl_core.sparse.plan import make_plan
    from rigl_core.spec import ModelSpec, SparsitySpec

    spec = json.loads(model_json)
    model = ModelSpec.model_validate(spec)
    input_shape = json.loads(input_shape_json)
    meta = build_model(model.name, num_classes, input_shape, model.hidden_sizes, device="meta",
                       architecture=model.architecture, hf=model.hf, task=task, program=model.program)
    modules = check_built(meta, spec, max_modules)
    if model.program is not None and not input_shape:  # a stored job's program: it fixes its own shapes
        input_shape = list(meta.input_shape)
    check_model(meta, input_shape, num_classes, task)
    plan = make_plan(meta, input_shape, SparsitySpec.model_validate_json(sparsity_json), total_steps=total_steps)
    report = dataclasses.replace(plan, total_steps=None).to_dict()  # what the sparsity route always showed
    dense_forward = sum(layer.flops_dense for layer in plan.layers)
    out = {"params": sum(p.numel() for p in meta.parameters()), "modules": modules,
           "flops_per_example": 3 * dense_forward * plan.training_flops_ratio(),
           "plan": {"layers": report["layers"], "totals": report["totals"]}}
    if shapes:
        from rigl_core.training.warm_start import expected_shapes, tied_names

        out["shapes"], out["tied"] = expected_shapes(meta), tied_names(meta)
    return out


def plan(model: dict, input_shape: list[int] | None, num_classes: int | None, sparsity_json: str, task: str,
         bounds: Bounds) -> dict:
    """`POST /v1/plan`: {input_shape, num_classes, plan (the whole Plan.to_dict, as `rigl plan`)} of the model,
    built in a bounded child as at submission (a program fixes both shapes)."""
    from rigl_core.models.budget import check_estimate

    check_estimate(model, bounds.max_modules)
    return run_bounded(_plan, (json.dumps(model), json.dumps(input_shape), num_classes, sparsity_json, task), bounds)


def _plan(model_json: str, input_shape_json: str, num_classes: int | None, sparsity_json: str, task: str,
          max_modules: int) -> dict:
    from rigl_core.models.budget import check_built
    from rigl_core.models.registry import build_model, check_model
    from rigl_core.sparse.plan import make_plan
    from rigl_core.spec import ModelSpec, SparsitySpec

    spec = json.loads(model_json)
    model = ModelSpec.model_validate(spec)
    input_shape = json.loads(input_shape_json)
    meta = build_model(model.name, num_classes, input_shape, model.hidden_sizes, device="meta",
                       architecture=model.architecture, hf=model.hf, task=task, program=model.program)
    check_built(meta, spec, max_modules)
    if model.program is not None:  # its example input and its logits fix both shapes
        input_shape, num_classes = list(meta.input_shape), meta.program_classes
    check_model(meta, input_shape, num_classes, task)
    return {"input_shape": input_shape, "num_classes": num_classes,
            "plan": make_plan(meta, input_shape, SparsitySpec.model_validate_json(sparsity_json)).to_dict()}


# ---------------------------------------------------------------------------------------------- the child
def _fork_server():
    global _context
    with _context_lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["api.model_build_warmup"])
            _context = context
        return _context


def start_early() -> None:
    """Start the fork server in the background (a serving API calls it at startup), so the first submission
    does not wait for its imports."""
    def start():
        from multiprocessing import forkserver

        _fork_server()
        try:
            forkserver.ensure_running()
        except Exception:  # noqa: BLE001 - the first build starts it again, and reports what fails
            pass

    threading.Thread(target=start, name="model-build-forkserver", daemon=True).start()


def run_bounded(function, args: tuple, bounds: Bounds):
    """`function(*args, bounds.max_modules)` in a fresh child under the bounds; its result, or its
    ValueError again, or ApiError 422 model_too_costly when it ran out of time or memory."""
    context = _fork_server()
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, function, (*args, bounds.max_modules), bounds.memory_bytes,
                                                 bounds.seconds), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(bounds.seconds):
            raise _too_costly(f"building it took over {bounds.seconds:g} s (RIGL_MAX_MODEL_BUILD_SECONDS)")
        try:
            kind, value = receive.recv()
        except EOFError:  # died without a word: killed (memory, a signal)
            raise _too_costly("building it ran out of memory (RIGL_MAX_MODEL_BUILD_BYTES)") from None
    finally:
        receive.close()
        if child.is_alive():
            child.kill()
        child.join()
    if kind == "ok":
        return value
    if kind == "memory":
        raise _too_costly("building it ran out of memory (RIGL_MAX_MODEL_BUILD_BYTES)")
    if kind == "extra":
        from rigl_core.optional import MissingExtra

        raise MissingExtra(*value)
    raise ValueError(value)


def _too_costly(why: str) -> ApiError:
    return ApiError(422, "model_too_costly", f"the model is too costly to check: {why}", "model")


def _child(send, function, args: tuple, memory_bytes: int, seconds: float) -> None:
    try:
        _limit(memory_bytes, seconds)
        import torch

        torch.set_num_threads(1)
        send.send(("ok", function(*args)))
    except MemoryError:
        send.send(("memory", None))
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the request that asked
        from rigl_core.optional import MissingExtra

        if isinstance(exc, MissingExtra):
            send.send(("extra", (exc.feature, exc.extra, exc.module)))
        else:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            send.send(("error", text))
    finally:
        send.close()


def _limit(memory_bytes: int, seconds: float) -> None:
    """RLIMIT_AS: what the process maps now plus `memory_bytes`; RLIMIT_CPU: a backstop to the deadline."""
    try:
        import resource
    except ImportError:  # not a POSIX system: the deadline alone bounds it
        return
    try:
        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        mapped = None
    if mapped is not None:
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        limit = mapped + memory_bytes if hard == resource.RLIM_INFINITY else min(hard, mapped + memory_bytes)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    cpu = int(seconds) + 2
    resource.setrlimit(resource.RLIMIT_CPU, (cpu if hard == resource.RLIM_INFINITY else min(cpu, hard), hard))
