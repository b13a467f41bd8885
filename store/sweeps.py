"""Sweeps: a bounded grid of jobs over one base spec, queued through the normal queue and its fairness.

A sweep queues, it never fails on the per-owner active-job cap: its children that fit under the cap
become jobs at once; the rest wait in the sweep row (`held`, already validated and resolved) and become
jobs as the owner's jobs end. Whoever learns that a job ended releases them: the worker that finished it
(worker/tasks.py) and the reaper's pass (store/reaper.py, every API replica and worker), so a lost
release is made good within one reaper interval. A release is one transaction under the owner's lock
row (as create_job's cap check), so concurrent releases and submissions never overshoot the cap, and a
child leaves `held` in the transaction that creates its job: never twice, never lost.
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable

from sqlalchemy import delete, func, select, update

from store import quotas, webhooks
from store.artifacts import ID_PATTERN, issued_id
from store.db import Checkpoint, DatasetRecord, Event, IdempotencyRecord, Job, Sweep, WeightsRecord, utcnow
from store.dispatch import dispatch
from store.idempotency import check_unused, remember
from store.job_state import ACTIVE, TERMINAL
from store.jobs import JobStore, count_active_in, source_job_kept

log = logging.getLogger("rigl.sweeps")

# grid axis -> (section, field) of the JobSpec it sets; the order is the grid's expansion order
AXES = {"method": ("sparsity", "method"), "structure": ("sparsity", "structure"),
        "distribution": ("sparsity", "distribution"), "sparsity": ("sparsity", "sparsity"), "seed": ("training", "seed")}
DEFAULT_STRUCTURE = "unstructured"  # a child resolved (or held) before `structure` was an axis has none


def expand(base: dict, grid: dict) -> list[tuple[dict, dict]]:
    """Every (params, child spec tree) of the grid, the base tree with the grid's values applied. An axis
    left out (or None) keeps the base's value and is not in `params`."""
    axes = [axis for axis in AXES if grid.get(axis)]
    out = []
    for values in itertools.product(*(grid[axis] for axis in axes)):
        tree = {key: (dict(value) if isinstance(value, dict) else value) for key, value in base.items()}
        params = dict(zip(axes, values))
        for axis, value in params.items():
            section, field = AXES[axis]
            tree[section] = {**(tree.get(section) or {}), field: value}
        out.append((params, tree))
    return out


def params_of(resolved_spec: dict) -> dict:
    """A child's place in the grid, read from its validated spec (every axis, defaults included)."""
    return {axis: (resolved_spec.get(section) or {}).get(field) for axis, (section, field) in AXES.items()}


# ---------------------------------------------------------------------------------------------- create
class TooManySweepChildren(Exception):
    """The owner's unfinished sweep children plus the new sweep's would pass `max_children`."""

    def __init__(self, max_children: int, unfinished: int, adding: int):
        super().__init__(f"{unfinished} unfinished sweep children + {adding} is over {max_children}")
        self.max_children, self.unfinished, self.adding = max_children, unfinished, adding


def unfinished_children(session, owner: str) -> int:
    """The owner's sweep children not finished: held in active sweeps, or queued/running jobs of a sweep
    (in the caller's transaction; after the owner's lock: exact)."""
    held = session.scalar(select(func.coalesce(func.sum(Sweep.held_count), 0))
                          .where(Sweep.owner == owner, Sweep.status == "active")) or 0
    jobs = session.scalar(select(func.count()).select_from(Job)
                          .where(Job.owner == owner, Job.sweep_id.is_not(None), Job.status.in_(ACTIVE))) or 0
    return int(held) + int(jobs)


def create_sweep(store: JobStore, owner: str, name: str | None, base: dict, grid: dict, children: list[dict],
                 max_active: int, idempotency: tuple[str, str] | None = None,
                 artifacts_quota: quotas.Quota | None = None, max_children: int | None = None,
                 search: dict | None = None) -> tuple[Sweep, list[str]]:
    """Store the sweep and the children that fit under the owner's cap as queued jobs, all in one
    transaction; the rest are held. `children`: entries with spec, resolved, total_steps, name, tags,
    metadata (validated by the caller). Returns (sweep, ids of the jobs created: the caller dispatches).
    `idempotency` = (key, body hash), stored with the sweep (the jobs' table: a key names one job or one
    sweep); a twin that committed first raises IdempotencyConflict. `artifacts_quota`: every child counts
    as a kept job now, held ones included (QuotaExceeded: nothing is stored). `max_children`: the owner's
    cap on unfinished sweep children, counted under the same lock (TooManySweepChildren: nothing is stored)."""
    with store.sessions.begin() as s:
        store.lock_owners(s, [owner])
        check_unused(s, owner, idempotency)
        if max_children is not None:
            unfinished = unfinished_children(s, owner)
            if unfinished + len(children) > max_children:
                raise TooManySweepChildren(max_children, unfinished, len(children))
        if artifacts_quota is not None:
            quotas.check(s, owner, "artifacts", artifacts_quota, adding_bytes=0, adding_count=len(children))
        sweep = Sweep(owner=owner, name=name, status="active", base=base, grid=grid, children=len(children),
                      held=[], held_count=0, search=search)
        s.add(sweep)
        s.flush()
        remember(s, owner, idempotency, sweep.id)
        free = max(0, max_active - count_active_in(s, owner))
        created = [_add_child(store, s, sweep, entry).id for entry in children[:free]]
        sweep.held, sweep.held_count = children[free:], len(children) - min(free, len(children))
    return sweep, created


