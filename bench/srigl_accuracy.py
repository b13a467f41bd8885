"""SRigL vs RigL vs static: final validation accuracy at 90/95/98% (ERK and uniform), ≥ 3 seeds.

The MLP protocols of bench/methods.py (scikit-learn digits and MNIST-1D, the same models, recipes and
schedules), with `srigl` (RigL + constant fan-in + neuron ablation at the paper's γ = 0.3), `rigl` and
`static`, plus `vit-tiny` (rigl_core/models/vit.py) on digits at 90% ERK. Also records the neurons SRigL
ablated. Parallel processes, one thread each.

    PYTHONPATH=. python bench/srigl_accuracy.py            # writes bench/results/srigl_accuracy.{json,md,png}
    PYTHONPATH=. python bench/srigl_accuracy.py --quick    # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from methods import SETTINGS, label_panel, run_grid  # noqa: E402

RESULTS = ROOT / "bench" / "results"
METHODS = ["srigl", "srigl-sparse-first", "rigl", "rigl-dense-first", "static"]
# Rows that differ from a method only in the first layer (srigl keeps it dense by default, rigl under ER/ERK does
# not): run under ERK only, where the defaults differ (uniform keeps the first layer dense for every method).
VARIANTS = {"srigl-sparse-first": ("srigl", {"dense_first_layer": False}),
            "rigl-dense-first": ("rigl", {"dense_first_layer": True})}
VIT = {"model": {"name": "vit-tiny"}, "dataset": {"name": "digits"},
       "training": {"epochs": 40, "batch_size": 64, "lr": 0.001, "optimizer": "adamw", "weight_decay": 0.05},
       "schedule": {"delta_t": 25, "alpha": 0.3, "t_end": 0.75}}


def run_one(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from rigl_core.spec import JobSpec
    from rigl_core.training.trainer import Trainer

    setting = VIT if job["dataset"] == "digits-vit" else SETTINGS[job["dataset"]]
    method, extra = VARIANTS.get(job["method"], (job["method"], {}))
    tree = {"model": setting["model"], "dataset": setting["dataset"],
            "sparsity": {"method": method, "sparsity": job["sparsity"], "distribution": job["distribution"],
                         "schedule": setting["schedule"], **extra},
            "training": {**setting["training"], "seed": job["seed"], "log_every_steps": 1000}}
    if job.get("epochs"):
        tree["training"]["epochs"] = job["epochs"]
    report = Trainer(JobSpec.model_validate(tree)).fit()
    layers = [r for r in report["layers"] if r["masked"]]
    neurons = sum(r.get("neurons", 0) for r in layers)
    active = sum(r.get("active_neurons", 0) for r in layers)
    return {**job, "accuracy": report["final_metrics"]["val_accuracy"], "sparsity_masked": report["totals"]["sparsity"],
            "ablated": (neurons - active) if neurons else None, "neurons": neurons or None,
            "seconds": report["train_seconds"], "leak_ok": report["leak_check"]["ok"]}


def grid(quick: bool) -> list[dict]:
    seeds = [0] if quick else [0, 1, 2]
    sparsities = [0.9] if quick else [0.9, 0.95, 0.98]
    jobs = [{"dataset": dataset, "method": method, "sparsity": s, "distribution": distribution, "seed": seed}
            for dataset in SETTINGS for seed in seeds for distribution in ("erk", "uniform")
            for s in sparsities for method in METHODS if distribution == "erk" or method not in VARIANTS]
    jobs += [{"dataset": "digits-vit", "method": method, "sparsity": 0.9, "distribution": "erk", "seed": seed}
             for seed in seeds for method in METHODS]
    for job in jobs if quick else []:
        job["epochs"] = 2
    return jobs


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["distribution"], row["sparsity"], row["method"]), []).append(row)
    out = []
    for (dataset, distribution, sparsity, method), items in sorted(groups.items()):
        accs = [r["accuracy"] for r in items]
        ablated = [r["ablated"] for r in items if r["ablated"] is not None]
        out.append({"dataset": dataset, "distribution": distribution, "sparsity": sparsity, "method": method,
                    "mean": statistics.mean(accs), "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "n": len(accs), "ablated": statistics.mean(ablated) if ablated else None,
                    "neurons": items[0]["neurons"]})
    return out


def markdown(summary: list[dict], meta: dict) -> str:
    lines = ["# SRigL vs RigL vs static: final validation accuracy (mean ± sd over seeds)", "",
             f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['date']}; wall {meta['wall_minutes']:.1f} min. "
             "Command: `PYTHONPATH=. python bench/srigl_accuracy.py`.", "",
             "MLP protocols of bench/methods.py: " + "; ".join(
                 f"`{n}` model {json.dumps(s['model'])}, training {json.dumps(s['training'])}, schedule "
                 f"{json.dumps(s['schedule'])}" for n, s in SETTINGS.items()) + f". `digits-vit`: {json.dumps(VIT)}.",
             "srigl = RigL + constant fan-in + neuron ablation (γ = 0.3 of the layer's first fan-in) + a dense first "
             "layer; srigl-sparse-first = the same with the first layer sparse and fan-in too (the reference code's "
             "default); rigl-dense-first = rigl with the first layer dense (rigl under ERK keeps it sparse; under "
             "uniform every method keeps it dense, so the two variants run under ERK only). "
             "'ablated' = neurons removed at the end (mean over seeds, of all neurons of the masked layers).", ""]
    table = {(r["dataset"], r["distribution"], r["sparsity"], r["method"]): r for r in summary}
    for dataset in dict.fromkeys(r["dataset"] for r in summary):
        for distribution in ("erk", "uniform"):
            sparsities = sorted({k[2] for k in table if k[0] == dataset and k[1] == distribution})
            if not sparsities:
                continue
            lines += [f"## {dataset}, {distribution}", "", "| method | " + " | ".join(f"S={s}" for s in sparsities) + " |",
                      "|---" * (len(sparsities) + 1) + "|"]
            for method in METHODS:
                if not any(k[:2] == (dataset, distribution) and k[3] == method for k in table):
                    continue
                cells = []
                for s in sparsities:
                    r = table.get((dataset, distribution, s, method))
                    extra = f" (ablated {r['ablated']:.1f}/{r['neurons']})" if r and r["ablated"] else ""
                    cells.append(f"{r['mean']:.4f} ± {r['sd']:.4f}{extra}" if r else "—")
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
            for rigl in ("rigl", "rigl-dense-first"):
                if (dataset, distribution, sparsities[0], rigl) in table:
                    gaps = [table[(dataset, distribution, s, rigl)]["mean"] - table[(dataset, distribution, s, "srigl")]["mean"]
                            for s in sparsities]
                    lines.append(f"{rigl} − srigl: " + ", ".join(f"S={s}: {g * 100:+.2f} points"
                                                               for s, g in zip(sparsities, gaps)) + "  ")
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(d, dist) for d in SETTINGS for dist in ("erk", "uniform")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    for ax, (dataset, distribution) in zip(axes.flat, panels):
        for method in METHODS:
            points = sorted((r["sparsity"], r) for r in summary if (r["dataset"], r["distribution"], r["method"])
                            == (dataset, distribution, method))
            if points:
                ax.errorbar([p[0] for p in points], [p[1]["mean"] for p in points], yerr=[p[1]["sd"] for p in points],
                            marker="o", capsize=3, label=method)
        label_panel(ax, f"{dataset} — {distribution}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=RESULTS / "srigl_accuracy")
    args = parser.parse_args()
    rows, meta = run_grid(run_one, grid(args.quick), args.workers, every=10)
    summary = summarise(rows)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=1))
    args.out.with_suffix(".md").write_text(markdown(summary, meta))
    plot(summary, args.out.with_suffix(".png"))
    print(f"wrote {args.out}.md/.json/.png")


if __name__ == "__main__":
    main()
