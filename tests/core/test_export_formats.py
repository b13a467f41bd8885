"""The compressed (entropy-coded) and ONNX exports: lossless round trips, size within 1.10× of the
information bound, a reader that needs numpy only, onnxruntime agreeing with PyTorch, and the API route."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from rigl_core import RigL
from rigl_core.export.packed import dense_state_dict, load_packed, save_compressed_model, save_packed
from rigl_core.export.compressed import (decode_mask, encode_mask, entropy_bits, read_compressed, save_compressed,
                                         size_report)
from rigl_core.models.registry import build_model


def sparse_model(name: str, input_shape: list[int], sparsity: float, seed: int = 0):
    """A model with ERK random masks applied (dense-with-zeros) and its masks keyed by layer name."""
    torch.manual_seed(seed)
    model = build_model(name, 10, input_shape)
    rigl = RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=sparsity, total_steps=10,
                method="static", seed=seed)
    return model.eval(), rigl.sparsifier.masks


def exact_mask(shape, density: float, rng) -> np.ndarray:
    n = int(np.prod(shape))
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, max(1, round(n * density)), replace=False)] = True
    return mask.reshape(shape)


@pytest.mark.parametrize("sparsity", [0.8, 0.9, 0.95, 0.98])
def test_compressed_is_lossless_and_within_1_10_of_the_information_bound(tmp_path, sparsity):
    rng = np.random.default_rng(int(sparsity * 100))
    shapes = {"conv.weight": (128, 64, 3, 3), "fc.weight": (100, 512), "small.weight": (40, 256)}  # ≥ 10k weights
    masks = {k: exact_mask(s, 1 - sparsity, rng) for k, s in shapes.items()}
    state = {k: rng.standard_normal(s).astype(np.float32) * masks[k] for k, s in shapes.items()}
    state["fc.bias"] = rng.standard_normal(100).astype(np.float32)
    path = save_compressed(state, masks, tmp_path / "c.safetensors")

    back = read_compressed(path)
    assert set(back) == set(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key

    report = size_report(path)
    for name, layer in report["layers"].items():
        bound = (layer["nnz"] * 32 + entropy_bits(layer["numel"], layer["nnz"])) / 8
        assert layer["bound_bytes"] == pytest.approx(bound)
        assert layer["ratio"] <= 1.10, (name, layer)
        assert layer["mask_ratio"] <= 1.10, (name, layer)  # the mask alone, near N·H(density)
    assert report["ratio_tensors"] <= 1.10
    assert report["ratio_file"] <= 1.10  # the JSON header included, at these sizes
    packed = save_packed_np(state, masks, tmp_path)
    assert path.stat().st_size < packed  # the entropy coder beats one bit per weight


def save_packed_np(state, masks, tmp_path) -> int:
    model = torch.nn.Module()
    for key, value in state.items():
        model.register_buffer(key.replace(".", "_"), torch.from_numpy(value))
    renamed = {k.replace(".", "_"): torch.from_numpy(v) for k, v in masks.items()}
    return save_packed(model, renamed, tmp_path / "p.safetensors").stat().st_size


def test_the_plain_bitmask_misses_the_bound_at_high_sparsity():
    """The control: a 1-bit-per-weight mask (the packed export) is ~2× the bound at 98% sparsity."""
    n, nnz = 100_000, 2_000
    bound = nnz * 32 + entropy_bits(n, nnz)
    assert (nnz * 32 + n) / bound > 1.9


@pytest.mark.parametrize("density", [0.0, 1e-5, 0.3, 0.5, 0.99, 1.0])
def test_mask_codec_round_trips_edge_densities(density):
    rng = np.random.default_rng(1)
    n = 20_000
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, round(n * density), replace=False)] = True
    unary, rem, k = encode_mask(mask)
    idx = decode_mask(unary, rem, k, int(mask.sum()), n)
    assert np.array_equal(idx, np.flatnonzero(mask))


def test_compressed_model_matches_the_dense_with_zeros_state_dict(tmp_path):
    model, masks = sparse_model("resnet18-cifar", [3, 32, 32], 0.9)
    path = save_compressed_model(model, masks, tmp_path / "m.safetensors")
    back = read_compressed(path)
    dense = dense_state_dict(model)
    assert set(back) == set(dense)
    for key, tensor in dense.items():
        assert np.array_equal(back[key], tensor.numpy()), key
    restored = build_model("resnet18-cifar", 10, [3, 32, 32])
    restored.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    report = size_report(path)
    assert report["ratio_file"] <= 1.10
    assert report["bytes_per_weight"] < 0.5  # vs 4 dense


@pytest.mark.parametrize("values,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_values_match_torch_casts(tmp_path, values, dtype):
    model, masks = sparse_model("lenet5", [1, 28, 28], 0.9)
    back = read_compressed(save_compressed_model(model, masks, tmp_path / "h.safetensors", values=values))
    packed = load_packed(save_packed(model, masks, tmp_path / "p.safetensors", values=values))
    dense = dense_state_dict(model)
    for key, tensor in dense.items():
        expected = tensor.to(dtype).float() if key.rsplit(".", 1)[0] in masks else tensor
        assert np.array_equal(back[key], expected.numpy()), key
        assert packed[key].dtype == tensor.dtype and torch.equal(packed[key], expected), key
    half = size_report(tmp_path / "h.safetensors")
    assert half["layers"]["classifier.1.weight"]["ratio"] <= 1.10  # 48k weights; the bound with 16 value bits
    with pytest.raises(ValueError, match="values"):
        save_compressed_model(model, masks, tmp_path / "x.safetensors", values="fp8")


def test_the_reader_needs_numpy_only(tmp_path):
    model, masks = sparse_model("mlp", [64], 0.95)
    path = save_compressed_model(model, masks, tmp_path / "m.safetensors", values="bf16")
    expected = {k: v.numpy() for k, v in dense_state_dict(model).items()}
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        for blocked in ("torch", "safetensors"):
            sys.modules[blocked] = None
        spec = importlib.util.spec_from_file_location("reader", {str(__import__("rigl_core.export.compressed",
                                                                  fromlist=["x"]).__file__)!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        state = module.read_compressed({str(path)!r})
        print(json.dumps({{k: [list(v.shape), str(v.dtype), float(abs(v).sum())] for k, v in state.items()}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key][:2] == [list(value.shape), str(value.dtype)]
    assert got["fc1.weight"][2] == pytest.approx(float(np.abs(expected["fc1.weight"].astype(np.float32)).sum()),
                                                  rel=1e-2)  # bf16 values


def test_the_reader_never_unpickles_and_rejects_other_files(tmp_path):
    bogus = tmp_path / "x.safetensors"
    np.save(tmp_path / "x.npy", np.zeros(3))
    bogus.write_bytes((tmp_path / "x.npy").read_bytes())
    with pytest.raises(ValueError):
        read_compressed(bogus)
    model, masks = sparse_model("mlp", [64], 0.9)
    with pytest.raises(ValueError, match="not a rigl-compressed"):
        read_compressed(save_packed(model, masks, tmp_path / "p.safetensors"))


# -------------------------------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("name,shape", [("mlp", [64]), ("lenet5", [1, 28, 28]), ("wrn-22-2", [3, 32, 32])])
def test_onnx_matches_pytorch(tmp_path, name, shape):
    pytest.importorskip("onnxruntime")
    from rigl_core.export.onnx import check_onnx, export_onnx, run_onnx

    model, _ = sparse_model(name, shape, 0.9)
    path = export_onnx(model, shape, tmp_path / "m.onnx")
    assert check_onnx(model, path, shape, batch=3) <= 1e-4
    x = torch.randn(5, *shape)  # a batch size other than the export's: the batch axis is dynamic
    with torch.no_grad():
        assert np.allclose(run_onnx(path, x.numpy()), model(x).numpy(), atol=1e-4)
    assert model.training is False and next(model.parameters()).device.type == "cpu"


def test_onnx_of_a_declarative_architecture(tmp_path):
    """docs/guide/models.md's residual architecture example, sparsified."""
    pytest.importorskip("onnxruntime")
    from rigl_core.models.architecture import Architecture
    from rigl_core.export.onnx import check_onnx, export_onnx

    arch = {"input_shape": [1, 8, 8], "layers": [
        {"type": "conv2d", "out_channels": 16, "kernel_size": 3, "padding": 1, "name": "stem"},
        {"type": "batchnorm2d"}, {"type": "relu"},
        {"type": "residual", "projection": True, "layers": [
            {"type": "conv2d", "out_channels": 32, "kernel_size": 3, "stride": 2, "padding": 1},
            {"type": "relu"},
            {"type": "conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1}]},
        {"type": "adaptive-avg-pool"}, {"type": "flatten"},
        {"type": "linear", "out_features": 10, "name": "head"}]}
    model = build_model("custom", 10, [1, 8, 8], architecture=Architecture.model_validate(arch))
    RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.9, total_steps=10, method="static")
    path = export_onnx(model.eval(), [1, 8, 8], tmp_path / "a.onnx")
    assert check_onnx(model, path, [1, 8, 8], batch=4) <= 1e-4


# --------------------------------------------------------------------------------------------------- API
@pytest.fixture()
def succeeded_job(make_api, tmp_path):
    """(API client, job id) of a digits MLP job run to success in process (SQLite, no broker)."""
    from helpers.service import JOB
    from worker.runner import run_job

    api = make_api()
    settings = api.settings
    job_id = api.post("/v1/jobs", json={**JOB, "training": {**JOB["training"], "epochs": 1}}).json()["id"]
    assert run_job(job_id, settings) == "succeeded"
    yield api, job_id


def test_the_checkpoint_route_serves_compressed_and_onnx(succeeded_job, tmp_path):
    api, job_id = succeeded_job
    kinds = {c["kind"] for c in api.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]}
    assert {"dense", "packed", "compressed", "onnx"} <= kinds

    from safetensors.torch import load

    dense = load(api.get(f"/v1/jobs/{job_id}/checkpoint?format=dense").content)
    compressed = api.get(f"/v1/jobs/{job_id}/checkpoint?format=compressed")
    assert compressed.status_code == 200
    (tmp_path / "c.safetensors").write_bytes(compressed.content)
    back = read_compressed(tmp_path / "c.safetensors")
    assert set(back) == set(dense) and all(np.array_equal(back[k], v.numpy()) for k, v in dense.items())

    onnx = api.get(f"/v1/jobs/{job_id}/checkpoint?format=onnx")
    assert onnx.status_code == 200 and "model.onnx" in onnx.headers["content-disposition"]
    pytest.importorskip("onnxruntime")
    from rigl_core.export.onnx import run_onnx

    (tmp_path / "m.onnx").write_bytes(onnx.content)
    import onnxruntime

    shape = onnxruntime.InferenceSession(str(tmp_path / "m.onnx")).get_inputs()[0].shape
    assert shape == ["batch", 1, 8, 8]  # digits' sample shape, the batch axis dynamic
    model = build_model("mlp", 10, shape[1:])
    model.load_state_dict(dense)
    x = torch.randn(4, *shape[1:])
    with torch.no_grad():
        assert np.allclose(run_onnx(tmp_path / "m.onnx", x.numpy()), model.eval()(x).numpy(), atol=1e-4)

    bad = api.get(f"/v1/jobs/{job_id}/checkpoint?format=zip")
    assert bad.status_code == 422
    assert bad.json()["error"]["field"] == "format", bad.json()


def test_a_model_the_onnx_exporter_cannot_trace_is_skipped_with_a_warning(make_api, tmp_path, monkeypatch):
    """The job still succeeds with its other exports; the event log says why there is no ONNX file."""
    import rigl_core.export.onnx
    from helpers.service import JOB
    from worker.runner import run_job

    def untraceable(*_args, **_kwargs):
        raise RuntimeError("Unsupported: the exporter cannot trace this model")

    monkeypatch.setattr(rigl_core.export.onnx, "export_onnx", untraceable)
    api = make_api()
    settings = api.settings
    job_id = api.post("/v1/jobs", json={**JOB, "training": {**JOB["training"], "epochs": 1}}).json()["id"]
    assert run_job(job_id, settings) == "succeeded"
    kinds = {c["kind"] for c in api.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]}
    assert kinds == {"dense", "packed", "compressed"}
    events = api.get(f"/v1/jobs/{job_id}/events?limit=1000").json()["data"]
    assert any(e["level"] == "warn" and "onnx export skipped: Unsupported" in e["message"] for e in events
               if e["type"] == "message"), events
    missing = api.get(f"/v1/jobs/{job_id}/checkpoint?format=onnx")
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "format"
    assert not list((tmp_path).rglob("*.onnx*"))  # no temp file left behind


