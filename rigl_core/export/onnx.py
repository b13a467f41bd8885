"""ONNX export of the trained dense-with-zeros model (masks already applied to the weights).

Why the TorchScript exporter (`dynamo=False`): it needs the onnx package (the `[onnx]` extra, which
`[service]` brings) but not onnxscript to write the file, and it exports mlp, lenet5, resnet18-cifar, wrn-22-2, declarative architectures and model.hf sequence
classifiers (int64 token ids in) reliably; it cannot trace transformers' causal LMs (GPT-2: the job skips
that export with a warning; torch's dynamo exporter would need onnxscript). The batch dimension is dynamic. `check_onnx` compares onnxruntime's outputs with PyTorch's when onnxruntime is
installed (the `[onnx]` extra).
"""

from __future__ import annotations

import copy
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 17  # supported by every onnx >= 1.12 and onnxruntime >= 1.11; capped by the installed onnx below


def opset() -> int:
    try:
        import onnx

        return min(OPSET, onnx.defs.onnx_opset_version())
    except ImportError:
        return OPSET


def export_onnx(model: nn.Module, input_shape: list[int] | tuple[int, ...], path: str | os.PathLike,
                example: torch.Tensor | None = None) -> Path:
    """Write `model` (eval mode, on CPU, a copy: the caller's model is untouched) to `path`.

    Raises whatever the exporter raises for models it cannot trace (the caller decides to skip)."""
    cpu = copy.deepcopy(model).to("cpu").float().eval()
    x = example if example is not None else _example(cpu, input_shape, 1)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(cpu, (x,), buffer, dynamo=False, opset_version=opset(), input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
    return path


def _example(model: nn.Module, input_shape, batch: int) -> torch.Tensor:
    """Random inputs the model takes: token ids below its vocabulary for a token model (model.hf), else floats."""
    if getattr(model, "input_dtype", None) == torch.long:
        return torch.randint(0, int(getattr(model, "vocab_size", 2)), (batch, *input_shape))
    return torch.randn(batch, *input_shape)


def run_onnx(path: str | os.PathLike, x: np.ndarray, threads: int | None = None) -> np.ndarray:
    """The first output of the ONNX model at `path` on `x`, with onnxruntime on CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = x if np.issubdtype(x.dtype, np.integer) else x.astype(np.float32)  # token ids stay int64
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def check_onnx(model: nn.Module, path: str | os.PathLike, input_shape, batch: int = 2, atol: float = 1e-4) -> float:
    """Max |onnxruntime - PyTorch| on a random batch; raises AssertionError above `atol`."""
    cpu = copy.deepcopy(model).to("cpu").float().eval()
    x = _example(cpu, input_shape, batch)
    with torch.no_grad():
        expected = cpu(x)
    expected = (expected if isinstance(expected, torch.Tensor) else expected[0]).numpy()
    diff = float(np.abs(run_onnx(path, x.numpy()) - expected).max())
    if not diff <= atol:
        raise AssertionError(f"onnxruntime differs from PyTorch by {diff:.3g} (> {atol})")
    return diff
