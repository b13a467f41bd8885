"""N:M structured sparsity (`sparsity.pattern: "2:4"`): exactly N active weights in every group of M.

Groups are M consecutive weights along the input dimension, the layout of the GPU 2:4 kernels:
- Linear (and attention, RNN) weights [out, in]: M consecutive inputs of each row, as cuSPARSELt and
  `torch.sparse.to_sparse_semi_structured` take them;
- conv weights [out, C, kh, kw]: M consecutive **input channels at each kernel position** (the weight seen as
  [out, kh, kw, C], the channels-last implicit GEMM that sparse conv kernels run), so C must divide by M.
  (Groups along the flattened C·kh·kw would mix kernel positions, which no sparse conv kernel accepts.)
`groups_of` gives every kernel in its [-1, M] group view, `from_groups` puts a grouped tensor back.

The drop/grow keeps unstructured RigL's global choice of what to drop (the k = fraction·n_active active
weights of smallest |w| in the layer), then grows in each group exactly as many as it dropped there,
taking the group's non-kept positions of largest grow score; so every group keeps exactly N active and a
weight never moves between groups. Everything is tensor ops over all groups at once.
"""

from __future__ import annotations

import re

import torch

from rigl_core.sparse.masking import DropGrow, kept_after_drop, top_per_row

PATTERN = re.compile(r"^([0-9]{1,2}):([0-9]{1,2})$")
MAX_M = 32
KINDS = ("linear", "conv", "attention", "rnn")  # kernels stored (out, in, ...): groups along the input dim


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """(N, M) of "N:M", None for "unstructured"; ValueError (without the field name) otherwise."""
    if pattern == "unstructured":
        return None
    match = PATTERN.fullmatch(pattern) if isinstance(pattern, str) else None
    if not match:
        raise ValueError(f"'unstructured' or 'N:M' (e.g. '2:4'), got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m <= MAX_M:
        raise ValueError(f"N:M needs 1 <= N < M <= {MAX_M}, got {pattern!r}")
    return n, m


def nm_unfit_reason(kind: str, shape: tuple[int, ...], m: int) -> str | None:
    """Why a layer cannot be N:M-masked (it then stays dense), or None when it can."""
    if kind not in KINDS:
        return f"N:M: {kind} kernels have no (out, in) layout"
    if len(shape) < 2:
        return "N:M: a kernel needs an input dimension"
    if kind == "conv":
        if shape[1] % m:
            return f"N:M: {shape[1]} input channels not divisible by M={m} (groups run along channels)"
        return None
    reduction = 1
    for s in shape[1:]:
        reduction *= s
    if reduction % m:
        return f"N:M: input dim {reduction} not divisible by M={m}"
    return None


def groups_of(t: torch.Tensor, m: int, kind: str = "linear") -> torch.Tensor:
    """[-1, M]: one group per row. Convs [out, C, kh, kw] group channels at each position (a copy)."""
    if kind == "conv" and t.dim() > 2:
        return t.movedim(1, -1).reshape(-1, m)
    return t.reshape(-1, m)


def from_groups(groups: torch.Tensor, shape: tuple[int, ...], kind: str = "linear") -> torch.Tensor:
    """The inverse of `groups_of`."""
    if kind == "conv" and len(shape) > 2:
        return groups.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1).contiguous()
    return groups.reshape(shape)


def nm_random_mask(shape: tuple[int, ...], n: int, m: int, generator: torch.Generator,
                   kind: str = "linear") -> torch.Tensor:
    """Exactly n random active positions in every group of m (seeded, on the CPU)."""
    numel = 1
    for s in shape:
        numel *= s
    noise = torch.rand(numel // m, m, generator=generator)
    chosen = noise.topk(n, dim=1).indices
    mask = torch.zeros(numel // m, m, dtype=torch.bool).scatter_(1, chosen, True)
    return from_groups(mask, tuple(shape), kind)


def group_counts(mask: torch.Tensor, m: int, kind: str = "linear") -> torch.Tensor:
    """Active entries per group of m, one entry per group."""
    return groups_of(mask, m, kind).sum(dim=1)


def nm_drop_and_grow(mask: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor, k: int, m: int,
                     n_active: int | None = None, kind: str = "linear") -> DropGrow:
    """`_drop_and_grow_groups` in the layer's group layout (convs: channels at each kernel position)."""
    if kind != "conv" or mask.dim() <= 2:
        return _drop_and_grow_groups(mask, drop_score, grow_score, k, m, n_active)
    shape = tuple(mask.shape)
    grouped = _drop_and_grow_groups(groups_of(mask, m, kind), groups_of(drop_score, m, kind),
                                    groups_of(grow_score, m, kind), k, m, n_active)

    def back(flat: torch.Tensor) -> torch.Tensor:
        return from_groups(flat.view(-1, m), shape, kind).reshape(-1)

    return DropGrow(from_groups(grouped.new_mask, shape, kind), back(grouped.kept), back(grouped.grown),
                    grouped.n_drop)


def _drop_and_grow_groups(mask: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor, k: int, m: int,
                          n_active: int | None = None) -> DropGrow:
    """Drop the k active weights of smallest |drop score| (|w|, over the layer); in each group grow as many as
    it lost, the group's non-kept positions of largest grow score (a just-dropped one may come back, as in RigL)."""
    flat_mask = mask.reshape(-1)
    if n_active is None:
        n_active = int(flat_mask.sum())
    k = min(k, n_active)
    if k <= 0:
        return DropGrow(mask, flat_mask, torch.zeros_like(flat_mask), 0)
    kept = kept_after_drop(flat_mask, drop_score, k)
    dropped_per_group = (flat_mask & ~kept).view(-1, m).sum(dim=1)
    grow = torch.where(kept, -float("inf"), grow_score.detach().reshape(-1).float()).view(-1, m)
    grown = top_per_row(grow, dropped_per_group).reshape(-1)  # each group regrows what it lost
    new_mask = (kept | grown).view(mask.shape)
    return DropGrow(new_mask, kept, grown, k)
