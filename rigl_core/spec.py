"""JobSpec: the one description of a training job, shared by the CLI, the REST API and the worker.

The sparsity defaults are the paper's (ERK, ΔT 100, T_end 0.75, α 0.3, cosine); the training defaults
are a short generic run. `recipe` fills a paper setting whole (rigl_core.training.recipes). Unknown fields are
rejected so a typo never silently trains something other than what was asked.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rigl_core.models.architecture import Architecture

MAX_DIM = 65_536  # largest single dimension (width, channels, spatial size) a spec may name
MAX_SEED = 2**32 - 1  # seeds are 32-bit everywhere (numpy, torch's generators): larger ones overflow later
MAX_STEPS = 2**31 - 1  # steps are stored as 32-bit integers (PostgreSQL INTEGER)
MAX_LIST = 256  # entries of a list or mapping field (patterns, milestones, per-layer densities)
MAX_SYNTHETIC_VALUES = 200_000_000  # synthetic datasets: samples × values per sample
UPLOADED_ARCHITECTURE = re.compile(r"^arch_[0-9a-f]{20}$")
UPLOADED_WEIGHTS = re.compile(r"^w_[0-9a-f]{20}$")
JOB_ID = re.compile(r"^job_[0-9a-f]{20}$")
METHODS = ("dense", "static", "set", "snfs", "rigl", "srigl", "gmp", "snip")
FAN_IN_METHODS = ("static", "set", "rigl", "srigl")  # sparsity.structure "fan-in" applies to these
SRIGL_ABLATION_THRESHOLD = 0.3  # γ_sal of the SRigL paper: a neuron needs 30% of its fan-in salient
DISTRIBUTIONS = ("uniform", "er", "erk")
OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")


class _Strict(BaseModel):
    # Infinity/NaN are refused in every float field: they are not JSON, and break storage and training.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSpec(_Strict):
    """Which network to train: a built-in, any torchvision classifier, or a declarative architecture."""

    name: str = Field(
        "custom",
        description="mlp, lenet5, wrn-22-2, resnet18-cifar, vit-tiny, vit-small, a torchvision classification model name, "
        "'timm/<name>' (any timm model, randomly initialised), 'hf' with `hf`, or 'custom' with `architecture`.",
    )
    hf: dict[str, Any] | None = Field(
        None, max_length=MAX_LIST, description="A Hugging Face transformers config, e.g. {\"model_type\": \"bert\", "
        "\"vocab_size\": 30522, ...}: built offline with AutoConfig.for_model and the head of training.task "
        "(sequence classification or causal LM); takes int64 token ids. Implies name 'hf'.")
    architecture: Architecture | None = Field(
        None, description="Declarative JSON architecture (layers with shape inference); implies name 'custom'."
    )
    program: str | None = Field(
        None, min_length=1, max_length=4096, description="A torch.export program (any PyTorch module, exported "
        "with a dynamic batch dimension): trained from its exported weights with every method; its linear and "
        "convolution weights are masked. Service: the id (arch_…) from POST /v1/architectures/program; "
        "`rigl train`/`rigl plan`: a local .pt2 file. Implies name 'program'. The export's example input fixes "
        "the sample shape.")
    num_classes: int | None = Field(None, ge=2, le=100_000, description="Output classes; defaults to the dataset's.")
    input_shape: list[int] | None = Field(
        None, min_length=1, max_length=4, description="Input shape C,H,W (or C,L / features; "
        "L token ids for model.hf); defaults to the dataset's."
    )
    hidden_sizes: list[int] | None = Field(
        None, max_length=16, description="MLP hidden layer widths (default 300,100 as LeNet-300-100)."
    )
    zero_init_residual: bool | None = Field(
        None, description="Start the last BatchNorm γ of each residual block at 0 (the paper's ResNet-50): "
        "torchvision ResNets, resnet18-cifar, architecture residual blocks ending in a batchnorm. null: off.")
    weights: str | None = Field(
        None, min_length=1, max_length=4096, description="Start from these trained weights: a safetensors "
        "state_dict of this exact model (names and shapes checked). Service: the id (w_…) from POST /v1/weights; "
        "`rigl train`: a local .safetensors file. See sparsity.init.")
    init_from_job: str | None = Field(
        None, description="Service only: start from the dense export (model.safetensors) of an earlier "
        "succeeded job (job_…) of the same model that you can see.")

    @field_validator("init_from_job")
    @classmethod
    def _job_id(cls, value: str | None) -> str | None:
        if value is not None and not JOB_ID.fullmatch(value):
            raise ValueError("must be a job id (job_ and 20 hex digits)")
        return value

    @model_validator(mode="after")
    def _one_source_of_weights(self) -> "ModelSpec":
        if self.weights is not None and self.init_from_job is not None:
            raise ValueError("model.init_from_job: give either model.weights or model.init_from_job, not both")
        return self

    @model_validator(mode="before")
    @classmethod
    def _hf_implies_name(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("hf") is not None and "name" not in data:
            return {**data, "name": "hf"}
        if isinstance(data, dict) and data.get("program") is not None and "name" not in data:
            return {**data, "name": "program"}
        return data

    def _named_by(self, field: str) -> None:
        """`model.<field>` (hf, program) and the name it implies come together."""
        if (self.name == field) != (getattr(self, field) is not None):
            raise ValueError(f"model.{field}: required with name '{field}'" if getattr(self, field) is None else
                             f"model.{field}: give either model.name or model.{field}, not both")

    @model_validator(mode="after")
    def _program_alone(self) -> "ModelSpec":
        self._named_by("program")
        if self.program is not None:
            given = [f for f in ("hf", "architecture", "hidden_sizes", "zero_init_residual")
                     if getattr(self, f) is not None]
            if given:
                raise ValueError(f"model.{given[0]}: does not apply to a model.program model")
        return self

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from rigl_core.models.registry import available_models, timm_name

        if UPLOADED_ARCHITECTURE.match(value):
            return value  # an architecture uploaded to the service; it resolves the reference
        if timm_name(value) is not None:
            from rigl_core.models.hub import check_timm_name  # imports timm: only for timm/ names

            try:
                check_timm_name(timm_name(value))
            except ValueError as exc:
                raise ValueError(str(exc).removeprefix("model.name: ")) from None
            return value
        if value not in available_models():
            raise ValueError(f"unknown model {value!r}; try 'mlp', 'lenet5' or a torchvision name such as 'resnet18'")
        return value

    @model_validator(mode="after")
    def _hf_config(self) -> "ModelSpec":
        self._named_by("hf")
        if self.hf is not None:
            from rigl_core.models.hub import hf_config  # imports transformers: only for model.hf

            hf_config(self.hf)
        return self

    @model_validator(mode="after")
    def _architecture_or_name(self) -> "ModelSpec":
        if self.name == "custom" and self.architecture is None:
            raise ValueError("model.name is required (or give model.architecture)")
        if self.architecture is not None and self.name != "custom":
            raise ValueError("model.architecture: give either a built-in name or an architecture, not both")
        if self.architecture is not None:
            if self.input_shape not in (None, self.architecture.input_shape):
                raise ValueError("model.input_shape: differs from architecture.input_shape")
            from rigl_core.models.architecture import ArchitectureError
            from rigl_core.models.build import infer

            try:
                infer(self.architecture)
            except ArchitectureError as exc:
                raise ValueError(f"architecture.{exc.field}: {exc.message}") from None
        return self

    @model_validator(mode="after")
    def _zero_init_applies(self) -> "ModelSpec":
        from rigl_core.models.registry import supports_zero_init_residual

        if self.zero_init_residual and not UPLOADED_ARCHITECTURE.match(self.name) and not \
                supports_zero_init_residual(self.name, self.architecture):
            raise ValueError(f"model.zero_init_residual: {self.name!r} has no residual block ending in a "
                             "BatchNorm (torchvision ResNets, resnet18-cifar and architecture residual blocks "
                             "do; the pre-activation wrn-22-2 does not)")
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
    augment: Literal["auto", "none", "crop-flip", "random-resized-crop"] = Field(
        "auto", description="auto: random crop + flip for cifar, random-resized-crop + flip for a streamed "
        "imagefolder, none otherwise. random-resized-crop: ImageNet's training crop (streamed imagefolder only).")
    loader: Literal["auto", "memory", "stream"] = Field(
        "auto", description="memory: decode everything once and keep it in RAM (on the GPU when it fits); "
        "stream: read files with DataLoader worker processes (no size cap: ImageNet). auto: stream for "
        "imagefolder, memory for every other dataset.")
    workers: int | None = Field(
        None, ge=0, le=64, description="stream: decoding processes per device (null: min(8, CPUs per device - 1)); "
        "0 decodes in the training process.")
    prefetch: int = Field(4, ge=1, le=64, description="stream: batches each worker prepares ahead.")
    image_size: int = Field(32, ge=8, le=1024, description="imagefolder: square size the model sees (memory: "
                            "resized; stream: cropped, evaluation resizes to size·8/7 then center-crops).")
    max_samples: int = Field(200_000, ge=1, le=100_000_000,
                             description="imagefolder with loader memory: refuse folders with more images.")
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
        if self.loader == "stream" and self.name != "imagefolder":
            raise ValueError(f"dataset.loader: stream reads image files; {self.name!r} is loaded into memory")
        streamed = self.name == "imagefolder" and self.loader != "memory"
        if self.augment == "random-resized-crop" and not streamed:
            raise ValueError("dataset.augment: random-resized-crop needs a streamed imagefolder "
                             "(loader auto or stream)")
        return self


class ScheduleSpec(_Strict):
    """When masks change and by how much (paper §3(2))."""

    delta_t: int | Literal["auto"] = Field(  # range checked by _delta_t
        "auto", description="ΔT: steps between mask updates. \"auto\" (default): the paper's 100 when T_end is at "
        "least 1000 steps (every run of the paper), else T_end // 10 (at least 1), so a short run still makes "
        "about 10 mask updates. An integer is used as given.")
    t_end: float = Field(0.75, gt=0.0, le=1.0, description="T_end as a fraction of total training steps.")
    t_end_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="T_end in steps; overrides t_end when set.")
    alpha: float = Field(0.3, gt=0.0, le=1.0, description="Initial drop fraction α.")
    decay: Literal["cosine", "constant", "linear"] = Field("cosine", description="Drop-fraction decay.")
    grad_accumulation_n: int = Field(
        1, ge=1, le=64, description="RigL: average grow scores over the last n batches before an update."
    )
    snfs_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SNFS: EMA coefficient of dense gradients.")
    gmp_begin: float = Field(0.2, ge=0.0, lt=1.0, description="GMP: pruning starts at this fraction of training.")
    update_iterations_count: bool = Field(
        True, description="RigL/SNIP, whose mask update replaces the optimizer step: whether that iteration "
        "counts as one of the run's steps. true (default): a run of N steps makes N iterations, the update "
        "ones without an optimizer step. false (the paper's recipes; the official code, where the update "
        "leaves global_step alone): N optimizer steps, plus one extra batch per mask update. The paper does "
        "not say; other methods always count every iteration.")

    @field_validator("delta_t", mode="before")
    @classmethod
    def _delta_t(cls, value):
        """One plain error for the int-or-"auto" field instead of one per branch of the union."""
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_STEPS:
            raise ValueError(f"an integer in [1, {MAX_STEPS}] or \"auto\", got {value!r}")
        return value


class SparsitySpec(_Strict):
    """What is sparse and how it is trained."""

    method: Literal["dense", "static", "set", "snfs", "rigl", "srigl", "gmp", "snip"] = Field(
        "rigl", description="dense, static, set, snfs, rigl, gmp, snip, or srigl: Structured RigL (Lasby et al., ICLR "
        "2024), which is rigl with structure fan-in, neuron ablation (ablation_threshold 0.3) and a dense first layer, "
        "unless set.")
    init: Literal["random", "magnitude"] = Field(
        "random", description="First masks. random: the paper's (any method). magnitude: with model.weights or "
        "model.init_from_job, keep each layer's largest |w| at its planned density (one-shot magnitude pruning), "
        "then train sparse with `method` (static, set, snfs or rigl: e.g. RigL fine-tuning). gmp starts dense "
        "from the weights by itself.")
    sparsity: float = Field(0.9, ge=0.0, lt=1.0, description="Target sparsity S over the masked layers, in [0, 1).")
    distribution: Literal["uniform", "er", "erk"] = Field(
        "erk", description="How the sparsity is spread over layers. Default: erk; for method gmp, uniform "
        "(with the first layer dense), the paper's pruning baseline. Set it to override either.")
    erk_power_scale: float = Field(1.0, ge=0.0, le=1.0, description="ERK exponent; 0 makes ERK uniform.")
    dense_first_layer: bool | None = Field(
        None, description="Keep the first layer dense. Default: true for uniform and for method srigl, false for "
        "er/erk (paper)."
    )
    dense_depthwise: bool = Field(True, description="Keep depthwise convolutions dense (as the paper's MobileNets).")
    embeddings: bool = Field(
        False, description="Also mask nn.Embedding tables (opt-in: off, they stay dense and count as dense in "
        "the whole-network sparsity). Conv, linear, attention, RNN/LSTM/GRU and GPT-2 Conv1D kernels are always "
        "candidates.")
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
    pattern: str = Field(
        "unstructured", max_length=16, description="unstructured, or \"N:M\" (e.g. \"2:4\", 1 <= N < M <= 32): "
        "exactly N active weights in every M consecutive weights along each masked layer's input dimension "
        "(the layout of GPU 2:4 sparse kernels). Every masked layer then has density N/M: sparsity.sparsity "
        "defaults to 1 - N/M and must equal it; distribution is ignored; layers whose input dim (in·kh·kw) is "
        "not divisible by M, and GPT-2 Conv1D/embedding kernels, stay dense. Methods static, set, snfs, rigl; "
        "drop/grow stays within each group.")
    structure: Literal["unstructured", "fan-in"] = Field(
        "unstructured", description="unstructured, or fan-in: every active output neuron of a masked layer keeps "
        "exactly k inputs (k = the layer's density × its fan-in, rounded to a whole number; the plan says where "
        "rounding moves a density), so the model exports condensed and runs faster. Methods static, set, rigl, "
        "srigl (srigl sets it).")
    ablation_threshold: float | None = Field(
        None, gt=0.0, le=1.0, description="fan-in only: neuron ablation. At each mask update a neuron with fewer "
        "salient weights than this fraction of its layer's first fan-in (kept by magnitude, or among the grow "
        "candidates) is removed and its budget shared by the others; the last masked layer is never ablated. "
        "None: no ablation (srigl: 0.3, the paper's).")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)

    @property
    def fan_in(self) -> bool:
        """Constant fan-in masks (structure fan-in, or method srigl)."""
        return self.structure == "fan-in"

    @model_validator(mode="before")
    @classmethod
    def _srigl_defaults(cls, data):
        """method srigl is rigl with structure fan-in, the paper's ablation threshold and a dense first layer,
        unless given. The first layer because a constant fan-in there costs accuracy the other layers do not:
        it sees the raw input (40 values for MNIST-1D), where RigL gives a few neurons nearly every input; with
        every neuron held to k of them SRigL trailed RigL by 10 points on MNIST-1D at 90% ERK, and matched it
        with that layer dense (bench/results/srigl_accuracy.md)."""
        if isinstance(data, dict) and data.get("method") == "srigl":
            data = {**data, "structure": data.get("structure", "fan-in")}
            if "ablation_threshold" not in data:
                data["ablation_threshold"] = SRIGL_ABLATION_THRESHOLD
            if data.get("dense_first_layer") is None:
                data["dense_first_layer"] = True
        return data

    @model_validator(mode="after")
    def _fan_in_fits(self) -> "SparsitySpec":
        if self.method == "srigl" and not self.fan_in:
            raise ValueError("sparsity.structure: srigl is RigL with constant fan-in; use method rigl for unstructured")
        if not self.fan_in:
            if self.ablation_threshold is not None:
                raise ValueError("sparsity.ablation_threshold: neuron ablation needs sparsity.structure fan-in")
            return self
        if self.method not in FAN_IN_METHODS:
            raise ValueError(f"sparsity.structure: fan-in applies to methods {', '.join(FAN_IN_METHODS)}, "
                             f"not {self.method}")
        if self.nm is not None:
            raise ValueError(f"sparsity.structure: fan-in and sparsity.pattern {self.pattern} are two structures; "
                             "choose one")
        if self.init != "random":
            raise ValueError("sparsity.structure: fan-in needs sparsity.init random (magnitude init is unstructured)")
        if self.ablation_threshold is not None and self.method == "static":
            raise ValueError("sparsity.ablation_threshold: static masks never change, so nothing is ablated")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) of an N:M pattern, None when unstructured."""
        from rigl_core.sparse.nm import parse_pattern

        return parse_pattern(self.pattern)

    @model_validator(mode="before")
    @classmethod
    def _nm_sparsity_by_default(cls, data):
        """With an N:M pattern and no `sparsity` given, the sparsity is N:M's own, 1 - N/M."""
        from rigl_core.sparse.nm import parse_pattern

        if isinstance(data, dict) and "sparsity" not in data and isinstance(data.get("pattern"), str):
            try:
                nm = parse_pattern(data["pattern"])
            except ValueError:
                return data  # the field validator reports it
            if nm is not None:
                return {**data, "sparsity": 1.0 - nm[0] / nm[1]}
        return data

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern(cls, value: object) -> object:
        from rigl_core.sparse.nm import parse_pattern

        if not isinstance(value, str):  # YAML 1.1 reads an unquoted 2:4 as the number 124
            raise ValueError(f"a string such as \"2:4\" (quote it in YAML), got {value!r}")
        parse_pattern(value)
        return value

    @model_validator(mode="after")
    def _nm_fits(self) -> "SparsitySpec":
        nm = self.nm
        if nm is None:
            return self
        n, m = nm
        if self.method not in ("static", "set", "snfs", "rigl"):
            raise ValueError(f"sparsity.pattern: {self.pattern} applies to methods static, set, snfs and rigl, "
                             f"not {self.method}")
        if self.init != "random":
            raise ValueError(f"sparsity.pattern: {self.pattern} needs sparsity.init random (magnitude init is "
                             "unstructured)")
        if abs(self.sparsity - (1.0 - n / m)) > 1e-9:
            raise ValueError(f"sparsity.sparsity: must be 1 - N/M = {1.0 - n / m:g} with sparsity.pattern "
                             f"{self.pattern} (or leave it out), got {self.sparsity:g}")
        if any(density != 1.0 for density in self.layer_density.values()):
            raise ValueError(f"sparsity.layer_density: with sparsity.pattern {self.pattern} every masked layer has "
                             "density N/M; only 1.0 (keep a layer dense) is allowed")
        return self

    @model_validator(mode="before")
    @classmethod
    def _gmp_uniform_by_default(cls, data):
        """GMP as the paper's pruning baseline (uniform, dense first layer) unless `distribution` is given."""
        if isinstance(data, dict) and data.get("method") == "gmp" and "distribution" not in data:
            return {**data, "distribution": "uniform"}
        return data

    @field_validator("layer_density")
    @classmethod
    def _densities(cls, value: dict[str, float]) -> dict[str, float]:
        for name, density in value.items():
            if not 0.0 < density <= 1.0:
                raise ValueError(f"density of {name!r} must be in (0, 1], got {density}")
        return value


