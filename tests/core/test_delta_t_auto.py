"""delta_t "auto" and the too-few-mask-updates warning: a short run must not silently train
almost static (issue 14: the quick start made one mask update and reached 25%)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from rigl_core.sparse.schedules import UpdateSchedule, few_updates_warning, resolve_delta_t
from rigl_core.spec import JobSpec, ScheduleSpec
from helpers.service import JOB


@pytest.mark.parametrize("t_end,expected", [(1, 1), (9, 1), (34, 3), (345, 34), (999, 99), (1000, 100),
                                            (75_000, 100)])
def test_auto_is_the_papers_100_on_long_runs_and_ten_updates_on_short_ones(t_end, expected):
    delta_t = resolve_delta_t("auto", t_end)
    assert delta_t == expected
    assert len(UpdateSchedule(delta_t, t_end).update_steps()) >= min(10, t_end)


def test_the_update_count_of_a_huge_run_is_worked_out_without_listing_its_steps():
    """The API checks a submitted job's schedule before refusing it for its length: a JobSpec of 10^10 steps
    held the API for two minutes and gigabytes while the warning listed its 10^8 update steps (issue 26's
    newcomer run: test_job_caps took 127 s of the fast tests)."""
    import tracemalloc

    from rigl_core.sparse.schedules import update_schedule
    from rigl_core.spec import SparsitySpec

    tracemalloc.start()
    try:
        schedule, warnings = update_schedule(SparsitySpec(method="rigl", sparsity=0.9), 10**8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (schedule.t_end, schedule.delta_t, warnings) == (75_000_000, 100, [])
    assert peak < 1_000_000, f"{peak:,} bytes to count 750,000 updates"
    assert schedule.update_count() == 750_000
    assert UpdateSchedule(34, 345).update_count() == len(UpdateSchedule(34, 345).update_steps()) == 11
    assert UpdateSchedule(7, 1).update_count() == 1 and UpdateSchedule(100, 400).update_count() == 4


def test_an_integer_delta_t_is_used_as_given_and_auto_is_the_default():
    assert resolve_delta_t(7, 34) == 7 and resolve_delta_t(100, 34) == 100
    assert ScheduleSpec().delta_t == "auto"  # the paper's 100 on every run as long as the paper's
    assert ScheduleSpec(delta_t="auto").delta_t == "auto"
    for bad in (0, "fast", 1.5):
        with pytest.raises(ValidationError, match="delta_t"):
            ScheduleSpec(delta_t=bad)


def test_warning_names_the_field_and_the_fix_only_for_methods_that_update():
    warning = few_updates_warning("rigl", 100, 34, 46)
    assert warning is not None and "sparsity.schedule.delta_t" in warning
    assert "1 mask update(s)" in warning and "set delta_t to 3" in warning
    assert few_updates_warning("rigl", 3, 34, 46) is None  # 12 updates
    assert few_updates_warning("set", 100, 400, 600) is not None  # updates at 0, 100, 200, 300
    assert few_updates_warning("set", 100, 401, 600) is None  # ... and 400: five
    assert few_updates_warning("static", 100, 34, 46) is None and few_updates_warning("dense", 100, 34, 46) is None


def test_trainer_resolves_auto_and_the_cli_warns_on_stderr(tmp_path, capsys):
    from rigl_core.cli import main

    args = ["train", "--model", "mlp", "--dataset", "digits", "--epochs", "1", "--max-steps", "8",
            "--no-progress", "--out"]
    assert main([*args, str(tmp_path / "fixed"), "--delta-t", "100"]) == 0
    fixed = json.loads((tmp_path / "fixed" / "report.json").read_text())
    assert fixed["delta_t"] == 100 and len(fixed["schedule_warnings"]) == 1
    assert "warning: sparsity.schedule.delta_t: 1 mask update(s)" in capsys.readouterr().err

    assert main([*args, str(tmp_path / "auto"), "--delta-t", "auto"]) == 0
    auto = json.loads((tmp_path / "auto" / "report.json").read_text())
    assert auto["t_end"] == 6 and auto["delta_t"] == 1 and auto["schedule_warnings"] == []
    assert "mask update" not in capsys.readouterr().err


@pytest.fixture()
def api(make_api):
    return make_api(reaper=True)


def test_the_job_json_carries_the_warning_at_submit_and_after(api):
    fixed = {**JOB, "sparsity": {**JOB["sparsity"], "schedule": {"delta_t": 100}}}
    job = api.post("/v1/jobs", json=fixed).json()  # 46 steps, T_end 34, ΔT 100: one update
    assert len(job["warnings"]) == 1 and "sparsity.schedule.delta_t" in job["warnings"][0]
    assert api.get(f"/v1/jobs/{job['id']}").json()["warnings"] == job["warnings"]
    auto = {**JOB, "sparsity": {**JOB["sparsity"], "schedule": {"delta_t": "auto"}}}
    assert api.post("/v1/jobs", json=auto).json()["warnings"] == []
    assert api.post("/v1/jobs", json=JOB).json()["warnings"] == []  # auto is the default
    JobSpec.model_validate(auto)  # the same spec the worker trains


def test_plan_with_total_steps_resolves_auto_and_warns_on_stderr(capsys):
    from rigl_core.cli import main

    base = ["plan", "--model", "mlp", "--input-shape", "1,8,8", "--json", "--total-steps", "460"]
    assert main([*base, "--delta-t", "100"]) == 0
    out = capsys.readouterr()
    schedule = json.loads(out.out)["schedule"]
    assert (schedule["t_end"], schedule["delta_t"], schedule["mask_updates"]) == (345, 100, 4)
    assert "warning: sparsity.schedule.delta_t: 4 mask update(s)" in out.err and "set delta_t to 34" in out.err
    assert main([*base, "--delta-t", "auto"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["schedule"]["mask_updates"] == 11 and "mask update" not in out.err


def test_training_flops_use_the_resolved_auto_delta_t_when_the_run_length_is_known():
    from rigl_core.models.registry import build_model
    from rigl_core.sparse.plan import make_plan
    from rigl_core.spec import SparsitySpec

    model = build_model("mlp", 10, [1, 8, 8], None, device="meta")

    def ratio(delta_t, total_steps=None):
        spec = SparsitySpec(schedule={"delta_t": delta_t})
        return make_plan(model, [1, 8, 8], spec, total_steps=total_steps).training_flops_ratio()

    assert ratio("auto", 460) == ratio(34, 460) > ratio(100, 460)  # T_end 345 → ΔT 34: more update passes
    assert ratio("auto") == ratio(100)  # length unknown: the paper's ΔT
