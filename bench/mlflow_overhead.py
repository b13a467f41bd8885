"""Per-step cost of MLflow logging, side by side (issue "Fit the tools ML teams already run").

Trains the same digits MLP with and without the MLflow callback (rigl_core/integrations/mlflow.py)
against a real `mlflow server` (SQLite backend, local artifact root) that this script starts on a free
127.0.0.1 port, the variants taking turns within each repeat so that other load on the machine falls
on both. Two figures per setting of log_every_steps (1: every step logged, the worst case; 10: the
default):
- `hooks`: time spent inside the callback's hooks on the training thread (on_step, on_eval,
  on_mask_update: buffering and handing batches to the sender thread), per training step, over the
  mean step time without MLflow. This is what the callback adds to the step itself.
- `wall`: the median train_seconds per step with the callback over the median without (includes the
  sender thread's CPU, which competes with training on a small machine).
The run's final `finish` (artifacts, the ONNX model) happens after training and is timed apart.

    python bench/mlflow_overhead.py [--repeats 5] [--epochs 10]

Writes bench/results/mlflow_overhead.md (and .json next to it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    log = open(folder / "server.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                f"sqlite:///{folder / 'mlflow.db'}", "--default-artifact-root", str(folder / "art"),
                                "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    while True:
        if process.poll() is not None:
            raise SystemExit((folder / "server.log").read_text()[-2000:])
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)


class Timed:
    """Wraps a callback, adding up the time spent in its hooks."""

    def __init__(self, inner):
        self.inner, self.seconds = inner, 0.0

    def __getattr__(self, name):
        hook = getattr(self.inner, name)
        if name not in ("on_step", "on_eval", "on_mask_update", "should_stop"):
            return hook

        def timed(*args):
            tick = time.perf_counter()
            try:
                return hook(*args)
            finally:
                self.seconds += time.perf_counter() - tick
        return timed


def train(uri: str | None, epochs: int, log_every: int) -> dict:
    import torch

    from rigl_core.integrations.mlflow import MlflowCallback, MlflowTarget
    from rigl_core.spec import JobSpec
    from rigl_core.training.trainer import Trainer

    torch.set_num_threads(1)
    spec = JobSpec.model_validate({"model": {"name": "mlp"}, "dataset": {"name": "digits"},
                                   "training": {"epochs": epochs, "batch_size": 64, "log_every_steps": log_every},
                                   "export": {"latency": False}})
    callback = None
    if uri is not None:
        callback = MlflowCallback(MlflowTarget(uri, "overhead"), params=spec.model_dump(mode="json"))
        timed = Timed(callback)
        callback.start(wait=60)  # as the worker does, the run opens before the first step
    trainer = Trainer(spec, callbacks=[timed] if callback else [])
    report = trainer.fit()
    out = {"steps": trainer.step, "train_seconds": report["train_seconds"], "hook_seconds": 0.0}
    if callback is not None:
        out["hook_seconds"] = timed.seconds
        tick = time.perf_counter()
        callback.finish("succeeded", report)
        out["finish_seconds"] = time.perf_counter() - tick
        assert callback.info() is not None and not callback.sender.broken
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="mlflow-overhead-"))
    process, uri = start_server(folder)
    rows = []
    try:
        for log_every in (1, 10):
            plain, logged = [], []
            for _ in range(args.repeats):
                plain.append(train(None, args.epochs, log_every))
                logged.append(train(uri, args.epochs, log_every))
            steps = plain[0]["steps"]
            step_plain = statistics.median(r["train_seconds"] for r in plain) / steps
            step_logged = statistics.median(r["train_seconds"] for r in logged) / steps
            hooks = statistics.median(r["hook_seconds"] for r in logged) / steps
            rows.append({"log_every_steps": log_every, "steps": steps, "step_ms_without": step_plain * 1e3,
                         "step_ms_with": step_logged * 1e3, "hooks_us_per_step": hooks * 1e6,
                         "hooks_share": hooks / step_plain, "wall_share": step_logged / step_plain - 1,
                         "finish_seconds": statistics.median(r["finish_seconds"] for r in logged)})
    finally:
        os.killpg(process.pid, signal.SIGKILL)
    import mlflow

    meta = {"python": platform.python_version(), "mlflow": mlflow.__version__, "cpus": os.cpu_count(),
            "machine": platform.machine(), "repeats": args.repeats, "epochs": args.epochs}
    (ROOT / "bench/results/mlflow_overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# MLflow logging overhead per training step", "",
             "`python bench/mlflow_overhead.py` (digits MLP, batch 64, one torch thread, a local `mlflow server` "
             f"with SQLite; {args.repeats} repeats of {args.epochs} epochs, variants alternating; medians). "
             f"MLflow {meta['mlflow']}, Python {meta['python']}, {meta['cpus']} CPUs (shared VM).", "",
             "| log_every_steps | steps | step without (ms) | step with (ms) | hooks per step (µs) | hooks / step "
             "| wall change | finish (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['log_every_steps']} | {r['steps']} | {r['step_ms_without']:.3f} | {r['step_ms_with']:.3f} "
                     f"| {r['hooks_us_per_step']:.1f} | {100 * r['hooks_share']:.2f}% | {100 * r['wall_share']:+.1f}% "
                     f"| {r['finish_seconds']:.2f} |")
    lines += ["", "`hooks`: time inside the callback on the training thread (buffering metrics, handing a "
              "log_batch to the sender thread at most every 5 s, the per-layer "
              "sparsity at evaluations). `wall change`: median train time per step with the callback over "
              "without; on 2 shared cores it includes the sender thread's CPU and the machine's noise. "
              "`finish`: ending the run after training (final metrics, set_terminated), not per step.", ""]
    (ROOT / "bench/results/mlflow_overhead.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
