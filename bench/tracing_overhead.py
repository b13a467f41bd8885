"""What tracing costs (service_common/tracing.py, rigl_core/integrations/tracing.py): per API request and per
training step, tracing on against off, side by side in one process.

On is the production path: OTEL_EXPORTER_OTLP_ENDPOINT set, a BatchSpanProcessor and the OTLP/HTTP exporter
sending to a real receiver (tests/helpers/tracing.py's, in a process of its own, so its decoding doesn't
share this process's interpreter lock).

  requests  API apps in process (FastAPI's TestClient, SQLite): two made before tracing was set up (off, and
            control: FastAPI's telemetry off, engines unwrapped), one after (on: request spans, SQL spans). The
            requests rotate between them: GET /v1/jobs/{id}, GET /v1/jobs?limit=20 and POST /v1/jobs.
            Reported: median wall and CPU time of each, the median paired difference, and control − off
            (what noise alone shows).
  training  Trainer.fit on digits (MLP, RigL 90% ERK), tracing on (a configured provider: epoch and mask-update
            spans), off and control (off again), rotated. Two schedules: ΔT=100 (the default) and ΔT=5 (a mask
            update every 5 steps: the worst case for the per-update spans). Timed: trainer.train_seconds and
            the process's CPU time, per step. Then each span's own CPU cost, export included, and what it
            comes to at those counts: the floor that side-by-side runs on a shared machine can't resolve.
  install   the `otel` extra's installed size, and what it adds to the `service` and `test` installs.

    python bench/tracing_overhead.py        # ~4 min on the shared 2-core VM

Writes bench/results/tracing_overhead.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from overhead import git_state, loadavg, machine_info  # noqa: E402
from helpers.service import JOB, free_port  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MODES = ("off", "on", "control")  # control: tracing off again, so the table shows what noise alone looks like


def receive(port: int, counts) -> None:
    """The OTLP receiver's process: counts the spans it decoded."""
    from helpers.tracing import OtlpReceiver

    with OtlpReceiver(port) as receiver:
        while True:
            counts.value = len(receiver.spans)
            time.sleep(0.2)


def timed(call) -> tuple[float, float]:
    """(wall ms, CPU ms of this process: every thread, the exporter's included)."""
    started, cpu = time.perf_counter(), time.process_time()
    call()
    return (time.perf_counter() - started) * 1000, (time.process_time() - cpu) * 1000


