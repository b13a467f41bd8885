"""Trainer floor: our `Trainer` against a minimal hand-written PyTorch loop doing the same training.

The per-step Python overhead of the Trainer (LR per step, prepare, callbacks, sparsifier hooks) shows
first on a tiny model on CPU, so this measures it there (issue 12 item 5: trainer ≤ 1.10× the loop):

  minimal      the floor: MLP 300-100 (nn.Sequential written here), digits already prepared in memory
               as tensors (normalised once, outside the timing), one torch.randperm per epoch, slicing,
               forward, cross-entropy, backward, SGD step (momentum 0.9, weight decay 1e-4 on the
               kernels, as the Trainer's default). The LR schedule is left out (constant LR): its cost
               is negligible. Timed: the training steps only (perf_counter around the epoch loop).
  dense        `Trainer(spec).fit()` with sparsity.method dense, exactly as `rigl train` runs it.
  rigl         the same with RigL at 90% ERK, ΔT=100.

Same model, data, batch (64), epochs and number of steps for all three, on one torch thread by
default (--threads): the overhead measured is single-threaded Python, and with two intra-op threads on
a shared 2-core machine a step's time depends mostly on whether the other core happens to be free.
Trainer time is the report's `train_seconds` (the loop without evaluation), and per-step times from a
Callback (should_stop is polled after every step). Each repeat runs the three once, in-process, the
order rotated from repeat to repeat so drift and other processes on the machine hit all alike; one
discarded warm-up run of each comes first. Reported per step: the median of the per-repeat (paired)
ratios X/minimal, the ratio of the median step times, and a contention-filtered ratio (summarize()).

    python bench/trainer_floor.py            # full: up to 40 repeats, stops after ~150 s (--max-seconds)
    python bench/trainer_floor.py --quick    # smoke test (~20 s), writes trainer_floor_quick.md

Writes bench/results/trainer_floor.md and .json (with --quick: trainer_floor_quick.*).
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

RESULTS = ROOT / "bench" / "results"
GOAL = 1.10  # dense Trainer time per step / minimal loop's
RUNNERS = ("minimal", "dense", "rigl")
BATCH = 64
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4


def spec_tree(method: str, epochs: int) -> dict:
    """The JobSpec of a Trainer run; every field not named keeps the JobSpec default."""
    return {
        "model": {"name": "mlp", "hidden_sizes": [300, 100]},
        "dataset": {"name": "digits"},
        "sparsity": {"method": method, "sparsity": 0.9, "distribution": "erk", "schedule": {"delta_t": 100}},
        # evaluation only after the last step: it is outside train_seconds anyway, and keeps it out of
        # the per-step clock too
        "training": {"epochs": epochs, "batch_size": BATCH, "device": "cpu", "seed": 0, "lr": LR,
                     "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "eval_every_epochs": 100_000},
    }


def run_trainer(method: str, epochs: int) -> dict:
    from rigl_core.spec import JobSpec
    from rigl_core.training.trainer import Callback, Trainer

    class StepClock(Callback):
        """The clock after every step (should_stop is polled after each): per-step times with the
        loop's own overhead (feed, logging, bookkeeping) included. About a microsecond per step."""

        def __init__(self):
            self.marks: list[float] = []

        def should_stop(self, trainer) -> bool:
            self.marks.append(time.perf_counter())
            return False

    clock = StepClock()
    report = Trainer(JobSpec.model_validate(spec_tree(method, epochs)), callbacks=[clock]).fit()
    return {"seconds": report["train_seconds"], "steps": report["steps"], "step_s": step_times(clock.marks),
            "val_accuracy": report["final_metrics"].get("val_accuracy")}


def step_times(marks: list[float]) -> list[float]:
    """Durations between consecutive step ends, without the last (the Trainer evaluates there)."""
    return [b - a for a, b in zip(marks[:-2], marks[1:-1])]


def digits_tensors() -> tuple:
    """The digits training split, normalised once: the data a hand-written loop keeps in memory."""
    from rigl_core.data.registry import load_dataset
    from rigl_core.spec import DatasetSpec

    data = load_dataset(DatasetSpec(name="digits"))
    x = data.x_train.float()
    if getattr(data, "mean", None) is not None:
        x = (x - data.mean.view(1, -1, 1, 1)) / data.std.view(1, -1, 1, 1)
    return x.contiguous(), data.y_train.clone()