# ------------------------------------------------------------------------------- export.values fp16/bf16
def test_stored_values_rounds_the_masked_weights_inside_and_restores_them_exactly():
    from rigl_core.export.packed import stored_values

    model, masks = sparse_model("lenet5", [1, 28, 28], 0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with stored_values(model, masks, "bf16"):
        inside = model.state_dict()
        rounded = [k for k in before if not torch.equal(inside[k], before[k])]
        assert rounded and all(k.rsplit(".", 1)[0] in masks for k in rounded)  # only masked weights move
        for k in rounded:
            assert torch.equal(inside[k], before[k].to(torch.bfloat16).float())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match="values"):
        with stored_values(model, masks, "int8"):
            pass


def test_a_job_with_fp16_values_exports_them_and_reports_the_accuracy_they_cost(tmp_path):
    """The run evaluates the model holding exactly what the packed/compressed readers get back, and the
    report's figures are those of the exported files."""
    from rigl_core.training.run import run_training
    from rigl_core.spec import JobSpec

    spec = JobSpec.model_validate({"model": {"name": "mlp"}, "dataset": {"name": "digits"},
                                   "training": {"epochs": 3, "device": "cpu"}, "export": {"values": "fp16"}})
    report = run_training(spec, tmp_path)
    check = report["export"]
    assert check["values"] == "fp16" and set(check["change"]) >= {"val_accuracy", "val_loss"}
    final = report["final_metrics"]
    assert check["change"]["val_accuracy"] == pytest.approx(check["metrics"]["val_accuracy"] - final["val_accuracy"])
    meta = json.loads(__import__("safetensors").safe_open(str(tmp_path / "model.packed.safetensors"), "pt")
                      .metadata()["rigl"])
    assert {t["values_dtype"] for t in meta["tensors"].values()} == {"float16"}
    packed = load_packed(tmp_path / "model.packed.safetensors")
    back = read_compressed(tmp_path / "model.compressed.safetensors")
    assert all(np.array_equal(back[k], v.numpy()) for k, v in packed.items())
    from rigl_core.training.trainer import Trainer

    trainer = Trainer(spec)  # the exported values give the reported accuracy
    trainer.model.load_state_dict(packed)
    assert trainer.evaluate()["val_accuracy"] == pytest.approx(check["metrics"]["val_accuracy"])


