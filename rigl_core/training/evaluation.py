"""Evaluation of a Trainer's model: validation metrics (summed over ranks), the history and callbacks
after each evaluation, and the metrics with the half-precision values the exports store."""

from __future__ import annotations

import torch

from rigl_core.export.packed import stored_values
from rigl_core.training.step import layout


@torch.no_grad()
def evaluate(trainer) -> dict:
    """Validation loss and accuracy (a causal LM's per token, plus perplexity); with several ranks each
    evaluates its share and they add up."""
    model = trainer.model
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    group = trainer.group
    for x, y in trainer.feed.val_batches(trainer.rank if group else 0, trainer.world_size if group else 1):
        if trainer.autocast_dtype is None:
            logits = model(layout(trainer, x))
        else:
            with torch.autocast(trainer.device.type, dtype=trainer.autocast_dtype):
                logits = model(layout(trainer, x)).float()
        batch_loss, batch_correct, batch_count = trainer.task.eval_sums(logits, x, y)
        total_loss += batch_loss
        correct += batch_correct
        count += batch_count
    if group is not None:
        total_loss, correct, count = group.sum([total_loss, correct, count])
    model.train(was_training)
    return trainer.task.metrics(total_loss, correct, count)


def evaluate_and_notify(trainer, bar) -> None:
    """Evaluate, keep the metrics in the history and hand them to the callbacks and the progress bar."""
    metrics = {"step": trainer.step, "epoch": trainer.epoch, **trainer.evaluate()}
    if trainer.last_train_loss is not None:
        metrics["train_loss"] = trainer.last_train_loss
    trainer.eval_history.append(metrics)
    for cb in trainer.callbacks if trainer.rank == 0 else ():
        cb.on_eval(trainer, metrics)
    if bar is not None:
        bar.set_postfix(val_acc=f"{metrics['val_accuracy']:.3f}", refresh=False)


def evaluate_export_values(trainer) -> dict:
    """The validation metrics with the values the packed/compressed exports store (fp16/bf16), beside the
    final ones: what the half-precision export costs. Every rank takes part (evaluate sums over ranks)."""
    values = trainer.spec.export.values
    with stored_values(trainer.model, trainer.sparsifier.masks, values):
        metrics = trainer.evaluate()
    final = trainer.eval_history[-1] if trainer.eval_history else {}
    change = {k: v - final[k] for k, v in metrics.items() if isinstance(final.get(k), (int, float))}
    return {"values": values, "metrics": metrics, "change": change}
