"""The masks a sparsifier holds: first masks, applying them to weights, gradients and optimizer state,
keeping replicas identical, the history of active positions, and checkpoints. When and how masks change is
the update loop's (rigl_core/sparse/updater.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from rigl_core.sparse.distributions import active_count
from rigl_core.sparse.fan_in import neurons_and_fan_in, random_fan_in_mask, row_counts
from rigl_core.sparse.layers import Layer
from rigl_core.sparse.masking import like_weight, mask_optimizer_state, random_mask
from rigl_core.sparse.nm import group_counts, nm_random_mask, nm_unfit_reason


class MaskState:
    """Masks of the masked layers, with exact per-layer active counts (`target_active`)."""

    method = "static"
    starts_dense = False  # SNIP and GMP: every weight is active until the first update prunes
    takes_pattern = True  # sparsity.pattern N:M and structure fan-in apply (GMP and SNIP prune unstructured)
    score_state_key: str | None = None  # the checkpoint key of `score_state` (RigL's "grad_sums", SNFS's "grad_ema")

    def __init__(self, layers: list[Layer], sparsities: list[float], optimizer: torch.optim.Optimizer | None,
                 seed: int = 0, pattern: tuple[int, int] | None = None, fan_in: dict[str, int] | None = None,
                 ablation_threshold: float | None = None):
        self.layers = [layer for layer in layers if layer.masked]
        self.sparsity = {layer.name: s for layer, s in zip(self.layers, sparsities)}
        self.target_active = {
            layer.name: max(1, active_count(layer.numel, self.sparsity[layer.name])) for layer in self.layers
        }
        # (N, M) of sparsity.pattern N:M (rigl_core/sparse/nm.py): exactly N active in every group of M
        self.pattern = pattern if self.takes_pattern else None
        if self.pattern is not None:
            n, m = self.pattern
            for layer in self.layers:
                unfit = nm_unfit_reason(layer.kind, layer.shape, m)
                if unfit is not None:  # make_plan leaves such layers dense; a caller passed one anyway
                    raise ValueError(f"sparsity.pattern: layer {layer.name!r} cannot be masked {n}:{m} ({unfit})")
                self.target_active[layer.name] = layer.numel // m * n
        # Structure fan-in (rigl_core/sparse/fan_in.py): inputs per active neuron, per layer; the first fan-in
        # (the ablation threshold's reference) and the active neurons, which ablation changes.
        self.fan_in = dict(fan_in) if fan_in is not None and self.takes_pattern else None
        self.ablation_threshold = ablation_threshold if self.fan_in is not None else None
        self.first_fan_in: dict[str, int] = {}
        self.active_neurons: dict[str, int] = {}
        if self.fan_in is not None:
            for layer in self.layers:
                neurons, _ = neurons_and_fan_in(layer.shape, layer.kind)
                self.first_fan_in[layer.name] = self.fan_in[layer.name]
                self.active_neurons[layer.name] = neurons
                self.target_active[layer.name] = self.fan_in[layer.name] * neurons
        self.optimizer = optimizer
        self.seed = seed
        self.masks: dict[str, torch.Tensor] = {}
        # Bool union of every mask so far; made at the first drop/grow update (until then it equals
        # the mask), so static and pruning methods never pay for it.
        self.ever_active: dict[str, torch.Tensor] = {}
        # Per-layer gradient statistics a method carries between steps to score growth (RigL's accumulated
        # gradients, SNFS's EMA); checkpointed under `score_state_key`.
        self.score_state: dict[str, torch.Tensor] = {}
        self._layer = {layer.name: layer for layer in self.layers}
        self._active: dict[str, int] = {}  # each mask's count, known after a drop/grow (saves a sync)
        self._grad_masks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # CPU: (mask, its float copy)
        # First masks chosen by the caller instead of random ones (a warm start's magnitude pruning);
        # init_masks uses them once. Exact per-layer counts, as random masks.
        self.initial_masks: dict[str, torch.Tensor] | None = None

    def init_masks(self, masks: dict[str, torch.Tensor] | None = None) -> None:
        """Random masks with exact per-layer counts; identical on every rank (seeded, then broadcast).
        Methods that start dense get all-true masks instead. `masks` (or `initial_masks`), keyed by
        layer name with exactly `target_active` true entries each, are used instead of random ones."""
        self._active = {}
        masks = masks if masks is not None else self.initial_masks
        self.initial_masks = None
        if masks is not None:
            if self.starts_dense:
                raise ValueError(f"sparsity.init: {self.method} starts dense and prunes by itself; "
                                 "initial masks apply to static, set, snfs and rigl")
            for layer in self.layers:
                mask = masks[layer.name].to(dtype=torch.bool, device=layer.weight.device)
                if tuple(mask.shape) != layer.shape or int(mask.sum()) != self.target_active[layer.name]:
                    raise ValueError(f"initial mask of {layer.name!r}: needs shape {list(layer.shape)} with "
                                     f"{self.target_active[layer.name]} active entries")
                if self.pattern is not None and bool((group_counts(mask, self.pattern[1], layer.kind)
                                                      != self.pattern[0]).any()):
                    raise ValueError(f"initial mask of {layer.name!r}: needs exactly {self.pattern[0]} active in "
                                     f"every group of {self.pattern[1]} (sparsity.pattern)")
                self._store_mask(layer, mask)
            self._broadcast_masks()
            self.apply_masks()
            return
        if self.starts_dense:
            for layer in self.layers:
                self._store_mask(layer, torch.ones(layer.shape, dtype=torch.bool, device=layer.weight.device))
            return
        generator = torch.Generator().manual_seed(self.seed)
        for layer in self.layers:
            if self.pattern is not None:
                mask = nm_random_mask(layer.shape, *self.pattern, generator, layer.kind)
            elif self.fan_in is not None:
                mask = random_fan_in_mask(layer.shape, layer.kind, self.fan_in[layer.name], generator)
            else:
                mask = random_mask(layer.shape, self.target_active[layer.name], generator)
            self._store_mask(layer, mask.to(layer.weight.device))
        self._broadcast_masks()
        self.apply_masks()

    def apply_masks(self) -> None:
        """Zero inactive weights and their optimizer state."""
        with torch.no_grad():
            for layer in self.layers:
                mask = self.masks[layer.name]
                layer.weight.mul_(mask)
                mask_optimizer_state(self.optimizer, layer.weight, mask)

    def _store_mask(self, layer: Layer, mask: torch.Tensor) -> None:
        self.masks[layer.name] = like_weight(mask, layer.weight)

    def mask_gradients(self) -> None:
        """One fused call over every masked layer (a kernel launch per layer costs on small models).

        On CPU the product with a bool mask is not vectorised (about 7× slower than with a float one,
        the library's largest per-step cost on a small model), so CPU layers use a float copy of the
        mask, made once per mask (identical products: the bool is promoted to 0./1. either way). On a
        GPU the 1-byte mask reads less memory and stays as it is."""
        grads, masks = [], []
        for layer in self.layers:
            grad = layer.weight.grad
            if grad is not None:
                grads.append(grad)
                mask = self.masks[layer.name]
                if grad.device.type == "cpu":
                    cached = self._grad_masks.get(layer.name)
                    if cached is None or cached[0] is not mask or cached[1].dtype != grad.dtype:
                        cached = self._grad_masks[layer.name] = (mask, mask.to(grad.dtype))
                    mask = cached[1]
                masks.append(mask)
        if grads:
            torch._foreach_mul_(grads, masks)

    def _broadcast_masks(self) -> None:
        """Rank 0's masks win, so replicas can never diverge (paper App. M bug 1)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        for name in sorted(self.masks):
            buffer = self.masks[name].to(torch.uint8).contiguous()
            dist.broadcast(buffer, src=0)
            self._store_mask(self._layer[name], buffer.bool())
        self._count_neurons()  # rank 0's masks: its neuron counts too

    def _count_neurons(self) -> None:
        """Fan-in and active neurons read from the masks themselves (after a resume, or rank 0's broadcast)."""
        if self.fan_in is None:
            return
        for layer in self.layers:
            counts = row_counts(self.masks[layer.name], layer.kind)
            self.active_neurons[layer.name] = int((counts > 0).sum())
            self.fan_in[layer.name] = int(counts.max())

    def neuron_counts(self) -> dict[str, tuple[int, int]]:
        """Structure fan-in: per layer (active neurons, inputs per active neuron); empty otherwise."""
        if self.fan_in is None:
            return {}
        return {name: (self.active_neurons[name], self.fan_in[name]) for name in self.fan_in}

    def ever_active_counts(self) -> dict[str, int]:
        """Per layer, how many positions have been active at some step (the mask's own count until
        the first drop/grow update; every position for methods that start dense)."""
        if self.starts_dense:
            return {layer.name: layer.numel for layer in self.layers}
        return {name: int(self.ever_active[name].sum()) if name in self.ever_active else int(mask.sum())
                for name, mask in self.masks.items()}

    def exploration(self) -> float:
        numel = sum(layer.numel for layer in self.layers)
        return sum(self.ever_active_counts().values()) / numel if numel else 0.0

    # ----------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        extra = {}
        if self.score_state_key:
            extra[self.score_state_key] = {k: v.cpu() for k, v in self.score_state.items()}
        return {"method": self.method, "masks": {k: v.cpu() for k, v in self.masks.items()},
                "ever_active": {k: v.cpu() for k, v in self.ever_active.items()}, "extra": extra}

    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.method:
            raise ValueError(f"checkpoint is for method {state['method']!r}, not {self.method!r}")
        self._active = {}
        for layer in self.layers:
            self._store_mask(layer, state["masks"][layer.name].to(layer.weight.device))
        self.ever_active = {layer.name: state["ever_active"][layer.name].to(layer.weight.device)
                            for layer in self.layers if layer.name in state.get("ever_active", {})}
        if self.score_state_key:
            saved = state.get("extra", {}).get(self.score_state_key, {})
            self.score_state = {layer.name: saved[layer.name].to(layer.weight.device)
                                for layer in self.layers if layer.name in saved}
        self._count_neurons()
        with torch.no_grad():  # re-apply after loading: guards against mask drift
            for layer in self.layers:
                layer.weight.mul_(self.masks[layer.name])
