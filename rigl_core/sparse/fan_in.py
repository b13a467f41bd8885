"""Constant fan-in sparsity (`sparsity.structure: "fan-in"`, SRigL): every active output neuron keeps exactly
k inputs, so a layer is a dense (active neurons, k) matrix of values plus their input indices (the condensed
export, rigl_core/export/condensed.py) and runs fast with dense ops.

A neuron is a row of the kernel in (out, in·kh·kw) form: an output feature of a Linear, an output channel of a
conv (fan-in over C·kh·kw), a row of an attention projection or an RNN gate; GPT-2's Conv1D stores (in, out),
so its neurons are columns.

The update (Lasby et al., "Dynamic Sparse Training with Structured Sparsity", ICLR 2024, and their
condensed-sparsity code): drop as RigL does, the `n_drop` active weights of smallest |w| over the whole layer;
then every surviving neuron grows back to exactly k, taking its non-kept inputs of largest grow score. With
**neuron ablation** (`ablation_threshold` γ), a neuron left with fewer than max(1, ⌊γ·k₀⌋) salient weights
(kept by magnitude, or among the `n_drop` largest grow scores of the layer; k₀ the layer's first fan-in) is
ablated: its weights all drop and the layer's budget is shared by the others, whose fan-in becomes
⌊budget / active neurons⌋. At least ⌈budget / fan-in⌉ neurons always stay, and the model's last masked layer
(its outputs) is never ablated. Where we differ from that code: a neuron that keeps more than k weights after
the layer-wide drop keeps its k largest (the code keeps an arbitrary k of them).
"""

from __future__ import annotations

import math

import torch

from rigl_core.sparse.masking import DropGrow, kept_after_drop, top_per_row

KINDS = ("linear", "conv", "attention", "rnn", "conv1d_hf")


def to_rows(t: torch.Tensor, kind: str) -> torch.Tensor:
    """(neurons, fan-in) form of a kernel-shaped tensor: a view, or for GPT-2's Conv1D a transposed copy."""
    return t.t().contiguous() if kind == "conv1d_hf" else t.reshape(t.shape[0], -1)


def from_rows(rows: torch.Tensor, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    return rows.t().contiguous() if kind == "conv1d_hf" else rows.reshape(shape)


def neurons_and_fan_in(shape: tuple[int, ...], kind: str) -> tuple[int, int]:
    if kind == "conv1d_hf":
        return shape[1], shape[0]
    return shape[0], math.prod(shape[1:])


def whole_fan_in(shape: tuple[int, ...], kind: str, density: float) -> int:
    """The constant fan-in closest to `density` (at least 1 input, at most all of them)."""
    _, fan_in = neurons_and_fan_in(shape, kind)
    return min(fan_in, max(1, round(density * fan_in)))


def fan_in_unfit_reason(kind: str) -> str | None:
    return None if kind in KINDS else f"fan-in: {kind} kernels have no output neurons"


def random_fan_in_mask(shape: tuple[int, ...], kind: str, k: int, generator: torch.Generator) -> torch.Tensor:
    """Exactly k random inputs on every neuron (seeded, on the CPU)."""
    neurons, fan_in = neurons_and_fan_in(shape, kind)
    chosen = torch.rand(neurons, fan_in, generator=generator).topk(k, dim=1).indices
    rows = torch.zeros(neurons, fan_in, dtype=torch.bool).scatter_(1, chosen, True)
    return from_rows(rows, kind, shape)


def row_counts(mask: torch.Tensor, kind: str) -> torch.Tensor:
    """Active inputs per neuron."""
    return to_rows(mask, kind).sum(dim=1)


def ablated_neurons(kept: torch.Tensor, grow: torch.Tensor | None, n_drop: int, threshold: int,
                    budget: int, fan_in: int) -> torch.Tensor:
    """Neurons (bool per row) with fewer than `threshold` salient weights: kept by magnitude, or among the
    layer's `n_drop` largest grow scores outside the kept set. At least ⌈budget / fan_in⌉ neurons survive."""
    salient = kept.clone()
    if grow is not None and n_drop > 0:
        candidates = torch.where(kept, -float("inf"), grow).reshape(-1)
        top = candidates.topk(min(n_drop, candidates.numel())).indices
        salient.view(-1)[top] = True
    counts = salient.sum(dim=1)
    must_keep = min(counts.numel(), max(1, -(-budget // fan_in)))
    floor = int(counts.sort(descending=True).values[must_keep - 1])
    return counts < min(threshold, floor)


def fan_in_drop_and_grow(mask: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor | None,
                         n_drop: int, kind: str, k: int, ablation_threshold: int | None = None,
                         budget: int | None = None) -> tuple[DropGrow, int, int]:
    """One constant fan-in update of one layer. Returns (the DropGrow, the new fan-in k', active neurons).
    With `ablation_threshold` (salient weights a neuron needs) neurons may be ablated, and the survivors share
    the layer's `budget` (its first active count: ablations never erode it): k' = ⌊budget / survivors⌋."""
    shape = tuple(mask.shape)
    rows = to_rows(mask, kind)
    neurons, fan_in = rows.shape
    n_active = int(rows.sum())
    budget = n_active if budget is None else budget
    alive = rows.any(dim=1)
    n_drop = min(n_drop, n_active)
    kept = kept_after_drop(rows.reshape(-1), to_rows(drop_score, kind), n_drop).view(rows.shape)  # RigL's drop
    grow = None if grow_score is None else to_rows(grow_score.detach(), kind).float()
    ablate = ablation_threshold is not None
    if ablate:
        alive = ~ablated_neurons(kept, grow, n_drop, ablation_threshold, budget, fan_in)
        kept &= alive.unsqueeze(1)
    n_alive = int(alive.sum())
    k_new = min(fan_in, budget // max(1, n_alive)) if ablate else k
    over = kept.sum(dim=1) > k_new  # a neuron that kept more than k' keeps its k' largest
    if bool(over.any()):
        magnitude = to_rows(drop_score.detach(), kind).abs().float()
        kept &= top_per_row(torch.where(kept, magnitude, -float("inf")),
                            torch.full((neurons,), k_new, device=rows.device))
    need = (k_new - kept.sum(dim=1)).clamp_min(0) * alive
    if grow is None:  # random growth is the caller's score; without one nothing grows (kept as it is)
        grown = torch.zeros_like(rows)
    else:
        grown = top_per_row(torch.where(kept | ~alive.unsqueeze(1), -float("inf"), grow), need)
    new_rows = kept | grown
    result = DropGrow(from_rows(new_rows, kind, shape), from_rows(kept, kind, shape).reshape(-1),
                      from_rows(grown, kind, shape).reshape(-1), n_active - int(kept.sum()))
    return result, k_new, n_alive
