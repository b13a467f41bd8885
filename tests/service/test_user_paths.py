"""User-named dataset paths (issue 11, item 1 and the dataset parts of items 6 and 12).

An `imagefolder` path is resolved once at submit time to a real folder inside the server's datasets
directory (symlinks followed); every probe gets the same 422 without a server path; the worker
re-checks a stored spec before loading; mnist-style jobs use the datasets directory as data_dir;
folder size is capped; a failed job's message names no server path.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from helpers.service import JOB
from store.settings import Settings
from store.user_paths import PATH_MESSAGE, check_job_paths, on_this_node

FOLDER_JOB = {**JOB, "dataset": {"name": "imagefolder", "path": "pets", "image_size": 8, "val_fraction": 0.25},
              "training": {"epochs": 1, "batch_size": 4}}


def png(path, size=(6, 5), seed=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def png_header_only(path, width: int, height: int) -> None:
    """A tiny file whose header declares width×height pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">L", len(data)) + kind + data + struct.pack(">L", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">LLBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def make_tree(tmp_path, datasets) -> None:
    """pets/ (a good folder), inner -> pets (a link that stays inside), escape -> a folder outside,
    leaky/ (one image is a link to a file outside), broken/ (files that are not images)."""
    for i, label in enumerate(("cat", "cat", "dog", "dog")):
        png(datasets / "pets" / label / f"{i}.png", seed=i)
    outside = tmp_path / "outside"
    for label in ("a", "b"):
        png(outside / label / "secret.png", seed=7)
    (datasets / "escape").symlink_to(outside, target_is_directory=True)
    (datasets / "inner").symlink_to(datasets / "pets", target_is_directory=True)
    png(datasets / "leaky" / "a" / "0.png")
    (datasets / "leaky" / "b").mkdir(parents=True)
    (datasets / "leaky" / "b" / "0.png").symlink_to(outside / "b" / "secret.png")
    for label in ("a", "b"):
        (datasets / "broken" / label).mkdir(parents=True)
        (datasets / "broken" / label / "x.png").write_bytes(b"not a png")
    png(datasets / "mixed" / "a" / "0.png")  # a class folder that is a link out
    (datasets / "mixed" / "b").symlink_to(outside / "b", target_is_directory=True)
    for label in ("a", "b"):  # a link loop that stays inside: fine, and must not hang the scan
        png(datasets / "loop" / label / "0.png")
    (datasets / "loop" / "a" / "up").symlink_to(datasets / "loop", target_is_directory=True)


@pytest.fixture()
def served(tmp_path, make_api):
    """(API client, resolved settings, JobStore) with a prepared datasets directory."""
    client = make_api(data_dir=tmp_path / "data", cancel_poll_seconds=0.2)
    client.settings.datasets_dir.mkdir(parents=True, exist_ok=True)
    make_tree(tmp_path, client.settings.datasets_dir)
    return client, client.settings, client.store


PROBES = [
    "~", "~root", "~nobody/x", "~/", "pets/~", "a/~root/b",  # home folders (the worker used to expanduser)
    "/etc", "/root", "/home",  # absolute
    "..", "../..", "pets/../..", "pets/../../outside", "pets/..",  # parent segments
    "pets\x00", "pets\x00/../../..", "pets\n", "pets\\..\\..",  # NUL, control characters, backslashes
    "\uff0e\uff0e/etc", "a\u2215..\u2215b", "pet\u0455", "\u2024\u2024/x",  # unicode look-alikes
    "escape", "escape/a", "leaky", "mixed",  # symlinks in the datasets directory that lead out
    "missing", "pets/cat/0.png", "pets//cat", "...",  # not a folder / empty or all-dot segments
]


@pytest.mark.parametrize("path", PROBES)
def test_path_probes_all_get_the_same_422_without_a_path(served, tmp_path, path):
    api, settings, _ = served
    response = api.post("/v1/jobs", json={**FOLDER_JOB, "dataset": {**FOLDER_JOB["dataset"], "path": path}})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    if "\x00" in path:  # refused before any route by the text rule (api/text_guard.py): nothing is looked up
        assert (error["code"], error["field"]) == ("invalid_text", "dataset.path")
    else:
        assert (error["field"], error["message"]) == ("dataset.path", PATH_MESSAGE)  # identical for every probe
    assert str(tmp_path) not in response.text and "/root" not in response.text and "/etc" not in response.text
    print(f"\nPROBE {path!r} -> {response.status_code} {error['field']}: {error['message']}")


def test_good_folders_resolve_to_their_real_path_and_count_their_images(served):
    api, settings, store = served
    real_pets = os.path.realpath(settings.datasets_dir / "pets")
    for path in ("pets", "pets/", "inner"):  # a link that stays inside the directory is fine
        response = api.post("/v1/jobs", json={**FOLDER_JOB, "dataset": {**FOLDER_JOB["dataset"], "path": path}})
        assert response.status_code == 201, response.text
        job = response.json()
        assert job["spec"]["dataset"]["path"] == path  # the user's spec is kept as sent
        resolved = store.get_job(job["id"]).resolved_spec
        # no node's absolute path in the stored spec: keys each worker resolves to its datasets directory
        assert resolved["dataset"]["path"] == "@datasets/pets" and resolved["dataset"]["data_dir"] == "@datasets"
        on_node = on_this_node(json.loads(json.dumps(resolved)), settings)["dataset"]
        assert os.path.realpath(on_node["path"]) == real_pets and on_node["data_dir"] == str(settings.datasets_dir)
        check_job_paths({"dataset": on_node}, settings)  # what the worker loads passes its re-check
        assert job["progress"]["total_steps"] == 1  # 4 images, 1 held out, batch 4: known at submit time
    assert api.post("/v1/jobs", json={**FOLDER_JOB, "dataset": {**FOLDER_JOB["dataset"], "path": "loop",
                                                                "val_fraction": 0.5}}).status_code == 201


def test_the_worker_rechecks_a_stored_spec_before_loading(served, tmp_path):
    """A spec that reached the store without the submit-time checks (an old row, a bug) still can't
    make the worker read outside its datasets directory."""
    from worker.runner import run_job

    api, settings, store = served
    datasets = settings.datasets_dir
    model = {"name": "mlp", "num_classes": 2}
    cases = {
        "~": ("imagefolder", "~", str(datasets)),
        "~root": ("imagefolder", "~root", str(datasets)),
        "absolute outside": ("imagefolder", str(tmp_path / "outside"), str(datasets)),
        "link out": ("imagefolder", str(datasets / "escape"), str(datasets)),
        "file link out": ("imagefolder", os.path.realpath(datasets / "leaky"), str(datasets)),
        "data_dir moved": ("imagefolder", "pets", "/"),
        "key climbing out": ("imagefolder", "@datasets/../outside", "@datasets"),
        "key to a link out": ("imagefolder", "@datasets/escape", "@datasets"),
        "tensors outside uploads": ("tensors", str(tmp_path / "outside" / "ds_00000000000000000000.npz"), None),
    }
    for what, (name, path, data_dir) in cases.items():
        dataset = {"name": name, "path": path, "image_size": 8}
        if data_dir is not None:
            dataset["data_dir"] = data_dir
        job = store.create_job(JOB, {**JOB, "model": model, "dataset": dataset}, 1)
        assert run_job(job.id, settings, store) == "failed", what
        error = api.get(f"/v1/jobs/{job.id}").json()["error"]
        field = "dataset.data_dir" if what == "data_dir moved" else "dataset.path"
        assert error == {"code": "invalid_job", "message": f"{field}: {PATH_MESSAGE}"}, (what, error)


def test_a_failed_jobs_error_names_no_server_path(served, tmp_path):
    from worker.runner import run_job

    api, settings, store = served
    response = api.post("/v1/jobs", json={**FOLDER_JOB, "dataset": {**FOLDER_JOB["dataset"], "path": "broken",
                                                                    "val_fraction": 0.5}})
    assert response.status_code == 201, response.text  # files are counted at submit, decoded by the worker
    assert run_job(response.json()["id"], settings, store) == "failed"
    error = api.get(f"/v1/jobs/{response.json()['id']}").json()["error"]
    # the streamed loader reads files as training reaches them: whichever broken file comes first
    assert re.match(r"dataset.path: cannot read image [ab]/x.png", error["message"]), error
    assert str(tmp_path) not in error["message"] and "/tmp" not in error["message"]


def test_scrub_paths_replaces_server_roots_and_other_absolute_paths(tmp_path):
    from store.scrub import scrub_paths

    settings = Settings(data_dir=tmp_path).resolved()
    assert scrub_paths(f"dataset.data_dir: {settings.datasets_dir}/MNIST is not a directory", settings) == \
        "dataset.data_dir: <datasets>/MNIST is not a directory"
    assert scrub_paths(f"no file {settings.artifact_dir}/jobs/x", settings) == "no file <artifacts>/jobs/x"
    assert scrub_paths("cannot open '/etc/shadow' (see /var/log)", settings) == "cannot open '<path>' (see <path>)"
    assert scrub_paths("labels in [0, 10), 1/255 of x/y", settings) == "labels in [0, 10), 1/255 of x/y"


def write_idx(path, array) -> None:
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))


