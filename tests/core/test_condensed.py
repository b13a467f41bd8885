"""The condensed export (rigl-condensed-v1): numpy-readable, loads into plain PyTorch modules whose outputs
equal the dense export's, through every kernel path (compiled loop, embedding bag, plain PyTorch) and
through onnxruntime; narrow index types; ablated neurons; layers without a constant fan-in stay dense."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from rigl_core import RigL
from rigl_core.export import condensed_kernel
from rigl_core.export.compressed import _read_safetensors
from rigl_core.export.condensed import index_dtype, read_condensed, save_condensed
from rigl_core.export.condensed_layers import CondensedConv2d, CondensedLinear, load_condensed
from rigl_core.models.registry import build_model


def trained(name: str, shape: list[int], method: str = "srigl", steps: int = 30, **options):
    torch.manual_seed(0)
    model = build_model(name, 10, shape)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rigl = RigL(model, opt, sparsity=0.9, total_steps=steps, method=method, delta_t=5, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, *shape, generator=generator)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), torch.randint(0, 10, (16,), generator=generator)).backward()
        if rigl.step():
            opt.step()
    return model.eval(), rigl


@pytest.mark.parametrize("name, shape, swapped", [("mlp", [1, 8, 8], CondensedLinear),
                                                  ("lenet5", [1, 8, 8], CondensedConv2d),
                                                  ("vit-tiny", [1, 8, 8], CondensedLinear)])
def test_condensed_model_equals_the_dense_export(tmp_path, name, shape, swapped):
    model, rigl = trained(name, shape)
    path = save_condensed(model, rigl.masks, tmp_path / "m.safetensors")
    dense = {k: v.numpy() for k, v in model.state_dict().items()}
    back = read_condensed(path)  # numpy alone
    assert back.keys() == dense.keys() and all(np.array_equal(back[k], dense[k]) for k in dense)
    condensed = load_condensed(copy.deepcopy(model), path).eval()
    assert any(isinstance(m, swapped) for m in condensed.modules())
    with torch.inference_mode():
        for batch in (1, 2, 7, 64):  # the compiled loop below 4 rows, the embedding bag from 4
            x = torch.randn(batch, *shape)
            torch.testing.assert_close(condensed(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loop", ["this CPU's", "gathers", "plain"])
def test_every_kernel_path_agrees(monkeypatch, tmp_path, loop):
    """Every index type, batch sizes on both sides of BAG_FROM, and fan-ins that leave each tail of the
    compiled loop's 16- and 8-wide steps (k = 5, 8, 16, 30, 77), with and without a bias; in the build this
    CPU gets and in both of the C file's loops (explicit AVX2 gathers where the CPU has them, and the plain one)."""
    if loop != "this CPU's":
        monkeypatch.setenv("RIGL_KERNEL_CACHE", str(tmp_path))
        monkeypatch.setattr(condensed_kernel, "_state", {})
        extra = ["-DCONDENSED_PLAIN"] if loop == "plain" else []
        monkeypatch.setattr(condensed_kernel, "flags", lambda: [*condensed_kernel.FLAGS, *extra])
    generator = torch.Generator().manual_seed(0)
    for fan_in, k in ((300, 30), (300, 77), (200, 5), (200, 8), (250, 16)):
        indices = torch.rand(50, fan_in, generator=generator).topk(k, dim=1).indices.sort(dim=1).values
        values, bias = torch.randn(50, k, generator=generator), torch.randn(50, generator=generator)
        types = (torch.int16, torch.int32, torch.int64) + ((torch.uint8,) if fan_in <= 256 else ())
        for batch in (1, 3, 4, 33):
            x = torch.randn(batch, fan_in, generator=generator)
            expected = condensed_kernel.reference_matmul(x, indices, values)
            for dtype in types:
                got = condensed_kernel.condensed_matmul(x, indices.to(dtype), values)
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
                got = condensed_kernel.condensed_matmul(x, indices.to(dtype), values, bias=bias)
                torch.testing.assert_close(got, expected + bias, rtol=1e-5, atol=1e-5)
    assert condensed_kernel.unavailable() is None or "compiler" in condensed_kernel.unavailable()


