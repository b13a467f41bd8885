"""The sparsity plan: which layers are masked, at what density, and what that costs in FLOPs.

Computed on the meta device from shapes alone, so planning ResNet-50 takes well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from rigl_core.sparse.distributions import active_count, layer_sparsities
from rigl_core.sparse.flops import Positions, count_positions, training_flops_ratio
from rigl_core.sparse.layers import Layer, select_layers
from rigl_core.sparse.schedules import PAPER_DELTA_T, gmp_sparsity, update_schedule
from rigl_core.spec import SparsitySpec


LARGE_WEIGHT = 1_000_000
LARGE_SHARE = 0.05
USER_CHOSEN_DENSE = ("excluded", "not in include", "density 1 (override)")
STRUCTURE_REASONS = ("N:M:", "fan-in:")  # reasons of layers a structure leaves dense (rigl_core/sparse/nm.py, fan_in.py)
ROUNDING_NOTE = 0.01  # a fan-in that moves a layer's density by more than this is named in the plan's warnings


@dataclass
class LayerPlan:
    layer: Layer
    target_sparsity: float  # 0 for unmasked layers
    positions: int  # output positions per sample (FLOPs = 2·nnz·positions)
    fan_in: int | None = None  # sparsity.structure fan-in: inputs kept per neuron (rigl_core/sparse/fan_in.py)
    neurons: int | None = None  # its output neurons
    asked_density: float | None = None  # the distribution's density before rounding to a whole fan-in

    @property
    def target_active(self) -> int:
        if not self.layer.masked:
            return self.layer.numel
        if self.fan_in is not None:
            return self.fan_in * self.neurons
        return max(1, active_count(self.layer.numel, self.target_sparsity))

    @property
    def flops_dense(self) -> int:
        return 2 * self.layer.numel * self.positions

    def flops_for(self, nnz: int) -> int:
        return 2 * nnz * self.positions


@dataclass
class Plan:
    method: str
    spec: SparsitySpec
    layers: list[LayerPlan]
    # Parameters no Layer covers (biases, norms, position embeddings, …): name -> (numel, ndim). Totals
    # over the whole model count them as dense, so a plan never reports a sparsity the model lacks.
    other_params: dict[str, tuple[int, int]] = field(default_factory=dict)
    attention_flops: int = 0  # per sample, dense: score and weighted-sum matmuls (see rigl_core.sparse.flops)
    # Steps the run will make, when known (the Trainer, RigL(total_steps=...), a job's epochs): the
    # training FLOPs then use T_end in steps (`schedule.t_end_steps` included), not the t_end fraction.
    total_steps: int | None = None
    # What the model says about its own weights: a torch.export program's weights left dense and why
    # (rigl_core/models/program/trainable.py), always shown.
    notes: list[str] = field(default_factory=list)

    def warnings(self) -> list[str]:
        """Large weights (ndim ≥ 2, over 1M entries or 5% of the model) left dense without the user asking,
        and the model's own notes."""
        if self.method == "dense":
            return list(self.notes)
        total = sum(lp.layer.numel for lp in self.layers) + sum(n for n, _ in self.other_params.values())
        large = [(lp.layer.name, lp.layer.numel, lp.layer.reason) for lp in self.layers
                 if not lp.layer.masked and lp.layer.reason not in USER_CHOSEN_DENSE]
        large += [(name, n, "no maskable layer type") for name, (n, ndim) in self.other_params.items()
                  if ndim >= 2 and not any(note.startswith(f"{name} ") for note in self.notes)]
        out = [f"{name} ({n:,} weights, {n / total:.1%} of the model) stays dense: {why}"
               for name, n, why in large if n > LARGE_WEIGHT or n > LARGE_SHARE * total]
        # A structure (N:M, fan-in) that cannot apply to a layer leaves it dense: always said, never silent.
        out += [f"{lp.layer.name} ({lp.layer.numel:,} weights) stays dense: {lp.layer.reason}" for lp in self.layers
                if not lp.layer.masked and lp.layer.reason.startswith(STRUCTURE_REASONS)
                and not (lp.layer.numel > LARGE_WEIGHT or lp.layer.numel > LARGE_SHARE * total)]
        for lp in self.masked:  # fan-in: where rounding to whole inputs per neuron moved a density by > 1 point
            if lp.fan_in is not None and abs(lp.target_active / lp.layer.numel - lp.asked_density) > ROUNDING_NOTE:
                out.append(f"{lp.layer.name}: fan-in rounds its density {lp.asked_density:.4f} to "
                           f"{lp.target_active / lp.layer.numel:.4f} ({lp.fan_in} of "
                           f"{lp.layer.numel // lp.neurons} inputs per neuron)")
        return out + list(self.notes)

    @property
    def masked(self) -> list[LayerPlan]:
        return [lp for lp in self.layers if lp.layer.masked]

    def t_end_fraction(self) -> float:
        """T_end as a share of training: from the resolved T_end in steps when the run length is known
        (so `t_end_steps` counts, and GMP's T_end ≤ total − 1 as the Trainer clamps it), else `t_end`."""
        if not self.total_steps:
            return self.spec.schedule.t_end
        return update_schedule(self.spec, self.total_steps)[0].t_end / self.total_steps

    def training_flops_ratio(self, nnz: dict[str, int] | None = None) -> float:
        dense = sum(lp.flops_dense for lp in self.layers)
        sparse = self.inference_flops(nnz)
        schedule = self.spec.schedule
        t_end = self.t_end_fraction()
        curve = None
        if self.method == "gmp":
            curve = []
            samples = 200
            for i in range(samples):
                t = i / samples
                total = 0
                for lp in self.layers:
                    s = gmp_sparsity(int(t * 10_000), lp.target_sparsity, int(schedule.gmp_begin * 10_000),
                                     int(t_end * 10_000)) if lp.layer.masked else 0.0
                    total += lp.flops_for(active_count(lp.layer.numel, s))
                curve.append(total)
        delta_t = schedule.delta_t
        if delta_t == "auto":  # from T_end in steps when the run's length is known, else the paper's ΔT
            delta_t = update_schedule(self.spec, self.total_steps)[0].delta_t if self.total_steps else PAPER_DELTA_T
        return training_flops_ratio(self.method, dense, sparse, delta_t, t_end, curve)

    def inference_flops(self, nnz: dict[str, int] | None = None) -> int:
        if self.method == "dense":
            return sum(lp.flops_dense for lp in self.layers)
        nnz = nnz or {}
        return sum(lp.flops_for(nnz.get(lp.layer.name, lp.target_active)) for lp in self.layers)

    def _reason(self, lp: LayerPlan) -> str:
        """The layer's reason, saying so when ER/ERK itself left a masked layer dense (its raw density
        exceeded 1 and was capped): a masked layer at density 1.0 would read as a bug otherwise."""
        if lp.layer.reason == "masked" and lp.target_sparsity == 0.0 and self.spec.sparsity > 0:
            return f"{self.spec.distribution.upper()} density capped at 1"
        return lp.layer.reason

    def to_dict(self, nnz: dict[str, int] | None = None, neurons: dict[str, tuple[int, int]] | None = None) -> dict:
        """Per-layer rows and totals; `nnz` (measured) replaces the planned counts in a report, and `neurons`
        (measured: layer -> (active neurons, fan-in)) the planned ones of a fan-in structure."""
        dense_method = self.method == "dense"
        rows = []
        for lp in self.layers:
            masked = lp.layer.masked and not dense_method
            target = lp.target_active if masked else lp.layer.numel
            count = (nnz or {}).get(lp.layer.name, target)
            rows.append(
                {
                    "name": lp.layer.name,
                    "shape": list(lp.layer.shape),
                    "params": lp.layer.numel,
                    "masked": masked,
                    "reason": "dense method" if dense_method else self._reason(lp),
                    "nnz": count,
                    "density": count / lp.layer.numel,
                    "target_density": target / lp.layer.numel,
                    "flops_dense": lp.flops_dense,
                    "flops_sparse": lp.flops_for(count),
                }
            )
            if lp.fan_in is not None and masked:
                active, fan_in = (neurons or {}).get(lp.layer.name, (lp.neurons, lp.fan_in))
                rows[-1].update(neurons=lp.neurons, active_neurons=active, fan_in=fan_in)
        masked_rows = [r for r in rows if r["masked"]]
        masked_params = sum(r["params"] for r in masked_rows)
        all_params = sum(r["params"] for r in rows)
        dense_flops = sum(r["flops_dense"] for r in rows)
        sparse_flops = sum(r["flops_sparse"] for r in rows)
        other = sum(n for n, _ in self.other_params.values())
        model_nnz = sum(r["nnz"] for r in rows) + other
        return {
            "method": self.method,
            "distribution": self.spec.distribution,
            "target_sparsity": 0.0 if dense_method else self.spec.sparsity,
            "layers": rows,
            "totals": {
                "params": all_params,
                "nnz": sum(r["nnz"] for r in rows),
                "masked_params": masked_params,
                "sparsity": 1 - sum(r["nnz"] for r in masked_rows) / masked_params if masked_params else 0.0,
                # over every parameter of the model (biases, norms and uncovered weights count as dense)
                "model_params": all_params + other,
                "overall_sparsity": 1 - model_nnz / (all_params + other) if all_params + other else 0.0,
                "flops_dense": dense_flops,
                "flops_sparse": sparse_flops,
                "flops_attention": self.attention_flops,
                "inference_flops_ratio": sparse_flops / dense_flops if dense_flops else 1.0,
                "training_flops_ratio": self.training_flops_ratio(nnz),
            },
            "warnings": self.warnings(),
        }


