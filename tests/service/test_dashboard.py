"""The web dashboard, end to end in a real headless Chromium (Debian's, driven by Playwright).

`rigl serve` runs with API keys required; the browser enters the key once, submits a job through
the form (after its plan preview), watches it succeed live, reads the charts, downloads the
checkpoint, compares jobs and cancels a long one. `.ci/run` installs Chromium and sets
RIGL_REQUIRE_BROWSER=1, so there a missing browser is a failure, not a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers.service import ROOT, embedded_service

CHROMIUM = os.environ.get("RIGL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("RIGL_REQUIRE_BROWSER") == "1"
WAIT_MS = 180_000  # how long one step may wait for the page; only a hang reaches it
ARTIFACTS = Path(os.environ.get("RIGL_TEST_ARTIFACTS", ROOT / "tests" / "artifacts"))


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed"
    if not CHROMIUM:
        return "no chromium on PATH (apt-get install chromium)"
    return None


missing = _browser_missing()
if missing and REQUIRED:
    raise RuntimeError(f"RIGL_REQUIRE_BROWSER=1 but {missing}")
pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.skipif(missing is not None, reason=missing or "")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`rigl serve` (API + one worker) with keys required, and one key for `alice`."""
    data = tmp_path_factory.mktemp("dashboard") / "data"
    settings = {"RIGL_AUTH": "true", "RIGL_EVENT_EVERY_STEPS": "1"}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RIGL_")}, "RIGL_DATA_DIR": str(data), **settings}
    key = subprocess.run([sys.executable, "-m", "rigl_core.cli", "keys", "create", "--owner", "alice"], env=env,
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    with embedded_service(data, log_path=data.parent / "serve.log", **settings) as base:
        yield base, key


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))
        # Every step waits for its element or text (the plan preview, a redraw, a status) as long as a loaded
        # machine needs: Playwright's own 5 s default for expect() was a wall-clock limit, not a check.
        page.set_default_timeout(WAIT_MS)
        expect.set_options(timeout=WAIT_MS)
        yield page
        expect.set_options(timeout=5_000)  # Playwright's default, for other modules
        context.close()
        browser.close()


def _get(base: str, key: str, path: str) -> dict:
    import httpx

    response = httpx.get(base + path, headers={"Authorization": f"Bearer {key}"})
    response.raise_for_status()
    return response.json()


