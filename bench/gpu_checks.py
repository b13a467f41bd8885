"""CUDA checks of issue 12's features that CPU tests cannot reach: run after bench/gpu.py in the same lease.

Each check trains a small job on the GPU and asserts what the CPU tests assert (masks exact, nnz at
target, finite weights), recording its wall time:

  stream      a streamed imagefolder (generated JPEGs) with 4 decoding workers, pinned memory and
              non-blocking copies, ResNet-18 at 64², bf16 + channels_last (auto); data_wait_share
  fp16        fp16 autocast + GradScaler on WRN-22-2 (synthetic), with accumulation 2 and clipping
  compile     torch.compile (inductor) on WRN-22-2: masks exact, and their agreement with the eager run's
  auto        precision/channels_last/devices 'auto'/'all' resolve to bf16, NHWC, 1 on one GPU

    python bench/gpu_checks.py --out DIR          # writes bench/results/gpu_checks.md (+ DIR/)
    python bench/gpu_checks.py --smoke            # CPU, to test the script: gpu_checks_smoke.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def make_folder(root: Path, classes: int = 4, per_class: int = 48, size: tuple[int, int] = (160, 120)) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", per_class // 4)):
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                base = np.full((size[1], size[0], 3), 40 + 50 * label, dtype=np.uint8)
                noise = rng.integers(0, 60, size=base.shape, dtype=np.uint8)
                Image.fromarray(base + noise).save(folder / f"{index}.jpg", quality=90)
    return root


def spec(tree: dict):
    from rigl_core.spec import JobSpec

    return JobSpec.model_validate(tree)


def masks_exact(trainer) -> bool:
    import torch

    ok = trainer.leak_check()["ok"]
    for layer in trainer.sparsifier.layers:
        ok &= int(trainer.sparsifier.masks[layer.name].sum()) == trainer.sparsifier.target_active[layer.name]
    return bool(ok and all(torch.isfinite(p).all() for p in trainer.model.parameters()))


def check_stream(device: str, smoke: bool) -> dict:
    from rigl_core.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp), per_class=8 if smoke else 48)
        trainer = Trainer(spec({
            "model": {"name": "resnet18"},
            "dataset": {"name": "imagefolder", "path": str(folder), "image_size": 32 if smoke else 64,
                        "workers": 2 if smoke else 4},
            "sparsity": {"method": "rigl", "sparsity": 0.9, "schedule": {"delta_t": 5}},
            "training": {"epochs": 2, "batch_size": 16 if smoke else 32, "device": device, "log_every_steps": 1}}))
        report = trainer.fit()
    return {"ok": masks_exact(trainer) and report["completed"], "steps": report["steps"],
            "precision": report["precision"], "channels_last": report["channels_last"],
            "data_wait_share": round(report["data_wait_share"], 3),
            "val_accuracy": report["final_metrics"]["val_accuracy"]}


def wrn(device: str, smoke: bool, **training) -> object:
    return spec({
        "model": {"name": "wrn-22-2"},
        "dataset": {"name": "synthetic", "num_samples": 320 if smoke else 5120, "input_shape": [3, 32, 32]},
        "sparsity": {"method": "rigl", "sparsity": 0.9, "schedule": {"delta_t": 4 if smoke else 10}},
        "training": {"epochs": 1, "batch_size": 32 if smoke else 128, "device": device, **training}})


def check_fp16(device: str, smoke: bool) -> dict:
    from rigl_core.training.trainer import Trainer

    trainer = Trainer(wrn(device, smoke, precision="fp16", accumulate_steps=2, clip_grad_norm=1.0))
    report = trainer.fit()
    return {"ok": masks_exact(trainer) and trainer.scaler is not None, "steps": report["steps"],
            "skipped_steps": trainer.sparsifier.skipped_steps, "scale": float(trainer.scaler.get_scale())}


def check_compile(device: str, smoke: bool) -> dict:
    from rigl_core.training.trainer import Callback, Trainer

    class Log(Callback):
        def __init__(self):
            self.masks = []

        def on_mask_update(self, trainer, update):
            self.masks.append({n: m.clone() for n, m in trainer.sparsifier.masks.items()})

    runs = {}
    for compiled in (False, True):
        log = Log()
        trainer = Trainer(wrn(device, smoke, compile=compiled, precision="fp32", tf32=False), callbacks=[log])
        tick = time.perf_counter()
        trainer.fit()
        runs[compiled] = (trainer, log, time.perf_counter() - tick)
    (_, eager_log, eager_s), (fast, fast_log, fast_s) = runs[False], runs[True]
    # inductor's kernels round differently from eager ones, so near-ties in the top-k may differ
    agreement = min(sum(int((a[n] == b[n]).sum()) for n in a) / sum(a[n].numel() for n in a)
                    for a, b in zip(eager_log.masks, fast_log.masks))
    return {"ok": masks_exact(fast) and len(fast_log.masks) == len(eager_log.masks) > 0,
            "updates": len(fast_log.masks), "min_mask_agreement_with_eager": round(agreement, 5),
            "eager_s": round(eager_s, 1), "compiled_s_incl_compilation": round(fast_s, 1)}


def check_auto(device: str, smoke: bool) -> dict:
    from rigl_core.training.trainer import Trainer

    trainer = Trainer(wrn(device, smoke, devices="all", max_steps=2))
    return {"ok": True, "precision": trainer.precision, "channels_last": trainer.channels_last,
            "devices": trainer.world_size, "accumulate_steps": trainer.accumulate_steps, "tf32": trainer.tf32}


CHECKS = {"stream": check_stream, "fp16": check_fp16, "compile": check_compile, "auto": check_auto}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import torch

    device = "cpu" if args.smoke else "cuda"
    stem = "gpu_checks_smoke" if args.smoke else "gpu_checks"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": name, "torch": torch.__version__, "checks": {}}
    for check, run in CHECKS.items():
        tick = time.perf_counter()
        try:
            results["checks"][check] = run(device, args.smoke)
        except Exception as exc:  # noqa: BLE001 - report every check
            traceback.print_exc()
            results["checks"][check] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        results["checks"][check]["seconds"] = round(time.perf_counter() - tick, 1)
        print(check, results["checks"][check], flush=True)
    lines = [f"# CUDA checks of issue 12's features ({results['date']})", "",
             f"Device: {name}, torch {results['torch']}. Command: `python bench/gpu_checks.py` "
             "(after bench/gpu.py, same lease). Each row trains a small job and checks masks exact "
             "(no weight at a masked position, nnz at target) and weights finite.", "",
             "| check | ok | seconds | details |", "|---|---|---|---|"]
    for check, row in results["checks"].items():
        details = ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("ok", "seconds"))
        lines.append(f"| {check} | {'yes' if row['ok'] else '**no**'} | {row['seconds']} | {details} |")
    text = "\n".join(lines) + "\n"
    for folder in [RESULTS] + ([args.out] if args.out else []):
        (folder / f"{stem}.md").write_text(text)
        (folder / f"{stem}.json").write_text(json.dumps(results, indent=2))
    print(text)


if __name__ == "__main__":
    main()