def make_plan(model: nn.Module, input_shape: list[int] | None, spec: SparsitySpec,
              total_steps: int | None = None) -> Plan:
    """Select layers, distribute the sparsity and count FLOPs (none without an `input_shape`: every
    layer's positions are 0). `total_steps`, when known, puts T_end in steps into the training FLOPs.
    Raises ValueError naming the field."""
    layers = select_layers(
        model,
        spec.distribution,
        dense_first_layer=spec.dense_first_layer,
        dense_depthwise=spec.dense_depthwise,
        include=spec.include,
        exclude=spec.exclude,
        layer_density=spec.layer_density,
        embeddings=spec.embeddings,
    )
    nm = spec.nm if spec.method != "dense" else None
    if nm is not None:  # N:M: layers without an (out, in) layout divisible by M stay dense, saying why
        from rigl_core.sparse.nm import nm_unfit_reason

        for layer in layers:
            reason = nm_unfit_reason(layer.kind, layer.shape, nm[1]) if layer.masked else None
            if reason is not None:
                layer.masked, layer.reason = False, reason
    if spec.fan_in and spec.method != "dense":  # fan-in: kernels without output neurons stay dense, saying why
        from rigl_core.sparse.fan_in import fan_in_unfit_reason

        for layer in layers:
            reason = fan_in_unfit_reason(layer.kind) if layer.masked else None
            if reason is not None:
                layer.masked, layer.reason = False, reason
    masked = [layer for layer in layers if layer.masked]
    if spec.method != "dense" and not masked:
        raise ValueError(
            "sparsity: this configuration masks no layer (check include/exclude, dense_first_layer "
            "and layer_density)"
        )
    sparsities = layer_sparsities(
        [layer.fan_shape for layer in masked],
        spec.sparsity,
        spec.distribution,
        custom=[layer.custom_density for layer in masked],
        erk_power_scale=spec.erk_power_scale,
    )
    if nm is not None:  # every masked layer at exactly N/M: the distribution does not apply
        sparsities = [1.0 - nm[0] / nm[1]] * len(masked)
    by_name = {layer.name: s for layer, s in zip(masked, sparsities)}
    counted = count_positions(model, input_shape) if input_shape is not None else Positions()
    positions = counted.by_layer
    plans = [LayerPlan(layer, by_name.get(layer.name, 0.0),
                       sum(positions.get(name, 0) for name in (layer.name, *layer.tied))) for layer in layers]
    if spec.fan_in and spec.method != "dense":
        for lp in plans:
            if lp.layer.masked:
                _round_to_fan_in(lp)
    covered = {id(layer.weight) for layer in layers}
    other = {name: (p.numel(), p.dim()) for name, p in model.named_parameters() if id(p) not in covered}
    return Plan(method=spec.method, spec=spec, layers=plans, other_params=other,
                attention_flops=counted.attention_flops, total_steps=total_steps,
                notes=list(getattr(model, "plan_notes", ())))


def _round_to_fan_in(lp: LayerPlan) -> None:
    """Whole inputs per neuron: the layer's density becomes k / fan-in (rigl_core/sparse/fan_in.py)."""
    from rigl_core.sparse.fan_in import neurons_and_fan_in, whole_fan_in

    lp.asked_density = 1.0 - lp.target_sparsity
    lp.neurons, fan_in = neurons_and_fan_in(lp.layer.shape, lp.layer.kind)
    lp.fan_in = whole_fan_in(lp.layer.shape, lp.layer.kind, lp.asked_density)
    lp.target_sparsity = 1.0 - lp.fan_in / fan_in
