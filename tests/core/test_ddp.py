"""Masks and weights stay identical on every rank under DistributedDataParallel (2 CPU ranks, gloo).

Each rank draws its own random batches, so local gradients differ and only DDP's gradient
all-reduce (plus the sparsifier's mask broadcast) can keep the replicas in step. At the end each
rank saves its masks, the masks it computed *before* every broadcast, its weights and its
optimizer state; the parent process compares them bitwise.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

WORLD_SIZE = 2
STEPS = 32
DELTA_T = 3
T_END = 30
SPARSITY = 0.8
MODEL_SEED = 1234
SPARSIFIER_SEED = 7
INPUT_SHAPE = [1, 8, 8]
NUM_CLASSES = 10
BATCH = 16
JOIN_TIMEOUT_S = 45.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, method: str, out_dir: str) -> None:
    """One DDP rank: train STEPS steps with the sparsifier, then save everything to compare."""
    try:
        _train_rank(rank, world_size, port, method, out_dir)
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    # Results are saved and the group is gone: skip interpreter teardown, where a gloo thread
    # still being destroyed can abort the process ("terminate called without an active exception").
    os._exit(0)


def _train_rank(rank: int, world_size: int, port: int, method: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rigl_core.sparse.distributions import layer_sparsities
    from rigl_core.sparse.layers import select_layers
    from rigl_core.models.registry import build_model
    from rigl_core.sparse.schedules import UpdateSchedule
    from rigl_core.sparse.sparsifier import SPARSIFIERS

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        torch.manual_seed(MODEL_SEED)  # same init everywhere (DDP would broadcast rank 0's anyway)
        model = build_model("mlp", NUM_CLASSES, INPUT_SHAPE, hidden_sizes=[32, 16])
        ddp = DDP(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)

        layers = [layer for layer in select_layers(model, "erk") if layer.masked]  # unwrapped: no "module."
        sparsities = layer_sparsities([layer.shape for layer in layers], SPARSITY, "erk")
        schedule = UpdateSchedule(delta_t=DELTA_T, t_end=T_END, alpha=0.3, decay="cosine")
        sparsifier = SPARSIFIERS[method](layers, sparsities, optimizer, schedule, seed=SPARSIFIER_SEED)

        # Record each rank's own masks just before every broadcast: they must already agree.
        pre_broadcast: list[dict[str, torch.Tensor]] = []
        broadcast = sparsifier._broadcast_masks

        def spy_broadcast() -> None:
            pre_broadcast.append({name: mask.clone() for name, mask in sparsifier.masks.items()})
            broadcast()

        sparsifier._broadcast_masks = spy_broadcast
        sparsifier.init_masks()
        initial_masks = {name: mask.clone() for name, mask in sparsifier.masks.items()}

        torch.manual_seed(1000 + rank)  # different data on every rank -> different local gradients
        loss_fn = nn.CrossEntropyLoss()
        updates = []
        first_batch = None
        for step in range(STEPS):
            x = torch.randn(BATCH, *INPUT_SHAPE)
            y = torch.randint(0, NUM_CLASSES, (BATCH,))
            if first_batch is None:
                first_batch = x.clone()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(ddp(x), y)
            loss.backward()
            update = sparsifier.step(step)
            if update is not None:
                updates.append(update.to_dict())

        momentum = {
            layer.name: optimizer.state[layer.weight]["momentum_buffer"].clone()
            for layer in sparsifier.layers
            if "momentum_buffer" in optimizer.state.get(layer.weight, {})
        }
        torch.save(
            {
                "masks": {name: mask.clone() for name, mask in sparsifier.masks.items()},
                "initial_masks": initial_masks,
                "pre_broadcast": pre_broadcast,
                "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "momentum": momentum,
                "target_active": dict(sparsifier.target_active),
                "updates": updates,
                "first_batch": first_batch,
            },
            Path(out_dir, f"rank{rank}.pt"),
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_ranks(method: str, out_dir: Path) -> list[dict]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, WORLD_SIZE, port, method, str(out_dir)), daemon=True)
        for rank in range(WORLD_SIZE)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    errors = "\n".join(p.read_text() for p in sorted(out_dir.glob("rank*.err")))
    assert not hung, f"ranks {hung} still running after {JOIN_TIMEOUT_S}s\n{errors}"
    codes = [proc.exitcode for proc in procs]
    assert codes == [0] * WORLD_SIZE, f"exit codes {codes}\n{errors}"
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def _assert_same_masks(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: layer names differ"
    for name in a:
        assert a[name].dtype == torch.bool and b[name].dtype == torch.bool, f"{what}: {name} not bool"
        assert torch.equal(a[name], b[name]), f"{what}: {name} differs between ranks"


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", ["rigl", "set", "snfs"])
def test_ddp_masks_and_weights_identical_across_ranks(method, tmp_path):
    r0, r1 = _run_ranks(method, tmp_path)

    # The test is not vacuous: ranks saw different data, and masks were really updated.
    assert not torch.equal(r0["first_batch"], r1["first_batch"]), "ranks drew the same data"
    expected_updates = len(range(0, T_END, DELTA_T))
    assert len(r0["updates"]) == len(r1["updates"]) == expected_updates
    assert any(
        not torch.equal(r0["masks"][name], r0["initial_masks"][name]) for name in r0["masks"]
    ), "no mask update moved any connection"
    assert sum(layer["grown_new"] for u in r0["updates"] for layer in u["layers"].values()) > 0

    # Masks: identical after training, and already identical before every broadcast.
    assert set(r0["masks"]) == {"fc1", "fc2", "fc3"}  # unwrapped names, no "module." prefix
    _assert_same_masks(r0["masks"], r1["masks"], "final masks")
    _assert_same_masks(r0["initial_masks"], r1["initial_masks"], "initial masks")
    assert len(r0["pre_broadcast"]) == len(r1["pre_broadcast"]) == 1 + expected_updates
    for i, (m0, m1) in enumerate(zip(r0["pre_broadcast"], r1["pre_broadcast"])):
        _assert_same_masks(m0, m1, f"masks before broadcast #{i}")
    assert r0["updates"] == r1["updates"], "ranks report different mask updates"

    # Weights (all parameters, dense biases included) and momentum: bitwise identical.
    assert r0["state_dict"].keys() == r1["state_dict"].keys()
    for key in r0["state_dict"]:
        assert torch.equal(r0["state_dict"][key], r1["state_dict"][key]), f"{key} differs between ranks"
    assert r0["momentum"].keys() == r1["momentum"].keys() == r0["masks"].keys()
    for name in r0["momentum"]:
        assert torch.equal(r0["momentum"][name], r1["momentum"][name]), f"{name} momentum differs"

    # Exact per-layer counts; inactive weights and momentum exactly zero.
    for name, mask in r0["masks"].items():
        assert int(mask.sum()) == r0["target_active"][name], f"{name}: nnz {int(mask.sum())} != target"
        weight = r0["state_dict"][f"{name}.weight"]
        assert weight.shape == mask.shape
        assert torch.count_nonzero(weight[~mask]) == 0, f"{name}: inactive weights not zero"
        assert torch.count_nonzero(r0["momentum"][name][~mask]) == 0, f"{name}: inactive momentum not zero"
        assert torch.count_nonzero(weight[mask]) > 0, f"{name}: all active weights are zero"