def _add_child(store: JobStore, session, sweep: Sweep, entry: dict) -> Job:
    job = store.add_job_rows(session, entry["spec"], entry["resolved"], entry["total_steps"], sweep.owner,
                             entry.get("name"), entry.get("tags"), entry.get("metadata"), sweep_id=sweep.id,
                             plan=entry.get("plan"))
    gone = _gone_upload(session, entry["resolved"], entry["spec"])
    if gone is not None:  # deleted while the child was held: a visible failed child, not a lost one
        message = f"the {gone} was deleted before this sweep child could start"
        job.status, job.finished_at, job.error_code, job.error_message = "failed", utcnow(), "upload_gone", message
        session.add(Event(job_id=job.id, type="status", level="error", message=message, data={"status": "failed"}))
    return job


def _gone_upload(session, resolved: dict, spec: dict) -> str | None:
    dataset = spec.get("dataset") or {}
    if dataset.get("name") == "tensors" and session.get(DatasetRecord, dataset.get("path")) is None:
        return "uploaded dataset"
    weights = (spec.get("model") or {}).get("weights")
    if weights is not None and session.get(WeightsRecord, weights) is None:
        return "uploaded weights"
    source = (spec.get("model") or {}).get("init_from_job")
    if source is not None and not source_job_kept(session, source):
        return f"job {source!r} it starts from"
    return None


# ---------------------------------------------------------------------------------------------- release
def release_held(store: JobStore, enqueue: Callable[[str], None], max_active: int, owner: str | None = None
                 ) -> list[str]:
    """Turn held children into queued jobs while their owner is under `max_active`, oldest sweep first,
    and send each one's message (store/dispatch.py: a broker outage leaves it for the reaper). Returns the
    ids of the jobs created. Cheap when nothing is held (one indexed query)."""
    with store.sessions() as s:
        query = select(Sweep.id, Sweep.owner).where(Sweep.status == "active", Sweep.held_count > 0)
        if owner is not None:
            query = query.where(Sweep.owner == owner)
        waiting = list(s.execute(query.order_by(Sweep.created_at, Sweep.id)))
    created: list[tuple[str, str]] = []  # (job id, status)
    full: set[str] = set()
    for sweep_id, sweep_owner in waiting:
        if sweep_owner in full:
            continue
        with store.sessions.begin() as s:
            store.lock_owners(s, [sweep_owner])
            sweep = s.scalars(select(Sweep).where(Sweep.id == sweep_id).with_for_update()).first()
            if sweep is None or sweep.status != "active" or not sweep.held:
                continue
            free = max(0, max_active - count_active_in(s, sweep_owner))
            if free == 0:
                full.add(sweep_owner)
                continue
            held = list(sweep.held)
            for entry in held[:free]:
                job = _add_child(store, s, sweep, entry)
                created.append((job.id, job.status))
            sweep.held, sweep.held_count = held[free:], len(held[free:])
    for job_id, status in created:
        if status == "queued":
            dispatch(store, enqueue, job_id)
    if created:
        log.info("released %d held sweep children", len(created))
    return [job_id for job_id, _status in created]


# ---------------------------------------------------------------------------------------------- read
def get_sweep(store: JobStore, sweep_id: str, owner: str | None = None) -> Sweep | None:
    """Someone else's sweep is as good as missing (as jobs are)."""
    if not issued_id(sweep_id):
        return None
    with store.sessions() as s:
        query = select(Sweep).where(Sweep.id == sweep_id)
        if owner is not None:
            query = query.where(Sweep.owner == owner)
        return s.scalars(query).first()


def list_sweeps(store: JobStore, owner: str | None = None, limit: int = 50) -> list[Sweep]:
    with store.sessions() as s:
        query = select(Sweep).order_by(Sweep.created_at.desc(), Sweep.id.desc()).limit(limit)
        if owner is not None:
            query = query.where(Sweep.owner == owner)
        return list(s.scalars(query))


def sweep_jobs(store: JobStore, sweep_id: str) -> list[Job]:
    with store.sessions() as s:
        return list(s.scalars(select(Job).where(Job.sweep_id == sweep_id).order_by(Job.seq)))


def packed_sizes(store: JobStore, job_ids: list[str]) -> dict[str, int]:
    """Bytes of each job's newest packed export (what a deployment downloads)."""
    if not job_ids:
        return {}
    with store.sessions() as s:
        rows = s.execute(select(Checkpoint.job_id, Checkpoint.size, Checkpoint.step)
                         .where(Checkpoint.job_id.in_(job_ids), Checkpoint.kind == "packed"))
        newest: dict[str, tuple[int, int]] = {}
        for job_id, size, step in rows:
            if job_id not in newest or step >= newest[job_id][1]:
                newest[job_id] = (size, step)
    return {job_id: size for job_id, (size, _step) in newest.items()}


