"""The worker's Prometheus multiprocess folder, as its writers and its readers share it.

Every training process writes its values to files in one folder; an exiting process folds its counters
and histograms into `<kind>_totals.db` (`fold`, worker/metrics.py calls it), and every reader (the
worker's own endpoint, and the API of `rigl serve` for its /metrics, api/metrics.py) reads the folder
under the same lock (`FolderCollector`), so a scrape never sees a job's counts twice or not at all.
"""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path


@contextlib.contextmanager
def folder_lock(folder: Path):
    with open(folder / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fold(folder: Path, pid: int) -> None:
    """Add process `pid`'s counter and histogram values into `<kind>_totals.db` and remove its files."""
    from prometheus_client.mmap_dict import MmapedDict

    with folder_lock(folder):
        for kind in ("counter", "histogram"):
            own = folder / f"{kind}_{pid}.db"
            if not own.exists():
                continue
            totals = MmapedDict(str(folder / f"{kind}_totals.db"))
            try:
                for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(str(own)):
                    current, timestamp = totals.read_value(key)
                    totals.write_value(key, current + value, timestamp)
            finally:
                totals.close()
            own.unlink()


class FolderCollector:
    """prometheus_client's MultiProcessCollector, reading under `folder_lock` (never mid-fold)."""

    def __init__(self, registry, path: str):
        from prometheus_client.multiprocess import MultiProcessCollector

        self.path, self.inner = Path(path), MultiProcessCollector(None, path=path)
        registry.register(self)

    def collect(self):
        with folder_lock(self.path):
            return list(self.inner.collect())
