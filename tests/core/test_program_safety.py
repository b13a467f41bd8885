"""Loading a `torch.export` program runs nothing from the file (rigl_core.models.program).

Every hostile archive in helpers.programs.HOSTILE differs from a valid export in one way; each is refused
with its reason by the upload check (`inspect_program`) and by the loader jobs use (`load_program`), and
the payload's marker folder is never created. For the payloads torch's own `torch.export.load` would run,
a test shows that it does run them: the checks are what stands between an upload and code execution.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from helpers.programs import DIGITS, HOSTILE, SmallCNN, export, rewrite
from rigl_core.models.program import ArchiveLimits, ProgramError, inspect_program, load_program
from rigl_core.models.program.expressions import check_expression


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    return export(SmallCNN(), DIGITS, tmp_path_factory.mktemp("valid") / "cnn.pt2")


@pytest.mark.parametrize("name, build, reason", HOSTILE, ids=[case[0] for case in HOSTILE])
def test_hostile_archive_is_refused_with_its_reason_and_nothing_runs(valid, tmp_path, name, build, reason):
    marker = tmp_path / "payload-ran"
    hostile = build(valid, tmp_path / f"{name}.pt2", marker)
    with pytest.raises(ProgramError, match="") as upload:
        inspect_program(hostile)
    assert reason in str(upload.value)
    with pytest.raises(ProgramError):
        load_program(hostile)
    assert not marker.exists()


RUN_BY_TORCH = ["pickle-in-sample-inputs", "pickled-weight", "pickled-constant", "python-in-a-symbolic-size",
                "guards-code"]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", RUN_BY_TORCH)
def test_torch_export_load_would_run_the_payload(valid, tmp_path, name):
    """Why the checks exist: the installed torch's own loader executes each of these payloads."""
    build = next(case[1] for case in HOSTILE if case[0] == name)
    marker = tmp_path / "payload-ran"
    hostile = build(valid, tmp_path / f"{name}.pt2", marker)
    with pytest.raises(ProgramError):
        load_program(hostile)
    assert not marker.exists()
    try:
        program = torch.export.load(hostile)
        program.module()(torch.randn(2, *DIGITS))  # guards_code runs when the module is called
    except Exception:  # noqa: BLE001 - the payload ran before whatever broke next
        pass
    assert marker.exists()


def test_the_valid_export_passes(valid):
    summary = inspect_program(valid)
    assert summary.input_shape == DIGITS and summary.num_classes == 10
    assert summary.kernels == ["conv", "fc", "head"]
    assert summary.params == sum(p.numel() for p in SmallCNN().parameters())


def test_a_custom_operator_is_refused(tmp_path):
    @torch.library.custom_op("rigltest::double", mutates_args=())
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @double.register_fake
    def _(x):
        return torch.empty_like(x)

    class UsesCustomOp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(double(x.flatten(1)))

    path = export(UsesCustomOp(), DIGITS, tmp_path / "custom.pt2")
    with pytest.raises(ProgramError, match=r"operator rigltest::double is outside ATen \(a custom op\)"):
        inspect_program(path)


def test_control_flow_is_refused(tmp_path):
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = x.flatten(1)
            return torch.cond(x.sum() > 0, lambda v: self.fc(v), lambda v: self.fc(-v), (x,))

    path = export(Branches(), DIGITS, tmp_path / "cond.pt2")
    with pytest.raises(ProgramError, match="higher-order operator cond"):
        inspect_program(path)


def test_a_fixed_batch_size_is_refused_with_the_way_to_export(tmp_path):
    path = export(SmallCNN(), DIGITS, tmp_path / "static.pt2", dynamic=False)
    with pytest.raises(ProgramError) as refused:
        inspect_program(path)
    message = str(refused.value)
    assert "fixed batch size (2)" in message and "dynamic_shapes=({0: torch.export.Dim('batch')},)" in message


def test_member_count_and_inflated_size_are_capped(valid, tmp_path):
    with pytest.raises(ProgramError, match="members in"):
        inspect_program(valid, ArchiveLimits(max_members=5))
    with pytest.raises(ProgramError, match="inflates to"):
        inspect_program(valid, ArchiveLimits(max_inflated=10_000))


def test_non_finite_weights_are_refused(valid, tmp_path):
    bad = rewrite(valid, tmp_path / "nan.pt2", {"data/weights/weight_0": torch.full((72,), float("nan")).numpy()
                                                .tobytes()})
    with pytest.raises(ProgramError, match="conv.weight holds inf or NaN"):
        inspect_program(bad)


def test_a_weight_reaching_past_its_storage_is_refused(valid, tmp_path):
    short = rewrite(valid, tmp_path / "short.pt2", {"data/weights/weight_0": bytes(4 * 10)})
    with pytest.raises(ProgramError, match="conv.weight reaches past the end of its storage"):
        load_program(short)


@pytest.mark.parametrize("text", ["Symbol('s77', positive=True, integer=True)", "2*s0 + 1", "FloorDiv(s0, 2)",
                                  "Max(1, s3) - Mod(s3, 4)", "Eq(s0, 2) & Ne(s1, 3)"])
def test_symbolic_sizes_torch_writes_are_accepted(text):
    check_expression(text, "here")


@pytest.mark.parametrize("text", ["__import__('os').system('x')", "s0.__class__", "(lambda: 1)()", "s0[0]",
                                  "Pow(10, 10000000)", "10**100000", "Symbol('s0', evil=print)", "Integer(2**80)",
                                  "Symbol('../etc')", "getattr(s0, 'x')"])
def test_anything_else_in_a_symbolic_size_is_refused(text):
    with pytest.raises(ProgramError, match="symbolic size"):
        check_expression(text, "here")
