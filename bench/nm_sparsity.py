"""N:M sparsity: what 2:4's structure costs in accuracy against unstructured RigL at the same 50%.

MNIST-1D (the built-in `mnist1d`, 4000 train / 1000 test), MLP 40-256-256-10, every Linear masked at
exactly 50% (unstructured: distribution uniform with the first layer masked too, so both patterns have the
same per-layer density). Runs: dense, unstructured RigL, 2:4 RigL, 2:4 static; 3 seeds each; final
validation accuracy, median and mean ± sd. Two worker processes, one thread each (2-core machine).

    python bench/nm_sparsity.py              # writes bench/results/nm_sparsity.{md,json}
    python bench/nm_sparsity.py --quick      # 1 seed, 2 epochs: a smoke test (prints only)

The GPU speedup of 2:4 kernels is bench/gpu.py's `nm24` part (needs a lent GPU), not measured here.
"""

from __future__ import annotations

import argparse
import datetime
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

MODEL = {"name": "mlp", "hidden_sizes": [256, 256]}
TRAINING = {"epochs": 60, "batch_size": 100, "lr": 0.05, "optimizer": "sgd", "weight_decay": 1e-4,
            "device": "cpu", "log_every_steps": 1000, "eval_every_epochs": 60}
SCHEDULE = {"delta_t": 50, "alpha": 0.3, "t_end": 0.75}
RUNS = {
    "dense": {"method": "dense"},
    "rigl unstructured 50%": {"method": "rigl", "sparsity": 0.5, "distribution": "uniform",
                              "dense_first_layer": False},
    "rigl 2:4": {"method": "rigl", "pattern": "2:4"},
    "static 2:4": {"method": "static", "pattern": "2:4"},
}


def run_one(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from rigl_core.spec import JobSpec
    from rigl_core.training.trainer import Trainer

    training = {**TRAINING, "seed": job["seed"]}
    if job.get("epochs"):
        training.update(epochs=job["epochs"], eval_every_epochs=job["epochs"])
    tree = {"model": MODEL, "dataset": {"name": "mnist1d"},
            "sparsity": {**RUNS[job["run"]], "schedule": SCHEDULE}, "training": training}
    start = time.perf_counter()
    trainer = Trainer(JobSpec.model_validate(tree))
    report = trainer.fit()
    nm_ok = None
    if RUNS[job["run"]].get("pattern") == "2:4":
        nm_ok = all(bool((m.reshape(-1, 4).sum(1) == 2).all()) for m in trainer.sparsifier.masks.values())
    t = report["totals"]
    return {**job, "accuracy": report["final_metrics"]["val_accuracy"], "sparsity_masked": t["sparsity"],
            "exploration": t.get("exploration"), "leak_ok": report["leak_check"]["ok"], "nm_ok": nm_ok,
            "seconds": time.perf_counter() - start}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# N:M (2:4) sparsity vs unstructured RigL on MNIST-1D at 50%", "",
             f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['date']}; wall time "
             f"{meta['wall_s']:.0f} s; 2 processes × 1 thread.", "",
             f"Settings: model {json.dumps(MODEL)}, training {json.dumps(TRAINING)}, schedule "
             f"{json.dumps(SCHEDULE)}, seeds {meta['seeds']}. Unstructured RigL: uniform 50% on every Linear "
             "(first layer too), the same per-layer density as 2:4. Accuracy: final validation accuracy "
             "(MNIST-1D's 1000 test sequences).", "",
             "| run | median acc | mean ± sd | per-seed | masked sparsity | exploration | checks |",
             "|---|---|---|---|---|---|---|"]
    for run in RUNS:
        items = [r for r in rows if r["run"] == run]
        if not items:
            continue
        accs = [r["accuracy"] for r in items]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        checks = "leak ok" if all(r["leak_ok"] for r in items) else "LEAK"
        if items[0]["nm_ok"] is not None:
            checks += ", 2 of every 4" if all(r["nm_ok"] for r in items) else ", NOT 2:4"
        explore = items[0]["exploration"]
        lines.append(f"| {run} | {statistics.median(accs):.4f} | {statistics.mean(accs):.4f} ± {sd:.4f} | "
                     f"{', '.join(f'{a:.3f}' for a in accs)} | {items[0]['sparsity_masked']:.3f} | "
                     f"{'—' if explore is None else f'{explore:.3f}'} | {checks} |")
    lines += ["", "No GPU was used: the 2:4 inference speedup (torch.sparse.to_sparse_semi_structured) is "
              "bench/gpu.py's `nm24` part and has not been measured.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    seeds = [0] if args.quick else [0, 1, 2]
    jobs = [{"run": run, "seed": seed, **({"epochs": 2} if args.quick else {})} for seed in seeds for run in RUNS]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        rows = list(pool.map(run_one, jobs))
    import torch

    meta = {"machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, no GPU",
            "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "wall_s": time.perf_counter() - start, "seeds": seeds}
    text = markdown(rows, meta)
    print(text)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "nm_sparsity.md").write_text(text)
        (RESULTS / "nm_sparsity.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
