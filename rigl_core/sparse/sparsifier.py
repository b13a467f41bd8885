"""Sparse-training methods: dense, static, SET, SNFS, RigL, GMP and SNIP.

A Sparsifier owns the masks. The public way to use one is `rigl_core.RigL` (rigl_core/sparse/rigl.py), which
lets the caller (or a framework: AMP, Accelerate, Lightning) call `optimizer.step()` itself. Here the
step is split so that nothing in the decision calls the optimizer:

    plan = sparsifier.prepare_step(step, scaler)   # masks grads; says whether the optimizer may step
    if plan.take_step: optimizer.step()            # or scaler.step(optimizer)
    if plan.update_after_step: sparsifier.finish_step(step)   # SET/SNFS/GMP drop after the step

`sparsifier.step(step, scaler=scaler)` still does all three (the older one-call form).

The methods differ only in when masks change and which scores drop and grow (docs/algorithm.md "Drop and grow").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from rigl_core.sparse.distributions import active_count
from rigl_core.sparse.layers import Layer
from rigl_core.sparse.masking import drop_and_grow, like_weight, mask_optimizer_state, random_mask, topk_mask
from rigl_core.sparse.nm import group_counts, nm_drop_and_grow, nm_random_mask, nm_unfit_reason
from rigl_core.sparse.schedules import UpdateSchedule, gmp_sparsity


@dataclass
class LayerUpdate:
    """What one mask update did to one layer."""

    n_active: int
    dropped: int
    grown_new: int  # previously inactive positions that became active
    regrown: int  # positions dropped and regrown in the same update
    ever_active: int = 0  # positions active at any time so far (in-time over-parameterisation)
    numel: int = 0


@dataclass
class MaskUpdate:
    step: int
    drop_fraction: float
    layers: dict[str, LayerUpdate] = field(default_factory=dict)

    @property
    def churn(self) -> float:
        """Share of active weights that are new after this update."""
        active = sum(u.n_active for u in self.layers.values())
        return sum(u.grown_new for u in self.layers.values()) / active if active else 0.0

    @property
    def exploration(self) -> float:
        """Share of the masked weights that have ever been active (Liu et al. 2021's ITOP rate)."""
        numel = sum(u.numel for u in self.layers.values())
        return sum(u.ever_active for u in self.layers.values()) / numel if numel else 0.0

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "drop_fraction": self.drop_fraction,
            "churn": self.churn,
            "exploration": self.exploration,
            "layers": {name: vars(u) for name, u in self.layers.items()},
        }


@dataclass
class StepPlan:
    """What `Sparsifier.prepare_step` decided for one step."""

    take_step: bool  # the caller may call optimizer.step() (gradients are masked, unscaled, clipped)
    update: MaskUpdate | None = None  # a mask update already made (RigL/SNIP replace the step)
    update_after_step: bool = False  # SET/SNFS/GMP: call finish_step() after the optimizer step


