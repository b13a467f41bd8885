"""The training loop: one JobSpec in, a trained sparse model and a report out.

`rigl train` and the service's worker run this same Trainer with different callbacks. A run can be
stopped by a callback, checkpointed and resumed with bitwise-identical results on CPU: the data
order is a pure function of (seed, epoch), the LR a pure function of the step, and the checkpoint
holds model, optimizer, masks, method state, counters and RNG states.

The Trainer builds a job's parts and holds its state; the work is in its own modules: device and
process setup (setup.py), the step loop (loop.py), one optimizer step (step.py), evaluation
(evaluation.py) and checkpoints (checkpoint.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from rigl_core.data.batches import BatchOrder
from rigl_core.data.epochs import resolve_accumulation, total_steps
from rigl_core.data.feed import open_feed
from rigl_core.models.registry import build_model, check_model, resolve_task
from rigl_core.sparse.build import build_sparsifier
from rigl_core.sparse.plan import Plan
from rigl_core.sparse.rigl import RigL
from rigl_core.sparse.updater import Sparsifier
from rigl_core.sparse.updates import MaskUpdate
from rigl_core.spec import JobSpec
from rigl_core.training import checkpoint, evaluation
from rigl_core.training.checkpoint import CHECKPOINT_VERSION, NoSpaceError, is_no_space  # noqa: F401  (public)
from rigl_core.training.distributed import Gang, Group, rank_device, resolve_devices
from rigl_core.training.kernels import configure_kernels, resolve_channels_last
from rigl_core.training.loop import TrainingLoop
from rigl_core.training.optim import build_optimizer
from rigl_core.training.setup import (AUTOCAST_DTYPES, check_data_fits_model, check_tokens_fit_model, resolve_device,
                                      resolve_precision, seed_everything, start_ranks)
from rigl_core.training.step import train_step
from rigl_core.training.tasks import Task
from rigl_core.training.warm_start import warm_start

__all__ = ["Callback", "Trainer", "NoSpaceError", "is_no_space", "resolve_accumulation", "resolve_device",
           "resolve_precision", "CHECKPOINT_VERSION"]


class Callback:
    """Hooks into the loop; override what you need. `should_stop` is polled after every step."""

    def on_step(self, trainer: "Trainer", metrics: dict) -> None: ...

    def on_eval(self, trainer: "Trainer", metrics: dict) -> None: ...

    def on_mask_update(self, trainer: "Trainer", update: MaskUpdate) -> None: ...

    def should_stop(self, trainer: "Trainer") -> bool:
        return False


class Trainer:
    """Builds data, model, optimizer and sparsifier from a JobSpec and trains.

    With `training.devices` > 1 this process is rank 0 of a DistributedDataParallel job: `fit` starts
    the other ranks (rigl_core.training.distributed), and only rank 0 runs callbacks and reports. `rank` and
    `master_port` are for those other ranks only. With `training.nodes` > 1 an engine starts every rank
    and forms the process group, and each rank gets its `gang` (its rank, the world size, its device)."""

    def __init__(self, spec: JobSpec, callbacks: Sequence[Callback] = (), progress: bool = False,
                 rank: int = 0, master_port: int | None = None, gang: Gang | None = None):
        self.spec = spec
        self.callbacks = list(callbacks)
        self.progress = progress
        t = spec.training
        self.gang = gang
        self.rank = gang.rank if gang is not None else rank
        self.master_port = master_port
        self._setup_device()
        seed_everything(t.seed)
        self.feed = open_feed(spec.dataset, self.device, gang.local_world_size if gang else self.world_size)
        self.task = Task(resolve_task(t.task, spec.model.hf), t.label_smoothing)
        self._build_model()
        self.accumulate_steps = resolve_accumulation(t, self.world_size)
        self.batch_order = BatchOrder(self.feed.num_train, t.batch_size, t.seed, self.world_size, self.rank,
                                      self.accumulate_steps)
        self.steps_per_epoch = self.batch_order.steps_per_epoch
        self.total_steps = total_steps(t, self.feed.num_train, self.world_size)
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
        self._start_counters()

    # ------------------------------------------------------------------ setup
    def _setup_device(self) -> None:
        """This rank's device, the precision and its autocast dtype and scaler, and CUDA kernel settings."""
        t = self.spec.training
        device = resolve_device(t.device)
        if self.gang is not None:  # a rank of a job on several nodes: the engine placed it
            self.world_size = self.gang.world_size
            self.device = self.gang.device if device.type == "cuda" else device
        elif t.nodes > 1:
            raise ValueError(f"training.nodes: {t.nodes} nodes run only in the service, on its Ray cluster "
                             "(RIGL_RAY_ADDRESS); here use nodes: 1 with devices: N")
        else:
            self.world_size = resolve_devices(t.devices, device)
            self.device = rank_device(device, self.rank, self.world_size)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(t.precision, self.device)
        self.autocast_dtype = AUTOCAST_DTYPES[self.precision]  # None: plain fp32, no autocast
        # fp16 overflows: the scaler scales the loss and skips steps with inf/NaN gradients, and the
        # sparsifier honours the skip (no optimizer step, no drop/grow on non-finite scores).
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.tf32 = configure_kernels(self.device, t.tf32)  # CUDA only: TF32 and cudnn.benchmark

    def _build_model(self) -> None:
        """The model on this rank's device in its memory format, checked against the data."""
        spec, t = self.spec, self.spec.training
        self.num_classes = spec.model.num_classes or self.feed.num_classes
        self.input_shape = self.feed.input_shape
        check_data_fits_model(spec, self.feed, self.task, self.num_classes)
        self.model: nn.Module = build_model(
            spec.model.name, self.num_classes, self.input_shape, spec.model.hidden_sizes,
            architecture=spec.model.architecture, zero_init_residual=spec.model.zero_init_residual,
            hf=spec.model.hf, task=self.task.name, program=spec.model.program,
        ).to(self.device)
        self.num_classes = getattr(self.model, "program_classes", self.num_classes)  # a program's own logits
        self.num_classes = check_tokens_fit_model(spec, self.model, self.feed, self.task, self.input_shape,
                                                  self.num_classes)
        self.channels_last = resolve_channels_last(t.channels_last, self.model, self.device)
        if self.channels_last:  # 4-D weights only; masks and exports index the logical shape
            self.model = self.model.to(memory_format=torch.channels_last)
        check_model(self.model, self.input_shape, self.num_classes, self.task.name)

    def _start_counters(self) -> None:
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.train_seconds = 0.0
        self.data_wait_seconds = 0.0
        self.eval_history: list[dict] = []
        self.export_check: dict | None = None  # metrics with the exports' fp16/bf16 values (spec.export)
        self.last_train_loss: float | None = None
        self.stopped_early = False
        self.update_made_at: int | None = None  # the step of an update iteration that did not count as one
        self.resumed_from: str | None = None  # the other ranks of a multi-device job resume from it too
        self.group: Group | None = None
        self.replicas_agree: bool | None = None  # several ranks: every rank's weights and masks the same at the end
        self.forward_model: nn.Module = self.model  # what training calls: DDP- and compile-wrapped
        self.tracer = None  # OpenTelemetry spans while fitting, when configured (rigl_core/integrations/tracing.py)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train until the last step or until a callback asks to stop; returns the report."""
        failed = True
        try:
            start_ranks(self)
            TrainingLoop(self).run()
            if self.group is not None:
                self.replicas_agree = self.group.agree(self.replica_digest())
            if self.spec.export.values != "fp32" and self.step >= self.total_steps:
                self.export_check = evaluation.evaluate_export_values(self)
            report = self.report()
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

    def _train_step(self, micros: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
        """One optimizer step (rigl_core.training.step); returns this rank's weighted loss."""
        return train_step(self, micros)

    def evaluate(self) -> dict:
        """Validation metrics, summed over ranks (rigl_core.training.evaluation)."""
        return evaluation.evaluate(self)

    # ------------------------------------------------------------------ reporting
    def replica_digest(self) -> str:
        """SHA-256 of this rank's weights and masks, bit for bit (ranks compare it at the end of `fit`)."""
        import hashlib

        digest = hashlib.sha256()
        masks = self.sparsifier.state_dict()["masks"]
        state = {**{f"model.{k}": v for k, v in self.model.state_dict().items()},
                 **{f"mask.{k}": v for k, v in masks.items()}}
        for name in sorted(state):
            digest.update(name.encode())
            digest.update(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

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
                "nodes": self.spec.training.nodes,
                **({"replicas_agree": self.replicas_agree} if self.replicas_agree is not None else {}),
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
        return checkpoint.checkpoint_state(self)

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Atomic write; a full disk raises NoSpaceError (rigl_core.training.checkpoint)."""
        return checkpoint.save_checkpoint(self, path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Resume from our own checkpoint (rigl_core.training.checkpoint)."""
        checkpoint.load_checkpoint(self, path)
