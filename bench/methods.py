"""Method comparison: final accuracy of dense/static/SET/SNFS/RigL/GMP/SNIP across sparsities.

Grid: methods × sparsity {0.8, 0.9, 0.95, 0.98} × distribution {uniform, erk} × seeds, on
(a) an MLP on scikit-learn digits and (b) an MLP on MNIST-1D. Reports mean ± sd of the *final*
validation accuracy, the real whole-network sparsity and the training/inference FLOPs ratios;
plots accuracy vs sparsity per method. Runs in parallel processes, one thread each.

    python bench/methods.py                  # full grid (about 15 minutes on 2 cores)
    python bench/methods.py --quick          # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

METHODS = ["static", "set", "snfs", "rigl", "gmp", "snip"]

# Per dataset: model and training recipe. ΔT and T_end scale with the run length.
SETTINGS = {
    "digits": {
        "model": {"name": "mlp", "hidden_sizes": [300, 100]},
        "dataset": {"name": "digits"},
        "training": {"epochs": 40, "batch_size": 64, "lr": 0.1, "optimizer": "sgd", "weight_decay": 1e-4},
        "schedule": {"delta_t": 25, "alpha": 0.3, "t_end": 0.75},
    },
    "mnist1d": {
        "model": {"name": "mlp", "hidden_sizes": [256, 256]},
        "dataset": {"name": "mnist1d"},
        "training": {"epochs": 60, "batch_size": 100, "lr": 0.05, "optimizer": "sgd", "weight_decay": 1e-4},
        "schedule": {"delta_t": 50, "alpha": 0.3, "t_end": 0.75},
    },
}


def run_one(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from rigl_core.spec import JobSpec
    from rigl_core.training.trainer import Trainer

    setting = SETTINGS[job["dataset"]]
    tree = {
        "model": setting["model"],
        "dataset": setting["dataset"],
        "sparsity": {"method": job["method"], "sparsity": job["sparsity"], "distribution": job["distribution"],
                     "schedule": setting["schedule"]},
        "training": {**setting["training"], "seed": job["seed"], "log_every_steps": 1000},
    }
    if job.get("epochs"):
        tree["training"]["epochs"] = job["epochs"]
    report = Trainer(JobSpec.model_validate(tree)).fit()
    t = report["totals"]
    return {**job, "accuracy": report["final_metrics"]["val_accuracy"], "sparsity_masked": t["sparsity"],
            "sparsity_overall": t["overall_sparsity"], "inference_flops": t["inference_flops_ratio"],
            "training_flops": t["training_flops_ratio"], "seconds": report["train_seconds"],
            "leak_ok": report["leak_check"]["ok"]}


def grid(quick: bool) -> list[dict]:
    seeds = [0] if quick else [0, 1, 2]
    sparsities = [0.9] if quick else [0.8, 0.9, 0.95, 0.98]
    jobs = []
    for dataset in SETTINGS:
        for seed in seeds:
            jobs.append({"dataset": dataset, "method": "dense", "sparsity": 0.0, "distribution": "uniform",
                         "seed": seed})
            for distribution in ("uniform", "erk"):
                for sparsity in sparsities:
                    for method in METHODS:
                        jobs.append({"dataset": dataset, "method": method, "sparsity": sparsity,
                                     "distribution": distribution, "seed": seed})
    if quick:
        for job in jobs:
            job["epochs"] = 3
    return jobs


def summarise(rows: list[dict]) -> dict:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["distribution"], row["sparsity"], row["method"]), []).append(row)
    summary = {}
    for key, items in groups.items():
        accs = [r["accuracy"] for r in items]
        summary[key] = {
            "mean": statistics.mean(accs),
            "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "n": len(accs),
            "overall": items[0]["sparsity_overall"],
            "train_flops": items[0]["training_flops"],
            "infer_flops": items[0]["inference_flops"],
        }
    return summary


def markdown(summary: dict, meta: dict) -> str:
    lines = [
        "# Method comparison: final validation accuracy (mean ± sd over seeds)",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['date']}; wall time {meta['wall_minutes']:.1f} min.",
        "",
    ]
    for name, setting in SETTINGS.items():
        lines += [f"Settings `{name}`: model {json.dumps(setting['model'])}, training "
                  f"{json.dumps(setting['training'])}, schedule {json.dumps(setting['schedule'])}."]
    lines += ["", "Accuracy is the final (not best) validation accuracy. `overall` is the real sparsity of all",
              "conv/linear weights (uniform keeps the first layer dense, as in the paper, so it is less",
              "sparse overall than ERK at the same nominal S). FLOPs are relative to dense (paper App. H).", ""]
    datasets = sorted({k[0] for k in summary})
    for dataset in datasets:
        dense = summary.get((dataset, "uniform", 0.0, "dense"))
        lines.append(f"## {dataset}" + (f" — dense {dense['mean']:.4f} ± {dense['sd']:.4f}" if dense else ""))
        lines.append("")
        for distribution in ("uniform", "erk"):
            sparsities = sorted({k[2] for k in summary if k[0] == dataset and k[1] == distribution and k[2] > 0})
            if not sparsities:
                continue
            lines.append(f"### {distribution}")
            lines.append("")
            header = "| method | " + " | ".join(f"S={s}" for s in sparsities) + " |"
            lines += [header, "|---" * (len(sparsities) + 1) + "|"]
            for method in METHODS:
                cells = []
                for s in sparsities:
                    entry = summary.get((dataset, distribution, s, method))
                    cells.append(f"{entry['mean']:.4f} ± {entry['sd']:.4f}" if entry else "—")
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            flops = []
            for s in sparsities:
                entry = summary[(dataset, distribution, s, "rigl")]
                gmp = summary[(dataset, distribution, s, "gmp")]
                flops.append(f"overall {entry['overall']:.3f}; infer {entry['infer_flops']:.3f}; train rigl "
                             f"{entry['train_flops']:.3f}, gmp {gmp['train_flops']:.3f}")
            lines.append("| *sparsity / FLOPs* | " + " | ".join(flops) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def label_panel(ax, title: str) -> None:
    """Title, axes and legend of one accuracy-vs-sparsity panel."""
    ax.set_title(title)
    ax.set_xlabel("sparsity (masked layers)")
    ax.set_ylabel("final val accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({k[0] for k in summary})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 4.2 * len(datasets)), squeeze=False)
    for row, dataset in enumerate(datasets):
        for col, distribution in enumerate(("uniform", "erk")):
            ax = axes[row][col]
            for method in METHODS:
                points = sorted((k[2], v) for k, v in summary.items()
                                if k[0] == dataset and k[1] == distribution and k[3] == method)
                if points:
                    xs = [p[0] for p in points]
                    ax.errorbar(xs, [p[1]["mean"] for p in points], yerr=[p[1]["sd"] for p in points],
                                marker="o", capsize=3, label=method)
            dense = summary.get((dataset, "uniform", 0.0, "dense"))
            if dense:
                ax.axhline(dense["mean"], color="black", linestyle="--", label="dense")
            label_panel(ax, f"{dataset} — {distribution}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_grid(run, jobs: list[dict], workers: int, every: int = 20) -> tuple[list[dict], dict]:
    """Every job through `run` in parallel processes, with progress; (rows, the run's machine metadata).
    Refuses a result whose weights leaked at masked positions."""
    import torch

    started = time.time()
    rows = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for i, row in enumerate(pool.map(run, jobs), 1):
            rows.append(row)
            if i % every == 0 or i == len(jobs):
                print(f"{i}/{len(jobs)} runs, {time.time() - started:.0f}s", flush=True)
    assert all(r["leak_ok"] for r in rows), "a run leaked weights at masked positions"
    meta = {"machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python "
                       f"{platform.python_version()}", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "wall_minutes": (time.time() - started) / 60}
    return rows, meta


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    rows, meta = run_grid(run_one, grid(args.quick), args.workers)
    meta["quick"] = args.quick
    summary = summarise(rows)
    suffix = "-quick" if args.quick else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"methods{suffix}.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
    (RESULTS / f"methods{suffix}.md").write_text(markdown(summary, meta))
    plot(summary, RESULTS / f"methods{suffix}.png")
    print(markdown(summary, meta))


if __name__ == "__main__":
    main()
