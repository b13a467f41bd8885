"""Warm starts from a trained dense model vs RigL from scratch, on MNIST-1D at 90% and 95% sparsity.

Why: issue 13 added `model.weights` (a safetensors state_dict) with two ways to use it — GMP from the
dense weights (the classic compression workflow) and one-shot magnitude pruning then sparse
fine-tuning (`sparsity.init: magnitude`). This measures what a user who already has a trained dense
model gains from them over training sparse from scratch, at the same fine-tuning budget and (d) at
the same total budget. Everything goes through JobSpecs and the service's Trainer, as `rigl train` would.

Per seed (0, 1, 2): a dense MLP (hidden 256, 128) is trained once with `run_training` (SGD momentum
0.9, lr 0.05, cosine, wd 1e-4, batch 100, 60 epochs = 2,400 steps — the methods.py MNIST-1D recipe,
where the dense MLP has converged) and its `model.safetensors` export is the warm start. Then, at
S ∈ {0.9, 0.95}, ERK, each with the same seed:

  (a) gmp          — `model.weights` + `method: gmp`: starts dense from the weights and prunes by the
                     cubic schedule from step 0 (`gmp_begin: 0`) to T_end = 0.75, then fine-tunes sparse.
  (b) mag+rigl     — `model.weights` + `init: magnitude` + `method: rigl`: one-shot magnitude pruning to
                     the ERK counts, then RigL fine-tuning. Its val accuracy right after pruning (before
                     any step) is reported too.
  (b') mag+static  — the same one-shot pruning, then plain fine-tuning with fixed masks (RigL's baseline).
  (c) rigl scratch — no weights, random masks, the same number of steps as the fine-tunes.
  (d) rigl scratch, long — no weights, the dense run's + the fine-tune's steps (80 epochs): the same
                     total training compute as dense-then-fine-tune, ignoring that sparse steps are cheaper.

Fine-tunes (a, b, b'): 20 epochs (800 steps), lr 0.01 (docs/guide/warm-start.md: smaller than from scratch, the weights
are trained), cosine, ΔT = 25, α = 0.3, T_end = 0.75. From scratch (c, d): the dense recipe's lr 0.05,
ΔT = 50 (as methods.py). Reported: final val accuracy (1,000 test sequences) mean ± sd over seeds.

    python bench/warm_start.py           # full: 33 runs, ~2 min on 2 cores
    python bench/warm_start.py --quick   # 1 seed, 90% only, few epochs, < 1 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

from transformer_sparsity import commit  # noqa: E402  (bench/ is the script's own directory)

MODEL = {"name": "mlp", "hidden_sizes": [256, 128]}
DATASET = {"name": "mnist1d"}
DENSE = {"epochs": 60, "batch_size": 100, "lr": 0.05, "optimizer": "sgd", "weight_decay": 1e-4}
FINE_TUNE = {"epochs": 20, "lr": 0.01, "delta_t": 25}
SCRATCH = {"lr": 0.05, "delta_t": 50}
SCHEDULE = {"alpha": 0.3, "t_end": 0.75}
SPARSITIES = [0.9, 0.95]
# variant: (label, method, init, uses weights, epochs key, extra schedule)
VARIANTS = {
    "gmp": ("(a) GMP from dense weights", "gmp", "random", True, "fine_tune", {"gmp_begin": 0.0}),
    "mag_rigl": ("(b) magnitude prune + RigL fine-tune", "rigl", "magnitude", True, "fine_tune", {}),
    "mag_static": ("(b') magnitude prune + static fine-tune", "static", "magnitude", True, "fine_tune", {}),
    "rigl_scratch": ("(c) RigL from scratch, same steps", "rigl", "random", False, "fine_tune", {}),
    "rigl_scratch_long": ("(d) RigL from scratch, dense + fine-tune steps", "rigl", "random", False, "total", {}),
}


def epochs_for(kind: str, quick: bool) -> int:
    dense, fine = (4, 2) if quick else (DENSE["epochs"], FINE_TUNE["epochs"])
    return {"dense": dense, "fine_tune": fine, "total": dense + fine}[kind]


def train_dense(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from rigl_core.export.pipeline import DENSE_EXPORT
    from rigl_core.training.run import run_training
    from rigl_core.spec import JobSpec

    spec = JobSpec.model_validate({
        "model": MODEL, "dataset": DATASET, "sparsity": {"method": "dense"},
        "training": {**DENSE, "epochs": epochs_for("dense", job["quick"]), "seed": job["seed"],
                     "log_every_steps": 1000},
    })
    out = Path(job["dir"]) / f"dense-{job['seed']}"
    report = run_training(spec, out)
    return {"variant": "dense", "seed": job["seed"], "sparsity": 0.0, "accuracy": report["final_metrics"]["val_accuracy"],
            "steps": report["steps"], "seconds": report["train_seconds"], "weights": str(out / DENSE_EXPORT)}


def train_sparse(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from rigl_core.spec import JobSpec
    from rigl_core.training.trainer import Trainer

    label, method, init, uses_weights, epochs_kind, extra = VARIANTS[job["variant"]]
    recipe = FINE_TUNE if uses_weights else SCRATCH
    tree = {
        "model": {**MODEL, **({"weights": job["weights"]} if uses_weights else {})},
        "dataset": DATASET,
        "sparsity": {"method": method, "sparsity": job["sparsity"], "distribution": "erk", "init": init,
                     "schedule": {**SCHEDULE, "delta_t": recipe["delta_t"], **extra}},
        "training": {**DENSE, "lr": recipe["lr"], "epochs": epochs_for(epochs_kind, job["quick"]),
                     "seed": job["seed"], "log_every_steps": 1000},
    }
    trainer = Trainer(JobSpec.model_validate(tree))
    start = trainer.evaluate()  # after warm start and the first masks, before any step
    report = trainer.fit()
    t = report["totals"]
    return {"variant": job["variant"], "seed": job["seed"], "sparsity": job["sparsity"],
            "accuracy": report["final_metrics"]["val_accuracy"], "accuracy_step0": start["val_accuracy"],
            "steps": report["steps"], "seconds": report["train_seconds"], "sparsity_masked": t["sparsity"],
            "sparsity_overall": t["overall_sparsity"], "training_flops": t["training_flops_ratio"],
            "leak_ok": report["leak_check"]["ok"], "spec": tree}


def summarise(rows: list[dict]) -> dict:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["sparsity"]), []).append(row)
    out = {}
    for key, items in groups.items():
        accs = [r["accuracy"] for r in items]
        starts = [r["accuracy_step0"] for r in items if "accuracy_step0" in r]
        out[key] = {"mean": statistics.mean(accs), "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "n": len(accs), "steps": items[0]["steps"],
                    "start_mean": statistics.mean(starts) if starts else None,
                    "start_sd": statistics.stdev(starts) if len(starts) > 1 else 0.0,
                    "training_flops": items[0].get("training_flops"),
                    "overall": items[0].get("sparsity_overall")}
    return out


def markdown(summary: dict, meta: dict) -> str:
    dense = summary[("dense", 0.0)]
    lines = [
        "# Warm start from a trained dense MLP vs RigL from scratch (MNIST-1D)",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}; commit {meta['commit']}; {meta['date']}; "
        f"wall time {meta['wall_minutes']:.1f} min{' (QUICK)' if meta['quick'] else ''}.",
        "",
        f"Model {json.dumps(MODEL)}, dataset {json.dumps(DATASET)} (4,000 train / 1,000 val), ERK, seeds "
        f"{meta['seeds']}. Dense: {json.dumps(DENSE | {'epochs': meta['dense_epochs']})}, cosine; its "
        f"`model.safetensors` export is the `model.weights` of (a), (b), (b'). Fine-tunes: "
        f"{json.dumps(FINE_TUNE | {'epochs': meta['fine_epochs']})}; from scratch: {json.dumps(SCRATCH)}; "
        f"schedule {json.dumps(SCHEDULE)}; GMP prunes from step 0 (`gmp_begin: 0`).",
        "",
        f"**Dense MLP: {dense['mean']:.4f} ± {dense['sd']:.4f}** ({dense['steps']:,} steps).",
        "",
        "Final validation accuracy, mean ± sd. `after pruning` is the accuracy at step 0, after the warm "
        "start and the first masks, before any training step. Train FLOPs are the sparse run's own, "
        "relative to a dense run of the same length (the dense pre-training is not included).",
        "",
        "| variant | steps | " + " | ".join(f"S={s}" for s in SPARSITIES) + " | " +
        " | ".join(f"after pruning S={s}" for s in SPARSITIES) + " | train FLOPs (S=" +
        "/".join(str(s) for s in SPARSITIES) + ") |",
        "|---" * (3 + 2 * len(SPARSITIES)) + "|",
    ]
    for variant, (label, *_rest) in VARIANTS.items():
        entries = [summary.get((variant, s)) for s in SPARSITIES]
        if not any(entries):
            continue
        steps = next(e["steps"] for e in entries if e)
        accs = [f"{e['mean']:.4f} ± {e['sd']:.4f}" if e else "—" for e in entries]
        starts = [f"{e['start_mean']:.4f} ± {e['start_sd']:.4f}" if e and VARIANTS[variant][2] == "magnitude"
                  else "—" for e in entries]
        flops = "/".join(f"{e['training_flops']:.3f}" if e else "—" for e in entries)
        lines.append(f"| {label} | {steps:,} | " + " | ".join(accs) + " | " + " | ".join(starts) + f" | {flops} |")
    lines += ["", "Real overall sparsity (all parameters, biases dense): " +
              ", ".join(f"S={s}: {summary[('rigl_scratch', s)]['overall']:.3f}" for s in SPARSITIES
                        if ("rigl_scratch", s) in summary) + f"; leak check ok in every run: {meta['leak_ok']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    import torch

    seeds = [0] if args.quick else [0, 1, 2]
    sparsities = SPARSITIES[:1] if args.quick else SPARSITIES
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="warm_start_") as tmp, \
            ProcessPoolExecutor(max_workers=args.workers) as pool:
        dense_rows = list(pool.map(train_dense, [{"seed": s, "quick": args.quick, "dir": tmp} for s in seeds]))
        for row in dense_rows:
            print(f"dense seed {row['seed']}: acc {row['accuracy']:.4f}, {row['seconds']:.0f}s", flush=True)
        weights = {row["seed"]: row["weights"] for row in dense_rows}
        # the long runs first, so the pool's tail is short ones
        jobs = [{"variant": v, "sparsity": s, "seed": seed, "weights": weights[seed], "quick": args.quick}
                for v in sorted(VARIANTS, key=lambda v: VARIANTS[v][4] != "total")
                for s in sparsities for seed in seeds]
        rows = []
        for i, row in enumerate(pool.map(train_sparse, jobs), 1):
            rows.append(row)
            print(f"{i}/{len(jobs)} {row['variant']} S={row['sparsity']} seed {row['seed']}: "
                  f"step0 {row['accuracy_step0']:.4f} → {row['accuracy']:.4f} ({time.time() - started:.0f}s)",
                  flush=True)
    for row in dense_rows:
        row.pop("weights")
    leak_ok = all(r["leak_ok"] for r in rows)
    assert leak_ok, "a run leaked weights at masked positions"
    meta = {
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
                   f"Python {platform.python_version()}",
        "torch": torch.__version__, "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_minutes": (time.time() - started) / 60, "quick": args.quick, "seeds": seeds,
        "dense_epochs": epochs_for("dense", args.quick), "fine_epochs": epochs_for("fine_tune", args.quick),
        "leak_ok": leak_ok,
    }
    summary = summarise(dense_rows + rows)
    suffix = "-quick" if args.quick else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"warm_start{suffix}.json").write_text(
        json.dumps({"meta": meta, "runs": dense_rows + rows}, indent=1))
    text = markdown(summary, meta)
    (RESULTS / f"warm_start{suffix}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
