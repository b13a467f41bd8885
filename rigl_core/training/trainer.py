"""The training loop: one JobSpec in, a trained sparse model and a report out.

`rigl train` and the service's worker run this same Trainer with different callbacks. A run can be
stopped by a callback, checkpointed and resumed with bitwise-identical results on CPU: the data
order is a pure function of (seed, epoch), the LR a pure function of the step, and the checkpoint
holds model, optimizer, masks, method state, counters and RNG states.
"""

from __future__ import annotations

import errno
import json
import os
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rigl_core.training import distributed
from rigl_core.data.batches import BatchOrder
from rigl_core.data.feed import open_feed
from rigl_core.training.distributed import Group, rank_device, resolve_devices
from rigl_core.export.packed import stored_values
from rigl_core.training.kernels import configure_kernels, contiguous_state, resolve_channels_last, to_channels_last
from rigl_core.models.registry import build_model, check_model, resolve_task
from rigl_core.training.optim import build_optimizer, lr_at
from rigl_core.sparse.build import build_sparsifier
from rigl_core.sparse.plan import Plan
from rigl_core.sparse.rigl import RigL
from rigl_core.sparse.updater import Sparsifier
from rigl_core.sparse.updates import MaskUpdate
from rigl_core.spec import JobSpec, TrainingSpec
from rigl_core.training.tasks import Task
from rigl_core.training.warm_start import warm_start

CHECKPOINT_VERSION = 1


