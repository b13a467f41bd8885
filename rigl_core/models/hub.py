"""Models by name from timm and Hugging Face transformers, built offline (never a hub download).

- `model.name: "timm/<name>"`: `timm.create_model(name, pretrained=False, num_classes, in_chans)`; models
  with a fixed input size (ViTs) get `img_size` from the data's H, W.
- `model.hf: {"model_type": "bert", ...}`: `AutoConfig.for_model(**hf)` and the head of the task
  (`AutoModelForSequenceClassification` or `AutoModelForCausalLM`), wrapped in `TokenModel` so the
  trainer calls `model(input_ids)` and gets logits, as with any other model.

timm and transformers are imported only here, and only when such a model is asked for.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from rigl_core.optional import require

def check_timm_name(name: str) -> None:
    """Raises ValueError naming model.name when timm has no such model."""
    timm = require("timm", "models", "a timm/ model")

    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:6]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ValueError(f"model.name: timm has no model {name!r}{hint}")


def build_timm(name: str, num_classes: int, input_shape: list[int]) -> nn.Module:
    check_timm_name(name)
    timm = require("timm", "models", "a timm/ model")

    kwargs: dict[str, Any] = {}
    if len(input_shape) == 3:
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is not None and cfg.fixed_input_size:  # position embeddings sized for the image
            kwargs["img_size"] = tuple(input_shape[1:])
    in_chans = input_shape[0] if len(input_shape) >= 2 else 1
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


def hf_config(hf: dict[str, Any]):
    """The transformers config of a `model.hf` mapping; raises ValueError naming model.hf."""
    model_type = hf.get("model_type")
    if not isinstance(model_type, str):
        raise ValueError("model.hf.model_type: required, e.g. 'bert' or 'gpt2'")
    require("transformers", "models", "a model.hf (Hugging Face) model")
    from transformers import CONFIG_MAPPING, AutoConfig

    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"model.hf.model_type: transformers has no model type {model_type!r} (e.g. bert, gpt2, "
                         "llama)")
    fields = {k: v for k, v in hf.items() if k != "model_type"}
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"model.hf: {str(exc).splitlines()[0]}") from None
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 2:
        raise ValueError(f"model.hf.vocab_size: must be an integer ≥ 2, got {vocab!r}")
    return config


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def build_hf(hf: dict[str, Any], task: str, num_classes: int) -> "TokenModel":
    """A freshly initialised transformers model with the head of `task`, from its config alone."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = hf_config(hf)
    if task == "sequence-classification":
        config.num_labels = num_classes
        auto = AutoModelForSequenceClassification
    elif task == "causal-lm":
        auto = AutoModelForCausalLM
    else:
        raise ValueError(f"training.task: {task!r} does not apply to a model.hf model; use "
                         "sequence-classification or causal-lm")
    try:
        model = auto.from_config(config)
    except ValueError as exc:  # no such head for this model type, or a field it refuses
        raise ValueError(f"model.hf: cannot build a {config.model_type!r} {task} model: "
                         f"{str(exc).splitlines()[0]}") from None
    except (TypeError, AttributeError, KeyError, IndexError, RuntimeError) as exc:  # a field of the wrong kind
        raise ValueError(f"model.hf: cannot build a {config.model_type!r} model from this config: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    return TokenModel(model, config.vocab_size, max_positions(config))


class TokenModel(nn.Module):
    """Token ids (N, L) int64 → logits: (N, classes) for sequence classification, (N, L, vocab) for a
    causal LM. The attention mask is all ones: sequences are taken as unpadded (fixed-length chunks of
    a token stream, or classifier inputs of one length). The transformers model is `self.hf`."""

    input_dtype = torch.long  # what `rigl_core.models.registry.example_input` feeds it

    def __init__(self, hf: nn.Module, vocab_size: int, max_positions: int | None):
        super().__init__()
        self.hf = hf
        self.vocab_size = vocab_size
        self.max_positions = max_positions

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(input_ids)
        if input_ids.device.type == "meta":  # planning: sdpa's mask checks read values; eager does not
            with _eager_attention(self.hf):
                return self.hf(input_ids=input_ids, attention_mask=mask).logits
        return self.hf(input_ids=input_ids, attention_mask=mask).logits


@contextmanager
def _eager_attention(model: nn.Module):
    """Run a meta-device forward with eager attention (same kernels, same shapes): the sdpa mask
    helpers test `torch.all(mask == 1)`, which has no value on the meta device."""
    config, before = model.config, model.config._attn_implementation
    saved = []
    for module in model.modules():  # modules that copied the setting at init (BertModel, GPT2Model)
        for attr in ("attn_implementation", "_attn_implementation"):
            value = module.__dict__.get(attr)
            if isinstance(value, str):
                saved.append((module, attr, value))
                module.__dict__[attr] = "eager"
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before
        for module, attr, value in saved:
            module.__dict__[attr] = value
