"""The Trainer's step loop: epochs of batches, the log lines every `log_every_steps`, evaluation at
epoch ends, stop requests from the callbacks (agreed by every rank), and the time spent training and
waiting for data."""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from rigl_core.integrations.tracing import training_tracer
from rigl_core.training.evaluation import evaluate_and_notify


class DataWaitWindow:
    """The share of wall time spent waiting for data since the last log line."""

    def __init__(self, start: float, waited: float):
        self.start, self.waited = start, waited  # when the window began; the wait total then

    def share(self, now: float, waited: float) -> float:
        return (waited - self.waited) / max(now - self.start, 1e-9)

    def restart(self, now: float, waited: float) -> None:
        """A new window: after a log line, and after an evaluation (not training time). Both ends move
        together: a window that began after an evaluation but counted the waits before it read > 1."""
        self.start, self.waited = now, waited


class TrainingLoop:
    """One `fit` of a Trainer until its last step or a stop request (only rank 0 runs callbacks)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.callbacks = trainer.callbacks if trainer.rank == 0 else []
        self.bar = None
        if trainer.progress and trainer.rank == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=trainer.total_steps, initial=trainer.step, unit="step", dynamic_ncols=True)
        self.eval_seconds = 0.0
        self.update_iterations_count = trainer.spec.sparsity.schedule.update_iterations_count
        self.window = DataWaitWindow(time.perf_counter(), trainer.data_wait_seconds)
        # OpenTelemetry spans (epochs, mask updates) when the process configured it; None costs nothing
        trainer.tracer = training_tracer() if trainer.rank == 0 else None

    def run(self) -> None:
        trainer = self.trainer
        started = self.window.start
        trainer.model.train()
        try:
            while trainer.step < trainer.total_steps:
                with trainer.tracer.epoch(trainer) if trainer.tracer is not None else nullcontext():
                    stop = self._run_epoch()
                if stop:
                    trainer.stopped_early = trainer.step < trainer.total_steps
                    break
        finally:
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            trainer.train_seconds += time.perf_counter() - started - self.eval_seconds
            if self.bar is not None:
                self.bar.close()

    def _run_epoch(self) -> bool:
        """The rest of the current epoch; True when a callback asked to stop."""
        trainer = self.trainer
        steps = trainer.feed.train_steps(trainer.batch_order, trainer.epoch, trainer.batch_in_epoch, trainer.step)
        while trainer.step < trainer.total_steps:
            tick = time.perf_counter()
            micros = next(steps, None)
            trainer.data_wait_seconds += time.perf_counter() - tick
            if micros is None:
                return False
            loss = trainer._train_step(micros)
            trainer.batch_in_epoch += 1
            counted = self._counts_as_step()
            if counted:
                trainer.step += 1
                if trainer.step % trainer.spec.training.log_every_steps == 0 or trainer.step == trainer.total_steps:
                    self._log(loss)
            epoch_done = trainer.batch_in_epoch == trainer.steps_per_epoch
            if epoch_done:
                trainer.epoch += 1
                trainer.batch_in_epoch = 0
            if (epoch_done and trainer.epoch % trainer.spec.training.eval_every_epochs == 0) \
                    or trainer.step == trainer.total_steps:
                self._evaluate()
            if self.bar is not None and counted:
                self.bar.update(1)
            stop = self._stop_requested() if counted else False  # never between an update and its step
            if stop or epoch_done:
                return stop
        return False

    def _counts_as_step(self) -> bool:
        """Every iteration is a step, except (update_iterations_count false) one whose mask update replaced
        the optimizer step: the same step then comes again, with its optimizer step and no update."""
        trainer = self.trainer
        if self.update_iterations_count or trainer.rigl.last_update is None \
                or not trainer.sparsifier.replaces_step_on_update:
            return True
        trainer.update_made_at = trainer.step
        return False

    def _log(self, loss: torch.Tensor) -> None:
        trainer, group = self.trainer, self.trainer.group
        loss_value = float(loss) if group is None else group.sum([float(loss)])[0]
        trainer.last_train_loss = loss_value
        now = time.perf_counter()
        metrics = {"step": trainer.step, "epoch": trainer.epoch, "loss": loss_value,
                   "lr": trainer.optimizer.param_groups[0]["lr"],
                   "data_wait_share": self.window.share(now, trainer.data_wait_seconds)}
        if trainer.sparsifier.last_grad_norm is not None:
            metrics["grad_norm"] = float(trainer.sparsifier.last_grad_norm)
        self.window.restart(now, trainer.data_wait_seconds)
        for cb in self.callbacks:
            cb.on_step(trainer, metrics)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)

    def _evaluate(self) -> None:
        tick = time.perf_counter()
        evaluate_and_notify(self.trainer, self.bar)
        self.trainer.model.train()
        self.eval_seconds += time.perf_counter() - tick
        self.window.restart(time.perf_counter(), self.trainer.data_wait_seconds)

    def _stop_requested(self) -> bool:
        """Any callback's stop request; with several ranks, rank 0's decision reaches every rank."""
        stop = any(cb.should_stop(self.trainer) for cb in self.callbacks) if self.callbacks else False
        if self.trainer.group is not None:
            stop = self.trainer.group.stop_flag(stop)
        return stop