class Callback:
    """Hooks into the loop; override what you need. `should_stop` is polled after every step."""

    def on_step(self, trainer: "Trainer", metrics: dict) -> None: ...

    def on_eval(self, trainer: "Trainer", metrics: dict) -> None: ...

    def on_mask_update(self, trainer: "Trainer", update: MaskUpdate) -> None: ...

    def should_stop(self, trainer: "Trainer") -> bool:
        return False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"training.device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` is bf16 on a CUDA device that supports it and fp32 elsewhere (CPU included); explicit
    fp32/bf16/fp16 are taken as asked, on CPU too (torch autocasts both dtypes there)."""
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_accumulation(t: TrainingSpec, world_size: int) -> int:
    """accumulate_steps as given, or (auto) the fewest micro-batches that keep each device's micro-batch
    within max_device_batch and split the global batch evenly."""
    if t.batch_size % world_size:
        raise ValueError(f"training.batch_size: {t.batch_size} is not divisible by the {world_size} devices")
    if t.accumulate_steps != "auto":
        if t.batch_size % (world_size * t.accumulate_steps):
            raise ValueError(f"training.batch_size: {t.batch_size} is not divisible by devices × accumulate_steps "
                             f"({world_size} × {t.accumulate_steps})")
        return t.accumulate_steps
    per_device = t.batch_size // world_size
    steps = -(-per_device // t.max_device_batch)
    while per_device % steps:
        steps += 1
    return steps


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Builds data, model, optimizer and sparsifier from a JobSpec and trains.

    With `training.devices` > 1 this process is rank 0 of a DistributedDataParallel job: `fit` starts
    the other ranks (rigl_core.training.distributed), and only rank 0 runs callbacks and reports. `rank` and
    `master_port` are for those other ranks only."""

    def __init__(self, spec: JobSpec, callbacks: Sequence[Callback] = (), progress: bool = False,
                 rank: int = 0, master_port: int | None = None):
        self.spec = spec
        self.callbacks = list(callbacks)
        self.progress = progress
        t = spec.training
        device = resolve_device(t.device)
        self.world_size = resolve_devices(t.devices, device)
        self.rank = rank
        self.master_port = master_port
        self.device = rank_device(device, rank, self.world_size)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(t.precision, self.device)
        self.autocast_dtype = AUTOCAST_DTYPES[self.precision]  # None: plain fp32, no autocast
        # fp16 overflows: the scaler scales the loss and skips steps with inf/NaN gradients, and the
        # sparsifier honours the skip (no optimizer step, no drop/grow on non-finite scores).
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.tf32 = configure_kernels(self.device, t.tf32)  # CUDA only: TF32 and cudnn.benchmark
        _seed_everything(t.seed)
        self.feed = open_feed(spec.dataset, self.device, self.world_size)
        self.task = Task(resolve_task(t.task, spec.model.hf), t.label_smoothing)
        self.num_classes = spec.model.num_classes or self.feed.num_classes
        self.input_shape = self.feed.input_shape
        self._check_data_fits_model()
        self.model: nn.Module = build_model(
            spec.model.name, self.num_classes, self.input_shape, spec.model.hidden_sizes,
            architecture=spec.model.architecture, zero_init_residual=spec.model.zero_init_residual,
            hf=spec.model.hf, task=self.task.name,
        ).to(self.device)
        self._check_tokens_fit_model()
        self.channels_last = resolve_channels_last(t.channels_last, self.model, self.device)
        if self.channels_last:  # 4-D weights only; masks and exports index the logical shape
            self.model = self.model.to(memory_format=torch.channels_last)
        check_model(self.model, self.input_shape, self.num_classes, self.task.name)
        self.accumulate_steps = resolve_accumulation(t, self.world_size)
        self.batch_order = BatchOrder(self.feed.num_train, t.batch_size, t.seed, self.world_size, rank,
                                    self.accumulate_steps)
        self.steps_per_epoch = self.batch_order.steps_per_epoch
        self.total_steps = min(t.max_steps or 2**62, t.epochs * self.steps_per_epoch)
        self.optimizer = build_optimizer(self.model, t)
        built = build_sparsifier(self.model, self.optimizer, spec.sparsity, self.total_steps,
                                 input_shape=self.input_shape, seed=t.seed)
        self.sparsifier: Sparsifier = built.sparsifier
        self.plan: Plan = built.plan
        self.schedule_warnings: list[str] = built.warnings  # too few mask updates for the method to work
        self.schedule = self.sparsifier.schedule
        self.sparsifier.clip_grad_norm = t.clip_grad_norm
        warm_start(spec, self.model, self.sparsifier)  # model.weights loaded; sparsity.init magnitude's masks
        self.sparsifier.init_masks()  # seeded: the same masks on every rank
        # the public library API steps the sparsifier: the loop below calls optimizer.step() itself
        self.rigl = RigL.from_sparsifier(self.sparsifier, self.plan, self.total_steps)
        self.loss_fn = self.task.loss_fn
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.train_seconds = 0.0
        self.data_wait_seconds = 0.0
        self.eval_history: list[dict] = []
        self.export_check: dict | None = None  # metrics with the exports' fp16/bf16 values (spec.export)
        self.last_train_loss: float | None = None
        self.stopped_early = False
        self.resumed_from: str | None = None  # the other ranks of a multi-device job resume from it too
        self.group: Group | None = None
        self.forward_model: nn.Module = self.model  # what training calls: DDP- and compile-wrapped

    # ------------------------------------------------------------------ setup checks
    def _check_data_fits_model(self) -> None:
        data_shape = list(self.feed.input_shape)
        declared = self.spec.model.input_shape or (
            self.spec.model.architecture.input_shape if self.spec.model.architecture else None
        )
        if declared is not None and list(declared) != data_shape:
            field = "model.input_shape" if self.spec.model.input_shape else "model.architecture.input_shape"
            raise ValueError(f"{field}: {list(declared)} does not match the dataset's {data_shape}")
        if self.task.causal_lm:
            return  # the targets are the token ids, checked against the vocabulary once the model is built
        max_label = self.feed.max_label()
        if max_label >= self.num_classes:
            raise ValueError(
                f"model.num_classes: {self.num_classes} but the dataset has labels up to {max_label}"
            )

    def _check_tokens_fit_model(self) -> None:
        """A token model needs int64 ids below its vocabulary; other models never get token ids."""
        vocab = getattr(self.model, "vocab_size", None)
        tokens = getattr(self.feed, "tokens", False)
        if vocab is None:
            if tokens:
                raise ValueError(f"dataset.x: int64 token ids, but {self.spec.model.name!r} takes float inputs "
                                 "(give model.hf, or store x as float32)")
            return
        if not tokens or len(self.input_shape) != 1:
            raise ValueError(f"dataset.x: model.hf models take int64 token ids of shape (N, L), the data has "
                             f"samples of shape {list(self.input_shape)}{'' if tokens else ' that are not int64'}")
        if self.feed.max_token() >= vocab:
            raise ValueError(f"model.hf.vocab_size: {vocab} but the dataset has token ids up to "
                             f"{self.feed.max_token()}")
        if self.task.causal_lm:
            self.num_classes = vocab

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train until the last step or until a callback asks to stop; returns the report."""
        failed = True
        try:
            self._start_ranks()
            report = self._fit()
            failed = False
            return report
        except RuntimeError as exc:
            lost = self.group.child_failure(wait=5.0) if self.group is not None else None
            if lost:  # a collective failed because another rank died: say which and why
                raise RuntimeError(f"training.devices: {lost}") from exc
            raise
        finally:
            self.feed.close()
            if self.group is not None:
                self.group.close(abort=failed)
                self.group = None

    def _start_ranks(self) -> None:
        """Multi-device: form the process group (rank 0 starts the others) and wrap the model in DDP.
        torch.compile wraps last, around DDP, as PyTorch recommends."""
        self.forward_model = self.model
        if self.world_size > 1:
            if self.rank == 0:
                self.group = distributed.start(self.spec.model_dump_json(), self.world_size, self.device,
                                               self.resumed_from)
            else:
                self.group = distributed.join(self.rank, self.world_size, self.master_port, self.device)
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.model, device_ids=ids)
        if self.spec.training.compile:
            self.forward_model = torch.compile(self.forward_model)

    def _fit(self) -> dict:
        t = self.spec.training
        bar = None
        if self.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True)
        callbacks = self.callbacks if self.rank == 0 else []
        group = self.group
        feed = self.feed
        log_every = t.log_every_steps
        started = time.perf_counter()
        eval_seconds = 0.0
        window_start, window_wait = started, self.data_wait_seconds
        self.model.train()
        try:
            while self.step < self.total_steps:
                steps = feed.train_steps(self.batch_order, self.epoch, self.batch_in_epoch, self.step)
                stop = False
                while self.step < self.total_steps:
                    tick = time.perf_counter()
                    micros = next(steps, None)
                    self.data_wait_seconds += time.perf_counter() - tick
                    if micros is None:
                        break
                    loss = self._train_step(micros)
                    self.step += 1
                    self.batch_in_epoch += 1
                    if self.step % log_every == 0 or self.step == self.total_steps:
                        loss_value = float(loss) if group is None else group.sum([float(loss)])[0]
                        self.last_train_loss = loss_value
                        now = time.perf_counter()
                        metrics = {"step": self.step, "epoch": self.epoch, "loss": loss_value,
                                   "lr": self.optimizer.param_groups[0]["lr"],
                                   "data_wait_share": (self.data_wait_seconds - window_wait)
                                   / max(now - window_start, 1e-9)}
                        if self.sparsifier.last_grad_norm is not None:
                            metrics["grad_norm"] = float(self.sparsifier.last_grad_norm)
                        window_start, window_wait = now, self.data_wait_seconds
                        for cb in callbacks:
                            cb.on_step(self, metrics)
                        if bar is not None:
                            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
                    epoch_done = self.batch_in_epoch == self.steps_per_epoch
                    if epoch_done:
                        self.epoch += 1
                        self.batch_in_epoch = 0
                    if (epoch_done and self.epoch % t.eval_every_epochs == 0) or self.step == self.total_steps:
                        tick = time.perf_counter()
                        self._evaluate_and_notify(bar)
                        self.model.train()
                        eval_seconds += time.perf_counter() - tick
                        window_start = time.perf_counter()
                    if bar is not None:
                        bar.update(1)
                    stop = any(cb.should_stop(self) for cb in callbacks) if callbacks else False
                    if group is not None:
                        stop = group.stop_flag(stop)
                    if stop or epoch_done:
                        break
                if stop:
                    self.stopped_early = self.step < self.total_steps
                    break
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.train_seconds += time.perf_counter() - started - eval_seconds
            if bar is not None:
                bar.close()
        if self.spec.export.values != "fp32" and self.step >= self.total_steps:
            self.export_check = self._evaluate_export_values()
        return self.report()

    def _evaluate_export_values(self) -> dict:
        """The validation metrics with the values the packed/compressed exports store (fp16/bf16), beside the
        final ones: what the half-precision export costs. Every rank takes part (evaluate sums over ranks)."""
        values = self.spec.export.values
        with stored_values(self.model, self.sparsifier.masks, values):
            metrics = self.evaluate()
        final = self.eval_history[-1] if self.eval_history else {}
        change = {k: v - final[k] for k, v in metrics.items() if isinstance(final.get(k), (int, float))}
        return {"values": values, "metrics": metrics, "change": change}

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return to_channels_last(x) if self.channels_last else x

    def _train_step(self, micros: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches. Each micro-batch's loss is weighted by
        its share of the global batch (× world size, which DDP's averaging divides back out), so the
        summed gradient is the global batch's mean gradient. Returns this rank's weighted loss."""
        lr = lr_at(self.step, self.total_steps, self.steps_per_epoch, self.spec.training)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        model, scaler, dtype = self.forward_model, self.scaler, self.autocast_dtype
        last = len(micros) - 1
        total = None
        for number, (x, y, weight) in enumerate(micros):
            scale = weight * self.world_size
            sync = nullcontext() if number == last or self.group is None else model.no_sync()
            with sync:
                if dtype is None:  # fp32: exactly the plain loop
                    loss = self.task.loss(model(self._layout(x)), x, y)
                else:
                    with torch.autocast(self.device.type, dtype=dtype):
                        loss = self.task.loss(model(self._layout(x)), x, y)
                if scale != 1.0:
                    loss = loss * scale
                (loss if scaler is None else scaler.scale(loss)).backward()
            loss = loss.detach()
            total = loss if total is None else total + loss
        # as a library user's loop: rigl.step() masks (and clips) the gradients or makes a RigL update
        # that replaces the step; SET/GMP updates run in rigl's optimizer step post-hook
        if self.rigl.step(self.step, scaler=scaler):
            if scaler is not None:
                scaler.step(self.optimizer)  # already unscaled and finite: a plain optimizer.step()
            else:
                self.optimizer.step()
        if scaler is not None:
            scaler.update()
        update = self.rigl.last_update
        if update is not None:
            for cb in self.callbacks if self.rank == 0 else ():
                cb.on_mask_update(self, update)
        return total / self.world_size if self.world_size > 1 else total

    def _evaluate_and_notify(self, bar) -> None:
        metrics = {"step": self.step, "epoch": self.epoch, **self.evaluate()}
        if self.last_train_loss is not None:
            metrics["train_loss"] = self.last_train_loss
        self.eval_history.append(metrics)
        for cb in self.callbacks if self.rank == 0 else ():
            cb.on_eval(self, metrics)
        if bar is not None:
            bar.set_postfix(val_acc=f"{metrics['val_accuracy']:.3f}", refresh=False)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss and accuracy (a causal LM's per token, plus perplexity); with several ranks each
        evaluates its share and they add up."""
        was_training = self.model.training
        self.model.eval()
        total_loss, correct, count = 0.0, 0, 0
        for x, y in self.feed.val_batches(self.rank if self.group else 0, self.world_size if self.group else 1):
            if self.autocast_dtype is None:
                logits = self.model(self._layout(x))
            else:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                    logits = self.model(self._layout(x)).float()
            batch_loss, batch_correct, batch_count = self.task.eval_sums(logits, x, y)
            total_loss += batch_loss
            correct += batch_correct
            count += batch_count
        if self.group is not None:
            total_loss, correct, count = self.group.sum([total_loss, correct, count])
        self.model.train(was_training)
        return self.task.metrics(total_loss, correct, count)

    # ------------------------------------------------------------------ reporting
    def nnz(self) -> dict[str, int]:
        return self.rigl.nnz()

    def leak_check(self) -> dict:
        """Count nonzero weights at masked-out positions; must be 0."""
        return self.rigl.leak_check()

    def report(self) -> dict:
        report = self.rigl.report()  # the library's per-layer report (with its leak check), plus the run's
        final = self.eval_history[-1] if self.eval_history else {}
        report.update(
            {
                "model": self.spec.model.name,
                "dataset": self.spec.dataset.name,
                "task": self.task.name,
                "final_metrics": {k: v for k, v in final.items() if k not in ("step", "epoch")},
                "export": self.export_check or {"values": self.spec.export.values},
                "train_seconds": self.train_seconds,
                "steps": self.step,
                "total_steps": self.total_steps,
                "completed": self.step >= self.total_steps,
                "t_end": self.schedule.t_end,
                "delta_t": self.schedule.delta_t,
                "schedule_warnings": self.schedule_warnings,
                "device": str(self.device),
                "devices": self.world_size,
                "accumulate_steps": self.accumulate_steps,
                "compile": self.spec.training.compile,
                "data_wait_share": self.data_wait_seconds / self.train_seconds if self.train_seconds else 0.0,
                "precision": self.precision,
                "channels_last": self.channels_last,
                "tf32": self.tf32,
            }
        )
        return report

    # ------------------------------------------------------------------ checkpoint / resume
    def checkpoint_state(self) -> dict:
        state = {
            "version": CHECKPOINT_VERSION,
            "spec": self.spec.model_dump_json(),
            # contiguous tensors whatever the training layout (channels_last): the file is the same
            # for either layout and loads with a plain load_state_dict
            "model": contiguous_state(self.model.state_dict()),
            "optimizer": contiguous_state(self.optimizer.state_dict()),
            "sparsifier": contiguous_state(self.sparsifier.state_dict()),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
            "counters": {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch},
            "train_seconds": self.train_seconds,
            "eval_history": json.dumps(self.eval_history),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": _numpy_state(),
                "python": json.dumps(random.getstate()),
            },
        }
        return state

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
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
                torch.save(self.checkpoint_state(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if is_no_space(exc):
                raise NoSpaceError(f"no space left on the device while writing the checkpoint {path.name}") from exc
            raise
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Resume from our own checkpoint (loaded with weights_only=True: never unpickles code)."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.resumed_from = str(path)
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint {path}: unsupported version {state.get('version')}")
        saved = JobSpec.model_validate_json(state["spec"])
        if _portable(saved) != _portable(self.spec):
            raise ValueError(f"checkpoint {path} was written for a different job spec")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._match_optimizer_layout()
        self.sparsifier.load_state_dict(state["sparsifier"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        counters = state["counters"]
        self.step, self.epoch, self.batch_in_epoch = counters["step"], counters["epoch"], counters["batch_in_epoch"]
        self.train_seconds = state["train_seconds"]
        self.eval_history = json.loads(state["eval_history"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        _set_numpy_state(rng["numpy"])
        version, internal, gauss = json.loads(rng["python"])
        random.setstate((version, tuple(internal), gauss))

    def _match_optimizer_layout(self) -> None:
        """Checkpoints hold contiguous optimizer state; give each per-element buffer its parameter's
        memory format again (channels_last), as a run that never stopped has it."""
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                state = self.optimizer.state.get(param)
                if not state or param.dim() != 4 or param.is_contiguous():
                    continue
                for key, value in state.items():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        state[key] = value.contiguous(memory_format=torch.channels_last)


class NoSpaceError(OSError):
    """The disk filled up while writing a checkpoint (the partial file has been removed)."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


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
