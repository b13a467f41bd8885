"""Sweeps that search: `strategy` random (a seeded sample of the axes and numeric ranges, every child made
at creation like a grid's) and optuna (an Optuna study asked for trials as children finish, children
pruned from their intermediate validation accuracy).

The optuna flow is asynchronous and runs in the reaper's pass (store/reaper.py), which one process of
the database runs at a time: creating the sweep asks the study for the first `parallel` trials; each
pass reports every running child's new `eval` events to its trial, cancels a child the pruner prunes
(its error then reads `pruned`), tells the study each finished child's final val_accuracy, and asks
new trials while fewer than `parallel` children are active, until `trials` were asked.

Optuna's storage is the job database: its RDBStorage on the same PostgreSQL database in a schema of
its own (`optuna`), or on SQLite a file beside the job database. Optuna has no table prefix and
stamps its own Alembic revision in `alembic_version`, so it must not share our schema's tables.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Callable

from sqlalchemy import select, text

from store import quotas
from store.db import Event, Job, Sweep, utcnow
from store.dispatch import dispatch
from store.idempotency import check_unused, remember
from store.job_state import TERMINAL
from store.jobs import JobStore, count_active_in

log = logging.getLogger("rigl.sweeps")

# numeric ranges a search may draw from: JobSpec path -> type
RANGE_FIELDS = {"training.lr": float, "training.weight_decay": float, "training.momentum": float,
                "sparsity.sparsity": float, "sparsity.schedule.alpha": float, "sparsity.schedule.t_end": float,
                "sparsity.schedule.delta_t": int}
OPTUNA_SCHEMA = "optuna"
METRIC = "val_accuracy"


def set_path(tree: dict, path: str, value) -> dict:
    """`tree` with `path` (a.b.c) set, copying each dict on the way (the base stays as it was)."""
    head, _, rest = path.partition(".")
    out = dict(tree)
    out[head] = set_path(dict(out.get(head) or {}), rest, value) if rest else value
    return out


def get_path(tree: dict, path: str):
    for part in path.split("."):
        tree = (tree or {}).get(part) if isinstance(tree, dict) else None
    return tree


def point_tree(base: dict, params: dict) -> dict:
    """The base tree with a point's values: grid axes (sweeps.AXES) and range paths."""
    from store.sweeps import AXES

    tree = base
    for key, value in params.items():
        tree = set_path(tree, ".".join(AXES[key]) if key in AXES else key, value)
    return tree


def _draw(rng: random.Random, spec: dict, kind: type):
    low, high = spec["low"], spec["high"]
    if spec.get("log"):
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        value = rng.uniform(low, high)
    return int(round(value)) if kind is int else value


def sample_random(grid: dict, ranges: dict, trials: int, seed: int) -> list[dict]:
    """`trials` points: each axis a uniform choice of its values, each range uniform (log-uniform with
    `log`); the same seed gives the same points."""
    from store.sweeps import AXES

    rng = random.Random(seed)
    points = []
    for _ in range(trials):
        point = {axis: rng.choice(grid[axis]) for axis in AXES if grid.get(axis)}
        point.update({path: _draw(rng, ranges[path], RANGE_FIELDS[path]) for path in sorted(ranges)})
        points.append(point)
    return points


# ---------------------------------------------------------------------------------------------- optuna
def optuna_storage(database_url: str):
    """Optuna's RDBStorage in the job database, apart from our tables (see the module docstring)."""
    import optuna
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        sibling = url.set(database=f"{database}.optuna.db") if database not in ("", ":memory:") else url
        return optuna.storages.RDBStorage(sibling.render_as_string(hide_password=False))
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {OPTUNA_SCHEMA}"))
    finally:
        engine.dispose()
    return optuna.storages.RDBStorage(url.render_as_string(hide_password=False), engine_kwargs={
        "connect_args": {"options": f"-csearch_path={OPTUNA_SCHEMA}"}, "pool_pre_ping": True})


def _pruner(search: dict):
    import optuna

    spec = search.get("pruner") or {}
    kind = spec.get("type", "median")
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.get("warmup_evals", 1) or 1)
    return optuna.pruners.MedianPruner(n_startup_trials=spec.get("startup_trials", 2),
                                       n_warmup_steps=spec.get("warmup_evals", 1))


def load_study(storage, sweep_id: str, search: dict, asked: int = 0):
    """The sweep's study, with a TPE sampler seeded per trial (a sampler is not stored: a fresh one per
    pass with one seed would draw the same startup points again)."""
    import optuna

    sampler = optuna.samplers.TPESampler(seed=(search.get("seed") or 0) * 1_000_003 + asked,
                                         n_startup_trials=search.get("startup_trials", 10))
    return optuna.load_study(study_name=sweep_id, storage=storage, sampler=sampler, pruner=_pruner(search))


