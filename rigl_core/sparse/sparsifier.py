"""The sparse-training methods: dense, static, SET, SNFS, RigL, GMP and SNIP, each a small class over the one
update loop (rigl_core/sparse/updater.py) that says only when masks change and which scores drop and grow
(docs/algorithm.md "Drop and grow"). `SPARSIFIERS` maps `sparsity.method` to its class. N:M patterns
(rigl_core/sparse/nm.py) apply to static, SET, SNFS and RigL through the same loop."""

from __future__ import annotations

import torch

from rigl_core.sparse.distributions import active_count
from rigl_core.sparse.layers import Layer
from rigl_core.sparse.schedules import gmp_sparsity
from rigl_core.sparse.updater import Sparsifier


class StaticSparsifier(Sparsifier):
    """Fixed masks: they never change."""

    method = "static"

    def is_update_step(self, step: int) -> bool:
        return False


class DenseSparsifier(StaticSparsifier):
    """No masks at all: plain optimizer steps."""

    method = "dense"
    sparse = False
    takes_pattern = False


class SETSparsifier(Sparsifier):
    """SET: optimizer step first, then drop by magnitude and grow uniformly at random (stateless RNG)."""

    method = "set"

    def grow_score(self, index: int, layer: Layer) -> torch.Tensor:
        # Seeded by (seed, step, layer): every replica draws the same numbers.
        generator = torch.Generator().manual_seed(hash((self.seed, self.updating_step, index)) & 0x7FFF_FFFF_FFFF)
        return torch.rand(layer.shape, generator=generator).to(layer.weight.device)


class RigLSparsifier(Sparsifier):
    """RigL: on update steps skip the optimizer step, drop smallest |w|, grow largest |dense gradient|
    (of this minibatch, or summed over the last `grad_accumulation_n`)."""

    method = "rigl"
    replaces_step_on_update = True
    score_state_key = "grad_sums"

    @property
    def grad_sums(self) -> dict[str, torch.Tensor]:
        """Dense gradients summed over the steps before an update; only alive in the n-1 steps before it."""
        return self.score_state

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

    def _score_inputs(self) -> list[torch.Tensor]:
        # Sums already accumulated hold only finite gradients (a skipped step never adds to them);
        # any that go non-finite in fp32 are dropped on a skip, leaving this step's gradient to score.
        return super()._score_inputs() + list(self.grad_sums.values())


class SRigLSparsifier(RigLSparsifier):
    """Structured RigL: RigL's drop and grow with a constant fan-in per neuron and neuron ablation
    (rigl_core/sparse/fan_in.py); the spec sets sparsity.structure and ablation_threshold."""

    method = "srigl"


class SNFSSparsifier(Sparsifier):
    """SNFS (sparse momentum, no redistribution): grow by |EMA of dense gradients| updated every step.

    As in the reference, the optimizer step is taken first and the mask is updated after it, like
    SET's: `SparseMomentumOptimizer` subclasses `SparseSETOptimizerBase`, whose `apply_gradients`
    steps and then updates the masks (docs/algorithm.md "SNFS", google-research/rigl sparse_optimizers.py). Only RigL and
    SNIP replace the step on update iterations.
    """

    method = "snfs"
    score_state_key = "grad_ema"

    @property
    def grad_ema(self) -> dict[str, torch.Tensor]:
        return self.score_state

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


class SNIPSparsifier(Sparsifier):
    """SNIP: dense forward at step 0, keep top |g·w| per layer (no optimizer step), then static."""

    method = "snip"
    replaces_step_on_update = True
    starts_dense = True  # dense for the saliency step
    takes_pattern = False

    def is_update_step(self, step: int) -> bool:
        return step == 0

    def drop_fraction(self, step: int) -> float:
        return 0.0

    def drop_count(self, layer: Layer, n_active: int, fraction: float, step: int) -> int:
        return n_active - self.target_active[layer.name]

    def drop_score(self, index: int, layer: Layer) -> torch.Tensor:
        grad = layer.weight.grad if layer.weight.grad is not None else torch.zeros_like(layer.weight)
        return grad * layer.weight


class GMPSparsifier(Sparsifier):
    """Zhu & Gupta gradual magnitude pruning: dense start, cubic schedule to the target by T_end."""

    method = "gmp"
    starts_dense = True
    takes_pattern = False

    def is_update_step(self, step: int) -> bool:
        end = self.schedule.t_end
        if step == end:
            return True
        return self.gmp_begin <= step < end and step % self.schedule.delta_t == 0

    def sparsity_at(self, name: str, step: int) -> float:
        return gmp_sparsity(step, self.sparsity[name], self.gmp_begin, self.schedule.t_end)

    def drop_fraction(self, step: int) -> float:
        return 0.0

    def drop_count(self, layer: Layer, n_active: int, fraction: float, step: int) -> int:
        n_keep = max(1, active_count(layer.numel, self.sparsity_at(layer.name, step)))
        return n_active - min(n_keep, n_active)  # masks only shrink


SPARSIFIERS: dict[str, type[Sparsifier]] = {
    cls.method: cls
    for cls in (DenseSparsifier, StaticSparsifier, SETSparsifier, RigLSparsifier, SRigLSparsifier, SNFSSparsifier,
                SNIPSparsifier, GMPSparsifier)
}