class Sparsifier:
    """Base: fixed masks (the `static` method). Subclasses override the hooks below."""

    method = "static"
    replaces_step_on_update = False  # RigL/SNIP skip the optimizer step on update iterations
    starts_dense = False  # SNIP and GMP: every weight is active until the first update prunes

    def __init__(
        self,
        layers: list[Layer],
        sparsities: list[float],
        optimizer: torch.optim.Optimizer | None,
        schedule: UpdateSchedule,
        seed: int = 0,
        grad_accumulation_n: int = 1,
        snfs_momentum: float = 0.9,
        gmp_begin: int = 0,
        pattern: tuple[int, int] | None = None,
    ):
        self.layers = [layer for layer in layers if layer.masked]
        self.sparsity = {layer.name: s for layer, s in zip(self.layers, sparsities)}
        self.target_active = {
            layer.name: max(1, active_count(layer.numel, self.sparsity[layer.name])) for layer in self.layers
        }
        # (N, M) of sparsity.pattern N:M (rigl_core/sparse/nm.py): exactly N active in every group of M
        self.pattern = pattern if self.method in ("static", "set", "snfs", "rigl") else None
        if self.pattern is not None:
            n, m = self.pattern
            for layer in self.layers:
                unfit = nm_unfit_reason(layer.kind, layer.shape, m)
                if unfit is not None:  # make_plan leaves such layers dense; a caller passed one anyway
                    raise ValueError(f"sparsity.pattern: layer {layer.name!r} cannot be masked {n}:{m} ({unfit})")
                self.target_active[layer.name] = layer.numel // m * n
        self.optimizer = optimizer
        self.schedule = schedule
        self.seed = seed
        self.grad_accumulation_n = grad_accumulation_n
        self.snfs_momentum = snfs_momentum
        self.gmp_begin = gmp_begin
        self.masks: dict[str, torch.Tensor] = {}
        # Bool union of every mask so far; made at the first drop/grow update (until then it equals
        # the mask), so static and pruning methods never pay for it.
        self.ever_active: dict[str, torch.Tensor] = {}
        self.record_details = False  # tests: keep kept/grown sets of the last update
        self.last_details: dict[str, object] = {}
        self.pending_update = False  # a due mask update postponed by non-finite gradients
        self.skipped_steps = 0  # steps skipped because the scaler found inf/NaN gradients
        # Clip the global norm of the gradients the optimizer applies (masked, unscaled) to this;
        # `last_grad_norm` holds the norm before clipping (a 0-d tensor: reading it syncs the GPU).
        self.clip_grad_norm: float | None = None
        self.last_grad_norm: torch.Tensor | None = None
        self._layer = {layer.name: layer for layer in self.layers}
        self._active: dict[str, int] = {}  # each mask's count, known after a drop/grow (saves a sync)
        self._grad_masks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # CPU: (mask, its float copy)
        # First masks chosen by the caller instead of random ones (a warm start's magnitude pruning);
        # init_masks uses them once. Exact per-layer counts, as random masks.
        self.initial_masks: dict[str, torch.Tensor] | None = None

    # ----------------------------------------------------------------- lifecycle
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
                if self.pattern is not None and bool((group_counts(mask, self.pattern[1]) != self.pattern[0]).any()):
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
                mask = nm_random_mask(layer.shape, *self.pattern, generator)
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

    # ----------------------------------------------------------------- the step
    def step(self, step: int, scaler: torch.amp.GradScaler | None = None) -> MaskUpdate | None:
        """The one-call form: prepare_step, the optimizer step (through the scaler when one is given)
        and finish_step. Returns the mask update made at this step, if any."""
        plan = self.prepare_step(step, scaler)
        if plan.take_step:
            if scaler is not None and scaler.is_enabled():
                scaler.step(self.optimizer)  # already unscaled and finite: a plain optimizer.step()
            else:
                self.optimizer.step()
        return self.finish_step(step) if plan.update_after_step else plan.update

    def prepare_step(self, step: int, scaler: torch.amp.GradScaler | None = None,
                     may_update: bool = True) -> StepPlan:
        """Everything before the optimizer step, without calling it: observe the dense gradients,
        make a due RigL/SNIP update (those skip the optimizer step), else mask and clip the
        gradients. `take_step` says whether the caller may step the optimizer now.

        Non-finite gradients never reach the masks:

        - With an enabled `scaler`, the gradients are unscaled first (`scaler.unscale_`), so grow
          scores are true gradients, and a step whose gradients hold inf/NaN is skipped whole: no
          optimizer step, no gradient observation (SNFS EMA, RigL accumulation) and no drop/grow. A
          mask update due at a skipped step is postponed to the next step with finite gradients
          (with the drop fraction of the step it was due at), so SNIP's one update and GMP's last
          pruning step are never lost. The caller still calls `scaler.update()` afterwards.
        - Without a scaler nothing is checked on ordinary steps (no per-step cost), but a mask
          update refuses non-finite scores: if any masked layer's gradient (or accumulated score)
          is non-finite, it warns and postpones the update as above, and its optimizer step is
          skipped if the method would take it at that step. Non-finite weights raise
          FloatingPointError: training has already diverged.

        `may_update=False` (the step after an update iteration that did not count as a step): the
        update due at `step` is already made; this is its optimizer step, whose gradient scores nothing.
        """
        scheduled = may_update and self.is_update_step(step)
        if scaler is not None and scaler.is_enabled() and _unscale_found_inf(scaler, self.optimizer):
            self.skipped_steps += 1
            if scheduled:
                self.pending_update = True
            self._discard_scores_on_skip()
            self._zero_grads()
            return StepPlan(False)
        due = self.pending_update or scheduled
        if due and not self._scores_finite(step):
            self.pending_update = True
            self._discard_scores_on_skip()
            self._zero_grads()
            return StepPlan(False)
        if may_update:
            self.observe_gradients(step)
        if self.replaces_step_on_update and due:
            self.pending_update = False
            update = self.update_masks(step)
            self._zero_grads()
            return StepPlan(False, update=update)
        self.mask_gradients()
        self._clip()
        if due:  # SET/SNFS/GMP: pending until finish_step, so a step the caller never takes keeps it due
            self.pending_update = True
        return StepPlan(True, update_after_step=due)

    def finish_step(self, step: int) -> MaskUpdate | None:
        """After the optimizer step: the SET/SNFS/GMP mask update prepare_step found due."""
        if not self.pending_update or self.replaces_step_on_update:
            return None
        self.pending_update = False
        return self.update_masks(step)

    def _clip(self) -> None:
        if self.clip_grad_norm is None or self.optimizer is None:
            return
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.last_grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm, foreach=True)

    def _scores_finite(self, step: int) -> bool:
        """Checked only on mask-update steps: weights and grow scores of every masked layer, read back
        with one synchronisation (a per-layer check costs a sync per layer on a GPU)."""
        weights = [layer.weight for layer in self.layers]
        scores = self._score_inputs()
        finite = _all_finite(weights + scores)
        if all(finite[: len(weights)]) and all(finite[len(weights):]):
            return True
        for layer, ok in zip(self.layers, finite):
            if not ok:
                raise FloatingPointError(
                    f"step {step}: layer {layer.name} has non-finite weights, training has diverged "
                    "(with fp16, pass a torch.amp.GradScaler: rigl.step(scaler=scaler))")
        warnings.warn(f"step {step}: non-finite gradients, mask update postponed to the next "
                      "step with finite gradients (no drop or grow on non-finite scores)",
                      RuntimeWarning, stacklevel=3)
        return False

    def _score_inputs(self) -> list[torch.Tensor]:
        """The tensors the grow scores are computed from (this step's dense gradients by default)."""
        return [layer.weight.grad for layer in self.layers if layer.weight.grad is not None]

    def _discard_scores_on_skip(self) -> None:
        """Hook: drop score state that a skipped step may have made non-finite."""

    def is_update_step(self, step: int) -> bool:
        return False

    def observe_gradients(self, step: int) -> None:
        """Hook to read dense gradients before they are masked (SNFS EMA, RigL accumulation)."""

    def update_masks(self, step: int) -> MaskUpdate | None:
        return None

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

    # ----------------------------------------------------------------- helpers
    def _zero_grads(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def _drop_grow_all(self, step: int, grow_score) -> MaskUpdate:
        """`grow_score(index, layer)` is called one layer at a time, so only one layer's scores are
        ever alive (the peak-memory cost of an update is one layer, not the whole model)."""
        due = step if self.schedule.is_update_step(step) else step - step % self.schedule.delta_t
        fraction = self.schedule.drop_fraction(due)  # a postponed update drops what it would have when due
        update = MaskUpdate(step=step, drop_fraction=fraction)
        details = {}
        counts = []  # per layer, as tensors: read back with one synchronisation at the end
        with torch.no_grad():
            for index, layer in enumerate(self.layers):
                old = self.masks[layer.name]
                n_active = self._active.get(layer.name)
                if n_active is None:
                    n_active = self._active[layer.name] = int(old.sum())
                k = int(fraction * n_active)
                if self.pattern is not None:  # drop/grow within each group of M (rigl_core/sparse/nm.py)
                    result = nm_drop_and_grow(old, layer.weight, grow_score(index, layer), k, self.pattern[1],
                                              n_active=n_active)
                else:
                    result = drop_and_grow(old, layer.weight, grow_score(index, layer), k, n_active=n_active)
                old_flat = old.reshape(-1)
                ever = self.ever_active.get(layer.name)
                if ever is None:
                    ever = self.ever_active[layer.name] = old.clone()
                ever |= result.new_mask
                counts.append(torch.stack([result.new_mask.sum(), (result.grown & ~old_flat).sum(), ever.sum()]))
                if self.record_details:
                    details[layer.name] = {"old": old.clone(), "kept": result.kept, "grown": result.grown}
                self._store_mask(layer, result.new_mask)
                update.layers[layer.name] = LayerUpdate(0, result.n_drop, 0, 0, numel=layer.numel)
        read = torch.stack(counts).tolist() if counts else []
        for layer, (n_new, grown_new, ever_count) in zip(self.layers, read):
            row = update.layers[layer.name]
            row.n_active, row.grown_new, row.ever_active = n_new, grown_new, ever_count
            row.regrown = row.dropped - grown_new
            self._active[layer.name] = n_new
        self._broadcast_masks()
        self.apply_masks()
        if self.record_details:
            self.last_details = details
        return update

    def _broadcast_masks(self) -> None:
        """Rank 0's masks win, so replicas can never diverge (paper App. M bug 1)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        for name in sorted(self.masks):
            buffer = self.masks[name].to(torch.uint8).contiguous()
            dist.broadcast(buffer, src=0)
            self._store_mask(self._layer[name], buffer.bool())

    # ----------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {"method": self.method, "masks": {k: v.cpu() for k, v in self.masks.items()},
                "ever_active": {k: v.cpu() for k, v in self.ever_active.items()}, "extra": self._extra_state(),
                "pending_update": self.pending_update, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.method:
            raise ValueError(f"checkpoint is for method {state['method']!r}, not {self.method!r}")
        self._active = {}
        for layer in self.layers:
            self._store_mask(layer, state["masks"][layer.name].to(layer.weight.device))
        self.ever_active = {layer.name: state["ever_active"][layer.name].to(layer.weight.device)
                            for layer in self.layers if layer.name in state.get("ever_active", {})}
        self._load_extra_state(state.get("extra", {}))
        self.pending_update = bool(state.get("pending_update", False))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        with torch.no_grad():  # re-apply after loading: guards against mask drift
            for layer in self.layers:
                layer.weight.mul_(self.masks[layer.name])

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass


class DenseSparsifier(Sparsifier):
    """No masks at all: plain optimizer steps."""

    method = "dense"

    def __init__(self, layers, sparsities, optimizer, schedule, **kwargs):
        super().__init__([], [], optimizer, schedule, **kwargs)

    def prepare_step(self, step: int, scaler: torch.amp.GradScaler | None = None,
                     may_update: bool = True) -> StepPlan:
        """Always step: `scaler.step` skips inf/NaN steps itself. To clip, unscale first (the scaler
        does not unscale twice) so the true gradients are clipped."""
        if scaler is not None and scaler.is_enabled():
            if self.clip_grad_norm is not None:
                scaler.unscale_(self.optimizer)
                self._clip()
        else:
            self._clip()
        return StepPlan(True)


class StaticSparsifier(Sparsifier):
    method = "static"


class SETSparsifier(Sparsifier):
    """SET: optimizer step first, then drop by magnitude and grow uniformly at random (stateless RNG)."""

    method = "set"

    def is_update_step(self, step: int) -> bool:
        return self.schedule.is_update_step(step)

    def update_masks(self, step: int) -> MaskUpdate:
        def random_scores(index: int, layer: Layer) -> torch.Tensor:
            # Seeded by (seed, step, layer): every replica draws the same numbers.
            generator = torch.Generator().manual_seed(hash((self.seed, step, index)) & 0x7FFF_FFFF_FFFF)
            return torch.rand(layer.shape, generator=generator).to(layer.weight.device)

        return self._drop_grow_all(step, random_scores)


class RigLSparsifier(Sparsifier):
    """RigL: on update steps skip the optimizer step, drop smallest |w|, grow largest |dense gradient|."""

    method = "rigl"
    replaces_step_on_update = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grad_sums: dict[str, torch.Tensor] = {}  # only alive in the n-1 steps before an update

    def is_update_step(self, step: int) -> bool:
        return self.schedule.is_update_step(step)

    def _accumulating(self, step: int) -> bool:
        n = self.grad_accumulation_n
        if n <= 1:
            return False
        if self.pending_update:
            return True  # a postponed update: this step's gradient joins the accumulated ones
        next_update = -(-step // self.schedule.delta_t) * self.schedule.delta_t
        return next_update - step < n and next_update < self.schedule.t_end

    def observe_gradients(self, step: int) -> None:
        if not self._accumulating(step):
            return
        for layer in self.layers:
            grad = layer.weight.grad
            if grad is None:
                continue
            if layer.name in self.grad_sums:
                self.grad_sums[layer.name].add_(grad)
            else:
                self.grad_sums[layer.name] = grad.detach().clone()

    def grow_score(self, index: int, layer: Layer) -> torch.Tensor:
        """|dense gradient| of this minibatch (or of the last n, accumulated) for one layer."""
        grad = layer.weight.grad
        if layer.name in self.grad_sums:
            grad = self.grad_sums.pop(layer.name)  # already includes this step's gradient
        if grad is None:
            grad = torch.zeros_like(layer.weight)
        return grad.abs()

    def update_masks(self, step: int) -> MaskUpdate:
        return self._drop_grow_all(step, self.grow_score)

    def _score_inputs(self) -> list[torch.Tensor]:
        return super()._score_inputs() + list(self.grad_sums.values())

    def _discard_scores_on_skip(self) -> None:
        # Sums already accumulated hold only finite gradients (a skipped step never adds to them);
        # any that went non-finite in fp32 are dropped, leaving this step's gradient to score.
        for name in [n for n, v in self.grad_sums.items() if not bool(torch.isfinite(v).all())]:
            del self.grad_sums[name]

    def _extra_state(self) -> dict:
        return {"grad_sums": {k: v.cpu() for k, v in self.grad_sums.items()}}

    def _load_extra_state(self, state: dict) -> None:
        self.grad_sums = {
            layer.name: state["grad_sums"][layer.name].to(layer.weight.device)
            for layer in self.layers
            if layer.name in state.get("grad_sums", {})
        }


class SNFSSparsifier(RigLSparsifier):
    """SNFS (sparse momentum, no redistribution): grow by |EMA of dense gradients| updated every step.

    As in the reference, the optimizer step is taken first and the mask is updated after it, like
    SET's: `SparseMomentumOptimizer` subclasses `SparseSETOptimizerBase`, whose `apply_gradients`
    steps and then updates the masks (docs/algorithm.md "SNFS", google-research/rigl sparse_optimizers.py). Only RigL and
    SNIP replace the step on update iterations.
    """

    method = "snfs"
    replaces_step_on_update = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grad_ema: dict[str, torch.Tensor] = {}

    def observe_gradients(self, step: int) -> None:
        beta = self.snfs_momentum
        for layer in self.layers:
            grad = layer.weight.grad
            if grad is None:
                continue
            ema = self.grad_ema.get(layer.name)
            if ema is None:
                self.grad_ema[layer.name] = grad.detach() * (1 - beta)
            else:
                ema.mul_(beta).add_(grad, alpha=1 - beta)

    def grow_score(self, index: int, layer: Layer) -> torch.Tensor:
        return self.grad_ema.get(layer.name, torch.zeros_like(layer.weight)).abs()

    def _score_inputs(self) -> list[torch.Tensor]:
        return list(self.grad_ema.values())

    def _discard_scores_on_skip(self) -> None:
        for name in [n for n, v in self.grad_ema.items() if not bool(torch.isfinite(v).all())]:
            del self.grad_ema[name]  # restarts from the next finite gradient

    def _extra_state(self) -> dict:
        return {"grad_ema": {k: v.cpu() for k, v in self.grad_ema.items()}}

    def _load_extra_state(self, state: dict) -> None:
        self.grad_ema = {
            layer.name: state["grad_ema"][layer.name].to(layer.weight.device)
            for layer in self.layers
            if layer.name in state.get("grad_ema", {})
        }


class SNIPSparsifier(Sparsifier):
    """SNIP: dense forward at step 0, keep top |g·w| per layer (no optimizer step), then static."""

    method = "snip"
    replaces_step_on_update = True
    starts_dense = True  # dense for the saliency step

    def is_update_step(self, step: int) -> bool:
        return step == 0

    def update_masks(self, step: int) -> MaskUpdate:
        update = MaskUpdate(step=step, drop_fraction=0.0)
        with torch.no_grad():
            for layer in self.layers:
                grad = layer.weight.grad if layer.weight.grad is not None else torch.zeros_like(layer.weight)
                saliency = (grad * layer.weight).abs().float()
                n_active = self.target_active[layer.name]
                self._store_mask(layer, topk_mask(saliency, n_active))
                update.layers[layer.name] = LayerUpdate(n_active, layer.numel - n_active, 0, 0,
                                                        ever_active=layer.numel, numel=layer.numel)
        self._broadcast_masks()
        self.apply_masks()
        return update


class GMPSparsifier(Sparsifier):
    """Zhu & Gupta gradual magnitude pruning: dense start, cubic schedule to the target by T_end."""

    method = "gmp"
    starts_dense = True

    def is_update_step(self, step: int) -> bool:
        end = self.schedule.t_end
        if step == end:
            return True
        return self.gmp_begin <= step < end and step % self.schedule.delta_t == 0

    def sparsity_at(self, name: str, step: int) -> float:
        return gmp_sparsity(step, self.sparsity[name], self.gmp_begin, self.schedule.t_end)

    def update_masks(self, step: int) -> MaskUpdate:
        update = MaskUpdate(step=step, drop_fraction=0.0)
        with torch.no_grad():
            for layer in self.layers:
                old = self.masks[layer.name]
                n_keep = max(1, active_count(layer.numel, self.sparsity_at(layer.name, step)))
                n_keep = min(n_keep, int(old.sum()))  # masks only shrink
                scores = torch.where(old, layer.weight.abs().float(), torch.full_like(layer.weight, -1.0).float())
                new = topk_mask(scores, n_keep)
                update.layers[layer.name] = LayerUpdate(n_keep, int(old.sum()) - n_keep, 0, 0,
                                                        ever_active=layer.numel, numel=layer.numel)
                self._store_mask(layer, new)
        self._broadcast_masks()
        self.apply_masks()
        return update


def _all_finite(tensors: list[torch.Tensor]) -> list[bool]:
    """Per tensor, whether every entry is finite; one device synchronisation for all of them."""
    if not tensors:
        return []
    return torch.stack([torch.isfinite(t).all() for t in tensors]).tolist()


def _unscale_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Unscale the optimizer's gradients in place (unless the caller already did, e.g. to clip) and
    say whether the scaler found inf/NaN in them, i.e. whether `scaler.step` would skip this step."""
    from torch.amp.grad_scaler import OptState

    if scaler._per_optimizer_states[id(optimizer)]["stage"] is not OptState.UNSCALED:
        scaler.unscale_(optimizer)
    found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    return any(bool(v.item()) for v in found.values())


SPARSIFIERS: dict[str, type[Sparsifier]] = {
    cls.method: cls
    for cls in (DenseSparsifier, StaticSparsifier, SETSparsifier, RigLSparsifier, SNFSSparsifier, SNIPSparsifier, GMPSparsifier)
}
