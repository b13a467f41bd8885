"""Declarative JSON architectures: the only way users send models (never code, never pickles).

A sequential list of layers with shape inference, plus `residual` blocks wrapping a sub-list with
an optional projection. Errors point at the layer by path (`layers[3].layers[1].kernel_size`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"


class ArchitectureError(ValueError):
    """A layer does not fit: `field` is the dotted path of the offending entry."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Limits(BaseModel):
    """Caps that keep a submitted architecture trainable on the service's GPUs."""

    max_depth: int = 256  # layers, counting those inside residual blocks
    max_width: int = 16_384  # features or channels of any layer
    max_params: int = 100_000_000
    max_kernel: int = 31


MAX_SIZE = 1_048_576  # any single count a layer may name (features, channels, sizes, strides): bounded before use
MAX_POOL_OUTPUT = 1024  # adaptive pooling's output side: 1e9 would build a 1e18-feature flatten


class _Layer(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str | None = Field(None, pattern=NAME_PATTERN, description="Module name (for include/exclude).")


class Linear(_Layer):
    type: Literal["linear"]
    out_features: int = Field(ge=1, le=MAX_SIZE)
    bias: bool = True


class _Conv(_Layer):
    out_channels: int = Field(ge=1, le=MAX_SIZE)
    kernel_size: int = Field(ge=1, le=MAX_SIZE)
    stride: int = Field(1, ge=1, le=16)
    padding: int | Literal["same"] = 0
    groups: int = Field(1, ge=1, le=MAX_SIZE)
    bias: bool = True

    @field_validator("padding")
    @classmethod
    def _padding(cls, value):
        if isinstance(value, int) and not 0 <= value <= 1024:
            raise ValueError("must be an integer in 0..1024 or 'same'")
        return value


class Conv1d(_Conv):
    type: Literal["conv1d"]


class Conv2d(_Conv):
    type: Literal["conv2d"]


class BatchNorm1d(_Layer):
    type: Literal["batchnorm1d"]


class BatchNorm2d(_Layer):
    type: Literal["batchnorm2d"]


class LayerNorm(_Layer):
    type: Literal["layernorm"]


class Activation(_Layer):
    type: Literal["relu", "gelu", "tanh", "sigmoid"]


class Pool(_Layer):
    type: Literal["maxpool", "avgpool"]
    kernel_size: int = Field(ge=1, le=MAX_SIZE)
    stride: int | None = Field(None, ge=1, le=MAX_SIZE)


class AdaptiveAvgPool(_Layer):
    type: Literal["adaptive-avg-pool"]
    output_size: int = Field(1, ge=1, le=MAX_POOL_OUTPUT)


class Flatten(_Layer):
    type: Literal["flatten"]


class Dropout(_Layer):
    type: Literal["dropout"]
    p: float = Field(0.5, ge=0.0, lt=1.0)


class Residual(_Layer):
    """x + f(x); `projection` adds a 1×1 conv (or linear) on the shortcut when shapes differ."""

    type: Literal["residual"]
    layers: list["LayerSpec"] = Field(min_length=1)
    projection: bool = False


LayerSpec = Annotated[
    Union[Linear, Conv1d, Conv2d, BatchNorm1d, BatchNorm2d, LayerNorm, Activation, Pool, AdaptiveAvgPool,
          Flatten, Dropout, Residual],
    Field(discriminator="type"),
]
Residual.model_rebuild()


class Architecture(BaseModel):
    """A whole network: the input shape (without batch) and the layers in order."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    input_shape: list[int] = Field(min_length=1, max_length=3, description="C,H,W for conv2d; C,L for conv1d; F.")
    layers: list[LayerSpec] = Field(min_length=1)

    @field_validator("input_shape")
    @classmethod
    def _positive(cls, value):
        if any(not 0 < v <= 65_536 for v in value):
            raise ValueError("entries must be integers in 1..65536")
        return value


def architecture_json_schema() -> dict:
    return Architecture.model_json_schema()
