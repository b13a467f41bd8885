"""Condensed (constant fan-in) inference vs dense and CSR on CPU, measured side by side in one run.

1. Single linear layers of the SRigL paper's benchmark sizes (768→3072 and 3072→768) at 80/90/95/99%
   sparsity, batch 1 and 256: dense `F.linear`, torch.sparse CSR, condensed eager (the plain-PyTorch
   gather + multiply + sum), condensed under `torch.compile` (Inductor, the same expression), condensed with
   the compiled C kernel (`rigl_core/export/condensed_kernel.py`, uint8/int16/int32 indices as stored), and
   onnxruntime on the ONNX export of the condensed layer and of the dense one.
2. Whole models at batch 1 and 64: the MLP (LeNet-300-100 on 1×28×28), `vit-small` (3×32×32) and
   ResNet-18-CIFAR, with random constant fan-in masks at the ERK layer densities of rigl_core's plan (90%),
   each condensed layer swapped by `load_condensed` from a real condensed export. Every layer is fan-in
   (`dense_first_layer: false`); `mlp-dense-first` is the MLP as method srigl trains it by default, its first
   layer (784→300, 88% of the MLP's weights) dense.

One thread everywhere (torch and onnxruntime); median of `--repeats` rounds, each backend timed in turn in
every round so the load of other processes hits them alike; speed-up = dense / backend.

    PYTHONPATH=. python bench/condensed_inference.py     # writes bench/results/condensed_inference.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from inference import CSRLinear, median_ms, ort_session, sparse_variant, write_results  # noqa: E402
from overhead import machine_info  # noqa: E402

from rigl_core.export.condensed import save_condensed  # noqa: E402
from rigl_core.export.condensed_kernel import reference_matmul, unavailable  # noqa: E402
from rigl_core.export.condensed_layers import CondensedLinear, load_condensed  # noqa: E402
from rigl_core.export.onnx import export_onnx  # noqa: E402
from rigl_core.models.registry import build_model  # noqa: E402
from rigl_core.sparse.plan import make_plan  # noqa: E402
from rigl_core.spec import SparsitySpec  # noqa: E402

LAYERS = ((768, 3072), (3072, 768))
LAYER_SPARSITIES = (0.8, 0.9, 0.95, 0.99)
LAYER_BATCHES = (1, 256)
MODELS = {"mlp": [1, 28, 28], "mlp-dense-first": [1, 28, 28], "vit-small": [3, 32, 32], "resnet18-cifar": [3, 32, 32]}
DENSE_FIRST = "-dense-first"  # the model with its first layer dense: what method srigl trains by default
MODEL_BATCHES = (1, 64)
warnings.filterwarnings("ignore")


def fan_in_mask(rows: int, fan_in: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Exactly k random inputs on every output row."""
    chosen = torch.rand(rows, fan_in, generator=generator).topk(k, dim=1).indices
    return torch.zeros(rows, fan_in, dtype=torch.bool).scatter_(1, chosen, True)


def layer_rows(args) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for fan_in, out in LAYERS:
        for sparsity in LAYER_SPARSITIES:
            k = max(1, round((1 - sparsity) * fan_in))
            linear = nn.Linear(fan_in, out)
            mask = fan_in_mask(out, fan_in, k, generator)
            with torch.no_grad():
                linear.weight.mul_(mask)
            dense = nn.Linear(fan_in, out)  # an unmasked layer of the same shape: the reference
            masks = {"": mask}
            csr = CSRLinear(linear)
            folder = Path(tempfile.mkdtemp())
            model = nn.Sequential(linear)
            save_condensed(model, {"0": mask}, folder / "c.safetensors")
            condensed = load_condensed(copy.deepcopy(model), folder / "c.safetensors")[0].eval()
            torch._dynamo.reset()  # each layer its own compiled graph (one code object, many shapes)
            compiled = torch.compile(lambda x, c=condensed: reference_matmul(x, c.indices, c.values) + c.bias)
            sessions = {"ort_condensed": ort_session(export_onnx(condensed, [fan_in], folder / "c.onnx"), 1),
                        "ort_dense": ort_session(export_onnx(dense, [fan_in], folder / "d.onnx"), 1)}
            del masks
            for batch in LAYER_BATCHES:
                x = torch.randn(batch, fan_in)
                xn = x.numpy()
                with torch.inference_mode():
                    expected = linear(x)
                    for fn in (csr, condensed, compiled):
                        assert torch.allclose(fn(x), expected, atol=1e-3)
                fns = {"dense": lambda: dense(x), "csr": lambda: csr(x),
                       "condensed_eager": lambda: reference_matmul(x, condensed.indices, condensed.values),
                       "condensed_compiled": lambda: compiled(x),
                       "condensed": lambda: condensed(x),
                       **{name: (lambda s=s: s.run(None, {"input": xn})) for name, s in sessions.items()}}
                timed, once = median_ms(fns, args.repeats)
                row = {"in": fan_in, "out": out, "sparsity": sparsity, "k": k, "index_dtype": str(condensed.indices.dtype),
                       "batch": batch, **timed, "timed_once": once}
                rows.append(row)
                print(json.dumps({a: round(b, 4) if isinstance(b, float) else b for a, b in row.items()}), flush=True)
    return rows


