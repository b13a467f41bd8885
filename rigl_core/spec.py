"""JobSpec: the one description of a training job, shared by the CLI, the REST API and the worker.

Every field has the paper's behaviour as default; unknown fields are rejected so a typo never
silently trains something other than what was asked.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rigl_core.architecture import Architecture

MAX_DIM = 65_536  # largest single dimension (width, channels, spatial size) a spec may name
MAX_SEED = 2**32 - 1  # seeds are 32-bit everywhere (numpy, torch's generators): larger ones overflow later
MAX_STEPS = 2**31 - 1  # steps are stored as 32-bit integers (PostgreSQL INTEGER)
MAX_LIST = 256  # entries of a list or mapping field (patterns, milestones, per-layer densities)
MAX_SYNTHETIC_VALUES = 200_000_000  # synthetic datasets: samples × values per sample
UPLOADED_ARCHITECTURE = re.compile(r"^arch_[0-9a-f]{20}$")
METHODS = ("dense", "static", "set", "snfs", "rigl", "gmp", "snip")
DISTRIBUTIONS = ("uniform", "er", "erk")
OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")


class _Strict(BaseModel):
    # Infinity/NaN are refused in every float field: they are not JSON, and break storage and training.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSpec(_Strict):
    """Which network to train: a built-in, any torchvision classifier, or a declarative architecture."""

    name: str = Field(
        "custom",
        description="mlp, lenet5, wrn-22-2, resnet18-cifar, a torchvision classification model name, or "
        "'custom' with `architecture`.",
    )
    architecture: Architecture | None = Field(
        None, description="Declarative JSON architecture (layers with shape inference); implies name 'custom'."
    )
    num_classes: int | None = Field(None, ge=2, le=100_000, description="Output classes; defaults to the dataset's.")
    input_shape: list[int] | None = Field(
        None, min_length=1, max_length=4, description="Input shape C,H,W (or C,L / features); defaults to the dataset's."
    )
    hidden_sizes: list[int] | None = Field(
        None, max_length=16, description="MLP hidden layer widths (default 300,100 as LeNet-300-100)."
    )

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from rigl_core.models import available_models

        if UPLOADED_ARCHITECTURE.match(value):
            return value  # an architecture uploaded to the service; it resolves the reference
        if value not in available_models():
            raise ValueError(f"unknown model {value!r}; try 'mlp', 'lenet5' or a torchvision name such as 'resnet18'")
        return value

    @model_validator(mode="after")
    def _architecture_or_name(self) -> "ModelSpec":
        if self.name == "custom" and self.architecture is None:
            raise ValueError("model.name is required (or give model.architecture)")
        if self.architecture is not None and self.name != "custom":
            raise ValueError("model.architecture: give either a built-in name or an architecture, not both")
        if self.architecture is not None:
            if self.input_shape not in (None, self.architecture.input_shape):
                raise ValueError("model.input_shape: differs from architecture.input_shape")
            from rigl_core.architecture import ArchitectureError, infer

            try:
                infer(self.architecture)
            except ArchitectureError as exc:
                raise ValueError(f"architecture.{exc.field}: {exc.message}") from None
        return self

    @field_validator("input_shape", "hidden_sizes")
    @classmethod
    def _positive(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(not 0 < v <= MAX_DIM for v in value):
            raise ValueError(f"all entries must be integers in 1..{MAX_DIM}")
        return value


DATASETS = ("digits", "mnist1d", "synthetic", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder",
            "tensors")


class DatasetSpec(_Strict):
    """Which data to train on. `digits`, `mnist1d` and `synthetic` need no files."""

    name: Literal["digits", "mnist1d", "synthetic", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder",
                  "tensors"] = Field(description="Dataset name.")
    data_dir: str | None = Field(None, description="Directory holding mnist/fashion-mnist/cifar files or images.")
    path: str | None = Field(None, description="imagefolder: the folder; tensors: the .npz/.safetensors file.")
    download: bool = Field(False, description="mnist/fashion-mnist/cifar: fetch into data_dir if missing.")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Share held out when there is no validation set.")
    split_seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the fixed train/validation split.")
    normalize: bool = Field(True, description="tensors: standardise per channel with training-set statistics.")
    augment: Literal["auto", "none", "crop-flip"] = Field(
        "auto", description="auto: random crop + flip for cifar, none otherwise."
    )
    image_size: int = Field(32, ge=8, le=512, description="imagefolder: images are resized to this square size.")
    max_samples: int = Field(200_000, ge=1, le=100_000_000,
                             description="imagefolder: refuse folders with more images.")
    max_bytes: int = Field(2 * 1024**3, ge=1, le=2**40, description="tensors: refuse larger files.")
    num_samples: int = Field(2048, ge=16, le=5_000_000, description="synthetic: total samples.")
    num_classes: int = Field(10, ge=2, le=1000, description="synthetic: number of classes.")
    input_shape: list[int] = Field(
        default_factory=lambda: [3, 32, 32], min_length=1, max_length=4, description="synthetic: sample shape."
    )
    noise: float = Field(1.0, ge=0.0, le=100.0, description="synthetic: noise scale; larger is harder.")

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, value: list[int]) -> list[int]:
        if any(not 0 < v <= MAX_DIM for v in value):
            raise ValueError(f"all entries must be integers in 1..{MAX_DIM}")
        return value

    @model_validator(mode="after")
    def _files_named(self) -> "DatasetSpec":
        import math

        if self.name == "synthetic" and self.num_samples * math.prod(self.input_shape) > MAX_SYNTHETIC_VALUES:
            raise ValueError(f"num_samples × input_shape exceeds {MAX_SYNTHETIC_VALUES:,} values")
        # mnist/cifar need no data_dir here: the service supplies its datasets directory, and the CLI's
        # loader says "dataset.data_dir: required" when a local run leaves it out.
        if self.name in ("imagefolder", "tensors") and self.path is None:
            raise ValueError(f"path is required for {self.name!r}")
        return self


class ScheduleSpec(_Strict):
    """When masks change and by how much (paper §3(2))."""

    delta_t: int = Field(100, ge=1, le=MAX_STEPS, description="ΔT: steps between mask updates.")
    t_end: float = Field(0.75, gt=0.0, le=1.0, description="T_end as a fraction of total training steps.")
    t_end_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="T_end in steps; overrides t_end when set.")
    alpha: float = Field(0.3, gt=0.0, le=1.0, description="Initial drop fraction α.")
    decay: Literal["cosine", "constant", "linear"] = Field("cosine", description="Drop-fraction decay.")
    grad_accumulation_n: int = Field(
        1, ge=1, le=64, description="RigL: average grow scores over the last n batches before an update."
    )
    snfs_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SNFS: EMA coefficient of dense gradients.")
    gmp_begin: float = Field(0.2, ge=0.0, lt=1.0, description="GMP: pruning starts at this fraction of training.")


class SparsitySpec(_Strict):
    """What is sparse and how it is trained."""

    method: Literal["dense", "static", "set", "snfs", "rigl", "gmp", "snip"] = Field("rigl")
    sparsity: float = Field(0.9, ge=0.0, lt=1.0, description="Target sparsity S over the masked layers, in [0, 1).")
    distribution: Literal["uniform", "er", "erk"] = Field("erk")
    erk_power_scale: float = Field(1.0, ge=0.0, le=1.0, description="ERK exponent; 0 makes ERK uniform.")
    dense_first_layer: bool | None = Field(
        None, description="Keep the first layer dense. Default: true for uniform, false for er/erk (paper)."
    )
    dense_depthwise: bool = Field(True, description="Keep depthwise convolutions dense (as the paper's MobileNets).")
    include: list[str] = Field(
        default_factory=list, max_length=MAX_LIST,
        description="Glob patterns of module names to mask (default: every conv and linear).",
    )
    exclude: list[str] = Field(default_factory=list, max_length=MAX_LIST,
                               description="Glob patterns of module names never masked.")
    layer_density: dict[str, float] = Field(
        default_factory=dict, max_length=MAX_LIST,
        description="Explicit density per module name; such layers are outside the budget.",
    )
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)

    @field_validator("layer_density")
    @classmethod
    def _densities(cls, value: dict[str, float]) -> dict[str, float]:
        for name, density in value.items():
            if not 0.0 < density <= 1.0:
                raise ValueError(f"density of {name!r} must be in (0, 1], got {density}")
        return value


class TrainingSpec(_Strict):
    """Optimisation settings."""

    epochs: int = Field(10, ge=1, le=100_000)
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS,
                                  description="Stop after this many steps (overrides epochs' length).")
    batch_size: int = Field(128, ge=1, le=65_536)
    optimizer: Literal["sgd", "nesterov", "adam", "adamw"] = Field("sgd")
    lr: float = Field(0.1, gt=0.0, le=100.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    weight_decay_kernels_only: bool = Field(True, description="Decay conv/linear kernels only, not biases or norms.")
    lr_schedule: Literal["constant", "step", "cosine"] = Field("cosine")
    milestones: list[float] = Field(
        default_factory=lambda: [0.3, 0.6, 0.9], max_length=MAX_LIST,
        description="step schedule: fractions of training.",
    )
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="step schedule: LR factor at each milestone.")
    warmup_epochs: float = Field(0.0, ge=0.0, le=100_000, description="Linear LR warm-up length in epochs.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        "auto", description="Autocast dtype for forward and loss; fp16 adds a GradScaler. "
        "auto: bf16 on a CUDA GPU that supports it, else fp32.")
    channels_last: bool | None = Field(
        None, description="channels_last memory format for the model and 4-D inputs. null (auto): on for "
        "models with Conv2d layers on a CUDA device, off otherwise; true forces it (on CPU too).")
    tf32: bool = Field(True, description="CUDA only: allow TF32 in matmul and cuDNN convolutions where the GPU "
                       "supports it (cudnn.benchmark is always on for CUDA); no effect on CPU.")
    eval_every_epochs: int = Field(1, ge=1, le=100_000)
    log_every_steps: int = Field(10, ge=1, le=MAX_STEPS)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")

    @field_validator("milestones")
    @classmethod
    def _milestones(cls, value: list[float]) -> list[float]:
        if any(not 0.0 < m < 1.0 for m in value) or value != sorted(value):
            raise ValueError("milestones must be increasing fractions of training in (0, 1)")
        return value


class JobSpec(_Strict):
    """A complete training job."""

    model: ModelSpec
    dataset: DatasetSpec
    sparsity: SparsitySpec = Field(default_factory=SparsitySpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)


def format_validation_error(error: Exception) -> str:
    """One line naming the first offending field, e.g. `sparsity.sparsity: Input should be less than 1`."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        parts = []
        for item in error.errors():
            loc = ".".join(str(p) for p in item["loc"]) or "spec"
            msg = item["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}")
        return "; ".join(parts)
    return str(error)