def test_export_values_is_checked_and_reaches_the_service_result(make_api, tmp_path):
    from helpers.service import JOB
    from worker.runner import run_job

    api = make_api()
    settings = api.settings
    bad = api.post("/v1/jobs", json={**JOB, "export": {"values": "fp8"}})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "export.values", bad.json()
    job = {**JOB, "training": {**JOB["training"], "epochs": 1}, "export": {"values": "bf16"}}
    job_id = api.post("/v1/jobs", json=job).json()["id"]
    assert run_job(job_id, settings) == "succeeded"
    result = api.get(f"/v1/jobs/{job_id}").json()["result"]
    assert result["export"]["values"] == "bf16" and "val_accuracy" in result["export"]["change"]
    (tmp_path / "p.safetensors").write_bytes(api.get(f"/v1/jobs/{job_id}/checkpoint?format=packed").content)
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "p.safetensors"))["fc1.weight.values"].dtype == torch.bfloat16


def test_onnx_of_a_token_model_takes_int64_ids(tmp_path):
    """A model.hf sequence classifier exports with token ids in; onnxruntime agrees with PyTorch."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("transformers")
    from rigl_core.export.onnx import check_onnx, export_onnx, run_onnx

    hf = {"model_type": "bert", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
          "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}
    model = build_model("hf", 3, [16], hf=hf, task="sequence-classification").eval()
    path = export_onnx(model, [16], tmp_path / "bert.onnx")
    assert check_onnx(model, path, [16], batch=3) <= 1e-4
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert np.allclose(run_onnx(path, ids.numpy()), model(ids).numpy(), atol=1e-4)


def test_a_srigl_job_serves_a_condensed_export_equal_to_the_dense_one(tmp_path):
    """A service job with method srigl: the worker writes the condensed export, the API serves it with
    format=condensed, it loads into the plain model with the dense export's outputs; the report holds the
    active neurons, the fan-in and measured latencies. An unstructured job has none (404 naming format)."""
    import copy

    from fastapi.testclient import TestClient
    from safetensors.torch import load

    from api.app import create_app
    from rigl_core.export.condensed_layers import CondensedLinear, load_condensed
    from helpers.service import JOB
    from store.settings import Settings
    from worker.runner import run_job

    settings = Settings(data_dir=tmp_path).resolved()
    with TestClient(create_app(settings, enqueue=lambda _id: None, reaper=False)) as api:
        spec = {**JOB, "sparsity": {**JOB.get("sparsity", {}), "method": "srigl"},
                "training": {**JOB["training"], "epochs": 1}}
        job_id = api.post("/v1/jobs", json=spec).json()["id"]
        assert run_job(job_id, settings) == "succeeded"
        kinds = {c["kind"] for c in api.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]}
        assert "condensed" in kinds
        dense = load(api.get(f"/v1/jobs/{job_id}/checkpoint?format=dense").content)
        response = api.get(f"/v1/jobs/{job_id}/checkpoint?format=condensed")
        assert response.status_code == 200
        (tmp_path / "c.safetensors").write_bytes(response.content)
        model = build_model("mlp", 10, [1, 8, 8], hidden_sizes=JOB["model"].get("hidden_sizes"))
        model.load_state_dict(dense)
        condensed = load_condensed(copy.deepcopy(model), tmp_path / "c.safetensors").eval()
        assert any(isinstance(m, CondensedLinear) for m in condensed.modules())
        x = torch.randn(3, 1, 8, 8)
        with torch.inference_mode():
            torch.testing.assert_close(condensed(x), model.eval()(x), rtol=1e-4, atol=1e-5)
        layers = api.get(f"/v1/jobs/{job_id}/sparsity").json()["layers"]
        assert all(r["fan_in"] >= 1 and 1 <= r["active_neurons"] <= r["neurons"] for r in layers if r["masked"])

        plain = api.post("/v1/jobs", json={**JOB, "training": {**JOB["training"], "epochs": 1}}).json()["id"]
        assert run_job(plain, settings) == "succeeded"
        missing = api.get(f"/v1/jobs/{plain}/checkpoint?format=condensed")
        assert missing.status_code == 404 and missing.json()["error"]["field"] == "format"
