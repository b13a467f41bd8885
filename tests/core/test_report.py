"""`rigl report SOURCE --png OUT.png`: the charts of a real run, from a local --out directory or a job id.

Pixel checks look for each panel's own colours inside its sixth of the image, so a panel that silently
drew nothing (or drew the wrong series) fails.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from rigl_core.report import png as rp
from rigl_core.cli import main
from rigl_core.client import Client
from rigl_core.report.data import from_output_dir
from helpers.service import JOB, embedded_service, wait_for

PANEL_COLOURS = {  # (row, column) of the 2x3 grid -> colours its data is drawn in
    (0, 0): (rp.TRAIN_COLOR, rp.VAL_COLOR),
    (0, 1): (rp.ACCURACY_COLOR,),
    (0, 2): (rp.TARGET_COLOR, rp.ACHIEVED_COLOR),
    (1, 0): (rp.DROP_COLOR, rp.CHURN_COLOR),
    (1, 1): (rp.EXPLORATION_COLOR,),
    (1, 2): rp.FLOPS_COLORS,
}
MIN_PIXELS = 300  # a legend handle alone is well under this; a drawn series or bar is well over


def _packed(path) -> np.ndarray:
    """The image as one int per pixel (0xRRGGBB), so colour counts are a single np.unique."""
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB")).astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def pixel_counts(path) -> dict[tuple[int, int], dict[str, int]]:
    """Per panel cell, how many pixels have exactly each of the report's series colours."""
    image = _packed(path)
    h, w = image.shape
    counts = {}
    for row in range(2):
        for col in range(3):
            values, n = np.unique(image[row * h // 2:(row + 1) * h // 2, col * w // 3:(col + 1) * w // 3],
                                  return_counts=True)
            found = dict(zip(values.tolist(), n.tolist()))
            counts[row, col] = {c: found.get(int(c[1:], 16), 0)
                                for colours in PANEL_COLOURS.values() for c in colours}
    return counts


def assert_every_panel_drawn(path) -> dict[tuple[int, int], dict[str, int]]:
    """Each panel shows its series in its own colours (more than a legend handle's worth)."""
    counts = pixel_counts(path)
    for cell, colours in PANEL_COLOURS.items():
        for colour in colours:
            assert counts[cell][colour] >= MIN_PIXELS, (cell, colour, counts[cell])
    return counts


def assert_png(path, min_colours=300):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 1600 and image.height >= 900
    assert len(np.unique(_packed(path))) > min_colours  # text, lines and bars, not a blank canvas


def train(out, *extra, method="rigl"):
    rc = main(["train", "--model", "mlp", "--dataset", "digits", "--method", method, "--epochs", "2",
               "--batch-size", "64", "--lr", "0.1", "--out", str(out), "--no-progress", *extra])
    assert rc == 0


@pytest.fixture(scope="module")
def rigl_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "rigl-run"
    train(out, "--sparsity", "0.9", "--distribution", "erk", "--delta-t", "5")
    return out


def test_local_run_renders_every_panel(rigl_run, tmp_path, capsys):
    data = from_output_dir(rigl_run)
    assert data["status"] == "succeeded" and data["method"] == "rigl" and data["final"]
    assert len(data["train"]) >= 3 and len(data["eval"]) == 2 and len(data["mask_updates"]) >= 4
    assert all(u["drop_fraction"] is not None and u["churn"] is not None and 0 < u["exploration"] <= 1
               for u in data["mask_updates"])
    masked = [r for r in data["layers"] if r["masked"]]
    assert [r["name"] for r in masked] == ["fc1", "fc2", "fc3"]
    assert all(r["density"] == pytest.approx(r["target_density"], abs=1e-3) for r in masked)
    assert data["totals"]["sparsity"] == pytest.approx(0.9, abs=0.002)
    assert 0 < data["totals"]["inference_flops_ratio"] < data["totals"]["training_flops_ratio"] < 1
    assert "rigl" in data["title"] and "90.0% sparse" in data["title"] and "val accuracy" in data["title"]

    out = tmp_path / "figs" / "report.png"  # the parent folder is created
    assert main(["report", str(rigl_run), "--png", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert_png(out)
    counts = assert_every_panel_drawn(out)
    # the density bars are bars, not just legend patches
    assert counts[0, 2][rp.TARGET_COLOR] > 5000 and counts[0, 2][rp.ACHIEVED_COLOR] > 5000


def test_json_matches_the_normalised_data(rigl_run, capsys):
    assert main(["report", str(rigl_run), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(from_output_dir(rigl_run)))
    assert {"title", "status", "method", "train", "eval", "mask_updates", "layers", "totals"} <= printed.keys()


def test_dense_run_renders_with_no_mask_updates(tmp_path):
    run = tmp_path / "dense-run"
    train(run, method="dense")
    data = from_output_dir(run)
    assert data["mask_updates"] == [] and not any(r["masked"] for r in data["layers"])
    assert data["eval"] and data["totals"]["training_flops_ratio"] == pytest.approx(1.0)
    out = tmp_path / "dense.png"
    assert main(["report", str(run), "--png", str(out)]) == 0
    assert_png(out)
    counts = pixel_counts(out)
    assert counts[0, 0][rp.TRAIN_COLOR] >= MIN_PIXELS and counts[0, 1][rp.ACCURACY_COLOR] >= MIN_PIXELS
    assert counts[1, 2][rp.FLOPS_COLORS[0]] > 5000  # the FLOPs bars at 1.0x
    for cell, colour in (((0, 2), rp.TARGET_COLOR), ((1, 0), rp.DROP_COLOR), ((1, 1), rp.EXPLORATION_COLOR)):
        assert counts[cell][colour] == 0  # "no data" text instead of a chart


def test_bad_sources_exit_2_with_one_line(rigl_run, tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["report", str(missing), "--png", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rigl: error: SOURCE: ") and "does not exist" in err and "\n" not in err
    assert not (tmp_path / "a.png").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), "--png", str(tmp_path / "a.png")]) == 2
    assert "has no report.json" in capsys.readouterr().err

    (empty / "report.json").write_text("{not json")
    assert main(["report", str(empty), "--png", str(tmp_path / "a.png")]) == 2
    assert "SOURCE: cannot read" in capsys.readouterr().err

    assert main(["report", str(tmp_path), "--png", str(tmp_path)]) == 2
    assert "--png: " in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["report", str(rigl_run), "--png", str(tmp_path / "file" / "x.png")]) == 2
    assert capsys.readouterr().err.startswith("rigl: error: --png: cannot write ")
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "rigl: error: --png: required (or --json to print the data)"


def test_diverged_and_truncated_metrics_still_render(rigl_run, tmp_path, capsys):
    """A NaN loss and a half-written last line (a killed run) must not break the chart or the JSON."""
    run = tmp_path / "copy"
    run.mkdir()
    (run / "report.json").write_text((rigl_run / "report.json").read_text())
    lines = (rigl_run / "metrics.jsonl").read_text().splitlines()
    lines.insert(1, json.dumps({"type": "train", "step": 11, "epoch": 0, "loss": float("nan"), "lr": 0.1}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"type": "train", "st')
    assert main(["report", str(run), "--json", "--png", str(tmp_path / "x.png")]) == 0
    text = capsys.readouterr().out
    assert "NaN" not in text
    data = json.loads(text)
    assert {"step": 11, "loss": None} in data["train"]
    assert_png(tmp_path / "x.png")


# ---------------------------------------------------------------------------------------- service
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `rigl serve` (embedded SQLite, filesystem broker, one worker)."""
    with embedded_service(tmp_path_factory.mktemp("report-serve") / "data") as url:
        yield url


@pytest.mark.slow
def test_service_job_by_id(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RIGL_API_URL", server)
    spec = {**JOB, "sparsity": {**JOB["sparsity"], "schedule": {"delta_t": 5}}}
    with Client(server) as client:
        done = client.submit(spec).wait(timeout=120)
        assert done.status == "succeeded"
        running = client.submit({**spec, "training": {"epochs": 2000, "batch_size": 64}})
        wait_for(lambda: client.get(running.id).status == "running", 60, what="running")

        # finished: measured densities, every curve
        out = tmp_path / "job.png"
        assert main(["report", done.id, "--png", str(out)]) == 0
        assert capsys.readouterr().out.strip() == str(out)
        assert_png(out)
        assert_every_panel_drawn(out)
        assert main(["report", done.id, "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["source"] == done.id and data["status"] == "succeeded" and data["final"]
        assert data["eval"] and data["train"] and len(data["mask_updates"]) >= 4
        assert data["val_accuracy"] == done.result["final_metrics"]["val_accuracy"]
        assert data["totals"]["sparsity"] == pytest.approx(0.9, abs=0.002)
        assert all(r["density"] is not None for r in data["layers"])
        assert done.id in data["title"]

        # still running: the plan's targets, no achieved bars yet, and it says so
        out = tmp_path / "running.png"
        assert main(["report", running.id, "--json", "--png", str(out)]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["status"] in ("running", "cancelling") and not data["final"]
        assert data["layers"] and all(r["density"] is None and r["target_density"] for r in data["layers"])
        counts = pixel_counts(out)
        assert counts[0, 2][rp.TARGET_COLOR] > 5000 and counts[0, 2][rp.ACHIEVED_COLOR] == 0
        assert running.cancel().wait(timeout=60).status == "cancelled"

    assert main(["report", "job_00000000000000000000", "--png", str(tmp_path / "no.png")]) == 2
    assert capsys.readouterr().err.strip() == "rigl: error: job_id: no job 'job_00000000000000000000'"
    assert not (tmp_path / "no.png").exists()


def test_one_update_run_draws_labelled_bars_not_a_lone_dot(tmp_path):
    """ΔT=100 over 46 steps makes one mask update: panels (d)/(e) show it as labelled bars."""
    from matplotlib.figure import Figure

    run = tmp_path / "one-update"
    train(run, "--sparsity", "0.9", "--delta-t", "100")
    data = from_output_dir(run)
    assert len(data["mask_updates"]) == 1
    update = data["mask_updates"][0]
    axes = Figure().subplots(1, 2)
    rp._updates(axes[0], data)
    rp._exploration(axes[1], data)
    assert not any(line.get_marker() not in (None, "None", "") and len(line.get_xdata()) == 1
                   for ax in axes for line in ax.get_lines())  # no single-marker series
    heights = [round(patch.get_height(), 6) for patch in axes[0].patches]
    assert heights == [round(update["drop_fraction"], 6), round(update["churn"], 6)]
    assert [t.get_text() for t in axes[0].texts] == [f"{update['drop_fraction']:.3f}", f"{update['churn']:.3f}"]
    assert [round(p.get_height(), 6) for p in axes[1].patches] == [round(update["exploration"], 6)]
    assert all(p.get_x() >= -1e-9 for ax in axes for p in ax.patches)  # inside the step axis
    out = tmp_path / "one.png"
    assert main(["report", str(run), "--png", str(out)]) == 0
    counts = assert_every_panel_drawn(out)
    assert counts[1, 0][rp.DROP_COLOR] > 2000 and counts[1, 1][rp.EXPLORATION_COLOR] > 2000  # bars, not a dot