def distributions(grid: dict, ranges: dict) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from store.sweeps import AXES

    out = {axis: CategoricalDistribution(grid[axis]) for axis in AXES if grid.get(axis)}
    for path, spec in sorted(ranges.items()):
        kind = IntDistribution if RANGE_FIELDS[path] is int else FloatDistribution
        out[path] = kind(spec["low"], spec["high"], log=bool(spec.get("log")))
    return out


def create_study(storage, sweep_id: str) -> None:
    import optuna

    optuna.create_study(study_name=sweep_id, storage=storage, direction="maximize")


def ask(storage, sweep_id: str, search: dict, grid: dict) -> tuple[int, dict]:
    """(trial number, its point) for the next child."""
    study = load_study(storage, sweep_id, search, asked=search.get("asked", 0))
    trial = study.ask(distributions(grid, search.get("ranges") or {}))
    return trial.number, dict(trial.params)


def make_child(search: dict, base_resolved: dict, params: dict) -> tuple[dict, str | None]:
    """The child's resolved tree for a point, and an error when the JobSpec refuses the combination."""
    from pydantic import ValidationError

    from rigl_core.spec import JobSpec, format_validation_error

    tree = point_tree(base_resolved, params)
    try:
        JobSpec.model_validate(tree)
    except ValidationError as error:
        return tree, format_validation_error(error)
    return tree, None


def label(prefix: str, number: int, params: dict) -> str:
    shown = " ".join(f"{key.rsplit('.', 1)[-1]}={value:.4g}" if isinstance(value, float) else
                     f"{key.rsplit('.', 1)[-1]}={value}" for key, value in params.items())
    return f"{prefix} #{number} {shown}"[:200]


def create_search_sweep(store: JobStore, owner: str, name: str | None, base: dict, grid: dict, search: dict,
                        points: list[tuple[int, dict]], max_active: int,
                        idempotency: tuple[str, str] | None = None,
                        artifacts_quota: quotas.Quota | None = None, sweep_id: str | None = None
                        ) -> tuple[Sweep, list[str]]:
    """An optuna sweep and its first children (`points`: asked trials, as many as fit under the cap),
    in one transaction. Returns (sweep, job ids to dispatch)."""
    with store.sessions.begin() as s:
        store.lock_owners(s, [owner])
        check_unused(s, owner, idempotency)
        if artifacts_quota is not None:
            quotas.check(s, owner, "artifacts", artifacts_quota, adding_bytes=0, adding_count=search["trials"])
        sweep = Sweep(id=sweep_id, owner=owner, name=name, status="active", base=base, grid=grid,
                      children=search["trials"],
                      held=[], held_count=0, search={**search, "jobs": {}, "asked": 0})
        s.add(sweep)
        s.flush()
        remember(s, owner, idempotency, sweep.id)
        created = _add_trials(store, s, sweep, points, max_active)
    return sweep, created


def _add_trials(store: JobStore, session, sweep: Sweep, points: list[tuple[int, dict]], max_active: int) -> list[str]:
    search = dict(sweep.search)
    jobs, created = dict(search.get("jobs") or {}), []
    labels = search.get("labels") or {}
    for number, params in points:
        tree, error = make_child(search, search["resolved"], params)
        job = store.add_job_rows(session, point_tree(search["spec"], params), tree, search["total_steps"],
                                 sweep.owner, label(labels.get("prefix") or "sweep", number, params),
                                 labels.get("tags"), labels.get("metadata"), sweep_id=sweep.id)
        if error is not None:  # a combination the JobSpec refuses: a visible failed child, told as failed
            job.status, job.finished_at, job.error_code, job.error_message = "failed", utcnow(), "invalid_job", error
            session.add(Event(job_id=job.id, type="status", level="error", message=error, data={"status": "failed"}))
        else:
            created.append(job.id)
        session.flush()
        jobs[job.id] = number
    search["jobs"], search["asked"] = jobs, search.get("asked", 0) + len(points)
    sweep.search = search
    return created