def test_condensed_model_runs_the_same_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from rigl_core.export.onnx import export_onnx

    model, rigl = trained("mlp", [1, 8, 8], ablation_threshold=1.0)  # ablates: the output gather is exported too
    assert any(n < 300 for n, _ in rigl.sparsifier.neuron_counts().values())
    condensed = load_condensed(copy.deepcopy(model), save_condensed(model, rigl.masks, tmp_path / "m.safetensors"))
    onnx_path = export_onnx(condensed.eval(), [1, 8, 8], tmp_path / "m.onnx")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 8, 8)
    with torch.inference_mode():
        expected = model(x).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, rtol=1e-4, atol=1e-5)


def test_ablated_neurons_output_their_bias_and_are_not_stored(tmp_path):
    model, rigl = trained("mlp", [1, 8, 8], ablation_threshold=1.0, dense_first_layer=False)
    active, fan_in = rigl.sparsifier.neuron_counts()["fc1"]
    assert active < 300
    path = save_condensed(model, rigl.masks, tmp_path / "m.safetensors")
    arrays, metadata = _read_safetensors(path)
    meta = json.loads(metadata["rigl"])
    assert meta["format"] == "rigl-condensed-v1"
    assert arrays["fc1.weight.values"].shape == (active, fan_in) == arrays["fc1.weight.indices"].shape
    assert arrays["fc1.weight.indices"].dtype == np.uint8  # 64 inputs
    assert arrays["fc1.weight.active"].dtype == np.int16  # 300 outputs need more than uint8
    layer = load_condensed(copy.deepcopy(model), path).fc1
    off = torch.ones(300, dtype=torch.bool)
    off[torch.from_numpy(arrays["fc1.weight.active"].astype(np.int64))] = False
    with torch.inference_mode():
        out = layer(torch.randn(3, 64))
    torch.testing.assert_close(out[:, off], model.fc1.bias.detach()[off].expand(3, -1))


def test_index_types_are_the_smallest_that_fit():
    assert [index_dtype(n) for n in (2, 256, 257, 32768, 32769)] == [np.uint8, np.uint8, np.int16, np.int16, np.int32]


def test_layers_without_a_constant_fan_in_stay_dense_and_say_why(tmp_path):
    model, rigl = trained("mlp", [1, 8, 8], method="rigl")  # unstructured
    path = save_condensed(model, rigl.masks, tmp_path / "m.safetensors")
    _, metadata = _read_safetensors(path)
    meta = json.loads(metadata["rigl"])
    assert meta["layers"] == {} and all("fan-in varies" in why for why in meta["dense"].values())
    condensed = load_condensed(copy.deepcopy(model), path).eval()
    assert not any(isinstance(m, CondensedLinear) for m in condensed.modules())
    x = torch.randn(2, 1, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(condensed(x), model(x))


def test_a_file_of_another_model_is_refused(tmp_path):
    model, rigl = trained("mlp", [1, 8, 8])
    path = save_condensed(model, rigl.masks, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="does not fit the model"):
        load_condensed(build_model("mlp", 10, [1, 8, 8], hidden_sizes=[300, 100, 50]), path)


def test_the_docs_plain_pytorch_loader_runs_and_matches(tmp_path, monkeypatch):
    """README prints a CondensedLinear with no rigl_core import (the docs' Exports page includes it): it loads a
    real export."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", page, flags=re.S) if "class CondensedLinear" in b)
    assert "rigl_core" not in block
    model, rigl = trained("mlp", [1, 8, 8], ablation_threshold=1.0)
    monkeypatch.chdir(tmp_path)
    save_condensed(model, rigl.masks, tmp_path / "model.condensed.safetensors")
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - our own docs
    assert "fc1.weight" in load_file(str(tmp_path / "model.condensed.safetensors"))  # srigl's dense first layer
    x = torch.randn(4, 300)
    with torch.inference_mode():
        torch.testing.assert_close(scope["fc2"](x), model.fc2(x), rtol=1e-4, atol=1e-5)
