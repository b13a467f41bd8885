"""GPU benchmark: our Trainer against a minimal PyTorch loop, RigL against dense, and the worker's path.

One command, about 5 minutes on one H100/H200, synthetic data (nothing downloaded). For each model

  resnet50   torchvision ResNet-50, 3×224×224, 1000 classes, batch 256
  wrn-22-2   our WRN-22-2, 3×32×32, 10 classes, batch 128

it runs, one after the other in one process (bf16 autocast, channels_last, TF32, cudnn.benchmark,
SGD momentum 0.9, weight decay 1e-4):

  minimal    the floor, written here: the same model (rigl_core.models.registry.build_model), random data
             already on the GPU (as many training samples as the Trainer's synthetic split), a
             torch.randperm on the GPU per epoch, slicing, forward + loss under autocast, backward,
             optimizer.step. Constant LR, no logging.
  dense      `Trainer(spec).fit()`, sparsity.method dense, dataset `synthetic` (held on the GPU).
  rigl       the same at 90% ERK, ΔT=100 (drop fraction held at α=0.3, the largest: decay constant).
  worker     the rigl job with training.devices 1 through the worker's code path: a JobStore on
             SQLite (the embedded store; no PostgreSQL/Redis needed), `store.create_job`, then
             `worker.runner.run_slot` in-process (lease, heartbeat thread, StoreCallback, exports).
             Periodic checkpoints are moved past the end of the run (they are not step time).

Timing: a Callback synchronises the GPU and reads the clock after `warmup` steps (cudnn.benchmark and
allocator warm-up excluded) and again `steps` later; the runs stop right after (evaluation is outside
the window). images/s = steps × batch / seconds. The window holds mask updates at ΔT=100 as training
does (steps 10..210: updates at 100 and 200). Peak memory: torch.cuda.max_memory_allocated, reset
before each run (the data on the GPU included). Mask update: the RigL run's sparsifier.step on update
steps (drop/grow, replacing the optimizer step) is timed between synchronisations, against ΔT × the
RigL run's step time.

Goals (issue 12): RigL/dense step time ≤ 1.05×, dense images/s ≥ 0.95× minimal, peak memory
RigL/dense ≤ 1.10×, a mask update ≤ 2% of a ΔT=100 cycle.

Every part is budgeted (--budget-s, default 300): a part whose estimated time no longer fits is
skipped and said so; results are written after every part, so a timeout still leaves figures.

    python bench/gpu.py --out DIR           # on the GPU; writes bench/results/gpu.{md,json} (and DIR/)
    python bench/gpu.py --smoke             # on CPU, 10 s idle to ~1 min busy, tiny sizes: gpu_smoke.*
    python bench/gpu.py --nm24 [--out DIR]  # only 2:4 semi-structured Linear vs dense fp16: gpu_nm24.* (NOT RUN YET)

On the device machine (`run` tool; see bench/run_gpu.sh, which also prepares the wheels here):

    bash bench/run_gpu.sh prepare           # here, just before: wheels for pydantic/SQLAlchemy + the commit
    run(command="bash bench/run_gpu.sh", carry=[".device-wheels"], timeout_s=420)
    # then copy files_at/gpu.md and gpu.json into bench/results/ (gpu_log.txt is the console output)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

GOALS = {"rigl_dense_step": 1.05, "dense_minimal_throughput": 0.95, "rigl_dense_memory": 1.10,
         "update_share": 0.02}
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4
RUNS = ("minimal", "dense", "rigl", "worker")


@dataclass
class Config:
    name: str  # label in the results
    model: str  # rigl_core model name
    input_shape: list[int]
    num_classes: int
    batch: int
    num_samples: int  # synthetic dataset size; val_fraction 0.2 leaves a whole number of batches
    warmup: int
    steps: int
    delta_t: int

    @property
    def num_train(self) -> int:
        from rigl_core.data.holdout import training_size

        return training_size(self.num_samples, 0.2)


GPU_CONFIGS = [
    Config("resnet50", "resnet50", [3, 224, 224], 1000, 256, 1280, warmup=10, steps=200, delta_t=100),
    Config("wrn-22-2", "wrn-22-2", [3, 32, 32], 10, 128, 40960, warmup=20, steps=400, delta_t=100),
]
SMOKE_CONFIGS = [  # CPU: tiny, but every path runs (mask updates at steps 2 and 4, inside the window)
    Config("resnet18-smoke", "resnet18", [3, 32, 32], 10, 8, 40, warmup=2, steps=4, delta_t=2),
    Config("wrn-22-2-smoke", "wrn-22-2", [3, 32, 32], 10, 8, 40, warmup=2, steps=4, delta_t=2),
]
# Run order: the goals' parts first, the slower worker run of ResNet-50 last.
# WRN-22-2's steps are short enough for the CPU's kernel launches to matter, so run to run it varies by
# ~10%: its three runs are repeated three times, interleaved in rotated order, and the median is reported.
ORDER = [("resnet50", "minimal"), ("resnet50", "dense"), ("resnet50", "rigl"),
         ("wrn-22-2", "minimal"), ("wrn-22-2", "dense"), ("wrn-22-2", "rigl"),
         ("wrn-22-2", "dense"), ("wrn-22-2", "rigl"), ("wrn-22-2", "minimal"),
         ("wrn-22-2", "rigl"), ("wrn-22-2", "minimal"), ("wrn-22-2", "dense"),
         ("wrn-22-2", "worker"), ("resnet50", "worker")]


# ---------------------------------------------------------------------------- device helpers
def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def allocated(device) -> int | None:
    import torch

    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None


def peak_memory(device) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


# ---------------------------------------------------------------------------- the floor
def run_minimal(cfg: Config, device, channels_last: bool) -> dict:
    import torch
    from torch import nn

    from rigl_core.models.registry import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.num_classes, cfg.input_shape).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    loss_fn = nn.CrossEntropyLoss()
    n = cfg.num_train
    data = torch.randn(n, *cfg.input_shape, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, cfg.num_classes, (n,), device=device)
    per_epoch = n // cfg.batch
    model.train()
    started = None
    order = None
    for step in range(cfg.warmup + cfg.steps):
        if step == cfg.warmup:
            sync(device)
            started = time.perf_counter()
        if step % per_epoch == 0:
            order = torch.randperm(n, device=device)
        index = order[(step % per_epoch) * cfg.batch:(step % per_epoch + 1) * cfg.batch]
        x = data[index].contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(model(x), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "final_loss": float(loss.detach())}


# ---------------------------------------------------------------------------- the Trainer
def spec_tree(cfg: Config, method: str, device_name: str) -> dict:
    total = cfg.warmup + cfg.steps + 1  # the last step (and its evaluation) comes after the window
    return {
        "model": {"name": cfg.model, "num_classes": cfg.num_classes},
        "dataset": {"name": "synthetic", "input_shape": cfg.input_shape, "num_classes": cfg.num_classes,
                    "num_samples": cfg.num_samples, "val_fraction": 0.2},
        "sparsity": {"method": method, "sparsity": 0.9, "distribution": "erk",
                     "schedule": {"delta_t": cfg.delta_t, "t_end": 1.0, "decay": "constant", "alpha": 0.3}},
        "training": {"epochs": 100_000, "max_steps": total, "eval_every_epochs": 100_000, "batch_size": cfg.batch,
                     "optimizer": "sgd", "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY,
                     "lr_schedule": "constant", "device": device_name, "devices": 1, "precision": "bf16",
                     "channels_last": True, "tf32": True, "compile": False, "accumulate_steps": 1, "seed": 0},
    }


def make_timer(cfg: Config, device):
    """A Callback that reads the clock (after a GPU sync) when `warmup` and `warmup + steps` steps are done."""
    from rigl_core.training.trainer import Callback

    class WindowTimer(Callback):
        def __init__(self):
            self.marks: dict[str, float] = {}

        def should_stop(self, trainer) -> bool:
            if trainer.step in (cfg.warmup, cfg.warmup + cfg.steps):
                sync(device)
                self.marks["start" if trainer.step == cfg.warmup else "end"] = time.perf_counter()
            return False

        @property
        def seconds(self) -> float:
            if set(self.marks) != {"start", "end"}:
                raise RuntimeError(f"the timing window was not reached (marks: {sorted(self.marks)})")
            return self.marks["end"] - self.marks["start"]

    return WindowTimer()


def time_updates(trainer, device) -> dict:
    """Wrap the sparsifier's step: on update steps, and on the step halfway between two updates for
    reference, time it between GPU syncs (a sync every 50 steps costs next to nothing)."""
    sparsifier = trainer.sparsifier
    inner = sparsifier.step
    record = {"update_ms": [], "update_steps": [], "normal_ms": []}
    delta_t = trainer.schedule.delta_t

    def step(index, *args, **kwargs):
        update = sparsifier.is_update_step(index)
        reference = index % delta_t == delta_t // 2
        if not (update or reference):
            return inner(index, *args, **kwargs)
        sync(device)
        tick = time.perf_counter()
        out = inner(index, *args, **kwargs)
        sync(device)
        ms = 1000 * (time.perf_counter() - tick)
        if update:
            record["update_ms"].append(ms)
            record["update_steps"].append(index)
        else:
            record["normal_ms"].append(ms)
        return out

    sparsifier.step = step
    return record


def run_trainer(cfg: Config, method: str, device) -> dict:
    from rigl_core.spec import JobSpec
    from rigl_core.training.trainer import Trainer

    timer = make_timer(cfg, device)
    trainer = Trainer(JobSpec.model_validate(spec_tree(cfg, method, str(device))), callbacks=[timer])
    updates = time_updates(trainer, device) if method == "rigl" else None
    report = trainer.fit()
    out = {"seconds": timer.seconds, "steps_done": report["steps"], "precision": report.get("precision"),
           "channels_last": report.get("channels_last"), "tf32": report.get("tf32"),
           "leak_ok": report["leak_check"]["ok"], "sparsity": report["totals"].get("sparsity")}
    if updates is not None:
        out["updates"] = updates
    del trainer
    return out


def run_worker(cfg: Config, device) -> dict:
    """The rigl job through the service's worker: SQLite JobStore, create_job, run_slot in-process."""
    import worker.runner as runner
    from rigl_core.spec import JobSpec
    from store.jobs import JobStore
    from store.settings import Settings

    timer = make_timer(cfg, device)
    tree = spec_tree(cfg, "rigl", str(device))
    spec = JobSpec.model_validate(tree)
    with tempfile.TemporaryDirectory(prefix="rigl-gpu-bench-") as tmp:
        settings = Settings(data_dir=Path(tmp), checkpoint_every_steps=10**9).resolved()
        store = JobStore(settings.database_url)
        job = store.create_job(tree, spec.model_dump(mode="json"), cfg.warmup + cfg.steps + 1)
        original = runner.Trainer

        def trainer_with_timer(spec, callbacks=(), **kwargs):
            return original(spec, callbacks=[*callbacks, timer], **kwargs)

        runner.Trainer = trainer_with_timer  # the only change: one more callback, as in the library runs
        try:
            outcome, job_id = runner.run_slot(job.id, settings, store)
        finally:
            runner.Trainer = original
        row = store.get_job(job.id)
        if outcome != "succeeded":
            raise RuntimeError(f"worker run ended {outcome}: {row.error_code} {row.error_message}")
        result = row.result or {}
        store.engine.dispose()
    return {"seconds": timer.seconds, "outcome": outcome, "steps_done": result.get("steps"),
            "leak_ok": result.get("leak_check_ok")}


