"""Which weights are sparse: the kernels of conv, linear, attention, recurrent and (opt-in) embedding layers,
never biases or norm layers (paper §3(1)).

A `Layer` is one masked *parameter*: a module plus the attribute holding the kernel. Conv/linear layers are
named by their module ("layer1.0.conv1", parameter "layer1.0.conv1.weight"), as before. Other kernels:

- `nn.MultiheadAttention`: `<mha>.in_proj` (parameter `in_proj_weight`, the packed (3E, E) q/k/v projection),
  or `<mha>.q_proj`/`k_proj`/`v_proj` when kdim/vdim differ; its `out_proj` is an `nn.Linear` child,
  named `<mha>.out_proj` as any linear;
- `nn.RNN`/`nn.LSTM`/`nn.GRU`: `<rnn>.weight_ih_l0`, `<rnn>.weight_hh_l0_reverse`, … (every layer and
  direction, and `weight_hr_*` with `proj_size`);
- Hugging Face GPT-2's `Conv1D` (duck-typed: class name `Conv1D`, `nf`, weight (in, out)): named by module;
- `nn.Embedding`/`nn.EmbeddingBag`: named by module, masked only with `sparsity.embeddings: true`.

A parameter shared by several modules (tied embeddings and output layers) is one Layer, owned by its first
use; the later names are kept in `Layer.tied` so FLOPs count every use.

A model may also declare kernels its modules' types do not show (`model.declared_kernels`: name, module
path, attribute, kind): a `torch.export` program's linear and convolution weights that are not held by
an nn.Linear/ConvNd (rigl_core/models/program/trainable.py). They are masked where they live.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

KERNEL_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # named by module, parameter `weight`
EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)
EMBEDDING_REASON = "embedding (opt-in: sparsity.embeddings)"


@dataclass
class Layer:
    """One kernel parameter of the model, masked or not."""

    name: str  # e.g. "layer1.0.conv1", "encoder.layers.0.self_attention.in_proj", "rnn.weight_ih_l0"
    module: nn.Module
    masked: bool
    reason: str  # why it is (not) masked, shown in plans
    custom_density: float | None = None
    attr: str = "weight"  # the parameter's attribute on `module`
    kind: str = "linear"  # conv, linear, attention, rnn, conv1d_hf (GPT-2 Conv1D), embedding
    module_name: str | None = None  # the owning module's name; defaults to `name`
    tied: list[str] = field(default_factory=list)  # other layer names that use the same parameter

    def __post_init__(self) -> None:
        if self.module_name is None:
            self.module_name = self.name

    @property
    def param_name(self) -> str:
        """The parameter's key in `model.state_dict()`."""
        return f"{self.module_name}.{self.attr}" if self.module_name else self.attr

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.attr)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def fan_shape(self) -> tuple[int, ...]:
        """The shape in PyTorch's (out, in, *kernel) order, for ER/ERK: GPT-2's Conv1D stores (in, out)."""
        if self.kind == "conv1d_hf":
            return tuple(reversed(self.shape))
        return self.shape

    @property
    def numel(self) -> int:
        return self.weight.numel()


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups > 1 and module.groups == module.in_channels


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's `transformers.pytorch_utils.Conv1D` (GPT-2), recognised without importing transformers."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, nn.Parameter) and weight.dim() == 2
            and weight.shape[1] == getattr(module, "nf", None))


def module_kernels(name: str, module: nn.Module) -> list[tuple[str, str, str]]:
    """(layer name, parameter attribute, kind) of each kernel a module owns directly."""
    def join(suffix: str) -> str:
        return f"{name}.{suffix}" if name else suffix

    if isinstance(module, KERNEL_TYPES):
        if getattr(module, "weight", None) is None:
            return []
        return [(name, "weight", "linear" if isinstance(module, nn.Linear) else "conv")]
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            return [(join("in_proj"), "in_proj_weight", "attention")]
        return [(join(p), f"{p}_weight", "attention") for p in ("q_proj", "k_proj", "v_proj")
                if getattr(module, f"{p}_weight", None) is not None]
    if isinstance(module, nn.RNNBase):
        return [(join(w), w, "rnn") for w in module._flat_weights_names if w.startswith("weight_")]
    if is_hf_conv1d(module):
        return [(name, "weight", "conv1d_hf")]
    if isinstance(module, EMBEDDING_TYPES):
        return [(name, "weight", "embedding")]
    return []