def test_dashboard_end_to_end(server, page, tmp_path):
    from playwright.sync_api import expect

    base, key = server
    streams = []
    page.on("request", lambda r: streams.append(r.url) if "/events/stream" in r.url else None)

    # 1. Keys are required: the page says so, then works once the key is entered.
    page.goto(base + "/")
    expect(page.locator("#key-state")).to_have_text("API key needed or rejected")
    expect(page.locator("#banner")).to_contain_text("API key")
    page.fill("#key-input", key)
    page.click("#key-save")
    expect(page.locator("#key-state")).to_have_text("key set for this session")
    expect(page.locator("#jobs-table")).to_contain_text("No jobs yet")

    # 2. The form builds a JobSpec; the plan preview follows every edit.
    page.click("text=New job")
    expect(page.locator("#plan-totals")).to_contain_text("sparsity 90.0% of masked weights")
    expect(page.locator("#plan-table tbody tr")).to_have_count(3)  # fc1, fc2, fc3
    # The form starts from the JobSpec's defaults (ΔT auto), with the dataset's suggested length (issue 26).
    expect(page.locator("#f-delta_t")).to_have_value("auto")
    expect(page.locator("#f-epochs")).to_have_value("20")
    assert '"delta_t": "auto"' in page.input_value("#spec-json")
    expect(page.locator("#f-dataset option[value=mnist]")).to_have_count(1)  # GET /v1/datasets has answered
    page.select_option("#f-dataset", "mnist1d")
    expect(page.locator("#f-epochs")).to_have_value("60")
    page.select_option("#f-dataset", "digits")
    expect(page.locator("#f-epochs")).to_have_value("20")
    expect(page.locator("#plan-totals")).to_contain_text("on input [1,8,8]")
    assert "Fan-in" not in page.inner_text("#plan-table thead")  # unstructured: no fan-in column
    page.fill("#f-sparsity", "0.8")
    expect(page.locator("#plan-totals")).to_contain_text("sparsity 80.0% of masked weights")
    expect(page.locator("#plan-chart rect.bar")).to_have_count(3)

    # Fields typed into the JSON survive later form edits.
    spec = page.input_value("#spec-json").replace('"epochs": 20,', '"epochs": 20, "label_smoothing": 0.05,')
    page.fill("#spec-json", spec)
    page.fill("#f-batch_size", "64")
    merged = page.input_value("#spec-json")
    assert '"label_smoothing": 0.05' in merged and '"batch_size": 64' in merged

    # 3. Bad input comes back naming the field; nothing is submitted.
    page.fill("#f-sparsity", "1.5")
    page.click("#submit-job")
    expect(page.locator("#submit-error")).to_contain_text("sparsity.sparsity")
    expect(page.locator("#plan-totals")).to_contain_text("sparsity.sparsity")

    # 4. A real job: submitted through the form, watched live until it succeeds.
    for field, value in (("sparsity", "0.8"), ("delta_t", "10"), ("epochs", "4"), ("batch_size", "64"),
                         ("lr", "0.05")):
        page.fill(f"#f-{field}", value)
    page.click("#submit-job")
    page.wait_for_url(re.compile(r".*#/jobs/job_[0-9a-f]+$"))
    job_id = page.url.rsplit("/", 1)[1]
    expect(page.locator(".toolbar .status")).to_have_text("succeeded")
    assert any(f"/v1/jobs/{job_id}/events/stream" in url for url in streams), "the job page did not use SSE"

    # 5. The charts: curves from the stream, per-layer density (target and achieved per masked layer).
    expect(page.locator("#chart-density .chart-title")).to_have_text("Per-layer density: target vs achieved")
    expect(page.locator("#chart-density rect.bar")).to_have_count(6)
    # the per-layer table: every layer with its shape, densities and nonzeros (no fan-in for rigl)
    expect(page.locator("#layer-table thead")).to_contain_text("Achieved density")
    expect(page.locator("#layer-table tbody tr")).to_have_count(3)
    assert "Fan-in" not in page.inner_text("#layer-table thead")
    # (charts redraw at most once a second: expect() waits for the redraw that follows the last events)
    expect(page.locator("#chart-loss polyline.series")).to_have_count(2)
    expect(page.locator("#chart-accuracy circle")).to_have_count(4)  # one evaluation per epoch
    expect(page.locator("#chart-drop polyline.series")).to_have_count(2)
    expect(page.locator("#chart-exploration polyline.series")).to_have_count(1)
    expect(page.locator("#chart-flops rect.bar")).to_have_count(4)
    expect(page.locator("#event-log")).to_contain_text("dense checkpoint")
    summary = page.locator("#job-summary").inner_text()
    assert "rigl" in summary and "80.0%" in summary
    exploration = float(re.search(r"Exploration\s+([\d.]+)%", summary).group(1))
    assert 20.0 < exploration <= 100.0  # ever-active share grows past the 20% density
    assert "mask_update" in page.inner_text("#event-log")
    expect(page.locator("#job-spec")).to_contain_text('"delta_t": 10')

    # 6. The sparse checkpoint downloads through the button and is 80% sparse in masked layers.
    with page.expect_download() as info:
        page.click("#download-dense")
    path = tmp_path / "model.safetensors"
    info.value.save_as(path)
    tensors = load_file(str(path))
    kernels = [v for k, v in tensors.items() if k.endswith("weight")]
    zeros = sum(int((v == 0).sum()) for v in kernels) / sum(v.size for v in kernels)
    assert 0.75 < zeros < 0.85 and all(np.isfinite(v).all() for v in tensors.values())
    buttons = page.locator(".checkpoint button").all_inner_texts()  # every deployable export, in order
    assert buttons == ["Download dense", "Download packed", "Download compressed", "Download onnx"], buttons
    with page.expect_download() as info:
        page.click("#download-compressed")
    assert info.value.suggested_filename == f"{job_id}-model.compressed.safetensors"
    info.value.save_as(tmp_path / "c.safetensors")
    from rigl_core.export.compressed import read_compressed

    back = read_compressed(tmp_path / "c.safetensors")
    assert set(back) == set(tensors) and all(np.array_equal(back[k], tensors[k]) for k in tensors)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard_job.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000
    from PIL import Image

    with Image.open(shot) as image:  # the charts are really drawn: their series colours fill pixels
        counts = {colour: n for n, colour in image.convert("RGB").getcolors(maxcolors=1 << 24)}
    # bars (achieved, target, FLOPs) fill areas; the exploration line is a thin anti-aliased stroke
    for colour, least in (((0x25, 0x63, 0xEB), 1000), ((0x94, 0xA3, 0xB8), 1000), ((0x08, 0x91, 0xB2), 1000),
                          ((0x7C, 0x3A, 0xED), 50)):
        assert counts.get(colour, 0) > least, (colour, counts.get(colour, 0))
    assert "succeeded" in page.inner_text("main") and "Download dense" in page.inner_text("main")

    # 7. The jobs list shows it; compare plots accuracy against sparsity for the selection.
    page.click("text=Jobs")
    row = page.locator(f'tr[data-job="{job_id}"]')
    expect(row).to_contain_text("succeeded")
    expect(row).to_contain_text("80.0%")
    row.locator("input[type=checkbox]").check()
    page.click("#compare-selected")
    expect(page.locator("#compare-chart circle.point")).to_have_count(1)
    expect(page.locator("#compare-table")).to_contain_text(job_id)

    # 8. srigl (constant fan-in): the plan has a fan-in column; the job page's layer table shows each layer's
    # active neurons and fan-in, and the condensed export downloads.
    page.click("text=New job")
    page.select_option("#f-method", "srigl")
    expect(page.locator("#plan-table thead")).to_contain_text("Fan-in")
    for field, value in (("sparsity", "0.8"), ("delta_t", "10"), ("epochs", "2"), ("batch_size", "64"),
                         ("lr", "0.05")):
        page.fill(f"#f-{field}", value)
    assert '"method": "srigl"' in page.input_value("#spec-json")
    page.click("#submit-job")
    page.wait_for_url(re.compile(r".*#/jobs/job_[0-9a-f]+$"))
    srigl_id = page.url.rsplit("/", 1)[1]
    expect(page.locator(".toolbar .status")).to_have_text("succeeded", timeout=180_000)
    expect(page.locator("#layer-table thead")).to_contain_text("Active neurons")
    expect(page.locator("#layer-table thead")).to_contain_text("Achieved density")
    cells = page.locator("#layer-table tbody tr").evaluate_all("rows => rows.map(r => [...r.cells].map(c => c.textContent))")
    assert [row[0] for row in cells] == ["fc1", "fc2", "fc3"], cells
    report = {r["name"]: r for r in _get(base, key, f"/v1/jobs/{srigl_id}/sparsity")["layers"]}
    for name, shape, _target, _achieved, nnz, neurons, fan_in in cells:
        row = report[name]
        assert shape == "×".join(map(str, row["shape"])) and int(nnz.replace(",", "")) == row["nnz"]
        if name == "fc1":  # srigl keeps the first layer dense: no neurons or fan-in to show
            assert not row["masked"] and neurons == "—" and fan_in == "—", (row, neurons, fan_in)
            continue
        assert neurons == f"{row['active_neurons']} of {row['neurons']}" and int(fan_in) == row["fan_in"]
        assert row["nnz"] == row["active_neurons"] * row["fan_in"]  # constant fan-in, as the table says
    expect(page.locator("#download-condensed")).to_have_count(1)

    # Compare two jobs of different methods and lengths: one series each, named by what differs, labels that
    # do not overlap, and charts drawn at their box's own width (text at its real size on a 1400 px screen).
    page.goto(f"{base}/#/compare?ids={job_id},{srigl_id}")
    expect(page.locator("#compare-chart circle.point")).to_have_count(2)
    expect(page.locator("#compare-table")).to_contain_text("rigl · 4 ep")
    expect(page.locator("#compare-table")).to_contain_text("srigl · 2 ep")
    assert page.locator("#compare-chart polyline.group-line").count() == 0  # no line joins the two settings
    boxes = page.locator("#compare-chart text.point-label, #compare-chart circle.point").evaluate_all(
        "nodes => nodes.map(n => { const b = n.getBoundingClientRect(); return [n.tagName, b.x, b.y, b.width, b.height]; })")
    labels = [b for b in boxes if b[0] == "text"]
    assert labels, boxes
    for i, (_, x, y, w, h) in enumerate(boxes):
        for tag, x2, y2, w2, h2 in boxes[i + 1:]:
            assert not (x < x2 + w2 - 0.5 and x2 < x + w - 0.5 and y < y2 + h2 - 0.5 and y2 < y + h - 0.5), boxes
    scale = page.locator("#compare-chart svg").evaluate(
        "svg => svg.getBoundingClientRect().width / svg.viewBox.baseVal.width")
    assert abs(scale - 1) < 0.02, scale
    assert page.locator("#compare-chart svg").evaluate("svg => svg.getBoundingClientRect().width") > 1000

    # 9. Cancel from the page: a long job stops.
    page.click("text=New job")
    page.fill("#f-epochs", "500")
    page.click("#submit-job")
    page.wait_for_url(re.compile(r".*#/jobs/job_[0-9a-f]+$"))
    expect(page.locator(".toolbar .status")).to_have_text("running")
    page.click("#cancel-job")
    expect(page.locator(".toolbar .status")).to_have_text("cancelled")

    # 10. The key lives in this tab's session only, and the page raised no script errors.
    assert page.evaluate("sessionStorage.getItem('rigl.apiKey')") == key
    assert page.evaluate("localStorage.length") == 0
    assert page.errors == []