class TokenCSRLinear(CSRLinear):
    """CSRLinear for inputs with leading dims (ViT tokens): flattened to (N·T, in) and back."""

    def forward(self, x):
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def csr_model(model: nn.Module, masks: dict) -> tuple[nn.Module, int]:
    """inference.py's CSR variant (Linear and Conv2d), with Linear layers that take token inputs."""
    csr, swapped = sparse_variant(model, masks, "csr")
    for name, module in list(csr.named_modules()):
        if type(module) is CSRLinear:
            parent, _, attr = name.rpartition(".")
            wrapper = TokenCSRLinear.__new__(TokenCSRLinear)
            wrapper.__dict__.update(module.__dict__)
            setattr(csr.get_submodule(parent) if parent else csr, attr, wrapper)
    return csr, swapped


def fan_in_model(name: str, shape: list[int], sparsity: float) -> tuple[nn.Module, dict]:
    """`name` with random constant fan-in masks at the ERK densities of rigl_core's plan."""
    torch.manual_seed(0)
    model = build_model(name.removesuffix(DENSE_FIRST), 10, shape).eval()
    plan = make_plan(model, shape, SparsitySpec(sparsity=sparsity, distribution="erk",
                                                dense_first_layer=name.endswith(DENSE_FIRST)))
    generator = torch.Generator().manual_seed(0)
    masks = {}
    for layer_plan in plan.layers:
        layer = layer_plan.layer
        if not layer.masked or layer.kind not in ("linear", "conv"):
            continue
        weight = layer.weight
        rows, fan_in = weight.shape[0], math.prod(weight.shape[1:])
        k = max(1, round((1 - layer_plan.target_sparsity) * fan_in))
        mask = fan_in_mask(rows, fan_in, k, generator).view(weight.shape)
        with torch.no_grad():
            weight.mul_(mask)
        masks[layer.name] = mask
    return model, masks


def model_rows(args) -> list[dict]:
    rows = []
    for name in args.models:
        shape = MODELS[name]
        model, masks = fan_in_model(name, shape, 0.9)
        dense = build_model(name.removesuffix(DENSE_FIRST), 10, shape).eval()
        folder = Path(tempfile.mkdtemp())
        save_condensed(model, masks, folder / "c.safetensors")
        condensed = load_condensed(copy.deepcopy(model), folder / "c.safetensors").eval()
        swapped = sum(isinstance(m, CondensedLinear) for m in condensed.modules())
        csr, n_csr = csr_model(model, masks)
        sessions = {"ort_condensed": ort_session(export_onnx(condensed, shape, folder / "c.onnx"), 1),
                    "ort_dense": ort_session(export_onnx(dense, shape, folder / "d.onnx"), 1)}
        for batch in MODEL_BATCHES:
            x = torch.randn(batch, *shape)
            xn = x.numpy()
            with torch.inference_mode():
                expected = model(x)
                assert torch.allclose(condensed(x), expected, atol=1e-3), name
                assert torch.allclose(csr(x), expected, atol=1e-3), name
            fns = {"dense": lambda: dense(x), "csr": lambda: csr(x), "condensed": lambda: condensed(x),
                   **{n: (lambda s=s: s.run(None, {"input": xn})) for n, s in sessions.items()}}
            timed, once = median_ms(fns, args.repeats)
            row = {"model": name, "sparsity": 0.9, "batch": batch, "condensed_layers": swapped, "csr_layers": n_csr,
                   **timed, "timed_once": once}
            rows.append(row)
            print(json.dumps({a: round(b, 4) if isinstance(b, float) else b for a, b in row.items()}), flush=True)
    return rows


