"""The devices a worker owns, the queues it listens on, and keeping its visible GPUs equal to them.

A job with `training.devices: N` runs only on a worker owning ≥ N devices; `"all"` runs on any worker,
on all of its devices (the trainer counts the visible GPUs). One 8-GPU node is then either eight
workers owning one GPU each or one worker owning eight (docker-compose.yml shows both).

Slots (Celery messages) have the device class of their job (Claims.claim): a slot for N devices
starts only a job needing N. The API sends every slot to the plain queue, knowing no worker sizes; a
worker owning fewer than N sends it on to `<queue>.devices-<N>`, which only workers owning ≥ N listen
on (Claims.forward_class). So a 1-GPU worker never sits on an 8-GPU job's slot, and a backlog of
1-GPU jobs never holds up an 8-GPU one.
"""

from __future__ import annotations

import os

from store.settings import Settings


def visible_gpus() -> int:
    """CUDA GPUs this process may use (respects CUDA_VISIBLE_DEVICES; NVML, so it doesn't poison fork)."""
    import torch

    return torch.cuda.device_count()


def owned_devices(settings: Settings, gpus: int | None = None) -> int:
    """RIGL_WORKER_DEVICES, else every visible GPU, else 1 (a CPU host; >1 there means gloo processes)."""
    if settings.worker_devices is not None:
        return settings.worker_devices
    gpus = visible_gpus() if gpus is None else gpus
    return max(1, gpus)


def check_visible_gpus(settings: Settings, gpus: int | None = None) -> None:
    """The worker's setting and its visible GPUs must agree, or an 'all' job would use GPUs another worker
    owns (fewer set than visible) or jobs would be claimed that can't run (more set than visible).
    A CPU host (no GPU visible) may own any count: its jobs run as gloo processes."""
    gpus = visible_gpus() if gpus is None else gpus
    wanted = settings.worker_devices
    if wanted is None or gpus == 0 or wanted == gpus:
        return
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f"CUDA_VISIBLE_DEVICES={shown!r}" if shown is not None else "CUDA_VISIBLE_DEVICES unset"
    raise SystemExit(f"RIGL_WORKER_DEVICES={wanted} but {gpus} GPUs are visible ({where}): make them equal, "
                     f"e.g. CUDA_VISIBLE_DEVICES=0,…,{wanted - 1} or docker-compose device_ids for this worker")


def slot_queue(queue: str, devices: int) -> str:
    """The Celery queue of slots for jobs needing `devices` devices: the plain queue for 1."""
    return queue if devices <= 1 else f"{queue}.devices-{devices}"


def worker_queues(queue: str, devices: int) -> list[str]:
    """Every slot class a worker owning `devices` can serve: 1 … devices."""
    return [slot_queue(queue, n) for n in range(1, devices + 1)]
