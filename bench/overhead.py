"""Overhead: RigL's training time and peak memory against dense training, measured side by side.

Two configurations, each trained by `Trainer(spec).fit()` exactly as `rigl train` would:

  mlp       MLP 300-100 on scikit-learn digits, 90% ERK, batch 64, 20 epochs, ΔT=100 (460 steps).
  resnet18  torchvision ResNet-18 on synthetic 3×32×32 data (10 classes, 2048 samples), 90% ERK,
            batch 64, training.max_steps=200, ΔT=100 → mask updates at steps 0 and 100 (T_end=150).

Time: `train_seconds` from the report (the training loop alone: no model building, no evaluation).
Each repeat trains every method once, in-process, one after the other; the order is rotated from
repeat to repeat (dense, rigl, static / rigl, static, dense / …) so drift and noise from other
processes on the machine hit every method alike. One discarded warm-up run per method comes first.
Reported: median seconds per method, and rigl/dense as the median of the per-repeat (paired) ratios
and as the ratio of the medians. `static` (fixed random masks) is there for reference: static − dense
is the cost of masking gradients every step, rigl − static the cost of the mask updates.

Memory: each (configuration, method) is trained once more in a fresh process,
`/usr/bin/time -v python bench/overhead.py --single CONFIG METHOD`, and "Maximum resident set size"
is parsed (if /usr/bin/time is missing: `apt-get install -y time`; the child's own
getrusage() maximum is used instead). Also reported: the peak above the RSS right after importing
torch/torchvision/rigl_core, which is what training itself adds.

Where the time goes: one more instrumented run per sparse method times Sparsifier.mask_gradients,
optimizer.step and the mask updates (update_masks, with drop_and_grow inside it).

    python bench/overhead.py                  # full: 5 repeats, both configs (~10 minutes on 2 cores)
    python bench/overhead.py --quick          # smoke test (~1 minute)
    python bench/overhead.py --only resnet18 --repeats 3
    python bench/overhead.py --single resnet18 rigl   # one run, prints a RESULT {json} line

Writes bench/results/overhead.md and overhead.json (with --quick or --only the file names get a
suffix, e.g. overhead_quick.md, so a smoke test never overwrites the full results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

CONFIGS = ("mlp", "resnet18")
METHODS = ("dense", "rigl", "static")
TARGETS = {"mlp": 1.3, "resnet18": 1.10}  # rigl/dense training time
RSS_TARGET = 1.15  # rigl/dense peak RSS


def spec_tree(config: str, method: str, quick: bool) -> dict:
    """The JobSpec (as a dict) of one run. Everything not named keeps the JobSpec default."""
    sparsity = {"method": method, "sparsity": 0.9, "distribution": "erk"}
    common = {"batch_size": 64, "device": "cpu", "seed": 0, "log_every_steps": 1000}
    if config == "mlp":
        return {
            "model": {"name": "mlp", "hidden_sizes": [300, 100]},
            "dataset": {"name": "digits"},
            "sparsity": {**sparsity, "schedule": {"delta_t": 100}},
            "training": {**common, "epochs": 2 if quick else 20},
        }
    if config == "resnet18":
        return {
            "model": {"name": "resnet18"},
            "dataset": {"name": "synthetic", "input_shape": [3, 32, 32], "num_classes": 10,
                        "num_samples": 256 if quick else 2048},
            # Quick: ΔT=2 over 4 steps so the smoke test still exercises a mask update after step 0.
            "sparsity": {**sparsity, "schedule": {"delta_t": 2 if quick else 100}},
            # Evaluate only once, at the last step (evaluation is outside train_seconds anyway).
            "training": {**common, "epochs": 10_000, "max_steps": 4 if quick else 200, "eval_every_epochs": 10_000},
        }
    raise ValueError(config)


def train_once(config: str, method: str, quick: bool, max_steps: int | None = None) -> dict:
    """One training run; also records the wall time of every `Trainer._train_step` call (forward,
    backward and the sparsifier's step, i.e. masking, optimizer step or mask update)."""
    from rigl_core.spec import JobSpec
    from rigl_core.training.trainer import Trainer

    tree = spec_tree(config, method, quick)
    if max_steps is not None:
        tree["training"]["max_steps"] = max_steps
    trainer = Trainer(JobSpec.model_validate(tree))
    step_seconds: list[float] = []
    inner = trainer._train_step

    def timed_step(micros):
        tick = time.perf_counter()
        out = inner(micros)
        step_seconds.append(time.perf_counter() - tick)
        return out

    trainer._train_step = timed_step  # about a microsecond per step, alike for every method
    report = trainer.fit()
    return {
        "train_seconds": report["train_seconds"],
        "steps": report["steps"],
        "t_end": report["t_end"],
        "delta_t": report["delta_t"],
        "final_metrics": report["final_metrics"],
        "leak_ok": report["leak_check"]["ok"],
        "step_ms": [round(1000 * v, 4) for v in step_seconds],
    }


# ---------------------------------------------------------------------------- machine
def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def git_state() -> dict:
    """The commit measured, and whether the working tree differed from it (rigl_core changes matter)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "rigl_core"], capture_output=True,
                               text=True, cwd=ROOT, check=True).stdout.strip()
        return {"commit": commit, "rigl_core_dirty": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        return {}


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def current_rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------------- --single (memory)
def single(config: str, method: str, quick: bool) -> None:
    """One run in this (fresh) process; prints `RESULT {json}` with the child's own RSS figures."""
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    import rigl_core.training.trainer  # noqa: F401

    rss_after_imports = current_rss_kb()
    result = train_once(config, method, quick)
    result["rss_after_imports_kb"] = rss_after_imports
    result["ru_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("RESULT " + json.dumps(result), flush=True)


def measure_memory(config: str, method: str, quick: bool, threads: int | None) -> dict:
    time_bin = shutil.which("time") if not Path("/usr/bin/time").exists() else "/usr/bin/time"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--single", config, method]
    if quick:
        cmd.append("--quick")
    if threads:
        cmd += ["--threads", str(threads)]
    use_time = time_bin is not None
    if use_time:
        cmd = [time_bin, "-v"] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    if use_time:
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        result["peak_rss_kb"] = int(match.group(1))
        result["rss_source"] = "/usr/bin/time -v"
    else:
        result["peak_rss_kb"] = result["ru_maxrss_kb"]
        result["rss_source"] = "getrusage (no /usr/bin/time; apt-get install -y time)"
    return result


# ---------------------------------------------------------------------------- instrumented run
def instrumented(config: str, method: str, quick: bool) -> dict:
    """One extra in-process run with timers around the sparsifier's parts (not used for the ratios).

    Per-call times are kept so that medians, which a burst of contention barely moves, can be
    reported next to the totals."""
    import rigl_core.sparse.drop_grow as sp
    from rigl_core.sparse.mask_state import MaskState
    from rigl_core.spec import JobSpec
    from rigl_core.training.trainer import Trainer

    names = ("train_step", "mask_gradients", "optimizer_step", "update_masks", "drop_and_grow", "apply_masks")
    calls: dict[str, list[float]] = {k: [] for k in names}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            tick = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                calls[name].append(time.perf_counter() - tick)
        return wrapper

    saved = {
        (MaskState, "mask_gradients"): MaskState.mask_gradients,
        (MaskState, "apply_masks"): MaskState.apply_masks,
        (sp.DropGrowUpdate, "update_masks"): sp.DropGrowUpdate.update_masks,
        (sp, "drop_and_grow"): sp.drop_and_grow,
    }
    try:
        for (owner, name), fn in saved.items():
            setattr(owner, name, timed(name, fn))
        trainer = Trainer(JobSpec.model_validate(spec_tree(config, method, quick)))
        trainer.optimizer.step = timed("optimizer_step", trainer.optimizer.step)
        trainer._train_step = timed("train_step", trainer._train_step)
        calls["apply_masks"].clear()  # the one in init_masks is outside the loop
        report = trainer.fit()
    finally:
        for (owner, name), fn in saved.items():
            setattr(owner, name, fn)
    out = {"train_seconds": report["train_seconds"], "steps": report["steps"], "total_s": {}, "median_ms": {},
           "calls": {}, "per_call_ms": {}}
    for name, values in calls.items():
        out["calls"][name] = len(values)
        out["total_s"][name] = sum(values)
        out["median_ms"][name] = 1000 * statistics.median(values) if values else 0.0
        if name in ("update_masks", "drop_and_grow", "apply_masks"):
            out["per_call_ms"][name] = [round(1000 * v, 3) for v in values]
    return out


# ---------------------------------------------------------------------------- statistics
def summarize(times: dict[str, list[float]], steps: dict[str, int], step_ms: dict[str, list[list[float]]]) -> dict:
    """Medians and ratios of train_seconds, plus a contention-filtered estimate.

    Every repeat of a method does exactly the same work (same seed, same steps), so the minimum over
    repeats of step i's time, summed over i, is that method's training time with the bursts of
    contention from other processes filtered out (a step is lost only if it was slowed in every
    repeat). Mask-update steps stay in: they are slow in every repeat."""
    out = {"median_seconds": {}, "min_seconds": {}, "max_seconds": {}, "ms_per_step": {}, "ratios": {},
           "filtered_seconds": {}, "filtered_ms_per_step": {}, "median_step_ms": {}, "contended_share": {}}
    for method, values in times.items():
        out["median_seconds"][method] = statistics.median(values)
        out["min_seconds"][method] = min(values)
        out["max_seconds"][method] = max(values)
        out["ms_per_step"][method] = 1000 * statistics.median(values) / steps[method]
        series = step_ms[method]
        envelope = [min(column) for column in zip(*series)]
        out["filtered_seconds"][method] = sum(envelope) / 1000
        out["filtered_ms_per_step"][method] = sum(envelope) / len(envelope)
        out["median_step_ms"][method] = statistics.median(v for run in series for v in run)
        # Share of steps more than 1.5x slower than the envelope: how much contention each run saw.
        out["contended_share"][method] = [
            sum(v > 1.5 * e for v, e in zip(run, envelope)) / len(run) for run in series
        ]
    dense = times["dense"]
    for method, values in times.items():
        if method == "dense":
            continue
        paired = [v / d for v, d in zip(values, dense)]
        out["ratios"][method] = {
            "per_repeat": paired,
            "median_of_ratios": statistics.median(paired),
            "ratio_of_medians": statistics.median(values) / statistics.median(dense),
            "ratio_of_mins": min(values) / min(dense),
            "filtered": out["filtered_seconds"][method] / out["filtered_seconds"]["dense"],
            "median_step": out["median_step_ms"][method] / out["median_step_ms"]["dense"],
        }
    return out


# ---------------------------------------------------------------------------- main benchmark
def run_config(config: str, methods: list[str], repeats: int, quick: bool, log) -> dict:
    # Warm-up (discarded): lazy initialisation, allocator and kernel caches. Short for ResNet-18,
    # but long enough to include a mask update (step 0) and ordinary steps.
    warm_steps = None if (config == "mlp" or quick) else 10
    for method in methods:
        r = train_once(config, method, quick, max_steps=warm_steps)
        log(f"  warm-up {config:8s} {method:6s} {r['train_seconds']:7.2f} s ({r['steps']} steps)")
    times: dict[str, list[float]] = {m: [] for m in methods}
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    step_ms: dict[str, list[list[float]]] = {m: [] for m in methods}
    orders = []
    for rep in range(repeats):
        shift = rep % len(methods)
        order = methods[shift:] + methods[:shift]
        orders.append(order)
        for method in order:
            r = train_once(config, method, quick)
            r["loadavg"] = loadavg()
            times[method].append(r["train_seconds"])
            step_ms[method].append(r.pop("step_ms"))
            runs[method].append(r)
            log(f"  repeat {rep + 1}/{repeats} {config:8s} {method:6s} {r['train_seconds']:7.2f} s "
                f"({r['steps']} steps, val_acc {r['final_metrics'].get('val_accuracy', float('nan')):.3f}, "
                f"median step {1000 * statistics.median(step_ms[method][-1]) / 1000:.2f} ms, "
                f"load {r['loadavg'][0] if r['loadavg'] else '?'})")
    steps = {m: runs[m][0]["steps"] for m in methods}
    summary = summarize(times, steps, step_ms)
    first = runs[methods[0]][0]
    return {"times": times, "runs": runs, "orders": orders, "steps": steps, "step_ms": step_ms,
            "delta_t": first["delta_t"], "t_end_rigl": runs["rigl"][0]["t_end"] if "rigl" in runs else None,
            **summary}


def verdict(value: float, target: float) -> str:
    return "yes" if value <= target else "**NO**"


def render(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    lines = [
        "# RigL overhead vs dense training (time and peak memory)",
        "",
        f"Date: {results['date']}. Machine: {m['nproc']} cores, {m['cpu']}, torch {m['torch']}, "
        f"{m['threads']} torch threads, Python {m['python']}, device cpu. "
        f"Load average at start {results['loadavg_start']}, at end {results['loadavg_end']} "
        "(other processes shared the machine; methods are interleaved so noise hits them alike)."
        + (f" Code: commit {results['git']['commit']}"
           + (" with uncommitted rigl_core changes" if results["git"].get("rigl_core_dirty") else "") + "."
           if results.get("git") else ""),
        "",
        "Settings: " + "; ".join(s["describe"][c] for c in results["configs"]) + ". "
        f"{s['repeats']} repeats; each repeat runs every method once, order rotated per repeat; one discarded "
        "warm-up run per method first. Time = report `train_seconds` (training loop only, evaluation excluded).",
        "",
        f"Targets: RigL ≤ {TARGETS['resnet18']:.2f}× dense on ResNet-18, ≤ {TARGETS['mlp']:.2f}× on the MLP; "
        f"peak RSS ≤ {RSS_TARGET:.2f}× dense.",
    ]
    if s["quick"]:
        lines += ["", "**--quick smoke test: tiny settings, the numbers mean nothing.**"]
    lines += [
        "",
        "## Training time",
        "",
        "Columns: median/min–max of `train_seconds` over the repeats; ×dense as the median of the paired "
        "(same-repeat) ratios, as the ratio of the medians, and as the ratio of the contention-filtered times "
        "(sum over steps of the fastest repeat of that step: every repeat does identical work, so this drops "
        "steps slowed by other processes; mask-update steps are slow in every repeat and stay in). "
        "`contended` = share of steps over 1.5× the filtered step time, per repeat.",
        "",
        "| config | method | steps | median s | min–max s | ×dense (median of paired ratios) | "
        "×dense (ratio of medians) | filtered s | ×dense (filtered) | median step ms | target | met (filtered) "
        "| contended |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config in results["configs"]:
        r = results["time"][config]
        for method in r["times"]:
            row = [config, method, str(r["steps"][method]), f"{r['median_seconds'][method]:.2f}",
                   f"{r['min_seconds'][method]:.2f}–{r['max_seconds'][method]:.2f}"]
            filtered = f"{r['filtered_seconds'][method]:.2f}"
            step = f"{r['median_step_ms'][method]:.2f}"
            contended = ", ".join(f"{100 * v:.0f}%" for v in r["contended_share"][method])
            if method == "dense":
                row += ["1", "1", filtered, "1", step, "", "", contended]
            else:
                ratio = r["ratios"][method]
                target = TARGETS[config] if method == "rigl" else None
                row += [f"{ratio['median_of_ratios']:.3f}", f"{ratio['ratio_of_medians']:.3f}", filtered,
                        f"{ratio['filtered']:.3f}", step, f"≤ {target:.2f}" if target else "",
                        verdict(ratio["filtered"], target) if target else "", contended]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Per-repeat rigl/dense ratios of train_seconds: " + "; ".join(
        f"{c}: " + ", ".join(f"{v:.3f}" for v in results["time"][c]["ratios"]["rigl"]["per_repeat"])
        for c in results["configs"] if "rigl" in results["time"][c]["ratios"]) + "."]

    if results.get("memory"):
        lines += [
            "",
            "## Peak memory (fresh process per run, " + next(iter(next(iter(results["memory"].values())).values()))[
                "rss_source"] + ")",
            "",
            "| config | method | peak RSS MiB | ×dense | RSS after imports MiB | peak − imports MiB | "
            "×dense (above imports) | target | met |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for config in results["configs"]:
            mem = results["memory"][config]
            dense_peak = mem["dense"]["peak_rss_kb"]
            dense_extra = dense_peak - mem["dense"]["rss_after_imports_kb"]
            for method, r in mem.items():
                extra = r["peak_rss_kb"] - r["rss_after_imports_kb"]
                ratio = r["peak_rss_kb"] / dense_peak
                row = [config, method, f"{r['peak_rss_kb'] / 1024:.0f}", f"{ratio:.3f}",
                       f"{r['rss_after_imports_kb'] / 1024:.0f}", f"{extra / 1024:.0f}",
                       f"{extra / dense_extra:.3f}" if dense_extra > 0 else "n/a"]
                if method == "rigl":
                    row += [f"≤ {RSS_TARGET:.2f}", verdict(ratio, RSS_TARGET)]
                else:
                    row += ["", ""]
                lines.append("| " + " | ".join(row) + " |")

    if results.get("breakdown"):
        lines += [
            "",
            "## Where the time goes (one instrumented run per method; medians per call, totals in brackets)",
            "",
            "| config | method | train s | training step ms | optimizer.step ms | Sparsifier.mask_gradients ms "
            "| mask updates (update_masks) ms each | of which drop_and_grow ms | of which apply_masks ms |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for config in results["configs"]:
            for method, b in results["breakdown"][config].items():
                med, tot, calls, per = b["median_ms"], b["total_s"], b["calls"], b["per_call_ms"]
                updates = ", ".join(f"{v:.0f}" for v in per.get("update_masks", [])) or "–"
                lines.append(
                    f"| {config} | {method} | {b['train_seconds']:.2f} | {med['train_step']:.2f} "
                    f"({tot['train_step']:.2f} s) | {med['optimizer_step']:.2f} ({tot['optimizer_step']:.2f} s) | "
                    f"{med['mask_gradients']:.2f} ({tot['mask_gradients']:.2f} s, {calls['mask_gradients']} calls) | "
                    f"{updates} | {tot['drop_and_grow'] * 1000:.0f} total | {tot['apply_masks'] * 1000:.0f} total |")
    lines += ["", "Raw numbers: `bench/results/" + results["json_name"] + "`. "
              "Command: `" + results["command"].strip() + "`.", ""]
    return "\n".join(lines)


def describe(config: str, quick: bool) -> str:
    tree = spec_tree(config, "rigl", quick)
    t = tree["training"]
    if config == "mlp":
        return (f"mlp 300-100 on digits, 90% ERK, batch {t['batch_size']}, {t['epochs']} epochs, "
                f"ΔT={tree['sparsity']['schedule']['delta_t']}, SGD momentum 0.9, lr 0.1 cosine")
    d = tree["dataset"]
    return (f"torchvision resnet18 on synthetic {'×'.join(map(str, d['input_shape']))} "
            f"({d['num_samples']} samples, {d['num_classes']} classes), 90% ERK, batch {t['batch_size']}, "
            f"max_steps {t['max_steps']}, ΔT={tree['sparsity']['schedule']['delta_t']}, SGD momentum 0.9")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=None, help="repeats per config (default 5; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    parser.add_argument("--only", choices=CONFIGS, help="run one configuration")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list; must include dense")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocess runs")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the instrumented runs")
    parser.add_argument("--render", metavar="JSON", help="only re-render the markdown from a results JSON")
    parser.add_argument("--single", nargs=2, metavar=("CONFIG", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.single:
        single(args.single[0], args.single[1], args.quick)
        return
    if args.render:
        path = Path(args.render)
        table = render(json.loads(path.read_text()))
        path.with_suffix(".md").write_text(table)
        print(table)
        return

    repeats = args.repeats or (2 if args.quick else 5)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "dense" not in methods:
        parser.error("--methods must include dense")
    configs = [args.only] if args.only else list(CONFIGS)
    suffix = ("_quick" if args.quick else "") + (f"_{args.only}" if args.only else "")
    md_path, json_path = RESULTS / f"overhead{suffix}.md", RESULTS / f"overhead{suffix}.json"

    def log(msg: str) -> None:
        print(msg, flush=True)

    results = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "git": git_state(),
        "loadavg_start": loadavg(),
        "configs": configs,
        "settings": {"repeats": repeats, "quick": args.quick, "methods": methods,
                     "specs": {c: spec_tree(c, "rigl", args.quick) for c in configs},
                     "describe": {c: describe(c, args.quick) for c in configs}},
        "targets": {"time": TARGETS, "rss": RSS_TARGET},
        "command": " ".join(["python bench/overhead.py"] + sys.argv[1:]),
        "json_name": json_path.name,
        "time": {},
        "memory": {},
        "breakdown": {},
    }
    started = time.perf_counter()
    for config in configs:
        log(f"[time] {config}")
        results["time"][config] = run_config(config, methods, repeats, args.quick, log)
    if not args.no_breakdown:
        for config in configs:
            results["breakdown"][config] = {}
            for method in methods:
                log(f"[breakdown] {config} {method}")
                results["breakdown"][config][method] = instrumented(config, method, args.quick)
    if not args.no_memory:
        for config in configs:
            results["memory"][config] = {}
            for method in methods:
                r = measure_memory(config, method, args.quick, args.threads)
                results["memory"][config][method] = r
                log(f"[memory] {config:8s} {method:6s} peak {r['peak_rss_kb'] / 1024:7.0f} MiB "
                    f"(after imports {r['rss_after_imports_kb'] / 1024:.0f} MiB)")
    results["loadavg_end"] = loadavg()
    results["wall_seconds"] = time.perf_counter() - started

    RESULTS.mkdir(parents=True, exist_ok=True)
    table = render(results)
    md_path.write_text(table)
    json_path.write_text(json.dumps(results, indent=2))
    print()
    print(table)
    print(f"wrote {md_path.relative_to(ROOT)} and {json_path.relative_to(ROOT)} "
          f"({results['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
