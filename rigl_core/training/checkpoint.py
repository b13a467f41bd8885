"""A Trainer's checkpoints: what they hold, the atomic write (a full disk is a NoSpaceError), and the
resume that restores model, optimizer, masks, scaler, counters and every RNG, so a resumed run is
bitwise the run that never stopped (on CPU)."""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from rigl_core.spec import JobSpec
from rigl_core.training.kernels import contiguous_state

CHECKPOINT_VERSION = 1


class NoSpaceError(OSError):
    """The disk filled up while writing a file (the partial file has been removed); `path`: the file that
    could not be written, so the error can say where and how much room is left there."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(errno.ENOSPC, message)
        self.path = None if path is None else Path(path)

    def __str__(self) -> str:
        return self.strerror


def checkpoint_state(trainer) -> dict:
    return {
        "version": CHECKPOINT_VERSION,
        "spec": trainer.spec.model_dump_json(),
        # contiguous tensors whatever the training layout (channels_last): the file is the same
        # for either layout and loads with a plain load_state_dict
        "model": contiguous_state(trainer.model.state_dict()),
        "optimizer": contiguous_state(trainer.optimizer.state_dict()),
        "sparsifier": contiguous_state(trainer.sparsifier.state_dict()),
        **({"scaler": trainer.scaler.state_dict()} if trainer.scaler is not None else {}),
        "counters": {"step": trainer.step, "epoch": trainer.epoch, "batch_in_epoch": trainer.batch_in_epoch},
        "train_seconds": trainer.train_seconds,
        "eval_history": json.dumps(trainer.eval_history),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state(),
            "python": json.dumps(random.getstate()),
        },
    }


def save_checkpoint(trainer, path: str | os.PathLike) -> Path:
    """Atomic write: a crash mid-save never leaves a truncated checkpoint, and a failed write (a
    full disk) leaves no temp file behind. The temp name is `path` + ".tmp": callers that may race
    (two holders of one job) give each writer its own `path`. A full disk raises NoSpaceError.

    torch.save writes through a Python file object: given a path, its C++ writer reports a full
    disk as an opaque RuntimeError; through `write()` it is OSError(ENOSPC)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(trainer.checkpoint_state(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_no_space(exc):
            raise NoSpaceError(f"no space left on the device while writing the checkpoint {path.name}",
                               path) from exc
        raise
    return path


def load_checkpoint(trainer, path: str | os.PathLike) -> None:
    """Resume from our own checkpoint (loaded with weights_only=True: never unpickles code)."""
    state = torch.load(path, map_location=trainer.device, weights_only=True)
    trainer.resumed_from = str(path)
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path}: unsupported version {state.get('version')}")
    saved = JobSpec.model_validate_json(state["spec"])
    if _portable(saved) != _portable(trainer.spec):
        raise ValueError(f"checkpoint {path} was written for a different job spec")
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    _match_optimizer_layout(trainer.optimizer)
    trainer.sparsifier.load_state_dict(state["sparsifier"])
    if trainer.scaler is not None and "scaler" in state:
        trainer.scaler.load_state_dict(state["scaler"])
    counters = state["counters"]
    trainer.step, trainer.epoch, trainer.batch_in_epoch = (counters["step"], counters["epoch"],
                                                           counters["batch_in_epoch"])
    trainer.train_seconds = state["train_seconds"]
    trainer.eval_history = json.loads(state["eval_history"])
    _restore_rng(state["rng"])


def _restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"].cpu())
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    _set_numpy_state(rng["numpy"])
    version, internal, gauss = json.loads(rng["python"])
    random.setstate((version, tuple(internal), gauss))


def _match_optimizer_layout(optimizer: torch.optim.Optimizer) -> None:
    """Checkpoints hold contiguous optimizer state; give each per-element buffer its parameter's
    memory format again (channels_last), as a run that never stopped has it."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state or param.dim() != 4 or param.is_contiguous():
                continue
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    state[key] = value.contiguous(memory_format=torch.channels_last)


def _portable(spec: JobSpec) -> JobSpec:
    """The spec with where its files lie reduced to their names: a checkpoint resumes on any machine
    that holds the same files, wherever its folders are (the service gives each node its own)."""
    def name(path: str | None) -> str | None:
        return Path(path).name if path else None

    dataset = spec.dataset.model_copy(update={"path": name(spec.dataset.path), "data_dir": None})
    model = spec.model.model_copy(update={"weights": name(spec.model.weights)})
    return spec.model_copy(update={"dataset": dataset, "model": model})


def is_no_space(exc: BaseException | None) -> bool:
    """A full disk, however the writer reported it: an OSError in the chain, or safetensors' own
    error wrapping the OS's message."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "StorageFull" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached": float(cached)}


def _set_numpy_state(state: dict) -> None:
    keys = state["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["pos"], state["has_gauss"], state["cached"]))
