"""One job on N devices: the training process is rank 0 and starts ranks 1..N-1 as child processes.

Why this shape: the caller (`rigl train`, the service's worker) keeps calling `Trainer(spec).fit()`
unchanged, and only rank 0 has callbacks, writes files and talks to the job store. The other ranks
are plain `python -m rigl_core.training.rank` processes (not multiprocessing children: a Celery pool
process is daemonic and may not fork those), given the spec and the checkpoint to resume from. They
die with rank 0 (PR_SET_PDEATHSIG) and ignore SIGTERM/SIGINT: rank 0 decides when everyone stops
and tells them after every step, so all ranks stop at the same step and rank 0 checkpoints it.

NCCL carries the gradients on GPUs and gloo on CPU; a small gloo group carries the per-step stop flag
(so that flag never waits on the GPU).

A job on several nodes (`training.nodes`) is started by an engine with gang scheduling (the service's Ray
Train module), which forms the process group itself: each of its processes builds a Trainer with a `Gang`
(its rank, the world size, its device) and `attach`es to that group instead of starting children.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

STARTUP_TIMEOUT_S = float(os.environ.get("RIGL_DDP_STARTUP_TIMEOUT", "600"))
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def resolve_devices(devices: int | str, device: torch.device) -> int:
    """How many processes train the job: 'all' is every visible GPU (1 on CPU)."""
    if device.type != "cuda":
        return 1 if devices == "all" else int(devices)
    visible = torch.cuda.device_count()
    if devices == "all":
        return max(1, visible)
    if devices > visible:
        raise ValueError(f"training.devices: {devices} requested but {visible} GPU(s) are visible")
    return int(devices)


def rank_device(device: torch.device, rank: int, world_size: int) -> torch.device:
    """Rank r trains on GPU r (of the visible ones); CPU ranks share the CPU. A GPU always gets its index
    ('cuda' → 'cuda:<current>'): torch.cuda.set_device and friends refuse a bare 'cuda'."""
    if device.type != "cuda":
        return device
    if world_size == 1:
        return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda", rank)


@dataclass(frozen=True)
class Gang:
    """This process's place in a job whose process group an engine has already formed (ranks on several
    nodes): rank `rank` of `world_size`, `local_world_size` of them on this node, training on `device`."""

    rank: int
    world_size: int
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")


@dataclass
class Group:
    """This process's place in a multi-device job, and (on rank 0) the other ranks' processes."""

    rank: int
    world_size: int
    device: torch.device
    control: object = None  # gloo group for the stop flag
    children: list[subprocess.Popen] = field(default_factory=list)
    workdir: Path | None = None
    threads: int | None = None  # rank 0 on CPU: torch's thread count before the ranks shared the cores
    owned: bool = True  # False: an engine formed the process group (attach) and destroys it

    # --------------------------------------------------------------- collectives
    def stop_flag(self, stop: bool) -> bool:
        """Rank 0's decision, on every rank (a one-element gloo all-reduce)."""
        flag = torch.tensor([1 if stop else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        return bool(flag.item())

    def agree(self, digest: str) -> bool:
        """Whether every rank holds the same `digest` (of its weights and masks): replicas that drifted apart
        (a rank that missed an all-reduce) would otherwise go unnoticed until the export."""
        digests: list = [None] * self.world_size
        dist.all_gather_object(digests, digest, group=self.control)
        return len(set(digests)) == 1

    def sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def close(self, abort: bool = False) -> None:
        """Leave the group; rank 0 waits for the others to finish (or, when aborting, kills them)."""
        if abort:
            for child in self.children:
                child.kill()
        if dist.is_initialized() and self.owned:
            dist.destroy_process_group()
        for child in self.children:
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self.children = []

    def child_failure(self, wait: float = 0.0) -> str | None:
        """The first child that exited with an error, with the end of its output (waiting up to `wait`
        seconds for one: a collective can fail a moment before the dead rank is reaped)."""
        deadline = time.monotonic() + wait
        while wait and time.monotonic() < deadline and all(child.poll() is None for child in self.children):
            time.sleep(0.05)
        for rank, child in enumerate(self.children, start=1):
            code = child.poll()
            if code not in (None, 0):
                log = (self.workdir / f"rank{rank}.log").read_text(errors="replace") if self.workdir else ""
                tail = [line for line in log.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
                return f"rank {rank} exited with code {code}: {tail[0]}"
        return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start(spec_json: str, world_size: int, device: torch.device, resume: str | None) -> Group:
    """Rank 0: start ranks 1..N-1 and form the process group once every rank has built its trainer.

    Ranks sign in through the TCP store after construction (dataset loaded, model built, checkpoint
    read); a rank that fails first is reported with its own error instead of a long rendezvous wait."""
    workdir = Path(tempfile.mkdtemp(prefix="rigl-ddp-"))
    spec_path = workdir / "spec.json"
    spec_path.write_text(spec_json)
    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=True, wait_for_workers=False,
                          timeout=COLLECTIVE_TIMEOUT)
    group = Group(0, world_size, rank_device(device, 0, world_size), workdir=workdir)
    env = {**os.environ, "RIGL_DDP_CHILD": "1"}
    if device.type == "cpu":  # share the cores instead of oversubscribing them
        share = max(1, torch.get_num_threads() // world_size)
        env["OMP_NUM_THREADS"] = str(share)
        group.threads = torch.get_num_threads()
        torch.set_num_threads(share)
    for rank in range(1, world_size):
        command = [sys.executable, "-m", "rigl_core.training.rank", "--spec", str(spec_path), "--rank", str(rank),
                   "--world-size", str(world_size), "--port", str(port)]
        if resume is not None:
            command += ["--resume", str(resume)]
        with open(workdir / f"rank{rank}.log", "wb") as log:
            group.children.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                   preexec_fn=_die_with_parent))
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            failure = group.child_failure()
            if failure:
                raise RuntimeError(f"training.devices: {failure}")
            if all(store.check([f"ready/{rank}"]) for rank in range(1, world_size)):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"training.devices: the other ranks did not start within {STARTUP_TIMEOUT_S:.0f} s")
            time.sleep(0.05)
        _join(group, store)
    except BaseException:
        group.close(abort=True)
        raise
    return group


def join(rank: int, world_size: int, port: int, device: torch.device) -> Group:
    """Ranks 1..N-1: sign in, then form the process group."""
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    store.set(f"ready/{rank}", "1")
    group = Group(rank, world_size, rank_device(device, rank, world_size))
    _join(group, store)
    return group


def _join(group: Group, store) -> None:
    backend = "nccl" if group.device.type == "cuda" else "gloo"
    if group.device.type == "cuda":
        torch.cuda.set_device(group.device)
    dist.init_process_group(backend, store=store, rank=group.rank, world_size=group.world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    group.control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD


def attach(gang: Gang) -> Group:
    """A rank of an engine-started job (Gang): join the process group the engine formed, with a gloo group for
    the stop flag when the gradients go over NCCL. Every rank calls this at the same point (new_group is
    collective)."""
    if not dist.is_initialized():
        raise RuntimeError("training.nodes: this rank's process group was not formed by the engine")
    if dist.get_world_size() != gang.world_size or dist.get_rank() != gang.rank:
        raise RuntimeError(f"training.nodes: the engine's process group has rank {dist.get_rank()} of "
                           f"{dist.get_world_size()}, the job expects rank {gang.rank} of {gang.world_size}")
    if gang.device.type == "cuda":
        torch.cuda.set_device(gang.device)
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return Group(gang.rank, gang.world_size, gang.device, control=control, owned=False)