# ---------------------------------------------------------------------------------------------- cancel, delete
def cancel_sweep(store: JobStore, sweep_id: str, owner: str | None = None) -> Sweep | None:
    """Stop the sweep as a whole: its held children never start, and every child job not finished is
    cancelled through the job cancel path (JobStore.request_cancel). None: no such sweep for this owner."""
    sweep = get_sweep(store, sweep_id, owner)
    if sweep is None:
        return None
    with store.sessions.begin() as s:
        store.lock_owners(s, [sweep.owner])  # after this, no release creates another child
        if s.execute(update(Sweep).where(Sweep.id == sweep_id, Sweep.status != "cancelled")
                     .values(status="cancelled")).rowcount == 1:
            webhooks.sweep_cancelled(s, sweep)
    for job in sweep_jobs(store, sweep_id):
        if job.status not in TERMINAL:
            store.request_cancel(job.id)
    return get_sweep(store, sweep_id)


def delete_sweep(store: JobStore, artifacts, sweep_id: str, owner: str | None = None) -> dict | None:
    """Cancel the sweep, delete each child through the job deletion path (store/deletion.py: a running
    child is deleted by the cleanup pass once its worker stopped it), then the sweep row.
    Returns {deleted: [job ids], pending: [job ids]}, or None when there is no such sweep."""
    from store.deletion import delete_job

    if not ID_PATTERN.match(sweep_id) or cancel_sweep(store, sweep_id, owner) is None:
        return None
    done: dict[str, list[str]] = {"deleted": [], "pending": []}
    for job in sweep_jobs(store, sweep_id):
        outcome = delete_job(store, artifacts, job.id)
        if outcome is not None:
            done["deleted" if outcome == "deleted" else "pending"].append(job.id)
    with store.sessions.begin() as s:
        s.execute(delete(IdempotencyRecord).where(IdempotencyRecord.job_id == sweep_id))  # the key is free again
        s.execute(delete(Sweep).where(Sweep.id == sweep_id))
    return done


# ---------------------------------------------------------------------------------------------- aggregate
# aggregate frontier -> the group's cost it minimises
COSTS = {"flops": "inference_flops_ratio", "size": "packed_bytes", "latency": "latency_ms"}


def latency_ms(result: dict) -> float | None:
    """A finished job's measured batch-1 CPU latency (its report's `inference_latency_ms`, kept in the job
    result): the condensed model's when it was measured (a fan-in run deploys that one), else the dense one's."""
    measured = result.get("inference_latency_ms") or {}
    return measured.get("condensed") if measured.get("condensed") is not None else measured.get("dense")


def group_key(params: dict) -> tuple[str, str, str, float]:
    """A child's group: (method, structure, distribution, sparsity); seeds are averaged over."""
    return (params["method"], params.get("structure") or DEFAULT_STRUCTURE, params["distribution"],
            params["sparsity"])


def aggregate(children: list[dict]) -> dict:
    """The sweep's table: children grouped by (method, structure, distribution, sparsity), over seeds the
    mean ± sample sd of the final val_accuracy, and the means over the succeeded children of each cost
    (`COSTS`: inference FLOPs ratio, packed export bytes, measured batch-1 CPU latency), with the Pareto
    frontiers of the groups' mean accuracy against each cost. A group's key is method/distribution/sparsity,
    with /structure appended when it is not unstructured.
    `children`: dicts with params, status, val_accuracy, inference_flops_ratio, packed_bytes, latency_ms."""
    from rigl_core.report.pareto import frontier, mean_sd

    groups: dict[tuple, list[dict]] = {}
    for child in children:
        groups.setdefault(group_key(child["params"]), []).append(child)
    rows = []
    for (method, structure, distribution, sparsity), members in sorted(groups.items(),
                                                                       key=lambda kv: tuple(map(str, kv[0]))):
        done = [c for c in members if c["status"] == "succeeded"]
        accuracy, sd = mean_sd([c["val_accuracy"] for c in done if c.get("val_accuracy") is not None])
        costs = {cost: mean_sd([c[cost] for c in done if c.get(cost) is not None])[0] for cost in COSTS.values()}
        key = f"{method}/{distribution}/{sparsity}" + ("" if structure == DEFAULT_STRUCTURE else f"/{structure}")
        rows.append({"key": key, "method": method, "structure": structure, "distribution": distribution,
                     "sparsity": sparsity, "children": len(members), "succeeded": len(done),
                     "seeds": sorted(c["params"]["seed"] for c in done),
                     "val_accuracy": {"mean": accuracy, "sd": sd}, **costs})
    fronts = {}
    for name, cost in COSTS.items():
        picked = frontier([(row["val_accuracy"]["mean"], row[cost]) for row in rows])
        fronts[name] = [rows[i]["key"] for i in picked]
        for i, row in enumerate(rows):
            row.setdefault("on_frontier", {})[name] = i in picked
    return {"groups": rows, "frontier": fronts}