def advance_searches(store: JobStore, enqueue: Callable[[str], None], database_url: str, max_active: int) -> None:
    """One pass over the active optuna sweeps (see the module docstring). Called by the reaper's leader."""
    with store.sessions() as s:
        ids = [row.id for row in s.scalars(select(Sweep).where(Sweep.status == "active", Sweep.search.is_not(None)))
               if (row.search or {}).get("strategy") == "optuna"]
    if not ids:
        return
    storage = optuna_storage(database_url)
    try:
        for sweep_id in ids:
            try:
                _advance(store, enqueue, storage, sweep_id, max_active)
            except Exception:  # noqa: BLE001 - one sweep's trouble never stops the others or the reaper
                log.exception("sweep %s: the search could not advance", sweep_id)
    finally:
        storage.remove_session()
        storage.engine.dispose()


def _advance(store: JobStore, enqueue, storage, sweep_id: str, max_active: int) -> None:
    import optuna

    with store.sessions() as s:
        sweep = s.get(Sweep, sweep_id)
        search = dict(sweep.search)
        jobs = {job.id: job for job in s.scalars(select(Job).where(Job.sweep_id == sweep_id))}
    study = load_study(storage, sweep_id, search, search.get("asked", 0))
    numbers = search.get("jobs") or {}
    told, pruned, seen = set(search.get("told") or []), dict(search.get("pruned") or {}), dict(search.get("seen") or {})
    for job_id, number in numbers.items():
        job = jobs.get(job_id)
        if job is None or job_id in told:
            if job is not None and job_id in pruned and job.status == "cancelled" and job.error_code is None:
                _mark_pruned(store, job_id, pruned[job_id])
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        if job.status in TERMINAL:
            value = ((job.result or {}).get("final_metrics") or {}).get(METRIC)
            if job.status == "succeeded" and value is not None:
                study.tell(number, float(value))
            else:
                study.tell(number, state=optuna.trial.TrialState.FAIL)
            told.add(job_id)
            continue
        after = seen.get(job_id, 0)
        events = store.events.list_events(job_id, after=after, limit=1000, types=("eval",))
        for event in events:
            data = event.data or {}
            if data.get(METRIC) is not None and data.get("epoch") is not None:
                storage.set_trial_intermediate_value(trial_id, int(data["epoch"]), float(data[METRIC]))
            seen[job_id] = event.id
        if events and study.pruner.prune(study, storage.get_trial(trial_id)):
            frozen = storage.get_trial(trial_id)
            step = frozen.last_step
            reason = (f"pruned by the sweep's {(search.get('pruner') or {}).get('type', 'median')} pruner at epoch "
                      f"{step}: {METRIC} {frozen.intermediate_values[step]:.4f}")
            store.request_cancel(job_id)
            store.events.add_events(job_id, [{"type": "message", "level": "warn", "message": reason,
                                              "data": {"code": "pruned", "epoch": step}}])
            study.tell(number, state=optuna.trial.TrialState.PRUNED)
            told.add(job_id)
            pruned[job_id] = reason
    search.update(told=sorted(told), pruned=pruned, seen=seen)
    created: list[str] = []
    with store.sessions.begin() as s:
        store.lock_owners(s, [sweep.owner])
        row = s.scalars(select(Sweep).where(Sweep.id == sweep_id).with_for_update()).first()
        if row is None or row.status != "active":
            return
        row.search = {**row.search, "told": search["told"], "pruned": pruned, "seen": seen}
        active = sum(1 for job_id in numbers if jobs.get(job_id) is not None and jobs[job_id].status not in TERMINAL
                     and job_id not in pruned)
        room = min(search["parallel"] - active, search["trials"] - row.search.get("asked", 0),
                   max_active - count_active_in(s, row.owner))
        points = []
        for _ in range(max(0, room)):
            points.append(ask(storage, sweep_id, {**row.search, "asked": row.search.get("asked", 0) + len(points)},
                              row.grid))
        if points:
            created = _add_trials(store, s, row, points, max_active)
    for job_id in created:
        dispatch(store, enqueue, job_id)


def _mark_pruned(store: JobStore, job_id: str, reason: str) -> None:
    from sqlalchemy import update

    with store.sessions.begin() as s:
        s.execute(update(Job).where(Job.id == job_id, Job.status == "cancelled", Job.error_code.is_(None))
                  .values(error_code="pruned", error_message=reason))


def best_trial(children: list[dict]) -> dict | None:
    """The succeeded child with the highest val_accuracy (the study's best trial)."""
    done = [c for c in children if c["status"] == "succeeded" and c.get("val_accuracy") is not None]
    if not done:
        return None
    best = max(done, key=lambda c: c["val_accuracy"])
    return {"id": best["id"], "trial": best.get("trial"), "val_accuracy": best["val_accuracy"],
            "params": best.get("point") or best["params"]}
