"""One mask update over every masked layer: drop the active weights of smallest |drop score|, grow the
non-kept positions of largest grow score (none, for pruning methods), exact counts per layer, within each
group of M under an N:M pattern. When updates happen is the step loop's (rigl_core/sparse/updater.py)."""

from __future__ import annotations

import torch

from rigl_core.sparse.fan_in import fan_in_drop_and_grow, neurons_and_fan_in
from rigl_core.sparse.layers import Layer
from rigl_core.sparse.mask_state import MaskState
from rigl_core.sparse.masking import drop_and_grow
from rigl_core.sparse.nm import nm_drop_and_grow
from rigl_core.sparse.schedules import UpdateSchedule
from rigl_core.sparse.updates import LayerUpdate, MaskUpdate


class DropGrowUpdate(MaskState):
    """`update_masks` and the hooks a method overrides to change what it drops and grows: how much
    (`drop_fraction`, `drop_count`) and by which scores (`drop_score`, `grow_score`)."""

    def __init__(self, layers: list[Layer], sparsities: list[float], optimizer: torch.optim.Optimizer | None,
                 schedule: UpdateSchedule, seed: int = 0, pattern: tuple[int, int] | None = None,
                 fan_in: dict[str, int] | None = None, ablation_threshold: float | None = None):
        super().__init__(layers, sparsities, optimizer, seed, pattern, fan_in, ablation_threshold)
        self.schedule = schedule
        self.record_details = False  # tests: keep kept/grown sets of the last update
        self.last_details: dict[str, object] = {}
        self.updating_step: int | None = None  # the step of the update being made (score hooks may use it)

    def drop_fraction(self, step: int) -> float:
        """f(t) of the update made at `step`; a postponed update drops what it would have when due."""
        due = step if self.schedule.is_update_step(step) else step - step % self.schedule.delta_t
        return self.schedule.drop_fraction(due)

    def drop_count(self, layer: Layer, n_active: int, fraction: float, step: int) -> int:
        return int(fraction * n_active)

    def drop_score(self, index: int, layer: Layer) -> torch.Tensor:
        """The active weights of smallest |drop score| are dropped: magnitude pruning by default."""
        return layer.weight

    def grow_score(self, index: int, layer: Layer) -> torch.Tensor | None:
        """Non-kept positions of largest grow score become active; None: nothing grows (pruning only)."""
        return None

    def update_masks(self, step: int) -> MaskUpdate:
        """In every layer drop the `drop_count` active weights of smallest |drop score| and grow as many
        non-kept positions of largest grow score (none when it is None), within each group of M under
        sparsity.pattern. Scores are made one layer at a time, so only one layer's are ever alive (the
        peak-memory cost of an update is one layer, not the whole model)."""
        self.updating_step = step
        fraction = self.drop_fraction(step)
        update = MaskUpdate(step=step, drop_fraction=fraction)
        details = {}
        counts = []  # per layer, as tensors: read back with one synchronisation at the end
        grown = []  # per layer, how many positions grew
        with torch.no_grad():
            for index, layer in enumerate(self.layers):
                old = self.masks[layer.name]
                n_active = self._active.get(layer.name)
                if n_active is None:
                    n_active = self._active[layer.name] = int(old.sum())
                k = self.drop_count(layer, n_active, fraction, step)
                drop, grow = self.drop_score(index, layer), self.grow_score(index, layer)
                if self.pattern is not None:  # drop/grow within each group of M (rigl_core/sparse/nm.py)
                    result = nm_drop_and_grow(old, drop, grow, k, self.pattern[1], n_active=n_active,
                                              kind=layer.kind)
                elif self.fan_in is not None:  # every neuron back to exactly k (rigl_core/sparse/fan_in.py)
                    result = self._fan_in_update(index, layer, old, drop, grow, k)
                else:
                    result = drop_and_grow(old, drop, grow, k, n_active=n_active)
                counts.append(torch.stack([result.new_mask.sum(), (result.grown & ~old.reshape(-1)).sum(),
                                           self._ever_active_count(layer, old, result.new_mask)]))
                if self.record_details:
                    details[layer.name] = {"old": old.clone(), "kept": result.kept, "grown": result.grown}
                self._store_mask(layer, result.new_mask)
                update.layers[layer.name] = LayerUpdate(0, result.n_drop, 0, 0, numel=layer.numel)
                if self.fan_in is not None:
                    row = update.layers[layer.name]
                    row.active_neurons, row.fan_in = self.active_neurons[layer.name], self.fan_in[layer.name]
                grown.append(int(result.grown.sum()) if self.fan_in is not None and grow is not None
                             else result.n_drop if grow is not None else 0)  # growth refills what was dropped
        read = torch.stack(counts).tolist() if counts else []
        for layer, n_grown, (n_new, grown_new, ever_count) in zip(self.layers, grown, read):
            row = update.layers[layer.name]
            row.n_active, row.grown_new, row.ever_active = n_new, grown_new, ever_count
            row.regrown = n_grown - grown_new  # grown where it had just been dropped
            self._active[layer.name] = n_new
        self._broadcast_masks()
        self.apply_masks()
        if self.record_details:
            self.last_details = details
        return update

    def _fan_in_update(self, index: int, layer: Layer, old: torch.Tensor, drop: torch.Tensor,
                       grow: torch.Tensor | None, k: int):
        """Drop layer-wide, grow each neuron back to its fan-in; ablate neurons with too few salient weights
        (never in the last masked layer: the model's outputs)."""
        threshold = None
        if self.ablation_threshold is not None and grow is not None and index < len(self.layers) - 1:
            threshold = max(1, int(self.ablation_threshold * self.first_fan_in[layer.name]))
        budget = self.first_fan_in[layer.name] * neurons_and_fan_in(layer.shape, layer.kind)[0]
        result, k_new, alive = fan_in_drop_and_grow(old, drop, grow, k, layer.kind, self.fan_in[layer.name],
                                                    threshold, budget)
        self.fan_in[layer.name], self.active_neurons[layer.name] = k_new, alive
        return result

    def _ever_active_count(self, layer: Layer, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Positions active at any time so far (a tensor, read back with the update's other counts). A method
        that starts dense has had every position active: it keeps no union."""
        if self.starts_dense:
            return torch.full((), layer.numel, dtype=torch.long, device=old.device)
        ever = self.ever_active.get(layer.name)
        if ever is None:
            ever = self.ever_active[layer.name] = old.clone()
        ever |= new
        return ever.sum()