def model_kernels(model: nn.Module):
    """(module name, module, layer name, attribute, kind) of every kernel, in module order: those
    `module_kernels` recognises and those the model declares (`declared_kernels`)."""
    declared: dict[str, list[tuple[str, str, str]]] = {}
    for kernel in getattr(model, "declared_kernels", ()):
        declared.setdefault(kernel.module_path, []).append((kernel.name, kernel.attr, kernel.kind))
    for module_name, module in model.named_modules():
        for name, attr, kind in module_kernels(module_name, module) + declared.get(module_name, []):
            yield module_name, module, name, attr, kind


def kernel_parameters(model: nn.Module, embeddings: bool = False) -> list[nn.Parameter]:
    """Every kernel parameter a Layer can cover (once each): the weights that get weight decay."""
    seen: dict[int, nn.Parameter] = {}
    for _, module, _, attr, kind in model_kernels(model):
        if kind == "embedding" and not embeddings:
            continue
        param = getattr(module, attr)
        seen.setdefault(id(param), param)
    return list(seen.values())


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_layers(
    model: nn.Module,
    distribution: str,
    dense_first_layer: bool | None = None,
    dense_depthwise: bool = True,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    layer_density: dict[str, float] | None = None,
    embeddings: bool = False,
) -> list[Layer]:
    """Every kernel in module order, with the decision whether it is masked.

    The first non-embedding kernel is kept dense by default for uniform and masked for ER/ERK, as in
    the paper. Embeddings are masked only when `embeddings` is true. Patterns match the layer name or
    its module's name. Raises ValueError naming the option when a pattern or override matches no layer.
    """
    include = include or []
    exclude = exclude or []
    layer_density = dict(layer_density or {})
    if dense_first_layer is None:
        dense_first_layer = distribution == "uniform"
    layers: list[Layer] = []
    owner: dict[int, Layer] = {}
    seen_first = False
    for module_name, module, name, attr, kind in model_kernels(model):
        param = getattr(module, attr)
        if id(param) in owner:  # tied weights: one mask, every use counted in FLOPs
            owner[id(param)].tied.append(name)
            continue
        names = [name] if name == module_name else [name, module_name]
        first = kind != "embedding" and not seen_first
        seen_first = seen_first or kind != "embedding"
        masked, reason = True, "masked"
        if include and not any(_matches(n, include) for n in names):
            masked, reason = False, "not in include"
        elif any(_matches(n, exclude) for n in names):
            masked, reason = False, "excluded"
        elif kind == "embedding" and not embeddings:
            masked, reason = False, EMBEDDING_REASON
        elif first and dense_first_layer:
            masked, reason = False, "first layer dense"
        elif dense_depthwise and is_depthwise(module):
            masked, reason = False, "depthwise dense"
        custom = layer_density.pop(name, None)
        if custom is not None:
            if custom >= 1.0:
                masked, reason = False, "density 1 (override)"
            else:
                masked, reason = True, "density override"
        if masked and kind == "embedding" and getattr(module, "sparse", False):
            raise ValueError(f"sparsity.embeddings: {name} has sparse=True gradients, which cannot be masked; "
                             "build it with sparse=False or exclude it")
        layer = Layer(name=name, module=module, masked=masked, reason=reason, custom_density=custom,
                      attr=attr, kind=kind, module_name=module_name)
        owner[id(param)] = layer
        layers.append(layer)
    if layer_density:
        raise ValueError(f"sparsity.layer_density: no maskable layer named {sorted(layer_density)}")
    for option, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for layer in layers for n in (layer.name, layer.module_name)):
                raise ValueError(f"sparsity.{option}: pattern {pattern!r} matches no maskable layer")
    return layers
