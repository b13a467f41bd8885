"""README's program example end to end against a real `rigl serve` (API and worker processes): a custom
module exported and uploaded by the client, trained as a job, downloaded, and loaded with
`load_state_dict` into the original class; a hostile archive sent to the same server is refused."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from helpers.doc_pages import block
from helpers.programs import DIGITS, HOSTILE, SmallCNN, export
from helpers.service import ROOT, embedded_service

pytestmark = pytest.mark.slow

EXAMPLE = block("python", "README.md", "client.upload_program")


def test_readme_program_example_runs_against_rigl_serve(tmp_path):
    script = EXAMPLE.replace('"epochs": 10', '"epochs": 3') + "\nprint('loaded', model.out.weight.shape)\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIGL_")}
    with embedded_service(tmp_path / "data", log_path=tmp_path / "serve.log") as url:
        result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**env, "RIGL_API_URL": url,
                                "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        sparsity = float(re.search(r"sparsity (\d\.\d+)", result.stdout).group(1))
        assert abs(sparsity - 0.9) < 0.005
        assert "loaded torch.Size([10, 128])" in result.stdout
        assert (tmp_path / "gated.safetensors").exists()

        from rigl_core.client import Client, InvalidRequest

        name, build, reason = next(case for case in HOSTILE if case[0] == "pickle-in-sample-inputs")
        valid = export(SmallCNN(), DIGITS, tmp_path / "valid.pt2")
        marker = tmp_path / "payload-ran"
        with Client(url) as client, pytest.raises(InvalidRequest) as refused:
            client.upload_program(build(valid, tmp_path / "hostile.pt2", marker))
        assert refused.value.status == 422 and reason in str(refused.value)
        assert not marker.exists()