class TrainingSpec(_Strict):
    """Optimisation settings."""

    epochs: int = Field(20, ge=1, le=100_000, description="Passes over the training set (20: enough for the "
                        "quick start's digits MLP at 90% sparsity; paper runs set their own).")
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS,
                                  description="Stop after this many steps (overrides epochs' length).")
    batch_size: int = Field(128, ge=1, le=65_536)
    optimizer: Literal["sgd", "nesterov", "adam", "adamw"] = Field("sgd")
    lr: float = Field(0.1, gt=0.0, le=100.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    weight_decay_kernels_only: bool = Field(
        True, description="Decay kernels only (conv, linear, attention, RNN, GPT-2 Conv1D), not biases, norms or "
        "embeddings.")
    lr_schedule: Literal["constant", "step", "cosine"] = Field("cosine")
    milestones: list[float] = Field(
        default_factory=lambda: [0.3, 0.6, 0.9], max_length=MAX_LIST,
        description="step schedule: fractions of training.",
    )
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="step schedule: LR factor at each milestone.")
    warmup_epochs: float = Field(0.0, ge=0.0, le=100_000, description="Linear LR warm-up length in epochs.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    task: Literal["auto", "classification", "sequence-classification", "causal-lm"] = Field(
        "auto", description="What the model learns. classification: one label per sample (y). "
        "sequence-classification: one label per int64 token sequence (model.hf). causal-lm: next-token "
        "prediction over the token ids x (y ignored), reported as val_loss, val_perplexity and next-token "
        "val_accuracy. auto: sequence-classification with model.hf, classification otherwise.")
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
    devices: int | Literal["all"] = Field(
        1, description="Processes (one per GPU) that train this job together with DistributedDataParallel: "
        "NCCL on CUDA, gloo on CPU. 'all': every visible GPU (1 on CPU). batch_size is the global batch.")
    nodes: int = Field(
        1, ge=1, le=64, description="Nodes that train this job together, each running `devices` processes (one "
        "per GPU): nodes × devices ranks in one DistributedDataParallel job. More than 1 runs only in the service, "
        "on its Ray cluster (RIGL_RAY_ADDRESS); devices must then be a number. batch_size is the global batch.")
    accumulate_steps: int | Literal["auto"] = Field(
        1, description="Micro-batches whose gradients make one step: each device runs "
        "batch_size / (devices × accumulate_steps) samples at a time. auto: the fewest that keep a "
        "device's micro-batch ≤ max_device_batch.")
    max_device_batch: int = Field(256, ge=1, le=65_536,
                                  description="accumulate_steps auto: the largest micro-batch per device.")
    clip_grad_norm: float | None = Field(
        None, gt=0.0, le=1e6, description="Clip the global gradient norm (of the masked gradients) to this.")
    compile: bool = Field(False, description="torch.compile the model (inductor); the first steps compile.")
    eval_every_epochs: int = Field(1, ge=1, le=100_000)
    log_every_steps: int = Field(10, ge=1, le=MAX_STEPS)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, value: object) -> object:
        return _int_or_word(value, "all", 64)

    @field_validator("accumulate_steps", mode="before")
    @classmethod
    def _accumulate(cls, value: object) -> object:
        return _int_or_word(value, "auto", 4096)

    @model_validator(mode="after")
    def _batch_splits(self) -> "TrainingSpec":
        if self.nodes > 1 and not isinstance(self.devices, int):
            raise ValueError("training.devices: give the number of GPUs per node (not 'all') when nodes > 1")
        devices = self.devices if isinstance(self.devices, int) else 1
        steps = self.accumulate_steps if isinstance(self.accumulate_steps, int) else 1
        if self.nodes > 1 and self.batch_size % (self.nodes * devices * steps):
            raise ValueError(f"training.batch_size: {self.batch_size} is not divisible by nodes × devices × "
                             f"accumulate_steps ({self.nodes} × {devices} × {steps})")
        if self.batch_size % (devices * steps):
            raise ValueError(f"training.batch_size: {self.batch_size} is not divisible by devices × accumulate_steps "
                             f"({devices} × {steps})")
        if (self.devices != 1 or self.nodes != 1) and self.device not in ("auto", "cuda", "cpu"):
            raise ValueError("training.device: name 'cuda' (not one GPU) when devices > 1 or nodes > 1")
        return self

    @field_validator("milestones")
    @classmethod
    def _milestones(cls, value: list[float]) -> list[float]:
        if any(not 0.0 < m < 1.0 for m in value) or value != sorted(value):
            raise ValueError("milestones must be increasing fractions of training in (0, 1)")
        return value