def run_minimal(x, y, epochs: int) -> dict:
    """The floor. Nothing here but what any training loop must do."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                          nn.Linear(100, 10))
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    biases = [m.bias for m in model if isinstance(m, nn.Linear)]
    optimizer = torch.optim.SGD([{"params": weights, "weight_decay": WEIGHT_DECAY},
                                 {"params": biases, "weight_decay": 0.0}], lr=LR, momentum=MOMENTUM)
    loss_fn = nn.CrossEntropyLoss()
    n = len(x)
    steps = 0
    marks = []
    model.train()
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n)
        for begin in range(0, n, BATCH):
            index = order[begin:begin + BATCH]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
            steps += 1
            marks.append(time.perf_counter())
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "steps": steps, "step_s": step_times(marks), "final_loss": float(loss.detach())}


def run_one(name: str, epochs: int, tensors) -> dict:
    return run_minimal(*tensors, epochs) if name == "minimal" else run_trainer(name, epochs)


def summarize(times: dict[str, list[float]], steps: dict[str, int], step_s: dict[str, list[list[float]]]) -> dict:
    """Three estimates of X/minimal per step, from the least to the most robust to other processes:

    - paired: median over repeats of (X's train_seconds / minimal's seconds in the same repeat), per step;
    - median step: ratio of the median step times (all steps of all repeats);
    - filtered: every repeat of a runner does identical work (same seed), so the minimum over repeats of
      step i's time, summed over i, is its time with contention bursts filtered out (a step is lost only
      if it was slowed in every repeat). Mask-update steps are slow in every repeat and stay in."""
    out = {"ms_per_step": {}, "median_seconds": {}, "min_seconds": {}, "median_step_ms": {}, "filtered_ms_per_step": {},
           "contended_share": {}, "ratios": {}}
    for name, values in times.items():
        out["median_seconds"][name] = statistics.median(values)
        out["min_seconds"][name] = min(values)
        out["ms_per_step"][name] = 1000 * statistics.median(values) / steps[name]
        series = step_s[name]
        envelope = [min(column) for column in zip(*series)]
        out["filtered_ms_per_step"][name] = 1000 * sum(envelope) / len(envelope)
        out["median_step_ms"][name] = 1000 * statistics.median(v for run in series for v in run)
        out["contended_share"][name] = [sum(v > 1.5 * e for v, e in zip(run, envelope)) / len(run) for run in series]
    for name, base in (("dense", "minimal"), ("rigl", "minimal"), ("rigl", "dense")):
        paired = [(v / steps[name]) / (b / steps[base]) for v, b in zip(times[name], times[base])]
        out["ratios"][f"{name}/{base}"] = {
            "per_repeat": paired,
            "median_of_ratios": statistics.median(paired),
            "ratio_of_medians": out["ms_per_step"][name] / out["ms_per_step"][base],
            "median_step": out["median_step_ms"][name] / out["median_step_ms"][base],
            "filtered": out["filtered_ms_per_step"][name] / out["filtered_ms_per_step"][base],
        }
    return out


def verdict(value: float) -> str:
    return "met" if value <= GOAL else "NOT met"


def render(results: dict) -> str:
    m, s, r = results["machine"], results["settings"], results["summary"]
    dense = r["ratios"]["dense/minimal"]
    git = results.get("git") or {}
    contended = statistics.median(v for name in RUNNERS for v in r["contended_share"][name])
    lines = [
        "# Trainer vs a minimal PyTorch loop (CPU, digits MLP)",
        "",
        f"Date: {results['date']}. Machine: {m['nproc']} cores, {m['cpu']}, torch {m['torch']}, {m['threads']} torch "
        f"threads, Python {m['python']}, device cpu. Load average at start {results['loadavg_start']}, at end "
        f"{results['loadavg_end']} (the machine is shared; runs are interleaved so noise hits all alike)."
        + (f" Code: commit {git['commit']}" + (" with uncommitted rigl_core changes" if git.get("rigl_core_dirty")
                                               else "") + "." if git.get("commit") else ""),
        "",
        f"Settings: MLP 300-100 on digits, batch {BATCH}, {s['epochs']} epochs ({r['steps']['minimal']} steps), SGD "
        f"lr {LR} momentum {MOMENTUM}, weight decay {WEIGHT_DECAY} on kernels; RigL 90% ERK ΔT=100. "
        f"{s['repeats_done']} repeats (order rotated per repeat, one discarded warm-up run each). Trainer time = "
        "report `train_seconds` (evaluation excluded) and per-step times from a Callback's should_stop "
        "(polled after every step); "
        "minimal loop = its training steps only (data prepared once beforehand, constant LR). "
        f"torch threads: {s.get('threads') or 'torch default'}.",
        "",
    ]
    if s["quick"]:
        lines += ["**--quick smoke test: too short to mean much.**", ""]
    lines += [
        f"**Dense Trainer / minimal loop per step: {dense['median_of_ratios']:.3f}× (median of paired train_seconds "
        f"ratios, {verdict(dense['median_of_ratios'])}), {dense['filtered']:.3f}× (contention-filtered, "
        f"{verdict(dense['filtered'])}), {dense['median_step']:.3f}× (median step); goal ≤ {GOAL:.2f}×.** "
        f"Median share of contended steps (> 1.5× the filtered step time) per run: {contended:.0%}.",
        "",
        "| run | steps | median ms/step (train_seconds) | median step ms | filtered ms/step | min s "
        "| contended steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in RUNNERS:
        share = r["contended_share"][name]
        lines.append(f"| {name} | {r['steps'][name]} | {r['ms_per_step'][name]:.3f} | "
                     f"{r['median_step_ms'][name]:.3f} | "
                     f"{r['filtered_ms_per_step'][name]:.3f} | {r['min_seconds'][name]:.3f} | "
                     f"median {statistics.median(share):.0%}, max {max(share):.0%} |")
    lines += ["", "| ratio (per step) | median of paired ratios | ratio of medians | median step | filtered | goal |",
              "|---|---|---|---|---|---|"]
    for key, v in r["ratios"].items():
        goal = f"≤ {GOAL:.2f}" if key == "dense/minimal" else ""
        lines.append(f"| {key} | {v['median_of_ratios']:.3f} | {v['ratio_of_medians']:.3f} | {v['median_step']:.3f} | "
                     f"{v['filtered']:.3f} | {goal} |")
    lines += ["", "Per-repeat dense/minimal: " + ", ".join(f"{v:.3f}" for v in dense["per_repeat"]) + ".", "",
              "Filtered = for each step index, the fastest of the repeats, summed (identical work in every repeat, so "
              "this drops steps slowed by other processes); median step = median over every step of every repeat.",
              "",
              f"Raw numbers: `bench/results/{results['json_name']}`. Command: `{results['command']}`. "
              f"Wall time {results['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run; writes trainer_floor_quick.*")
    parser.add_argument("--repeats", type=int, default=None, help="most repeats (default 40; 3 with --quick)")
    parser.add_argument("--max-seconds", type=float, default=150.0,
                        help="stop repeating after this long (at least 5 repeats; default 150)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 20; 2 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1; 0: torch's own)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 40)
    epochs = args.epochs or (2 if args.quick else 20)
    suffix = "_quick" if args.quick else ""
    md_path, json_path = RESULTS / f"trainer_floor{suffix}.md", RESULTS / f"trainer_floor{suffix}.json"
    results = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": machine_info(), "git": git_state(), "loadavg_start": loadavg(),
               "settings": {"threads": args.threads, "repeats": repeats, "max_seconds": args.max_seconds,
                            "epochs": epochs, "quick": args.quick,
                            "batch_size": BATCH, "trainer_specs": {m: spec_tree(m, epochs) for m in ("dense", "rigl")}},
               "goal": {"dense/minimal": GOAL},
               "command": " ".join(["python bench/trainer_floor.py"] + sys.argv[1:]), "json_name": json_path.name}
    started = time.perf_counter()
    tensors = digits_tensors()
    for name in RUNNERS:
        r = run_one(name, epochs, tensors)
        print(f"warm-up {name:8s} {r['seconds']:.3f} s ({r['steps']} steps)", flush=True)
    times: dict[str, list[float]] = {n: [] for n in RUNNERS}
    step_s: dict[str, list[list[float]]] = {n: [] for n in RUNNERS}
    steps: dict[str, int] = {}
    runs = list(RUNNERS)
    for rep in range(repeats):
        if rep >= 5 and time.perf_counter() - started > args.max_seconds:
            print(f"stopping after {rep} repeats: --max-seconds {args.max_seconds:.0f} reached", flush=True)
            break
        shift = rep % len(runs)
        for name in runs[shift:] + runs[:shift]:
            r = run_one(name, epochs, tensors)
            times[name].append(r["seconds"])
            step_s[name].append(r["step_s"])
            if steps.setdefault(name, r["steps"]) != r["steps"]:
                raise RuntimeError(f"{name}: step count changed between repeats")
        print(f"repeat {rep + 1}/{repeats}: " + ", ".join(
            f"{n} {1000 * times[n][-1] / steps[n]:.3f} ms/step" for n in RUNNERS)
            + f" → dense/minimal {times['dense'][-1] / times['minimal'][-1] * steps['minimal'] / steps['dense']:.3f}"
            + f" (load {loadavg()[:1]})", flush=True)
    if len(set(steps.values())) != 1:
        print(f"warning: step counts differ: {steps}", flush=True)
    summary = summarize(times, steps, step_s)
    summary["steps"] = steps
    summary["times"] = times
    results["settings"]["repeats_done"] = len(times["minimal"])
    results.update({"summary": summary, "loadavg_end": loadavg(), "wall_seconds": time.perf_counter() - started})
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = render(results)
    md_path.write_text(table)
    json_path.write_text(json.dumps(results, indent=2))
    print()
    print(table)
    print(f"wrote {md_path.relative_to(ROOT)} and {json_path.relative_to(ROOT)} ({results['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