def _cell(row: dict, backend: str, reference: str = "dense") -> str:
    if row.get(backend) is None:
        return "—"
    mark = "¹" if backend in row["timed_once"] else ""
    ms = row[backend]
    value = f"{ms * 1000:.0f} µs" if ms < 1 else f"{ms:.2f} ms"
    return f"{value}{mark} ({row[reference] / ms:.2f}×)"


LAYER_COLUMNS = ("dense", "csr", "condensed_eager", "condensed_compiled", "condensed", "ort_condensed", "ort_dense")
MODEL_COLUMNS = ("dense", "csr", "condensed", "ort_condensed", "ort_dense")


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = ["# Condensed (constant fan-in) inference on CPU", "",
             f"Machine: {s['machine_note']}; torch {s['torch']}, onnxruntime {s['onnxruntime']}, one thread "
             f"(torch.set_num_threads(1), onnxruntime intra_op_num_threads=1); C kernel: {s['kernel']}; median of "
             f"{s['repeats']} side-by-side rounds. Command: `PYTHONPATH=. python bench/condensed_inference.py`.", "",
             "Backends: **dense** = `nn.Linear` / the unmasked model; **csr** = torch.sparse CSR (conv via im2col); "
             "**condensed eager** = `(x[:, idx] * values).sum(-1)` in eager PyTorch; **condensed compiled** = the same "
             "under `torch.compile` (Inductor); **condensed** = `CondensedLinear` with the compiled C kernel (the "
             "default on CPU); **ort condensed** = onnxruntime on the ONNX export of the condensed model (Gather, "
             "Mul, ReduceSum); **ort dense** = onnxruntime on the dense model. (×) = speed-up over dense; "
             "¹ timed once (over 1.5 s and 3× the fastest).", ""]
    for batch in LAYER_BATCHES:
        lines += [f"## One linear layer, batch {batch}", "",
                  "| layer | sparsity | k | " + " | ".join(c.replace("_", " ") for c in LAYER_COLUMNS) + " |",
                  "|---|---|---|" + "---|" * len(LAYER_COLUMNS)]
        for r in (r for r in results["layers"] if r["batch"] == batch):
            lines.append(f"| {r['in']}→{r['out']} | {r['sparsity']:.0%} | {r['k']} | "
                         + " | ".join(_cell(r, c) for c in LAYER_COLUMNS) + " |")
        lines.append("")
    for batch in MODEL_BATCHES:
        lines += [f"## Whole models at 90% (ERK densities, constant fan-in), batch {batch}", "",
                  "| model | condensed layers | " + " | ".join(c.replace("_", " ") for c in MODEL_COLUMNS) + " |",
                  "|---|---|" + "---|" * len(MODEL_COLUMNS)]
        for r in (r for r in results["models"] if r["batch"] == batch):
            lines.append(f"| {r['model']} | {r['condensed_layers']} | " + " | ".join(_cell(r, c) for c in MODEL_COLUMNS) + " |")
        lines.append("")
    lines += ["## Ratios the goals name (90%)", ""] + goals(results) + [""]
    return "\n".join(lines)


def goals(results: dict) -> list[str]:
    out = []
    for r in results["layers"]:
        if r["sparsity"] == 0.9 and r["batch"] == 1:
            out.append(f"- {r['in']}→{r['out']} batch 1: condensed {r['dense'] / r['condensed']:.2f}× dense "
                       f"(goal ≥ 3), {r['csr'] / r['condensed']:.2f}× CSR (goal ≥ 2)")
    for r in results["models"]:
        out.append(f"- {r['model']} batch {r['batch']}: condensed {r['dense'] / r['condensed']:.2f}× dense"
                   + (" (goal ≥ 2 at batch 1)" if r["batch"] == 1 and r["model"] in ("mlp", "vit-small") else ""))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--skip-layers", action="store_true")
    info = machine_info()
    parser.add_argument("--machine-note", default=f"shared {info['nproc']}-core Linux VM ({info['cpu']}), no GPU")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "condensed_inference")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the existing .json")
    args = parser.parse_args(argv)
    if args.render:
        args.out.with_suffix(".md").write_text(markdown(json.loads(args.out.with_suffix(".json").read_text())))
        return 0
    import onnxruntime

    torch.set_num_threads(1)
    began = time.perf_counter()
    results = {"settings": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                            "python": platform.python_version(), "repeats": args.repeats,
                            "machine_note": args.machine_note, "kernel": unavailable() or "compiled, in use"}}
    results["layers"] = [] if args.skip_layers else layer_rows(args)
    results["models"] = model_rows(args)
    results["settings"]["wall_s"] = round(time.perf_counter() - began, 1)
    write_results(args.out, results, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
