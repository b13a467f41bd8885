"""One normalised view of a training run, whether it ran locally or on the service.

`rigl train --out DIR` leaves report.json and metrics.jsonl; the service serves the same facts over
`/v1/jobs/{id}`, `/metrics` and `/sparsity`. The chart code (report_png.py) should not care which,
so both are reduced here to one plain dict:

    {"source", "title", "status", "steps", "total_steps", "method", "distribution", "target_sparsity",
     "model", "dataset",
     "final",          # True: layers hold measured densities; False: only the plan's targets so far
     "val_accuracy",   # the last evaluation, or None
     "train": [{step, loss}], "eval": [{step, val_loss, val_accuracy}],
     "mask_updates": [{step, drop_fraction, churn, exploration}],
     "layers": [{name, params, masked, target_density, density (None until measured), exploration}],
     "totals": {...}}  # sparsity, inference_flops_ratio, training_flops_ratio, ... as reported

Non-finite numbers (a diverged loss) become None so the dict is always valid JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

REPORT = "report.json"  # the name rigl_core/export/pipeline.py writes; not imported so that reading needs no torch
METRICS = "metrics.jsonl"


class ReportSourceError(ValueError):
    """The source cannot be read as a run: one line naming what is wrong (the CLI exits 2)."""


def _num(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _series(records, keys: tuple[str, ...]) -> list[dict]:
    """Keep `step` plus `keys`, sorted by step; records without a step are not plottable."""
    out = []
    for record in records or []:
        if not isinstance(record, dict) or _num(record.get("step")) is None:
            continue
        out.append({"step": record["step"], **{k: _num(record.get(k)) for k in keys}})
    return sorted(out, key=lambda r: r["step"])


TRAIN_KEYS = ("loss",)
EVAL_KEYS = ("val_loss", "val_accuracy", "train_loss")
UPDATE_KEYS = ("drop_fraction", "churn", "exploration")
TOTAL_KEYS = ("params", "nnz", "masked_params", "sparsity", "overall_sparsity", "flops_dense", "flops_sparse",
              "inference_flops_ratio", "training_flops_ratio", "exploration")


def _layers(rows, measured: bool) -> list[dict]:
    layers = []
    for row in rows or []:
        target = _num(row.get("target_density"))
        if target is None:  # a plan row: its density is the target
            target = _num(row.get("density"))
        layers.append({
            "name": str(row.get("name", "?")),
            "params": row.get("params") or 0,
            "masked": bool(row.get("masked", True)),
            "target_density": target,
            "density": _num(row.get("density")) if measured else None,
            "exploration": _num(row.get("exploration")) if measured else None,
        })
    return layers


def _totals(totals) -> dict:
    return {k: _num(totals.get(k)) for k in TOTAL_KEYS if k in totals} if isinstance(totals, dict) else {}


def _title(label: str, data: dict) -> str:
    parts = [label, data["method"]]
    if data["method"] != "dense":
        sparsity = data["totals"].get("sparsity")
        if sparsity is None:
            sparsity = data["target_sparsity"]
        if sparsity is not None:
            parts.append(f"{sparsity:.1%} sparse" + (f" ({data['distribution']})" if data["distribution"] else ""))
    if data["model"]:
        parts.append(f"{data['model']} on {data['dataset']}" if data["dataset"] else str(data["model"]))
    if data["val_accuracy"] is not None:
        parts.append(f"val accuracy {data['val_accuracy']:.4f}")
    if data["status"] != "succeeded":
        parts.append(data["status"])
    return "  ·  ".join(parts)


def _assemble(label: str, *, status, method, distribution, target_sparsity, model, dataset, final, train, evals,
              updates, layers, totals, steps=None, total_steps=None, val_accuracy=None) -> dict:
    data = {
        "source": label,
        "status": status,
        "steps": _num(steps),
        "total_steps": _num(total_steps),
        "method": method or "rigl",
        "distribution": distribution,
        "target_sparsity": _num(target_sparsity),
        "model": model,
        "dataset": dataset,
        "final": final,
        "train": _series(train, TRAIN_KEYS),
        "eval": _series(evals, EVAL_KEYS),
        "mask_updates": _series(updates, UPDATE_KEYS),
        "layers": _layers(layers, final),
        "totals": _totals(totals),
    }
    if val_accuracy is None:
        val_accuracy = next((e["val_accuracy"] for e in reversed(data["eval"]) if e["val_accuracy"] is not None),
                            None)
    data["val_accuracy"] = _num(val_accuracy)
    data["title"] = _title(label, data)
    return data


def _read_jsonl(path: Path) -> list[dict]:
    """Lines that do not parse are skipped: a run killed mid-write leaves a truncated last line."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def from_output_dir(path: str | Path) -> dict:
    """A `rigl train --out DIR` directory: needs DIR/report.json (written when training ends)."""
    path = Path(path)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise ReportSourceError(f"SOURCE: {path} {what} (expected a `rigl train --out` directory or a job id)")
    report_path = path / REPORT
    if not report_path.is_file():
        raise ReportSourceError(f"SOURCE: {path} has no {REPORT} (not a finished `rigl train --out` directory)")
    try:
        report = json.loads(report_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportSourceError(f"SOURCE: cannot read {report_path}: {exc}") from None
    if not isinstance(report, dict) or not isinstance(report.get("layers"), list):
        raise ReportSourceError(f"SOURCE: {report_path} has no per-layer 'layers' list (not a rigl report)")
    records = _read_jsonl(path / METRICS)
    by_type = {t: [r for r in records if r.get("type") == t] for t in ("train", "eval", "mask_update")}
    completed = report.get("completed", True)
    return _assemble(
        path.resolve().name,
        status="succeeded" if completed else f"stopped at step {report.get('steps')}/{report.get('total_steps')}",
        method=report.get("method"),
        distribution=report.get("distribution"),
        target_sparsity=report.get("target_sparsity"),
        model=report.get("model"),
        dataset=report.get("dataset"),
        final=True,
        train=by_type["train"],
        evals=by_type["eval"],
        updates=by_type["mask_update"],
        layers=report["layers"],
        totals=report.get("totals"),
        steps=report.get("steps"),
        total_steps=report.get("total_steps"),
        val_accuracy=(report.get("final_metrics") or {}).get("val_accuracy"),
    )


def from_service(client, job_id: str) -> dict:
    """A job on the service by id, in any state: before it succeeds the layers are the plan's targets
    and the curves are what has been logged so far. An unknown id raises the client's NotFound."""
    from rigl_core.client import RiglError
    from rigl_core.spec import SparsitySpec

    job = client.get(job_id).data
    metrics = client.metrics(job_id)
    try:
        sparsity = client.report(job_id)
    except RiglError as exc:
        if exc.status != 409:  # 409 not_ready: no plan for this job's data yet; render without layers
            raise
        sparsity = {}
    spec = job.get("spec") or {}
    sparsity_spec = spec.get("sparsity") or {}
    model_spec = spec.get("model") or {}
    result = job.get("result") or {}
    accuracy = (result.get("final_metrics") or {}).get("val_accuracy")
    if accuracy is None:
        accuracy = (job.get("metrics") or {}).get("val_accuracy")
    defaults = {k: f.default for k, f in SparsitySpec.model_fields.items()}  # what the service resolves
    method = sparsity_spec.get("method", defaults["method"])
    return _assemble(
        job_id,
        status=job.get("status", "unknown"),
        method=method,
        distribution=sparsity_spec.get("distribution", defaults["distribution"]),
        target_sparsity=0.0 if method == "dense" else sparsity_spec.get("sparsity", defaults["sparsity"]),
        model=model_spec.get("name") or ("custom" if model_spec.get("architecture") else None),
        dataset=(spec.get("dataset") or {}).get("name"),
        final=bool(sparsity.get("final")),
        train=metrics.get("train"),
        evals=metrics.get("eval"),
        updates=metrics.get("mask_updates"),
        layers=sparsity.get("layers"),
        totals=sparsity.get("totals"),
        steps=(job.get("progress") or {}).get("step"),
        total_steps=(job.get("progress") or {}).get("total_steps"),
        val_accuracy=accuracy,
    )
