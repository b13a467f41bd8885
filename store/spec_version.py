"""The version of a stored job spec, so a worker never fails a job a newer release wrote.

During a rolling upgrade a new API may store a spec an old worker can't parse (a new field, a new
method). Every job's `resolved_spec` carries `spec_version` (stamped when its row is made,
store/jobs.py `add_job_rows`; kept inside the JSON column, no schema change); a spec without one is
version 1, the format of every release before it. A worker that finds a version above `SPEC_VERSION`
hands the job back without spending an attempt (worker/runner.py `JobRun.defer`), and its message
comes back after `spec_defer_seconds`, so an old worker doesn't spin on it while a new one can take it.

Raise SPEC_VERSION when a release writes specs that the previous release's JobSpec would refuse.
"""

from __future__ import annotations

SPEC_VERSION = 1  # the newest spec format this release reads and writes
KEY = "spec_version"


def stamped(resolved_spec: dict) -> dict:
    """The spec as stored: with this release's version."""
    return {**resolved_spec, KEY: SPEC_VERSION}


def version_of(resolved_spec: dict) -> int:
    """The stored version (1 when absent: written before versions). A value that is not a positive
    integer is taken as newer than any release: only a release that knows it wrote it can judge it."""
    value = (resolved_spec or {}).get(KEY, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return 2**31 - 1
    return value


def spec_body(resolved_spec: dict) -> dict:
    """The spec without its version: what JobSpec parses."""
    return {key: value for key, value in (resolved_spec or {}).items() if key != KEY}
