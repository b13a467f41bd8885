"""What the webhook outbox adds to `POST /v1/jobs`, in process, on SQLite (issue: webhooks).

Every job status change runs the outbox hook (store/webhooks.py): one query for the owner's endpoints,
and one delivery row per interested endpoint. Three variants, taking turns request by request on one
API (TestClient, keys on, two owners):
- `no hook`: the hook removed from the store's sessions (the code before webhooks);
- `hook, no webhooks`: the owner has no endpoint (what every owner pays);
- `hook, 1 webhook`: the owner has one endpoint (the query plus one delivery row).
Medians in ms over `--requests` requests each, wall time and the process's CPU time (time.process_time:
on a shared machine the CPU time is the steadier measure of the work added, since time spent waiting
for a core is not in it; SQLite runs in process with synchronous=NORMAL, so no fsync waits either).
The sender is not running (nothing is sent).

    python bench/webhook_outbox.py [--requests 400]

Writes bench/results/webhook_outbox.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    from fastapi.testclient import TestClient
    from sqlalchemy import event

    from api.app import create_app
    from store import webhooks
    from store.keys import create_key
    from store.settings import Settings

    job = {"model": {"name": "mlp", "hidden_sizes": [16]}, "dataset": {"name": "digits"},
           "sparsity": {"method": "rigl", "sparsity": 0.9}, "training": {"epochs": 1}}
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), auth=True, max_active_jobs_per_owner=10**6,
                            webhook_allow_private=True)
        with TestClient(create_app(settings, enqueue=lambda _id: None, reaper=False)) as api:
            store = api.app.state.context.store
            keys = {owner: {"Authorization": f"Bearer {create_key(store, owner)[1]}"} for owner in ("plain", "hooked")}
            hook = api.post("/v1/webhooks", json={"url": "http://10.0.0.1/hook"}, headers=keys["hooked"])
            assert hook.status_code == 201, hook.text
            variants = {"no hook": keys["plain"], "hook, no webhooks": keys["plain"], "hook, 1 webhook": keys["hooked"]}
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
            for _ in range(20):  # warm up (imports, first model builds)
                api.post("/v1/jobs", json=job, headers=keys["plain"])
            for _ in range(args.requests):
                for name, headers in variants.items():
                    hooked = event.contains(store.sessions, "before_flush", webhooks._on_flush)
                    if (name == "no hook") == hooked:
                        (event.remove if hooked else event.listen)(store.sessions, "before_flush", webhooks._on_flush)
                    start, cpu = time.perf_counter(), time.process_time()
                    response = api.post("/v1/jobs", json=job, headers=headers)
                    times[name].append(((time.perf_counter() - start) * 1000, (time.process_time() - cpu) * 1000))
                    assert response.status_code == 201, response.text
            from sqlalchemy import func, select

            from store.db import WebhookDelivery

            with store.sessions() as s:
                rows = s.scalar(select(func.count()).select_from(WebhookDelivery))
            # the store alone (JobStore.create_job: the transaction the hook runs in), without the HTTP noise
            owners = {"no hook": "plain", "hook, no webhooks": "plain", "hook, 1 webhook": "hooked"}
            direct: dict[str, list[tuple[float, float]]] = {name: [] for name in owners}
            for _ in range(args.requests * 2):
                for name, owner in owners.items():
                    hooked = event.contains(store.sessions, "before_flush", webhooks._on_flush)
                    if (name == "no hook") == hooked:
                        (event.remove if hooked else event.listen)(store.sessions, "before_flush", webhooks._on_flush)
                    start, cpu = time.perf_counter(), time.process_time()
                    store.create_job(job, job, 10, owner=owner)
                    direct[name].append(((time.perf_counter() - start) * 1000, (time.process_time() - cpu) * 1000))
    lines = ["# POST /v1/jobs with the webhook outbox", "",
             f"In process (TestClient, keys on), SQLite, median of {args.requests} requests per variant, the "
             f"variants taking turns; {platform.machine()}, Python {platform.python_version()}, load average "
             f"{os.getloadavg()[0]:.1f} at the end (other work shared the cores); {rows} delivery rows written by "
             "the `1 webhook` variant. `python bench/webhook_outbox.py`.", ""]
    lines += table(times)
    lines += ["", f"The store's create_job alone (the transaction the hook runs in), median of {args.requests * 2} "
              "calls per variant, taking turns:", ""]
    lines += table(direct)
    text = "\n".join(lines) + "\n"
    (ROOT / "bench" / "results" / "webhook_outbox.md").write_text(text)
    print(text)


def table(samples: dict[str, list[tuple[float, float]]]) -> list[str]:
    """Median wall and CPU ms per variant, and each one's difference from `no hook`."""
    wall0 = statistics.median(w for w, _c in samples["no hook"])
    cpu0 = statistics.median(c for _w, c in samples["no hook"])
    rows = ["| variant | wall ms | vs no hook | CPU ms | vs no hook |", "|---|---|---|---|---|"]
    for name, values in samples.items():
        wall, cpu = statistics.median(w for w, _c in values), statistics.median(c for _w, c in values)
        rows.append(f"| {name} | {wall:.3f} | {wall - wall0:+.3f} | {cpu:.3f} | {cpu - cpu0:+.3f} |")
    return rows


if __name__ == "__main__":
    main()
