"""The sparsity plan: which layers are masked, at what density, and what that costs in FLOPs.

Computed on the meta device from shapes alone, so planning ResNet-50 takes well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from rigl_core.distributions import active_count, layer_sparsities
from rigl_core.flops import output_positions, training_flops_ratio
from rigl_core.layers import Layer, select_layers
from rigl_core.schedules import gmp_sparsity
from rigl_core.spec import SparsitySpec


@dataclass
class LayerPlan:
    layer: Layer
    target_sparsity: float  # 0 for unmasked layers
    positions: int  # output positions per sample (FLOPs = 2·nnz·positions)

    @property
    def target_active(self) -> int:
        if not self.layer.masked:
            return self.layer.numel
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

    @property
    def masked(self) -> list[LayerPlan]:
        return [lp for lp in self.layers if lp.layer.masked]

    def training_flops_ratio(self, nnz: dict[str, int] | None = None) -> float:
        dense = sum(lp.flops_dense for lp in self.layers)
        sparse = self.inference_flops(nnz)
        schedule = self.spec.schedule
        curve = None
        if self.method == "gmp":
            curve = []
            samples = 200
            for i in range(samples):
                t = i / samples
                total = 0
                for lp in self.layers:
                    s = gmp_sparsity(int(t * 10_000), lp.target_sparsity, int(schedule.gmp_begin * 10_000),
                                     int(schedule.t_end * 10_000)) if lp.layer.masked else 0.0
                    total += lp.flops_for(active_count(lp.layer.numel, s))
                curve.append(total)
        return training_flops_ratio(self.method, dense, sparse, schedule.delta_t, schedule.t_end, curve)

    def inference_flops(self, nnz: dict[str, int] | None = None) -> int:
        if self.method == "dense":
            return sum(lp.flops_dense for lp in self.layers)
        nnz = nnz or {}
        return sum(lp.flops_for(nnz.get(lp.layer.name, lp.target_active)) for lp in self.layers)

    def to_dict(self, nnz: dict[str, int] | None = None) -> dict:
        """Per-layer rows and totals; `nnz` (measured) replaces the planned counts in a report."""
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
                    "reason": "dense method" if dense_method else lp.layer.reason,
                    "nnz": count,
                    "density": count / lp.layer.numel,
                    "target_density": target / lp.layer.numel,
                    "flops_dense": lp.flops_dense,
                    "flops_sparse": lp.flops_for(count),
                }
            )
        masked_rows = [r for r in rows if r["masked"]]
        masked_params = sum(r["params"] for r in masked_rows)
        all_params = sum(r["params"] for r in rows)
        dense_flops = sum(r["flops_dense"] for r in rows)
        sparse_flops = sum(r["flops_sparse"] for r in rows)
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
                "overall_sparsity": 1 - sum(r["nnz"] for r in rows) / all_params if all_params else 0.0,
                "flops_dense": dense_flops,
                "flops_sparse": sparse_flops,
                "inference_flops_ratio": sparse_flops / dense_flops if dense_flops else 1.0,
                "training_flops_ratio": self.training_flops_ratio(nnz),
            },
        }


def make_plan(model: nn.Module, input_shape: list[int], spec: SparsitySpec) -> Plan:
    """Select layers, distribute the sparsity and count FLOPs. Raises ValueError naming the field."""
    layers = select_layers(
        model,
        spec.distribution,
        dense_first_layer=spec.dense_first_layer,
        dense_depthwise=spec.dense_depthwise,
        include=spec.include,
        exclude=spec.exclude,
        layer_density=spec.layer_density,
    )
    masked = [layer for layer in layers if layer.masked]
    if spec.method != "dense" and not masked:
        raise ValueError(
            "sparsity: this configuration masks no layer (check include/exclude, dense_first_layer "
            "and layer_density)"
        )
    sparsities = layer_sparsities(
        [layer.shape for layer in masked],
        spec.sparsity,
        spec.distribution,
        custom=[layer.custom_density for layer in masked],
        erk_power_scale=spec.erk_power_scale,
    )
    by_name = {layer.name: s for layer, s in zip(masked, sparsities)}
    positions = output_positions(model, input_shape)
    plans = [LayerPlan(layer, by_name.get(layer.name, 0.0), positions.get(layer.name, 0)) for layer in layers]
    return Plan(method=spec.method, spec=spec, layers=plans)
