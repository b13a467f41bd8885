"""Scaling: wall time of one RigL mask update vs parameter count, against ΔT training steps.

Model: Linear(d, d) → ReLU → Linear(d, 10) with d chosen for 1e5 … 5e7 weights, 90% ERK-sparse,
SGD with momentum, batch 128. For each size: median time of a normal training step and of one
mask update (drop + grow over all layers, masks applied to weights and optimizer state), and the
update's share of one ΔT=100 cycle: t_update / (t_update + 100·t_step).

    python bench/update_scaling.py
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from rigl_core.sparse.distributions import layer_sparsities  # noqa: E402
from rigl_core.sparse.layers import select_layers  # noqa: E402
from rigl_core.sparse.schedules import UpdateSchedule  # noqa: E402
from rigl_core.sparse.sparsifier import RigLSparsifier  # noqa: E402

SIZES = [100_000, 1_000_000, 10_000_000, 50_000_000]
DELTA_T, BATCH = 100, 128


def measure(params: int, device: torch.device) -> dict:
    d = int(math.sqrt(params))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 10)).to(device)
    layers = [layer for layer in select_layers(model, "erk") if layer.masked]
    sparsities = layer_sparsities([layer.shape for layer in layers], 0.9, "erk")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sparsifier = RigLSparsifier(layers, sparsities, optimizer, UpdateSchedule(DELTA_T, 10 * DELTA_T, 0.3))
    sparsifier.init_masks()
    x = torch.randn(BATCH, d, device=device)
    y = torch.randint(0, 10, (BATCH,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def backward():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step_times, update_times = [], []
    for step in range(1, 7):  # steps 1..6 are normal steps (updates happen at multiples of ΔT)
        backward()
        sync()
        start = time.perf_counter()
        backward()
        sparsifier.step(step)
        sync()
        step_times.append(time.perf_counter() - start)
    for _ in range(3):
        backward()
        sync()
        start = time.perf_counter()
        sparsifier.update_masks(0)  # an update at t=0: drop fraction α
        sync()
        update_times.append(time.perf_counter() - start)
    t_step = statistics.median(step_times[1:])
    t_update = statistics.median(update_times)
    total = sum(p.numel() for p in model.parameters())
    return {"params": total, "width": d, "step_seconds": t_step, "update_seconds": t_update,
            "update_share_of_cycle": t_update / (t_update + DELTA_T * t_step)}


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for size in SIZES:
        row = measure(size, device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [
        "# RigL update cost vs parameter count",
        "",
        f"Machine: {os.cpu_count()} cores ({platform.machine()}), device {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}.",
        f"Model Linear(d,d)-ReLU-Linear(d,10), 90% ERK, SGD momentum, batch {BATCH}; update at drop fraction 0.3 "
        f"(the largest, at t=0). Share = t_update / (t_update + {DELTA_T}·t_step).",
        "",
        "| params | training step | one mask update | update share of a ΔT=100 cycle |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['params']:.2e} | {r['step_seconds'] * 1000:.1f} ms | {r['update_seconds'] * 1000:.1f} ms "
                     f"| {r['update_share_of_cycle'] * 100:.2f}% |")
    text = "\n".join(lines) + "\n"
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "update_scaling.md").write_text(text)
    (out / "update_scaling.json").write_text(json.dumps(rows, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog([r["params"] for r in rows], [r["update_seconds"] for r in rows], "o-", label="one mask update")
    ax.loglog([r["params"] for r in rows], [DELTA_T * r["step_seconds"] for r in rows], "s--",
              label=f"{DELTA_T} training steps")
    ax.set_xlabel("parameters")
    ax.set_ylabel("seconds")
    ax.set_title(f"RigL update vs ΔT={DELTA_T} steps ({device})")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "update_scaling.png", dpi=110)
    print(text)


if __name__ == "__main__":
    main()
