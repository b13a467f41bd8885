"""A small ViT trained sparse with the public library API: RigL vs static vs dense at 80% and 90%.

Why: issue 13 made `nn.MultiheadAttention`'s packed `in_proj_weight` a masked layer (before, a
transformer was silently left ~1/3 dense). This runs a user's own loop — `RigL(model, optimizer, ...)`,
`loss.backward(); if rigl.step(): optimizer.step()` — on a transformer and checks both the accuracy
and that the sparsity is real (measured by counting zeros in the parameters, not read from the plan).

Model: a ViT on scikit-learn digits (8×8, offline): patch 2 → 16 tokens + a class token, dim 64,
4 heads, 2 `nn.TransformerEncoder` layers (pre-norm, MLP 128, no dropout), a linear head; 69 K
parameters. Masked by the default selection: the patch-embedding conv, each layer's attention in_proj
(3E×E) and out_proj, both MLP linears, the head. ERK distribution; ERK gives the tiny patch conv
(64×1×2×2) density 1, so it ends up dense.

Training (the same for every method): AdamW lr 3e-3, weight decay 0.05 (kernels and all), batch 64,
60 epochs (1,500 steps), cosine to 0 after 3 warm-up epochs — enough for the dense ViT to reach ~97%
on the 360-image validation split in ~20 s on one CPU thread. RigL ΔT=50, α=0.3, T_end=0.75.
Dense = no RigL object at all (the plain loop). 3 seeds (model init, masks and batch order).

Reports final val accuracy mean ± sd per (method, sparsity), the sparsity measured from the parameters
per layer kind (attention in_proj / out_proj, MLP linear, conv, head) for one run, and training/
inference FLOPs ratios from `rigl.report()` (input_shape given). Those ratios cover the weight layers;
attention's QKᵀ/AV matmuls (dense in every method) are reported apart as `flops_attention`, and the
table also gives the inference ratio with them included.

    python bench/transformer_sparsity.py           # full: 15 runs, ~3 min on 2 idle cores (6.7 shared)
    python bench/transformer_sparsity.py --quick   # 1 seed, 5 epochs, < 1 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

SETTINGS = {
    "model": {"patch": 2, "dim": 64, "heads": 4, "layers": 2, "mlp": 128},
    "training": {"epochs": 60, "batch_size": 64, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.05,
                 "warmup_epochs": 3, "lr_schedule": "cosine"},
    "sparsity": {"distribution": "erk", "delta_t": 50, "alpha": 0.3, "t_end": 0.75},
}
METHODS = ["static", "rigl"]
SPARSITIES = [0.8, 0.9]


def build_vit(patch: int, dim: int, heads: int, layers: int, mlp: int, image: int = 8, classes: int = 10):
    import torch
    from torch import nn

    class ViT(nn.Module):
        """Patch conv → [cls] + tokens + learned positions → pre-norm TransformerEncoder → head."""

        def __init__(self):
            super().__init__()
            tokens = (image // patch) ** 2
            self.patch = nn.Conv2d(1, dim, patch, stride=patch)
            self.cls = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
            layer = nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, classes)

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos
            return self.head(self.norm(self.encoder(x))[:, 0])

    return ViT()


def kind_of(name: str) -> str:
    if name.endswith("in_proj"):
        return "attention in_proj"
    if name.endswith("out_proj"):
        return "attention out_proj"
    if ".linear" in name:
        return "MLP linear"
    if name.startswith("patch"):
        return "patch conv"
    return "head"


def measured_sparsity(model, rigl) -> dict:
    """Zeros counted in the parameters themselves, per layer kind and over every weight matrix."""
    import torch

    weights = {}
    for name, module in model.named_modules():
        for attr in ("weight", "in_proj_weight"):
            p = getattr(module, attr, None)
            if isinstance(p, torch.nn.Parameter) and p.dim() >= 2:
                layer = f"{name}.in_proj" if attr == "in_proj_weight" else name
                weights[layer] = p
    kinds: dict[str, list[int]] = {}
    for layer, p in weights.items():
        k = kinds.setdefault(kind_of(layer), [0, 0])
        k[0] += int((p == 0).sum())
        k[1] += p.numel()
    zeros = sum(v[0] for v in kinds.values())
    total = sum(v[1] for v in kinds.values())
    everything = [p for p in model.parameters()]
    all_zeros = sum(int((p == 0).sum()) for p in everything)
    all_params = sum(p.numel() for p in everything)
    masked_names = set(rigl.masks) if rigl is not None else set()
    return {
        "by_kind": {k: {"zeros": z, "params": n, "sparsity": z / n} for k, (z, n) in kinds.items()},
        "weights": zeros / total,
        "all_params": all_zeros / all_params,
        "unmasked_weight_matrices": sorted(set(weights) - masked_names) if rigl is not None else [],
    }


def run_one(job: dict) -> dict:
    import torch
    from torch import nn

    torch.set_num_threads(1)
    from rigl_core import RigL
    from rigl_core.data.dataset import epoch_order
    from rigl_core.data.epochs import steps_per_epoch as epoch_steps
    from rigl_core.data.registry import load_dataset
    from rigl_core.spec import DatasetSpec

    t = dict(SETTINGS["training"], epochs=job["epochs"])
    torch.manual_seed(job["seed"])
    data = load_dataset(DatasetSpec(name="digits"))
    xt, yt = data.prepare(data.x_train, train=True), data.y_train
    xv, yv = data.prepare(data.x_val, train=False), data.y_val
    model = build_vit(**SETTINGS["model"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    steps_per_epoch = epoch_steps(len(xt), t["batch_size"])
    total = steps_per_epoch * t["epochs"]
    warmup = t["warmup_epochs"] * steps_per_epoch
    rigl = None
    if job["method"] != "dense":
        s = SETTINGS["sparsity"]
        rigl = RigL(model, optimizer, sparsity=job["sparsity"], total_steps=total, method=job["method"],
                    distribution=s["distribution"], delta_t=s["delta_t"], alpha=s["alpha"], t_end=s["t_end"],
                    seed=job["seed"], input_shape=[1, 8, 8])
    loss_fn = nn.CrossEntropyLoss()
    started = time.perf_counter()
    step = 0
    model.train()
    for epoch in range(t["epochs"]):
        order = epoch_order(len(xt), job["seed"], epoch)
        for i in range(steps_per_epoch):
            idx = order[i * t["batch_size"]:(i + 1) * t["batch_size"]]
            lr = t["lr"] * (step + 1) / warmup if step < warmup else \
                t["lr"] * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            if rigl is None or rigl.step():
                optimizer.step()
            step += 1
    seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        accuracy = float((model(xv).argmax(1) == yv).float().mean())
    row = {**job, "accuracy": accuracy, "seconds": seconds, "steps": step,
           "measured": measured_sparsity(model, rigl)}
    if rigl is not None:
        report = rigl.report()
        tot = report["totals"]
        row.update({"report_sparsity": tot["sparsity"], "report_overall": tot["overall_sparsity"],
                    "training_flops": tot["training_flops_ratio"], "inference_flops": tot["inference_flops_ratio"],
                    "flops_dense": tot["flops_dense"], "flops_attention": tot.get("flops_attention"),
                    "leak_ok": report["leak_check"]["ok"], "exploration": tot["exploration"],
                    "layers": [{k: r[k] for k in ("name", "shape", "density", "target_density")}
                               for r in report["layers"]]})
    return row


def grid(quick: bool) -> list[dict]:
    seeds = [0] if quick else [0, 1, 2]
    epochs = 5 if quick else SETTINGS["training"]["epochs"]
    jobs = []
    for seed in seeds:
        jobs.append({"method": "dense", "sparsity": 0.0, "seed": seed, "epochs": epochs})
        for sparsity in SPARSITIES:
            for method in METHODS:
                jobs.append({"method": method, "sparsity": sparsity, "seed": seed, "epochs": epochs})
    return jobs


def summarise(rows: list[dict]) -> dict:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["sparsity"]), []).append(row)
    out = {}
    for key, items in groups.items():
        accs = [r["accuracy"] for r in items]
        out[key] = {"mean": statistics.mean(accs), "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "n": len(accs), "seconds": statistics.mean(r["seconds"] for r in items),
                    "measured_weights": statistics.mean(r["measured"]["weights"] for r in items),
                    "measured_all": statistics.mean(r["measured"]["all_params"] for r in items),
                    "training_flops": items[0].get("training_flops"),
                    "inference_flops": items[0].get("inference_flops"),
                    "inference_attn": ((items[0]["inference_flops"] * items[0]["flops_dense"] + items[0]["flops_attention"])
                                       / (items[0]["flops_dense"] + items[0]["flops_attention"])
                                       if items[0].get("flops_attention") is not None else None),
                    "exploration": statistics.mean(r.get("exploration", 1.0) for r in items)}
    return out


def markdown(rows: list[dict], summary: dict, meta: dict) -> str:
    lines = [
        "# Small ViT on digits: RigL vs static vs dense through the library API",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']}; commit {meta['commit']}; {meta['date']}; "
        f"wall time {meta['wall_minutes']:.1f} min{' (QUICK)' if meta['quick'] else ''}.",
        "",
        f"Model {json.dumps(SETTINGS['model'])} ({meta['params']:,} parameters); training "
        f"{json.dumps(SETTINGS['training'] | {'epochs': rows[0]['epochs']})}; sparsity "
        f"{json.dumps(SETTINGS['sparsity'])}; seeds {sorted({r['seed'] for r in rows})}. Dense = the same loop "
        "with no RigL object. Accuracy is the final validation accuracy (360 images). `s/run` is wall time on "
        "2 cores shared with other work (about 23 s alone): not a speed comparison.",
        "",
        "`measured` = zeros counted in the parameters after training: over every weight matrix (conv, linear, "
        "attention in_proj) and over all parameters (biases, norms, class token and position embeddings are "
        "dense). FLOPs are relative to dense from `rigl.report()`, whose ratios cover the weight layers only; "
        "`infer +attn` adds attention's dense QKᵀ/AV matmuls (`flops_attention`) to both sides.",
        "",
        "| method | S | val accuracy | measured (weights) | measured (all params) | train FLOPs | infer FLOPs "
        "| infer +attn | s/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in [("dense", 0.0)] + [(m, s) for s in SPARSITIES for m in METHODS]:
        e = summary.get(key)
        if e is None:
            continue
        tf = f"{e['training_flops']:.3f}" if e["training_flops"] is not None else "1"
        inf = f"{e['inference_flops']:.3f}" if e["inference_flops"] is not None else "1"
        attn = f"{e['inference_attn']:.3f}" if e["inference_attn"] is not None else "1"
        lines.append(f"| {key[0]} | {key[1]} | {e['mean']:.4f} ± {e['sd']:.4f} | {e['measured_weights']:.3f} | "
                     f"{e['measured_all']:.3f} | {tf} | {inf} | {attn} | {e['seconds']:.1f} |")
    example = next((r for r in rows if r["method"] == "rigl" and r["sparsity"] == 0.9), None)
    if example:
        lines += ["", f"## Measured sparsity by layer kind (rigl, S=0.9, seed {example['seed']})", "",
                  "| kind | zeros / params | sparsity |", "|---|---|---|"]
        for kind, v in example["measured"]["by_kind"].items():
            lines.append(f"| {kind} | {v['zeros']:,} / {v['params']:,} | {v['sparsity']:.3f} |")
        lines += ["", f"Weight matrices left unmasked: {example['measured']['unmasked_weight_matrices'] or 'none'}; "
                  f"leak check ok in every run: {all(r.get('leak_ok', True) for r in rows)}; "
                  f"`rigl.report()` sparsity {example['report_sparsity']:.3f} (masked layers), overall "
                  f"{example['report_overall']:.3f}; exploration (share of positions ever active) "
                  f"{example['exploration']:.3f}.", "",
                  "ERK per-layer densities (planned → final):", "",
                  "| layer | shape | target density | density |", "|---|---|---|---|"]
        for layer in example["layers"]:
            lines.append(f"| {layer['name']} | {layer['shape']} | {layer['target_density']:.3f} | "
                         f"{layer['density']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method in METHODS:
        pts = [(s, summary[(method, s)]) for s in SPARSITIES if (method, s) in summary]
        ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[p[1]["sd"] for p in pts],
                    marker="o", capsize=3, label=method)
    dense = summary.get(("dense", 0.0))
    if dense:
        ax.axhline(dense["mean"], color="black", linestyle="--", label="dense")
    ax.set_xlabel("sparsity (ERK, masked layers)")
    ax.set_ylabel("final val accuracy")
    ax.set_title("ViT (2 layers, dim 64) on digits")
    ax.set_xticks(SPARSITIES)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "rigl_core"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return head + (" with uncommitted rigl_core changes" if dirty else "")
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    import torch

    jobs = grid(args.quick)
    started = time.time()
    rows = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for i, row in enumerate(pool.map(run_one, jobs), 1):
            rows.append(row)
            print(f"{i}/{len(jobs)} {row['method']} S={row['sparsity']} seed {row['seed']}: "
                  f"acc {row['accuracy']:.4f}, {row['seconds']:.0f}s ({time.time() - started:.0f}s)", flush=True)
    assert all(r.get("leak_ok", True) for r in rows), "a run leaked weights at masked positions"
    meta = {
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
                   f"Python {platform.python_version()}",
        "torch": torch.__version__, "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_minutes": (time.time() - started) / 60, "quick": args.quick,
        "params": sum(p.numel() for p in build_vit(**SETTINGS["model"]).parameters()),
    }
    summary = summarise(rows)
    suffix = "-quick" if args.quick else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"transformer_sparsity{suffix}.json").write_text(
        json.dumps({"meta": meta, "settings": SETTINGS, "runs": rows}, indent=1))
    text = markdown(rows, summary, meta)
    (RESULTS / f"transformer_sparsity{suffix}.md").write_text(text)
    plot(summary, RESULTS / f"transformer_sparsity{suffix}.png")
    print(text)


if __name__ == "__main__":
    main()