def bench_requests(repeats: int, posts: int) -> dict:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from service_common import tracing
    from store.settings import Settings

    def app(folder: str):
        settings = Settings(data_dir=folder, max_active_jobs_per_owner=10 ** 6).resolved()
        return TestClient(create_app(settings, enqueue=lambda _job_id: None, reaper=False))

    off, control = app(tempfile.mkdtemp()), app(tempfile.mkdtemp())  # before setup: nothing instrumented
    assert tracing.setup("rigl-api") and tracing.enabled()
    on = app(tempfile.mkdtemp())
    results: dict = {}
    with off, control, on:
        clients = {"off": off, "on": on, "control": control}  # control: a second "off", the noise floor
        ids = {mode: client.post("/v1/jobs", json=JOB).json()["id"] for mode, client in clients.items()}
        calls = {
            "GET /v1/jobs/{id}": lambda mode: clients[mode].get(f"/v1/jobs/{ids[mode]}"),
            "GET /v1/jobs?limit=20": lambda mode: clients[mode].get("/v1/jobs?limit=20"),
            "POST /v1/jobs": lambda mode: clients[mode].post("/v1/jobs", json=JOB),
        }
        for route, call in calls.items():
            n = posts if route.startswith("POST") else repeats
            for mode in clients:  # warm-up
                for _ in range(5):
                    call(mode)
            times = {mode: [] for mode in MODES}
            cpu = {mode: [] for mode in MODES}
            for i in range(n):
                for mode in MODES[i % 3:] + MODES[:i % 3]:  # order rotated
                    wall, used = timed(lambda: call(mode))
                    times[mode].append(wall)
                    cpu[mode].append(used)
            paired = [b - a for a, b in zip(times["off"], times["on"])]
            results[route] = {"n": n, "median_off_ms": statistics.median(times["off"]),
                              "median_on_ms": statistics.median(times["on"]),
                              "median_paired_diff_ms": statistics.median(paired),
                              "overhead_ms": statistics.median(times["on"]) - statistics.median(times["off"]),
                              "median_cpu_off_ms": statistics.median(cpu["off"]),
                              "median_cpu_on_ms": statistics.median(cpu["on"]),
                              "cpu_overhead_ms": statistics.median(cpu["on"]) - statistics.median(cpu["off"]),
                              "control_overhead_ms": statistics.median(times["control"]) - statistics.median(times["off"]),
                              "control_cpu_overhead_ms": statistics.median(cpu["control"]) - statistics.median(cpu["off"])}
            results[route].update(amortized(call, max(20, n // 10)))
            print(route, {k: round(v, 3) if isinstance(v, float) else v for k, v in results[route].items()},
                  flush=True)
    tracing.flush()
    return results


def amortized(call, n: int, rounds: int = 5) -> dict:
    """CPU per request with the spans' export counted: blocks of `n` requests of one mode, the exporter flushed
    at the end of each (the batch exporter works in a thread of its own, so in the rotation above its cost
    lands on whichever request runs meanwhile, any mode's). Median over `rounds` rotations of the blocks."""
    from service_common import tracing

    per = {mode: [] for mode in MODES}
    for i in range(rounds):
        for mode in MODES[i % 3:] + MODES[:i % 3]:
            tracing.flush()
            started = time.process_time()
            for _ in range(n):
                call(mode)
            tracing.flush()
            per[mode].append((time.process_time() - started) / n * 1000)
    off = statistics.median(per["off"])
    return {"amortized_block": n, "amortized_cpu_off_ms": off,
            "amortized_cpu_overhead_ms": statistics.median(per["on"]) - off,
            "amortized_control_overhead_ms": statistics.median(per["control"]) - off}


class MaskUpdates:
    """Counts the mask updates of a fit (on and off alike)."""

    def __init__(self):
        self.count = 0

    def on_step(self, trainer, metrics): ...

    def on_eval(self, trainer, metrics): ...

    def on_mask_update(self, trainer, update):
        self.count += 1

    def should_stop(self, trainer):
        return False


def span_costs(n: int = 5000) -> dict:
    """CPU µs of each thing the training loop does when tracing is on, export included (flushed at the end):
    the per-step clock read, one mask-update span, one epoch span."""
    from types import SimpleNamespace

    from rigl_core.integrations.tracing import training_tracer
    from rigl_core.sparse.updates import LayerUpdate, MaskUpdate
    from service_common import tracing

    tracer = training_tracer()
    layer = LayerUpdate(**{name: 1 for name in LayerUpdate.__dataclass_fields__})
    update = MaskUpdate(step=100, drop_fraction=0.3, layers={"fc1": layer, "fc2": layer, "fc3": layer})
    trainer = SimpleNamespace(epoch=0, step=0, eval_history=[])

    def cost(call, count):
        started = time.process_time()
        for _ in range(count):
            call()
        tracing.flush()
        return (time.process_time() - started) / count * 1e6

    def epoch():
        with tracer.epoch(trainer):
            pass

    return {"clock_read_us": cost(tracer.now, n * 20), "mask_update_span_us": cost(lambda: tracer.mask_update(update, 0), n),
            "epoch_span_us": cost(epoch, n)}


def bench_training(repeats: int, epochs: int) -> dict:
    from opentelemetry import trace

    from helpers.specs import small_spec
    from helpers.tracing import reset_global_provider
    from rigl_core.training.trainer import Trainer

    provider = trace.get_tracer_provider()  # bench_requests' (OTLP over HTTP, batched)
    results = {}
    for delta_t in (100, 5):
        spec = small_spec(training__epochs=epochs, sparsity__schedule__delta_t=delta_t, training__log_every_steps=50)
        per_step = {mode: [] for mode in MODES}
        cpu_per_step = {mode: [] for mode in MODES}
        for i in range(repeats + 1):
            for mode in MODES[i % 3:] + MODES[:i % 3]:
                reset_global_provider()
                if mode == "on":
                    trace.set_tracer_provider(provider)
                updates = MaskUpdates()
                trainer = Trainer(spec, callbacks=[updates])
                cpu = time.process_time()
                trainer.fit()
                cpu = time.process_time() - cpu
                assert (trainer.tracer is not None) == (mode == "on")
                if i:  # the first round warms up
                    per_step[mode].append(trainer.train_seconds / trainer.step * 1000)
                    cpu_per_step[mode].append(cpu / trainer.step * 1000)
        ratios = [b / a for a, b in zip(per_step["off"], per_step["on"])]
        results[f"delta_t={delta_t}"] = {
            "steps": trainer.step, "epochs": epochs, "mask_updates": updates.count, "repeats": repeats,
            "median_off_ms_per_step": statistics.median(per_step["off"]),
            "median_on_ms_per_step": statistics.median(per_step["on"]),
            "median_paired_ratio": statistics.median(ratios),
            "ratio_of_medians": statistics.median(per_step["on"]) / statistics.median(per_step["off"]),
            "ratio_of_minima": min(per_step["on"]) / min(per_step["off"]),
            "median_cpu_off_ms_per_step": statistics.median(cpu_per_step["off"]),
            "median_cpu_on_ms_per_step": statistics.median(cpu_per_step["on"]),
            "cpu_ratio_of_medians": statistics.median(cpu_per_step["on"]) / statistics.median(cpu_per_step["off"]),
            "control_paired_ratio": statistics.median(c / a for a, c in zip(per_step["off"], per_step["control"])),
            "control_cpu_ratio_of_medians": statistics.median(cpu_per_step["control"])
            / statistics.median(cpu_per_step["off"]),
            "per_repeat": [round(r, 3) for r in ratios]}
        print(f"ΔT={delta_t}", {k: v for k, v in results[f"delta_t={delta_t}"].items() if k != "per_repeat"},
              flush=True)
    reset_global_provider()
    trace.set_tracer_provider(provider)
    costs = span_costs()
    for r in results.values():  # what the loop's spans cost at these counts, against the CPU of a step
        spans_ms = (r["steps"] * costs["clock_read_us"] + r["mask_updates"] * costs["mask_update_span_us"]
                    + r["epochs"] * costs["epoch_span_us"]) / 1000
        r["expected_share"] = spans_ms / (r["median_cpu_off_ms_per_step"] * r["steps"])
    results["span_costs"] = costs
    print(costs, flush=True)
    return results


def closure(requirements: list[str], extras: dict) -> set[str]:
    """The installed distributions `requirements` bring (this project's own extras expanded)."""
    import importlib.metadata as metadata

    from packaging.requirements import Requirement

    seen, stack = set(), [Requirement(r) for r in requirements]
    while stack:
        requirement = stack.pop()
        name = requirement.name.lower().replace("_", "-")
        if name == "rigl-service":
            stack += [Requirement(r) for extra in requirement.extras for r in extras[extra]]
            continue
        key = (name, tuple(sorted(requirement.extras)))
        if key in seen:
            continue
        seen.add(key)
        for text in metadata.distribution(name).requires or []:
            child = Requirement(text)
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in ("", *requirement.extras)):
                stack.append(child)
    return {name for name, _extras in seen}


def install_size() -> dict:
    """What the `otel` extra adds to an install of the `service` extra (the images), and to `test` without it."""
    import importlib.metadata as metadata
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def size(name: str) -> int:
        dist = metadata.distribution(name)
        return sum(os.path.getsize(dist.locate_file(f)) for f in dist.files or [] if os.path.exists(dist.locate_file(f)))

    otel = closure(extras["otel"], extras)
    report = {"otel_closure": sorted(otel), "otel_closure_mb": sum(map(size, otel)) / 1e6}
    for base in ("service", "test"):
        others = closure([r.replace(",otel", "") for r in extras[base]], extras)  # test names otel among its extras
        added = sorted(otel - others)
        report[f"added_to_{base}"] = added
        report[f"added_to_{base}_mb"] = sum(map(size, added)) / 1e6
    return report


def write(report: dict) -> None:
    m, req, train = report["machine"], report["requests"], dict(report["training"])
    lines = [
        "# Tracing overhead: OpenTelemetry on vs off (per API request, per training step)", "",
        f"Date: {report['date']}. Machine: {m['nproc']} cores, {m['cpu']}, torch {m['torch']}, "
        f"{m['threads']} torch thread(s), Python {m['python']}. Load average at start {report['load_start']}, "
        f"at end {report['load_end']} (shared machine; on and off interleaved). Code: commit "
        f"{report['git'].get('commit')}{' with uncommitted changes' if report['git'].get('rigl_core_dirty') else ''}. "
        f"Command: `{report['command']}`. Wall time {report['wall_seconds']:.0f} s.", "",
        "On: OTEL_EXPORTER_OTLP_ENDPOINT set, BatchSpanProcessor, OTLP/HTTP exporter to a receiver in another "
        f"process ({report['spans_received']} spans received). Off: what a deployment without OTEL_* runs. "
        "Control: off again, measured the same way in the same rotation: its distance from off is what noise "
        "alone does to these numbers on this machine, so an on − off inside it is no measurable cost.", "",
        "## Per request (in process, TestClient, SQLite; goal ≤ 1 ms)", "",
        "Wall: the request's latency (the goal's measure: medians, the modes rotated request by request). CPU: this "
        "process's CPU time during it, every thread included, far less swayed by the other load. Blocks: "
        "CPU per request over blocks of one mode with the batch exporter flushed at each block's end, so the "
        "export of the spans (in the exporter's own thread, off the request's path) is counted too.", "",
        "| request | n (each) | wall off ms | wall on ms | on − off (medians) | median paired difference | "
        "CPU off ms | CPU on ms | CPU on − off (medians) | control − off: wall, CPU (medians) | "
        "CPU on − off, export included (blocks) | control − off (blocks) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for route, r in req.items():
        lines.append(f"| `{route}` | {r['n']} | {r['median_off_ms']:.3f} | {r['median_on_ms']:.3f} | "
                     f"{r['overhead_ms']:.3f} | {r['median_paired_diff_ms']:.3f} | {r['median_cpu_off_ms']:.3f} | "
                     f"{r['median_cpu_on_ms']:.3f} | {r['cpu_overhead_ms']:.3f} | "
                     f"{r['control_overhead_ms']:.3f}, {r['control_cpu_overhead_ms']:.3f} | "
                     f"{r['amortized_cpu_overhead_ms']:.3f} | {r['amortized_control_overhead_ms']:.3f} |")
    lines += ["", "## Per training step (Trainer.fit, digits MLP, RigL 90% ERK, CPU; goal ≤ 1%)", "",
              "Wall: trainer.train_seconds (training, not evaluation) per step. CPU: the process's CPU time of the "
              "whole fit (evaluation included) per step.", "",
              "| schedule | steps | mask updates | repeats | wall off ms/step | wall on ms/step | "
              "median paired on/off | ratio of medians | ratio of minima | CPU off ms/step | CPU on ms/step | "
              "CPU on/off | control/off: paired wall, CPU |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    costs = train.pop("span_costs")
    for name, r in train.items():
        lines.append(f"| {name.replace('delta_t', 'ΔT')} | {r['steps']} | {r['mask_updates']} | {r['repeats']} | "
                     f"{r['median_off_ms_per_step']:.3f} | {r['median_on_ms_per_step']:.3f} | "
                     f"{r['median_paired_ratio']:.4f} | {r['ratio_of_medians']:.4f} | {r['ratio_of_minima']:.4f} | "
                     f"{r['median_cpu_off_ms_per_step']:.3f} | {r['median_cpu_on_ms_per_step']:.3f} | "
                     f"{r['cpu_ratio_of_medians']:.4f} | {r['control_paired_ratio']:.4f}, "
                     f"{r['control_cpu_ratio_of_medians']:.4f} |")
    size = report["install"]
    lines += ["", "## Install size of the `otel` extra", "",
              f"Its packages with their dependencies: {len(size['otel_closure'])} distributions, "
              f"{size['otel_closure_mb']:.1f} MB installed. Added to an install of the `service` extra (the images): "
              f"{len(size['added_to_service'])}, {size['added_to_service_mb']:.1f} MB "
              f"({', '.join(size['added_to_service'])}). Added to the rest of `test`: {len(size['added_to_test'])}, "
              f"{size['added_to_test_mb']:.1f} MB. Sizes: the files each distribution's RECORD lists, on this machine."]
    lines += ["", f"Span costs (CPU, export included, {m['nproc']}-core machine above): the clock read every step "
              f"{costs['clock_read_us']:.3f} µs, a mask-update span {costs['mask_update_span_us']:.1f} µs, an epoch span "
              f"{costs['epoch_span_us']:.1f} µs. At the counts above that is "
              + ", ".join(f"{100 * r['expected_share']:.3f}% of the CPU of the {name.replace('delta_t', 'ΔT')} run"
                          for name, r in train.items())
              + " (the floor the side-by-side runs can't resolve on a shared machine).", "",
              "Per-repeat on/off ratios: " + "; ".join(f"{name}: {', '.join(map(str, r['per_repeat']))}"
                                                          for name, r in train.items()), "",
              "Raw numbers: `bench/results/tracing_overhead.json`.", ""]
    (RESULTS / "tracing_overhead.md").write_text("\n".join(lines))
    (RESULTS / "tracing_overhead.json").write_text(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=800, help="GETs of each kind per mode")
    parser.add_argument("--posts", type=int, default=300, help="POST /v1/jobs per mode")
    parser.add_argument("--repeats", type=int, default=20, help="training runs per mode and schedule")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    os.environ.pop("OTEL_SDK_DISABLED", None)
    port = free_port()
    spawn = multiprocessing.get_context("spawn")
    counts = spawn.Value("i", 0)
    receiver = spawn.Process(target=receive, args=(port, counts), daemon=True)
    receiver.start()
    os.environ.update(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}", OTEL_SERVICE_NAME="rigl-bench")
    started, load_start = time.perf_counter(), loadavg()
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "git": git_state(), "load_start": load_start,
              "command": "python bench/tracing_overhead.py " + " ".join(sys.argv[1:]),
              "requests": bench_requests(args.requests, args.posts),
              "training": bench_training(args.repeats, args.epochs), "install": install_size()}
    from service_common import tracing

    tracing.flush()
    time.sleep(1)
    report.update(load_end=loadavg(), wall_seconds=time.perf_counter() - started, spans_received=counts.value)
    receiver.terminate()
    write(report)
    print((RESULTS / "tracing_overhead.md").read_text())


if __name__ == "__main__":
    main()
