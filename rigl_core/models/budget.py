"""What a model will cost to build, read from its spec before anything is constructed.

Building a model is the expensive part of checking it: a `model.hf` config of 5,000 one-unit layers
is tiny in parameters but makes ~90,000 modules, and took minutes of CPU and gigabytes on the meta
device. The layer counts a spec states are enough to refuse such a model at once: a Hugging Face
config's layer fields (every transformer block makes at least `MODULES_PER_LAYER` modules), a
declarative architecture's layers (nested ones included). Built-in, torchvision and timm names are a
fixed set, counted exactly once built (`module_count`). Errors read `field: message`, as every
rigl_core error does.
"""

from __future__ import annotations

from torch import nn

# Fields of transformers configs that count blocks (encoder and decoder stacks add up).
HF_LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers",
                   "num_encoder_layers", "num_decoder_layers")
# A floor on the modules one transformer block makes: q, k, v and output projections, two MLP linears,
# two norms, an activation and a dropout (GPT-2 and Llama blocks make 13, BERT's 18).
MODULES_PER_LAYER = 10


def _count(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def module_field(model: dict) -> str:
    """The spec field that sets how many modules the model has: what a refusal names."""
    hf = model.get("hf")
    if isinstance(hf, dict):
        stated = [(_count(hf.get(key)) or 0, key) for key in HF_LAYER_FIELDS if _count(hf.get(key)) is not None]
        return f"model.hf.{max(stated)[1]}" if stated else "model.hf"
    if model.get("architecture") is not None:
        return "model.architecture.layers"
    return "model.name"


def _architecture_layers(layers) -> int:
    total = 0
    for layer in layers or []:
        total += 1
        if isinstance(layer, dict) and isinstance(layer.get("layers"), list):
            total += _architecture_layers(layer["layers"])
    return total


def estimated_modules(model: dict) -> int | None:
    """A lower bound on the modules the model of a `model` spec (JSON) builds, from the spec alone;
    None for names (a fixed set, counted once built)."""
    hf = model.get("hf")
    if isinstance(hf, dict):
        layers = sum(_count(hf.get(key)) or 0 for key in HF_LAYER_FIELDS if (_count(hf.get(key)) or 0) > 0)
        return layers * MODULES_PER_LAYER
    architecture = model.get("architecture")
    if isinstance(architecture, dict):
        return _architecture_layers(architecture.get("layers"))
    return None


def check_estimate(model: dict, max_modules: int) -> None:
    """Raise ValueError naming the field when the spec alone shows more than `max_modules` modules."""
    estimate = estimated_modules(model)
    if estimate is not None and estimate > max_modules:
        field = module_field(model)
        what = "layers" if field.startswith("model.architecture") else f"{estimate // MODULES_PER_LAYER:,} layers"
        raise ValueError(f"{field}: {what} make at least {estimate:,} modules; at most {max_modules:,} "
                         "(RIGL_MAX_MODEL_MODULES)")


def module_count(model: nn.Module) -> int:
    return sum(1 for _ in model.modules())


def check_built(model: nn.Module, spec: dict, max_modules: int) -> int:
    """The exact module count of a built model; ValueError naming the field past `max_modules`."""
    count = module_count(model)
    if count > max_modules:
        raise ValueError(f"{module_field(spec)}: the model has {count:,} modules; at most {max_modules:,} "
                         "(RIGL_MAX_MODEL_MODULES)")
    return count
