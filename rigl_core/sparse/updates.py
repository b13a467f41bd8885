"""What a sparsifier reports: what one mask update did (per layer and in all), and what it decided for one step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerUpdate:
    """What one mask update did to one layer."""

    n_active: int
    dropped: int
    grown_new: int  # previously inactive positions that became active
    regrown: int  # positions dropped and regrown in the same update
    ever_active: int = 0  # positions active at any time so far (in-time over-parameterisation)
    numel: int = 0
    active_neurons: int | None = None  # structure fan-in: neurons left after ablation
    fan_in: int | None = None  # structure fan-in: inputs per active neuron


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
class StepDecision:
    """What `Sparsifier.prepare_step` decided for one step."""

    take_step: bool  # the caller may call optimizer.step() (gradients are masked, unscaled, clipped)
    update: MaskUpdate | None = None  # a mask update already made (RigL/SNIP replace the step)
    update_after_step: bool = False  # SET/SNFS/GMP: call finish_step() after the optimizer step
