"""Applying boolean masks to weights, gradients and optimizer state, and the drop/grow primitive.

Inactive weights are kept at exactly 0 and gradients are masked before every optimizer step.
With zeroed state, SGD (momentum, Nesterov), Adam and AdamW then leave inactive weights and
their state at exactly 0 without re-masking after the step: each of their updates is a product
or a quotient of zeros. The forward pass uses the raw weights, so `p.grad` after backward is the
dense gradient RigL needs for growth, with no extra copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def random_mask(shape: tuple[int, ...], n_active: int, generator: torch.Generator) -> torch.Tensor:
    """Exactly `n_active` ones placed by a random shuffle (not Bernoulli), as the reference code does."""
    numel = 1
    for s in shape:
        numel *= s
    order = torch.randperm(numel, generator=generator)
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[order[:n_active]] = True
    return flat.view(shape)


def like_weight(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The mask in its weight's memory format: products with a channels_last weight or gradient then run
    as dense vectorised kernels instead of strided ones (masks index the logical shape either way)."""
    if weight.dim() == 4 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        return mask.contiguous(memory_format=torch.channels_last)
    return mask.contiguous()


def mask_optimizer_state(optimizer: torch.optim.Optimizer | None, param: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero every per-element state slot (momentum, exp_avg, exp_avg_sq, …) at inactive positions."""
    if optimizer is None:
        return
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.mul_(mask)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of a flat tensor; exact, and fast on large CPU tensors.

    torch.topk over tens of millions of entries costs seconds on a CPU. Entries at or above a
    threshold estimated from a fixed sample are taken first; whenever at least k pass, the top k
    of those are exactly the top k of all (every entry ≥ the k-th largest passes). Otherwise it
    falls back to a full topk.
    """
    n = scores.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    if n < 100_000 or k > n // 8:
        return torch.topk(scores, k, sorted=False).indices
    generator = torch.Generator(device=scores.device).manual_seed(n + k)  # identical on every rank
    sample = scores[torch.randint(0, n, (65_536,), generator=generator, device=scores.device)]
    rank = max(1, int(65_536 * (1 - min(1.0, 2.0 * k / n))))  # aim for about 2k candidates
    threshold = torch.kthvalue(sample.float(), rank).values
    candidates = (scores >= threshold).nonzero().squeeze(1)
    if candidates.numel() < k:
        return torch.topk(scores, k, sorted=False).indices
    return candidates[torch.topk(scores[candidates], k, sorted=False).indices]


def top_per_row(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boolean (rows, cols): in each row i its counts[i] largest scores (ties by position). The growth of the
    grouped structures: N:M groups (rigl_core/sparse/nm.py) and neurons of a constant fan-in (fan_in.py)."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    take = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0) < counts.reshape(-1, 1)
    return torch.zeros_like(take).scatter_(1, order, take)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest scores (flattened)."""
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    flat[topk_indices(scores.reshape(-1), k)] = True
    return flat.view(scores.shape)


@dataclass
class DropGrow:
    """Outcome of one drop/grow on one layer; `kept` and `grown` are flat boolean masks."""

    new_mask: torch.Tensor
    kept: torch.Tensor
    grown: torch.Tensor
    n_drop: int


def kept_after_drop(flat_mask: torch.Tensor, drop_score: torch.Tensor, k: int) -> torch.Tensor:
    """The active positions left once the k active ones of smallest |drop score| (|w| for magnitude
    pruning) are dropped: the k largest of -|score| among active, in fp32; inactive entries can never be
    dropped (or kept)."""
    drop_scores = drop_score.detach().reshape(-1).abs().float().neg_().masked_fill_(~flat_mask, -float("inf"))
    kept = flat_mask.clone()
    kept[topk_indices(drop_scores, k)] = False
    return kept


def drop_and_grow(mask: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor | None, k: int,
                  n_active: int | None = None) -> DropGrow:
    """Drop the k active positions of smallest |drop score| (the weight, for RigL); grow the k non-kept
    positions of largest grow score, or none when `grow_score` is None (pruning: GMP, SNIP).

    Positions dropped in this update may be regrown (they are not in the kept set), as in the paper.
    Scores are compared in fp32 to avoid bf16 ties. `n_active` (the mask's count, if the caller knows
    it) saves a device synchronisation.
    """
    flat_mask = mask.reshape(-1)
    if n_active is None:
        n_active = int(flat_mask.sum())
    k = min(k, n_active)
    if k <= 0:
        return DropGrow(mask, flat_mask, torch.zeros_like(flat_mask), 0)
    kept = kept_after_drop(flat_mask, drop_score, k)
    grown = torch.zeros_like(flat_mask)
    if grow_score is not None:
        grow = grow_score.detach().reshape(-1).float()
        grow = torch.where(kept, -float("inf"), grow)  # a new tensor: the gradient itself is untouched
        grown[topk_indices(grow, k)] = True
    new_mask = (kept | grown).view(mask.shape)
    return DropGrow(new_mask, kept, grown, k)