def test_mnist_jobs_use_the_servers_datasets_directory(served):
    from worker.runner import run_job

    api, settings, store = served
    raw = settings.datasets_dir / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_idx(raw / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28)))
    write_idx(raw / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 40))
    write_idx(raw / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (8, 28, 28)))
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 8))
    body = {**JOB, "dataset": {"name": "mnist"}, "training": {"epochs": 1, "batch_size": 16, "max_steps": 2}}
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert store.get_job(job_id).resolved_spec["dataset"]["data_dir"] == "@datasets"  # the worker's own folder
    assert run_job(job_id, settings, store) == "succeeded"

    missing = api.post("/v1/jobs", json={**body, "dataset": {"name": "fashion-mnist"}})
    assert missing.status_code == 422 and missing.json()["error"]["field"] == "dataset.name"
    assert str(settings.datasets_dir) not in missing.text
    given = api.post("/v1/jobs", json={**body, "dataset": {"name": "mnist", "data_dir": "/tmp"}})
    assert given.status_code == 422 and given.json()["error"]["field"] == "dataset.data_dir"


def test_imagefolder_size_is_capped_at_submit_time(tmp_path, make_api):
    def submit(dataset: dict, **limits):
        client = make_api(data_dir=tmp_path / "data", **limits)
        for i, label in enumerate(("cat", "cat", "dog", "dog")):
            png(client.settings.datasets_dir / "pets" / label / f"{i}.png", seed=i)
        return client.post("/v1/jobs", json={**FOLDER_JOB, "dataset": {**FOLDER_JOB["dataset"], **dataset}})

    assert submit({}).status_code == 201
    memory = {"loader": "memory"}  # the caps bound the in-memory loader
    cases = [(memory, {"max_imagefolder_images": 3}, "dataset.path"),
             ({**memory, "max_samples": 1}, {}, "dataset.max_samples"),
             ({**memory, "image_size": 64}, {"max_imagefolder_bytes": 4 * 3 * 64 * 64 - 1}, "dataset.image_size")]
    for dataset, limits, field in cases:
        response = submit(dataset, **limits)
        assert response.status_code == 422 and response.json()["error"]["field"] == field, response.text
        # a streamed folder (loader auto or stream) is not capped by image count or decoded size
        for loader in ("auto", "stream"):
            assert submit({**dataset, "loader": loader}, **limits).status_code == 201, (loader, limits)


