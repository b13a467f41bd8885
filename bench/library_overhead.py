"""Library API overhead: a minimal PyTorch loop against the same loop with `RigL` in it (issue 13 item 5).

`RigL.step()` runs on every step of a user's loop (mask the gradients, the schedule check, the
optimizer's step post-hook), so its per-step cost shows first on a tiny model on CPU. Three loops,
identical but for the RigL lines:

  minimal   MLP 300-100 (nn.Sequential) on digits prepared in memory once, one torch.randperm per
            epoch, slicing, forward, cross-entropy, backward, SGD step (momentum 0.9, weight decay 1e-4).
  static    + `rigl = RigL(model, optimizer, sparsity=0.9, total_steps=T, method="static")` and
            `if rigl.step(): optimizer.step()`: the API's per-step cost alone (fixed masks, no updates).
  rigl      the same with method rigl, ΔT=100: per-step cost plus its mask updates (drop/grow).

Timed: the training steps only (perf_counter around the epoch loop; RigL's construction is outside).
One torch thread (--threads) so the number is single-threaded Python overhead, not the other core's
luck. Each repeat runs the three once, order rotated between repeats, after one discarded warm-up
each. Reported: the median over repeats of the paired ratios X/minimal (same repeat), and the ratio
of the median times.

    python bench/library_overhead.py             # ~40 s: up to 30 repeats of 10 epochs, stops at --max-seconds

Writes bench/results/library_overhead.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from overhead import git_state, loadavg, machine_info  # noqa: E402
from trainer_floor import BATCH, LR, MOMENTUM, WEIGHT_DECAY, digits_tensors  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RUNNERS = ("minimal", "static", "rigl")


def run(name: str, x, y, epochs: int) -> dict:
    import torch
    from torch import nn

    from rigl_core import RigL
    from rigl_core.data.epochs import steps_per_epoch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                          nn.Linear(100, 10))
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    biases = [m.bias for m in model if isinstance(m, nn.Linear)]
    optimizer = torch.optim.SGD([{"params": weights, "weight_decay": WEIGHT_DECAY},
                                 {"params": biases, "weight_decay": 0.0}], lr=LR, momentum=MOMENTUM)
    loss_fn = nn.CrossEntropyLoss()
    n = len(x)
    total = epochs * steps_per_epoch(n, BATCH)
    rigl = None if name == "minimal" else RigL(model, optimizer, sparsity=0.9, total_steps=total, method=name,
                                               delta_t=100)
    steps = 0
    model.train()
    started = time.perf_counter()
    if rigl is None:
        for _ in range(epochs):
            order = torch.randperm(n)
            for begin in range(0, n, BATCH):
                index = order[begin:begin + BATCH]
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x[index]), y[index])
                loss.backward()
                optimizer.step()
                steps += 1
    else:
        for _ in range(epochs):
            order = torch.randperm(n)
            for begin in range(0, n, BATCH):
                index = order[begin:begin + BATCH]
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x[index]), y[index])
                loss.backward()
                if rigl.step():
                    optimizer.step()
                steps += 1
    seconds = time.perf_counter() - started
    out = {"seconds": seconds, "steps": steps, "final_loss": float(loss.detach())}
    if rigl is not None:
        report = rigl.report()
        out["sparsity"] = report["totals"]["sparsity"]
        out["leak_free"] = report["leak_check"]["ok"]
    return out


def render(results: dict) -> str:
    m, s, r = results["machine"], results["settings"], results["summary"]
    static, rigl = r["ratios"]["static/minimal"], r["ratios"]["rigl/minimal"]
    git = results.get("git") or {}
    lines = [
        "# Library API (`RigL`) overhead vs a minimal PyTorch loop (CPU, digits MLP)",
        "",
        f"Date: {results['date']}. Machine: {m['nproc']} cores, {m['cpu']}, torch {m['torch']}, {s['threads']} torch "
        f"thread(s), Python {m['python']}. Load average at start {results['loadavg_start']}, at end "
        f"{results['loadavg_end']} (shared machine; runs interleaved)."
        + (f" Code: commit {git['commit']}" + (" with uncommitted rigl_core changes" if git.get("rigl_core_dirty")
                                               else "") + "." if git.get("commit") else ""),
        "",
        f"Settings: MLP 300-100 on digits, batch {BATCH}, {s['epochs']} epochs ({r['steps']} steps), SGD lr {LR} "
        f"momentum {MOMENTUM}, weight decay {WEIGHT_DECAY} on kernels; RigL 90% ERK, ΔT=100 (static: the same "
        f"masks, never updated). {s['repeats_done']} repeats, order rotated, one warm-up each.",
        "",
        f"**`if rigl.step(): optimizer.step()` costs {static['median_of_ratios']:.3f}× the minimal loop per step "
        f"(static masks: the API alone) and {rigl['median_of_ratios']:.3f}× with RigL's mask updates (median of "
        f"paired ratios); fastest runs: {static['ratio_of_minima']:.3f}× and {rigl['ratio_of_minima']:.3f}×.**"
        " On a shared 2-core machine single repeats swing ±40% (per-repeat column): read the medians and minima.",
        "",
        "| run | median ms/step | min ms/step | final sparsity | leak-free |",
        "|---|---|---|---|---|",
    ]
    for name in RUNNERS:
        sparsity = format(r["sparsity"][name], ".3f") if name in r["sparsity"] else "—"
        lines.append(f"| {name} | {r['ms_per_step'][name]:.3f} | {r['min_ms_per_step'][name]:.3f} | {sparsity} | "
                     f"{r['leak_free'].get(name, '—')} |")
    lines += ["", "| ratio | median of paired ratios | ratio of medians | ratio of minima | per repeat |",
              "|---|---|---|---|---|"]
    for key, v in r["ratios"].items():
        lines.append(f"| {key} | {v['median_of_ratios']:.3f} | {v['ratio_of_medians']:.3f} | "
                     f"{v['ratio_of_minima']:.3f} | "
                     + ", ".join(f"{p:.2f}" for p in v["per_repeat"]) + " |")
    lines += ["", f"Raw numbers: `bench/results/library_overhead.json`. Command: `{results['command']}`. "
              f"Wall time {results['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--max-seconds", type=float, default=40.0, help="stop repeating after this long (≥ 5 repeats)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's own)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": machine_info(), "git": git_state(), "loadavg_start": loadavg(),
               "settings": {"threads": args.threads, "repeats": args.repeats, "epochs": args.epochs,
                            "max_seconds": args.max_seconds, "batch_size": BATCH},
               "command": " ".join(["python bench/library_overhead.py"] + sys.argv[1:])}
    started = time.perf_counter()
    x, y = digits_tensors()
    for name in RUNNERS:
        run(name, x, y, args.epochs)  # warm-up, discarded
    times: dict[str, list[float]] = {n: [] for n in RUNNERS}
    last: dict[str, dict] = {}
    for rep in range(args.repeats):
        if rep >= 5 and time.perf_counter() - started > args.max_seconds:
            break
        shift = rep % len(RUNNERS)
        for name in RUNNERS[shift:] + RUNNERS[:shift]:
            last[name] = run(name, x, y, args.epochs)
            times[name].append(last[name]["seconds"])
    steps = last["minimal"]["steps"]
    assert all(r["steps"] == steps for r in last.values())
    summary = {"steps": steps, "times": times,
               "ms_per_step": {n: 1000 * statistics.median(v) / steps for n, v in times.items()},
               "min_ms_per_step": {n: 1000 * min(v) / steps for n, v in times.items()},
               "sparsity": {n: last[n]["sparsity"] for n in RUNNERS if "sparsity" in last[n]},
               "leak_free": {n: last[n]["leak_free"] for n in RUNNERS if "leak_free" in last[n]},
               "ratios": {}}
    for name in ("static", "rigl"):
        paired = [a / b for a, b in zip(times[name], times["minimal"])]
        summary["ratios"][f"{name}/minimal"] = {
            "per_repeat": paired, "median_of_ratios": statistics.median(paired),
            "ratio_of_medians": summary["ms_per_step"][name] / summary["ms_per_step"]["minimal"],
            "ratio_of_minima": summary["min_ms_per_step"][name] / summary["min_ms_per_step"]["minimal"]}
    results["settings"]["repeats_done"] = len(times["minimal"])
    results.update({"summary": summary, "loadavg_end": loadavg(), "wall_seconds": time.perf_counter() - started})
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = render(results)
    (RESULTS / "library_overhead.md").write_text(table)
    (RESULTS / "library_overhead.json").write_text(json.dumps(results, indent=2))
    print(table)


if __name__ == "__main__":
    main()