def _int_or_word(value: object, word: str, most: int) -> object:
    """One readable error for an `int | "word"` field instead of pydantic's one per union member."""
    if value == word or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= most):
        return value
    raise ValueError(f"must be {word!r} or an integer in 1..{most}")


class ExportSpec(_Strict):
    """How the run's exports store their values (the dense export and ONNX stay in the training dtype)."""

    values: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="Precision of the nonzero values in the packed and compressed exports. fp16/bf16 "
        "halve their value bytes; the run then also evaluates the model with the rounded values and reports "
        "the change (report `export`, job result `export`).")
    latency: bool = Field(
        True, description="Measure the trained model's batch-1 inference latency on this machine's CPU (one thread, "
        "about a second per variant: dense, and condensed for a fan-in run) into the report's "
        "`inference_latency_ms`, for the sweep page's latency Pareto view.")


MLFLOW_URI_SCHEMES = ("http", "https", "file", "sqlite", "databricks", "postgresql", "mysql")


class MlflowSpec(_Strict):
    """Where this job's MLflow run goes (rigl_core/integrations/mlflow.py). Shorthands: a URI string sets
    `uri`, `true` is `{}` (the deployment's server, this job's defaults), `false` turns tracking off."""

    enabled: bool = Field(True, description="false: no MLflow run for this job, even where the deployment sets "
                          "a tracking URI.")
    uri: str | None = Field(None, min_length=1, max_length=2048, description="Tracking URI of this job's run "
                            "(http(s)://host:port of an MLflow server; `rigl train` also takes file: and sqlite: "
                            "URIs). Default: the deployment's (the service's RIGL_MLFLOW_TRACKING_URI, or "
                            "MLFLOW_TRACKING_URI).")
    experiment: str | None = Field(None, min_length=1, max_length=500, pattern=r"^[^\x00-\x1f\x7f]+$",
                                   description="Experiment name (created if missing). Default: the "
                                   "deployment's (service: RIGL_MLFLOW_EXPERIMENT, 'rigl').")
    run_name: str | None = Field(None, min_length=1, max_length=250, pattern=r"^[^\x00-\x1f\x7f]+$",
                                 description="Run name. Default: the job's name, else its id.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: object) -> object:
        if isinstance(data, bool):
            return {"enabled": data}
        if isinstance(data, str):
            return {"uri": data}
        return data

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        if value is not None and value.split(":", 1)[0].lower() not in MLFLOW_URI_SCHEMES:
            raise ValueError(f"a tracking URI starting {', '.join(s + ':' for s in MLFLOW_URI_SCHEMES)}")
        return value


class TrackingSpec(_Strict):
    """Experiment trackers this job reports to, besides the job store (which stays the source of truth)."""

    mlflow: MlflowSpec | None = Field(None, description="An MLflow run: the JobSpec as params, per-step and "
                                      "per-layer metrics, the report and the exports as artifacts. A URI "
                                      "string, true/false, or {uri, experiment, run_name, enabled}.")


class JobSpec(_Strict):
    """A complete training job."""

    recipe: str | None = Field(
        None, description="A paper setting whose defaults fill every field left out (`rigl recipes` lists them); "
        "fields you set win, at any depth.")
    model: ModelSpec
    dataset: DatasetSpec
    sparsity: SparsitySpec = Field(default_factory=SparsitySpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    tracking: TrackingSpec | None = Field(None, description="Experiment tracking (MLflow): where this job's "
                                          "run is logged, besides the job store.")

    @model_validator(mode="before")
    @classmethod
    def _fill_from_recipe(cls, data: object) -> object:
        from rigl_core.training.recipes import apply_recipe

        return apply_recipe(data)  # merged under the user's input; a dumped spec already holds every field

    @model_validator(mode="after")
    def _task_fits_model(self) -> "JobSpec":
        from rigl_core.models.registry import resolve_task

        resolve_task(self.training.task, self.model.hf)
        return self

    @model_validator(mode="after")
    def _magnitude_init_needs_weights(self) -> "JobSpec":
        if self.sparsity.init == "magnitude":
            if self.model.weights is None and self.model.init_from_job is None:
                raise ValueError("sparsity.init: magnitude prunes trained weights; give model.weights or "
                                 "model.init_from_job (or use init random)")
            if self.sparsity.method not in ("static", "set", "snfs", "rigl", "srigl"):
                raise ValueError(f"sparsity.init: magnitude needs a method that starts sparse (static, set, snfs, "
                                 f"rigl); {self.sparsity.method} "
                                 + ("never prunes" if self.sparsity.method == "dense" else
                                    "starts dense from the weights and prunes by itself: use init random"))
        return self

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, value: str | None) -> str | None:
        from rigl_core.training.recipes import get_recipe

        return value if value is None else get_recipe(value).name


def format_validation_error(error: Exception) -> str:
    """One line naming the first offending field, e.g. `sparsity.sparsity: Input should be less than 1`."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        parts = []
        for item in error.errors():
            loc = ".".join(str(p) for p in item["loc"]) or "spec"
            msg = item["msg"].removeprefix("Value error, ")
            named = msg.split(": ", 1)[0]  # a model validator's message already names its field in full
            if " " not in named and "." in named and (loc == "spec" or named.startswith(loc + ".")):
                parts.append(msg)
            else:
                parts.append(f"{loc}: {msg}")
        return "; ".join(parts)
    return str(error)