def test_image_pixels_are_capped_before_decoding(tmp_path):
    from rigl_core.data.dataset import DatasetError
    from rigl_core.data.registry import load_dataset
    from rigl_core.spec import DatasetSpec

    for label in ("a", "b"):
        png(tmp_path / "imgs" / label / "0.png")
    for name, (width, height) in {"big.png": (5000, 5000), "huge.png": (30000, 30000)}.items():
        png_header_only(tmp_path / "imgs" / "a" / "1.png", width, height)
        with pytest.raises(DatasetError, match=r"^dataset.path: image a/1.png .*pixel limit") as info:
            load_dataset(DatasetSpec(name="imagefolder", path=str(tmp_path / "imgs"), image_size=8))
        assert str(tmp_path) not in str(info.value), name


def test_loaders_never_expand_home_only_the_local_cli_does(tmp_path, monkeypatch):
    from rigl_core.cli import build_parser, spec_from_args
    from rigl_core.data.dataset import DatasetError
    from rigl_core.data.registry import load_dataset
    from rigl_core.spec import DatasetSpec

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for label in ("a", "b"):
        png(tmp_path / "pets" / label / "0.png")
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset(DatasetSpec(name="imagefolder", path="~/pets", image_size=8))
    args = build_parser().parse_args(["train", "--model", "mlp", "--dataset", "imagefolder", "--data-path", "~/pets",
                                      "--out", str(tmp_path / "run")])
    assert spec_from_args(args).dataset.path == str(tmp_path / "pets")


def test_no_string_resolves_outside_the_root(tmp_path):
    """Property: whatever the string, resolve_folder returns a real folder inside the root or raises
    UserPathError (never another exception, never a path outside)."""
    from hypothesis import given, settings, strategies as st

    from store.user_paths import UserPathError, resolve_folder

    root = tmp_path / "datasets"
    make_tree(tmp_path, root)
    real_root = os.path.realpath(root)
    pieces = st.sampled_from(["pets", "cat", "escape", "inner", "..", ".", "~", "~root", "/", "//", "\x00", "a",
                              "\uff0e", "\u2215", " ", "-", "\\", "outside", "leaky", "etc"])

    @settings(max_examples=400, deadline=None, derandomize=True)
    @given(st.one_of(st.text(max_size=40), st.lists(pieces, max_size=8).map("".join),
                     st.lists(pieces, max_size=6).map("/".join)))
    def check(path):
        try:
            folder = resolve_folder(path, root)
        except UserPathError:
            return
        assert str(folder) == real_root or str(folder).startswith(real_root + os.sep)
        assert folder.is_dir() and not str(folder).startswith(str(tmp_path / "outside"))

    check()
