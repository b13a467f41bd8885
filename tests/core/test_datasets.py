"""Datasets: built-ins, tiny CIFAR/MNIST/ImageFolder written by the test, uploaded tensors with errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from rigl_core.data.dataset import DatasetError

from rigl_core.data.registry import load_dataset
from rigl_core.data.augment import crop_flip
from rigl_core.spec import DatasetSpec, JobSpec


def spec(**kwargs) -> DatasetSpec:
    return DatasetSpec.model_validate(kwargs)


@pytest.mark.slow
def test_digits_and_mnist1d():
    digits = load_dataset(spec(name="digits"))
    assert digits.input_shape == [1, 8, 8] and digits.num_classes == 10
    assert len(digits.x_train) + len(digits.x_val) == 1797
    x = digits.prepare(digits.x_train, train=True)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-2  # standardised
    m1d = load_dataset(spec(name="mnist1d"))
    assert m1d.input_shape == [1, 40] and len(m1d.x_train) == 4000 and len(m1d.x_val) == 1000
    assert set(m1d.y_train.tolist()) == set(range(10))
    again = load_dataset(spec(name="mnist1d"))
    assert torch.equal(m1d.x_train, again.x_train)  # generated deterministically


def test_synthetic_difficulty_is_controllable():
    easy = load_dataset(spec(name="synthetic", input_shape=[20], num_samples=400, noise=0.1))
    hard = load_dataset(spec(name="synthetic", input_shape=[20], num_samples=400, noise=10.0))

    def nearest_template_accuracy(ds):
        centroids = torch.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(ds.num_classes)])
        predicted = torch.cdist(ds.x_val, centroids).argmin(1)
        return float((predicted == ds.y_val).float().mean())

    assert nearest_template_accuracy(easy) > 0.95 > nearest_template_accuracy(hard)


def write_cifar10(root, n_train=20, n_test=10):
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}.bin", n_train) for i in range(1, 6)] + [("test_batch.bin", n_test)]:
        labels = rng.integers(0, 10, size=(n, 1), dtype=np.uint8)
        pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        np.concatenate([labels, pixels], axis=1).tofile(folder / name)
    return labels, pixels


def test_cifar10_binary_format(tmp_path):
    labels, pixels = write_cifar10(tmp_path)
    ds = load_dataset(spec(name="cifar10", data_dir=str(tmp_path)))
    assert ds.input_shape == [3, 32, 32] and ds.num_classes == 10
    assert len(ds.x_train) == 100 and len(ds.x_val) == 10
    assert ds.x_train.dtype == torch.uint8  # kept compact; scaled per batch
    assert torch.equal(ds.x_val[-1].reshape(-1), torch.from_numpy(pixels[-1]))
    assert ds.y_val[-1] == int(labels[-1, 0])
    assert ds.augment  # auto: crop + flip for CIFAR
    a = ds.prepare(ds.x_train[:8], train=True, seed=1, step=5)
    b = ds.prepare(ds.x_train[:8], train=True, seed=1, step=5)
    c = ds.prepare(ds.x_train[:8], train=True, seed=1, step=6)
    assert torch.equal(a, b) and not torch.equal(a, c)  # augmentation is a function of (seed, step)


def test_cifar100_binary_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    for name, n in (("train.bin", 30), ("test.bin", 5)):
        coarse = np.full((n, 1), 3, dtype=np.uint8)
        fine = (np.arange(n, dtype=np.uint8) % 100)[:, None]
        np.concatenate([coarse, fine, np.zeros((n, 3072), np.uint8)], axis=1).tofile(folder / name)
    ds = load_dataset(spec(name="cifar100", data_dir=str(tmp_path)))
    assert ds.num_classes == 100 and ds.y_train.tolist() == list(range(30))


def write_idx(path, array, gz=False):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def test_mnist_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (30, 28, 28)), gz=True)
    write_idx(raw / "train-labels-idx1-ubyte", rng.integers(0, 10, 30))
    write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (7, 28, 28)))
    write_idx(raw / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 7))
    ds = load_dataset(spec(name="mnist", data_dir=str(tmp_path)))
    assert ds.input_shape == [1, 28, 28] and len(ds.x_train) == 30 and len(ds.x_val) == 7
    assert not ds.augment
    with pytest.raises(DatasetError, match="dataset.data_dir"):
        load_dataset(spec(name="fashion-mnist", data_dir=str(tmp_path)))


def test_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "eel"):
        (tmp_path / "pets" / cls).mkdir(parents=True)
        for i in range(4):
            size = (20 + i, 16 + 2 * i)  # different sizes: resized on load
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / "pets" / cls / f"{i}.png")
    (tmp_path / "pets" / "notes.txt").write_text("ignored")
    ds = load_dataset(spec(name="imagefolder", data_dir=str(tmp_path), path="pets", image_size=12, val_fraction=0.25))
    assert ds.num_classes == 3 and ds.input_shape == [3, 12, 12]
    assert len(ds.x_train) == 9 and len(ds.x_val) == 3
    (tmp_path / "pets" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="dataset.path: cannot read image"):
        load_dataset(spec(name="imagefolder", path=str(tmp_path / "pets")))


def test_uploaded_tensors_npz_and_safetensors(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 6)).astype(np.float32)
    y = rng.integers(0, 3, 50)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset(spec(name="tensors", path=str(tmp_path / "d.npz")))
    assert ds.num_classes == 3 and ds.input_shape == [6] and len(ds.x_train) == 40
    save_file({"x": x, "y": y.astype(np.int64), "x_val": x[:5], "y_val": y[:5].astype(np.int64)},
              str(tmp_path / "d.safetensors"))
    ds = load_dataset(spec(name="tensors", path=str(tmp_path / "d.safetensors")))
    assert len(ds.x_train) == 50 and len(ds.x_val) == 5


@pytest.mark.parametrize(
    "arrays,message",
    [
        ({"x": np.zeros((4, 3))}, "missing array 'y'"),
        ({"x": np.zeros((4, 3)), "y": np.zeros(5, np.int64)}, "dataset.y: 5 labels for 4 samples"),
        ({"x": np.zeros((4, 3)), "y": np.array([0, 1, -1, 2])}, "dataset.y: labels must be"),
        ({"x": np.zeros((4, 3)), "y": np.zeros(4, np.float32)}, "dataset.y: expected a 1-D integer"),
        ({"x": np.full((4, 3), np.nan), "y": np.zeros(4, np.int64)}, "dataset.x: contains NaN"),
        ({"x": np.zeros(4), "y": np.zeros(4, np.int64)}, "dataset.x: expected 2 to 4 dimensions"),
        ({"x": np.zeros((4, 3)), "y": np.zeros(4, np.int64), "x_val": np.zeros((2, 5)),
          "y_val": np.zeros(2, np.int64)}, "dataset.x_val: sample shape"),
        ({"x": np.zeros((4, 3)), "y": np.zeros(4, np.int64), "w": np.zeros(1)}, "unexpected arrays ['w']"),
    ],
)
def test_uploaded_tensor_validation(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError) as info:
        load_dataset(spec(name="tensors", path=str(tmp_path / "bad.npz")))
    assert message in str(info.value)


def test_upload_guards(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    import zipfile

    with zipfile.ZipFile(tmp_path / "pickled.npz", "w") as z:  # an object array needs pickle: refused
        z.write(tmp_path / "objects.npy", "x.npy")
    with pytest.raises(DatasetError, match="cannot read"):
        load_dataset(spec(name="tensors", path=str(tmp_path / "pickled.npz")))
    np.savez(tmp_path / "big.npz", x=np.zeros((100, 100)), y=np.zeros(100, np.int64))
    with pytest.raises(DatasetError, match="limit"):
        load_dataset(spec(name="tensors", path=str(tmp_path / "big.npz"), max_bytes=1000))
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(DatasetError, match=".npz or .safetensors"):
        load_dataset(spec(name="tensors", path=str(tmp_path / "d.csv")))


def test_spec_requires_files_for_file_datasets():
    # mnist/cifar without data_dir are valid specs (the service supplies its datasets directory);
    # a local run that leaves it out gets a clear error when the data is loaded
    job = JobSpec.model_validate({"model": {"name": "mlp"}, "dataset": {"name": "cifar10"}})
    with pytest.raises(DatasetError, match="dataset.data_dir: required"):
        load_dataset(job.dataset)
    with pytest.raises(ValidationError, match="path is required"):
        JobSpec.model_validate({"model": {"name": "mlp"}, "dataset": {"name": "tensors"}})


def test_crop_flip_keeps_content():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = crop_flip(x, torch.Generator().manual_seed(0), padding=0)  # no padding: only flips
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))


@pytest.mark.slow
def test_cifar_job_trains_with_resnet18_cifar(tmp_path):
    from rigl_core.training.trainer import Trainer

    write_cifar10(tmp_path)
    job = JobSpec.model_validate({"model": {"name": "resnet18-cifar"},
                                  "dataset": {"name": "cifar10", "data_dir": str(tmp_path)},
                                  "sparsity": {"sparsity": 0.9, "schedule": {"delta_t": 2}},
                                  "training": {"epochs": 1, "max_steps": 3, "batch_size": 16}})
    report = Trainer(job).fit()
    assert report["steps"] == 3 and report["leak_check"]["ok"]
