"""What the model learns, as a loss and evaluation statistics: `training.task`.

- classification / sequence-classification: logits (N, classes) against labels y;
- causal-lm: logits (N, L, vocab) against the inputs shifted by one (token t predicts token t+1; y is
  ignored); the loss is the mean token cross-entropy, and evaluation adds `val_perplexity` =
  exp(val_loss), with `val_accuracy` the next-token accuracy.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Task:
    """Loss for training and summed statistics for evaluation of one task."""

    def __init__(self, name: str, label_smoothing: float = 0.0):
        self.name = name
        self.causal_lm = name == "causal-lm"
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def _pairs(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.causal_lm:
            return logits, y
        return logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)

    def loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(*self._pairs(logits, x, y))

    def eval_sums(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int]:
        """(summed loss, correct predictions, predictions) of one validation batch."""
        scores, targets = self._pairs(logits.float(), x, y)
        loss = float(nn.functional.cross_entropy(scores, targets, reduction="sum"))
        return loss, int((scores.argmax(1) == targets).sum()), len(targets)

    def metrics(self, total_loss: float, correct: int, count: int) -> dict:
        result = {"val_loss": total_loss / count, "val_accuracy": correct / count}
        if self.causal_lm:
            result["val_perplexity"] = math.exp(min(result["val_loss"], 700.0))  # finite even for a bad start
        return result