# ---------------------------------------------------------------------------- machine
def machine(device) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "device": str(device), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                     "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
                     "bf16_supported": torch.cuda.is_bf16_supported()})
    return info


def commit() -> dict:
    """The commit measured: git here, or the file `bash bench/run_gpu.sh prepare` wrote (the device
    machine gets the working tree without .git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "rigl_core", "worker", "store"],
                               capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()
        return {"commit": head, "dirty": bool(dirty), "source": "git"}
    except (OSError, subprocess.CalledProcessError):
        pass
    saved = ROOT / ".device-wheels" / "commit.json"
    if saved.exists():
        return {**json.loads(saved.read_text()), "source": ".device-wheels/commit.json"}
    return {"commit": None}


# ---------------------------------------------------------------------------- summary and report
def summarize(results: dict) -> None:
    """Derived figures and goal verdicts, recomputed from whatever parts have finished."""
    derived = {}
    for cfg in results["configs"]:
        name, runs = cfg["name"], results["runs"].get(cfg["name"], {})
        d: dict = {"images_per_s": {}, "ms_per_step": {}, "peak_mib": {}}
        for run, r in runs.items():
            if "seconds" in r:
                d["ms_per_step"][run] = 1000 * r["seconds"] / cfg["steps"]
                d["images_per_s"][run] = cfg["steps"] * cfg["batch"] / r["seconds"]
            if r.get("peak_bytes") is not None:  # above what earlier parts left allocated (should be ~0)
                d["peak_mib"][run] = (r["peak_bytes"] - (r.get("baseline_bytes") or 0)) / 2**20
        ips, ms, mem = d["images_per_s"], d["ms_per_step"], d["peak_mib"]
        goals = {}
        if "dense" in ms and "rigl" in ms:
            goals["rigl_dense_step"] = ms["rigl"] / ms["dense"]
        if "dense" in ips and "minimal" in ips:
            goals["dense_minimal_throughput"] = ips["dense"] / ips["minimal"]
        if "dense" in mem and "rigl" in mem:
            goals["rigl_dense_memory"] = mem["rigl"] / mem["dense"]
        updates = runs.get("rigl", {}).get("updates")
        if updates and updates["update_ms"] and "rigl" in ms:
            # the first update inside the window is representative; step 0's is part of the warm-up
            in_window = [m for m, s in zip(updates["update_ms"], updates["update_steps"]) if s >= cfg["warmup"]]
            update_ms = statistics.median(in_window or updates["update_ms"])
            normal_ms = statistics.median(updates["normal_ms"]) if updates["normal_ms"] else None
            cycle_ms = cfg["delta_t"] * ms["rigl"]
            d["update"] = {"update_step_ms": update_ms, "normal_step_ms": normal_ms, "cycle_ms": cycle_ms,
                           "updates_timed": len(updates["update_ms"])}
            goals["update_share"] = update_ms / cycle_ms
        if "worker" in ips and "rigl" in ips:
            d["worker_vs_library"] = ips["worker"] / ips["rigl"]
        d["goals"] = {k: {"value": v, "goal": GOALS[k], "met": v >= GOALS[k] if k == "dense_minimal_throughput"
                          else v <= GOALS[k]} for k, v in goals.items()}
        derived[name] = d
    results["derived"] = derived


GOAL_TEXT = {
    "rigl_dense_step": ("RigL / dense step time", "≤ {:.2f}×", "{:.3f}×"),
    "dense_minimal_throughput": ("dense Trainer / minimal loop images/s", "≥ {:.2f}×", "{:.3f}×"),
    "rigl_dense_memory": ("RigL / dense peak GPU memory", "≤ {:.2f}×", "{:.3f}×"),
    "update_share": ("one mask update / ΔT cycle", "≤ {:.0%}", "{:.2%}"),
}


def render(results: dict) -> str:
    m, git = results["machine"], results.get("git") or {}
    smoke = results["smoke"]
    device = m.get("gpu") or m["device"]
    lines = [
        "# GPU benchmark: Trainer vs a minimal loop, RigL vs dense, worker path"
        + (" (CPU smoke test)" if smoke else ""),
        "",
        f"Date: {results['date']}. Device: {device}"
        + (f" ({m['gpu_memory_gib']} GiB, sm {m['capability']})" if m.get("gpu") else "")
        + f"; torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, Python {m['python']}, {m['cpu_count']} CPUs."
        + (f" Code: commit {git['commit']}" + (" with uncommitted changes" if git.get("dirty") else "") + "."
           if git.get("commit") else " Code: commit unknown."),
        "",
    ]
    if smoke:
        lines += ["**Smoke test on CPU with tiny sizes: checks that every path runs; the numbers mean nothing.**", ""]
    lines += [
        "Settings: bf16 autocast, channels_last, TF32 and cudnn.benchmark (CUDA), SGD momentum "
        f"{MOMENTUM}, weight decay {WEIGHT_DECAY}, constant LR, synthetic data resident on the device. RigL: 90% "
        "sparsity, ERK, drop fraction α=0.3 held constant. Time: the window of `steps` steps after `warm-up` steps, "
        "between GPU synchronisations; evaluation and setup outside it. Peak = torch.cuda.max_memory_allocated "
        "(reset before each run; includes the data on the GPU). worker = the RigL job (training.devices 1) run "
        "by worker.runner.run_slot on an SQLite JobStore.",
        "",
        "| model | input | batch | warm-up | steps | ΔT | run | images/s | ms/step | peak GPU MiB | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cfg in results["configs"]:
        name = cfg["name"]
        runs, d = results["runs"].get(name, {}), results.get("derived", {}).get(name, {})
        for run in RUNS:
            r = runs.get(run)
            if r is None:
                continue
            shape = "×".join(map(str, cfg["input_shape"]))
            if "error" in r or "skipped" in r:
                note = r.get("skipped") or f"failed: {r['error']}"
                lines.append(f"| {name} | {shape} | {cfg['batch']} | {cfg['warmup']} | {cfg['steps']} | "
                             f"{cfg['delta_t']} | {run} | – | – | – | {note} |")
                continue
            peak = d["peak_mib"].get(run)
            notes = []
            if len(r.get("repeat_seconds", [])) > 1:
                each = sorted(1000 * t / cfg["steps"] for t in r["repeat_seconds"])
                notes.append(f"median of {len(each)} interleaved runs ({', '.join(f'{t:.2f}' for t in each)} ms/step)")
            if run == "worker" and "worker_vs_library" in d:
                notes.append(f"{d['worker_vs_library']:.3f}× the library RigL run")
            if (r.get("baseline_bytes") or 0) > 64 * 2**20:
                notes.append(f"{r['baseline_bytes'] / 2**20:,.0f} MiB already allocated before this run (not counted)")
            if r.get("leak_ok") is False:
                notes.append("LEAK CHECK FAILED")
            lines.append(f"| {name} | {shape} | {cfg['batch']} | {cfg['warmup']} | {cfg['steps']} | {cfg['delta_t']} "
                         f"| {run} | {d['images_per_s'][run]:,.0f} | {d['ms_per_step'][run]:.2f} | "
                         + (f"{peak:,.0f}" if peak is not None else "n/a") + f" | {'; '.join(notes)} |")
    lines += ["", "## Goals", "", "| model | figure | measured | goal | met |", "|---|---|---|---|---|"]
    for cfg in results["configs"]:
        d = results.get("derived", {}).get(cfg["name"], {})
        for key, (label, goal_fmt, value_fmt) in GOAL_TEXT.items():
            g = d.get("goals", {}).get(key)
            if g is None:
                lines.append(f"| {cfg['name']} | {label} | not measured | {goal_fmt.format(GOALS[key])} | – |")
                continue
            lines.append(f"| {cfg['name']} | {label} | {value_fmt.format(g['value'])} | {goal_fmt.format(g['goal'])} "
                         f"| {'met' if g['met'] else 'NOT met'} |")
    lines += ["", "## Mask updates (RigL run)", "",
              "| model | update step's sparsifier.step ms | ordinary step's sparsifier.step ms | ΔT × step ms "
              "| share |",
              "|---|---|---|---|---|"]
    for cfg in results["configs"]:
        u = results.get("derived", {}).get(cfg["name"], {}).get("update")
        if u:
            normal = f"{u['normal_step_ms']:.2f}" if u["normal_step_ms"] is not None else "–"
            lines.append(f"| {cfg['name']} | {u['update_step_ms']:.2f} | {normal} | {u['cycle_ms']:.0f} | "
                         f"{u['update_step_ms'] / u['cycle_ms']:.2%} |")
    lines += ["", "An update step's sparsifier.step = drop/grow of every masked layer (replacing that step's "
              "optimizer step), timed between synchronisations; the median over the window's updates. The ordinary "
              "step's is the masked optimizer step, for scale.", ""]
    if results.get("log"):
        lines += ["## Log", "", *[f"- {line}" for line in results["log"]], ""]
    lines += [f"Raw numbers: `{results['json_name']}`. Command: `{results['command']}`. "
              f"Wall time {results.get('wall_seconds', 0):.0f} s.", ""]
    return "\n".join(lines)


def write(results: dict, paths: list[Path]) -> None:
    summarize(results)
    text = render(results)
    for md in paths:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.with_suffix(".json").write_text(json.dumps(results, indent=2))
        md.write_text(text)


# ---------------------------------------------------------------------------- 2:4 semi-structured (NOT RUN YET)
# Written for issue 16 item 4 without a GPU: this part has never run. `python bench/gpu.py --nm24` on a lent
# GPU times a Linear layer's forward with a 2:4 weight (sparsity.pattern "2:4") converted by
# rigl_core.export.nm.to_semi_structured (torch.sparse.to_sparse_semi_structured) against the same dense
# fp16 matmul, and writes bench/results/gpu_nm24.{md,json}. On CPU it only records why nothing converted.
NM24_SHAPES = [(4096, 4096, 4096), (4096, 11008, 4096), (256, 4096, 4096)]  # (tokens, in, out)


def run_nm24(device, paths: list[Path], iters: int = 50, warmup: int = 10, shapes=NM24_SHAPES) -> dict:
    import torch
    from torch import nn

    from rigl_core.export.nm import to_semi_structured
    from rigl_core.sparse.nm import nm_random_mask

    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": machine(device), "git": commit(), "shapes": [], "iters": iters}
    generator = torch.Generator().manual_seed(0)
    for tokens, d_in, d_out in shapes:
        row = {"tokens": tokens, "in": d_in, "out": d_out}
        layer = nn.Linear(d_in, d_out, bias=False)
        with torch.no_grad():
            layer.weight.mul_(nm_random_mask((d_out, d_in), 2, 4, generator))
        layer = layer.to(device, torch.float16)
        x = torch.randn(tokens, d_in, device=device, dtype=torch.float16)
        dense_weight = layer.weight.detach().clone()

        def timed(fn) -> float:
            for _ in range(warmup):
                fn()
            sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            sync(device)
            return (time.perf_counter() - start) / iters

        with torch.inference_mode():
            row["dense_ms"] = 1000 * timed(lambda: torch.nn.functional.linear(x, dense_weight))
            _, report = to_semi_structured(layer)
            row["report"] = report
            if report["converted"]:
                row["sparse_ms"] = 1000 * timed(lambda: layer(x))
                row["speedup"] = row["dense_ms"] / row["sparse_ms"]
                expected = torch.nn.functional.linear(x, dense_weight).float()
                row["max_rel_error"] = float((layer(x).float() - expected).abs().max() / expected.abs().max())
        results["shapes"].append(row)
        print(f"2:4 {tokens}×{d_in}→{d_out}: dense {row['dense_ms']:.3f} ms, "
              + (f"2:4 {row['sparse_ms']:.3f} ms ({row['speedup']:.2f}×)" if "sparse_ms" in row
                 else f"not converted: {report['reason']}"), flush=True)
    lines = ["# 2:4 semi-structured Linear vs dense fp16 (bench/gpu.py --nm24)", "",
             f"Device {results['machine'].get('gpu') or results['machine']['device']}, torch "
             f"{results['machine']['torch']}; {results['date']}; {iters} timed iterations after {warmup}.", "",
             "| tokens × in → out | dense ms | 2:4 ms | speedup | note |", "|---|---|---|---|---|"]
    for row in results["shapes"]:
        note = row["report"]["reason"] or ""
        lines.append(f"| {row['tokens']} × {row['in']} → {row['out']} | {row['dense_ms']:.3f} | "
                     f"{row.get('sparse_ms', float('nan')):.3f} | {row.get('speedup', float('nan')):.2f} | {note} |")
    for md in paths:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
        md.write_text("\n".join(lines) + "\n")
    return results


# ---------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes; writes gpu_smoke.{md,json}")
    parser.add_argument("--out", type=Path, default=None, help="also write the results into this folder ($OUT)")
    parser.add_argument("--budget-s", type=float, default=None, help="skip parts that would end past this "
                        "many seconds from the start (default 300; 240 with --smoke)")
    parser.add_argument("--only", default=None, help="comma list of model names to run (default: all)")
    parser.add_argument("--nm24", action="store_true", help="only the 2:4 semi-structured Linear timing "
                        "(gpu_nm24.{md,json}; never run yet); with --smoke, on CPU (records why it cannot run)")
    args = parser.parse_args()
    if args.nm24:
        import torch

        device = torch.device("cpu" if args.smoke else "cuda")
        paths = [] if args.smoke else [RESULTS / "gpu_nm24.md"]  # the CPU smoke prints only
        run_nm24(device, paths + ([args.out / "gpu_nm24.md"] if args.out else []), iters=2 if args.smoke else 50,
                 warmup=1 if args.smoke else 10, shapes=[(8, 64, 64)] if args.smoke else NM24_SHAPES)
        return
    started = time.perf_counter()
    budget = args.budget_s or (240.0 if args.smoke else 300.0)

    import torch

    if args.smoke:
        device, configs = torch.device("cpu"), SMOKE_CONFIGS
        order = [(c.name, run) for c in configs for run in RUNS] + [(configs[-1].name, "dense")]  # + a repeat
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --smoke on CPU")
        device, configs = torch.device("cuda"), GPU_CONFIGS
        order = ORDER
    if args.only:
        keep = {n.strip() for n in args.only.split(",")}
        configs = [c for c in configs if c.name in keep]
        order = [(n, r) for n, r in order if n in keep]
    by_name = {c.name: c for c in configs}
    stem = "gpu_smoke" if args.smoke else "gpu"
    paths = [RESULTS / f"{stem}.md"] + ([args.out / f"{stem}.md"] if args.out else [])
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke, "machine": machine(device), "git": commit(),
        "configs": [{**asdict(c), "num_train": c.num_train} for c in configs],
        "specs": {c.name: spec_tree(c, "rigl", str(device)) for c in configs},
        "goals": GOALS, "budget_s": budget, "runs": {c.name: {} for c in configs}, "log": [],
        "command": " ".join(["python bench/gpu.py"] + sys.argv[1:]), "json_name": f"bench/results/{stem}.json",
    }
    m = results["machine"]
    print(f"device {m.get('gpu') or m['device']}, torch {m['torch']}, CUDA {m['cuda']}; budget {budget:.0f} s",
          flush=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    estimates: dict[str, float] = {}  # seconds the last part of a model took: the next one's estimate
    for name, run in order:
        cfg = by_name[name]
        elapsed = time.perf_counter() - started
        estimate = 1.3 * estimates.get(name, 0.0)
        if elapsed + estimate > budget:
            note = f"skipped: {elapsed:.0f} s used, about {estimate:.0f} s more needed, budget {budget:.0f} s"
            results["runs"][name][run] = {"skipped": note}
            results["log"].append(f"{name} {run}: {note}")
            print(f"[{elapsed:5.0f} s] {name} {run}: {note}", flush=True)
            write(results, paths)
            continue
        print(f"[{elapsed:5.0f} s] {name} {run} ...", flush=True)
        part_started = time.perf_counter()
        reset_memory(device)
        baseline = allocated(device)  # what earlier parts left behind (should be ~0)
        try:
            if run == "minimal":
                r = run_minimal(cfg, device, channels_last=True)
            elif run == "worker":
                r = run_worker(cfg, device)
            else:
                r = run_trainer(cfg, run, device)
            r["peak_bytes"] = peak_memory(device)
            r["baseline_bytes"] = baseline
        except Exception as exc:  # noqa: BLE001 - one part failing must not lose the others' figures
            traceback.print_exc()
            r = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            results["log"].append(f"{name} {run}: {r['error']}")
        part_seconds = time.perf_counter() - part_started
        r["part_seconds"] = part_seconds
        earlier = results["runs"][name].get(run)
        if earlier and "seconds" in earlier and "seconds" in r:  # a repeat: keep every one, report the median
            r["repeat_seconds"] = earlier.get("repeat_seconds", [earlier["seconds"]]) + [r["seconds"]]
            r["seconds"] = statistics.median(r["repeat_seconds"])
            r["peak_bytes"] = max(r["peak_bytes"] or 0, earlier.get("peak_bytes") or 0) or None
            if "updates" in r and "updates" in earlier:
                r["updates"] = {key: earlier["updates"][key] + r["updates"][key] for key in r["updates"]}
        estimates[name] = max(estimates.get(name, 0.0), part_seconds)
        results["runs"][name][run] = r
        if "seconds" in r:
            ips = cfg.steps * cfg.batch / r["seconds"]
            peak = f", peak {r['peak_bytes'] / 2**20:,.0f} MiB" if r.get("peak_bytes") else ""
            print(f"          {ips:,.0f} images/s, {1000 * r['seconds'] / cfg.steps:.2f} ms/step{peak} "
                  f"(part {part_seconds:.0f} s)", flush=True)
        results["wall_seconds"] = time.perf_counter() - started
        write(results, paths)
    results["wall_seconds"] = time.perf_counter() - started
    write(results, paths)
    print()
    print(render(results))
    print(f"wrote {', '.join(str(p) for p in paths)} (+ .json), {results['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
