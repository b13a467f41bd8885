"""Model registry: built-in `mlp`, `lenet5`, `wrn-22-2`, `resnet18-cifar` and the all-Linear ViTs `vit-tiny` /
`vit-small` (rigl_core.models.vit), every torchvision classification model by name, timm models (`timm/<name>`),
Hugging Face configs (`hf`; rigl_core.models.hub) and `torch.export` programs (`program`;
rigl_core.models.program)."""

from __future__ import annotations

import functools
import math
from collections import OrderedDict

import torch
from torch import nn

from rigl_core.models.vit import SIZES as VIT_SIZES
from rigl_core.models.vit import ViT

BUILTIN_MODELS = ("mlp", "lenet5", "wrn-22-2", "resnet18-cifar", "vit-tiny", "vit-small")
CUSTOM = "custom"  # a declarative JSON architecture (rigl_core.models.architecture)
HF = "hf"  # a Hugging Face transformers config (model.hf; rigl_core.models.hub)
PROGRAM = "program"  # a torch.export program (model.program; rigl_core.models.program)


def timm_name(name: str) -> str | None:
    """The timm model name of `timm/<name>`, else None."""
    return name[5:] if name.startswith("timm/") else None


@functools.lru_cache(maxsize=1)
def torchvision_classifiers() -> tuple[str, ...]:
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def available_models() -> tuple[str, ...]:
    """Names known without importing timm: `timm/<name>` is checked against timm.list_models() apart."""
    return BUILTIN_MODELS + (CUSTOM, HF, PROGRAM) + torchvision_classifiers()


def default_input_shape(name: str) -> list[int]:
    """Input shape used by `rigl plan` when none is given: MNIST, CIFAR or ImageNet shaped (128 tokens
    for a model.hf config)."""
    if name == HF:
        return [128]
    if name in ("mlp", "lenet5"):
        return [1, 28, 28]
    if name in ("wrn-22-2", "resnet18-cifar", "vit-tiny", "vit-small"):
        return [3, 32, 32]
    return [3, 224, 224]


def default_num_classes(name: str) -> int:
    if name == HF:
        return 2  # sequence classification; a causal LM's outputs are its vocabulary
    return 10 if name in BUILTIN_MODELS else 1000


class MLP(nn.Sequential):
    """Flatten then Linear+ReLU layers named fc1, fc2, …; the default 300-100 is LeNet-300-100."""

    def __init__(self, in_features: int, num_classes: int, hidden_sizes: list[int] | None = None):
        sizes = [in_features, *(hidden_sizes if hidden_sizes is not None else [300, 100]), num_classes]
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            layers.append((f"fc{i}", nn.Linear(a, b)))
            if i < len(sizes) - 1:
                layers.append((f"relu{i}", nn.ReLU()))
        super().__init__(OrderedDict(layers))


class LeNet5(nn.Module):
    """LeNet-5 (6 and 16 5×5 filters, 120-84 classifier); 'same' padding so small inputs (8×8 digits) fit."""

    def __init__(self, input_shape: list[int], num_classes: int):
        super().__init__()
        channels = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        h, w = input_shape[1] // 4, input_shape[2] // 4
        if h < 1 or w < 1:
            raise ValueError("model.name: lenet5 needs inputs of at least 4×4")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * h * w, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )
        # He-normal init: PyTorch's default leaves this deep, narrow ReLU net barely trainable once sparse.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block (Zagoruyko & Komodakis 2016), 1×1 conv shortcut when shapes change."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


class WideResNet(nn.Module):
    """CIFAR WideResNet-depth-k; WRN-22-2 is the paper's CIFAR-10 model (§4.3)."""

    def __init__(self, depth: int, width: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("WideResNet depth must be 6n+4")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks = []
        in_planes = widths[0]
        for group, planes in enumerate(widths[1:]):
            for i in range(n):
                blocks.append(WideBasicBlock(in_planes, planes, stride=(1 if group == 0 else 2) if i == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.conv1(x))
        out = self.pool(torch.relu(self.bn(out)))
        return self.fc(torch.flatten(out, 1))


def _resnet18_cifar(num_classes: int, in_channels: int, zero_init_residual: bool = False) -> nn.Module:
    """torchvision ResNet-18 with the CIFAR stem: 3×3 stride-1 conv, no max-pool."""
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def is_torchvision_resnet(name: str) -> bool:
    """torchvision's ResNet family (resnet*, resnext*, wide_resnet*): builders that take zero_init_residual."""
    return name.startswith(("resnet", "resnext", "wide_resnet")) and name in torchvision_classifiers()


def supports_zero_init_residual(name: str, architecture=None) -> bool:
    """Whether `model.zero_init_residual` means something for this model.

    Post-activation residual blocks end in a BatchNorm whose γ can start at 0 (Goyal et al. 2017; the
    paper's ResNet-50 does it, docs/algorithm.md "Models"). The pre-activation WRN's branch ends in a conv: a zero
    γ there would sit before a ReLU and never receive a gradient, so it is refused rather than faked.
    """
    if architecture is not None:
        return _residual_ends_in_batchnorm(architecture.layers)
    return name == "resnet18-cifar" or is_torchvision_resnet(name)


def _residual_ends_in_batchnorm(layers) -> bool:
    """Whether any (nested) declarative residual body ends in a BatchNorm."""
    return any(layer.type == "residual" and (layer.layers[-1].type in ("batchnorm1d", "batchnorm2d")
                                             or _residual_ends_in_batchnorm(layer.layers))
               for layer in layers)


def _zero_residual_batchnorms(model: nn.Module) -> None:
    """Zero γ of a declarative architecture's residual blocks whose body ends in a BatchNorm."""
    from rigl_core.models.build import ResidualBlock

    for module in model.modules():
        if isinstance(module, ResidualBlock) and isinstance(module.body[-1], (nn.BatchNorm1d, nn.BatchNorm2d)):
            with torch.no_grad():
                module.body[-1].weight.zero_()


AUX_LOGIT_MODELS = ("googlenet", "inception_v3")  # torchvision classifiers with auxiliary heads
TASKS = ("classification", "sequence-classification", "causal-lm")


def resolve_task(task: str, hf: dict | None) -> str:
    """training.task `auto`: sequence-classification for a model.hf config, classification otherwise.
    Token tasks need a model.hf model (the one kind that takes token ids); raises ValueError naming the field."""
    if task == "auto":
        return "sequence-classification" if hf is not None else "classification"
    if (task != "classification") != (hf is not None):
        if hf is not None:
            raise ValueError("training.task: a model.hf model takes token ids: use sequence-classification or "
                             "causal-lm")
        raise ValueError(f"training.task: {task} needs a token model: give model.hf")
    return task


def example_input(model: nn.Module, input_shape: list[int], batch: int = 1,
                  device: torch.device | str = "meta") -> torch.Tensor:
    """A dummy batch the model takes: int64 token ids (zeros, a valid id) for a token model, else floats."""
    if getattr(model, "input_dtype", None) == torch.long:
        return torch.zeros(batch, *input_shape, dtype=torch.long, device=device)
    return torch.empty(batch, *input_shape, device=device)


def build_model(
    name: str,
    num_classes: int,
    input_shape: list[int],
    hidden_sizes: list[int] | None = None,
    device: torch.device | str | None = None,
    architecture=None,
    zero_init_residual: bool | None = None,
    hf: dict | None = None,
    task: str = "auto",
    program: str | None = None,
) -> nn.Module:
    """Build a freshly initialised model; `device="meta"` builds shapes only (for plans and validation).

    `program` (model.program, with name "program") is a local `.pt2` file: the exported module with its
    own weights, loaded without running code from the file; it must take samples of `input_shape` and
    output at least `num_classes` logits (rigl_core/models/program/fit.py).

    `hf` (model.hf, with name "hf") builds a transformers model with the head of `task` (see
    `resolve_task`); `timm/<name>` a timm model. Neither downloads anything.

    `zero_init_residual` starts the last BatchNorm γ of every residual block at 0 (torchvision ResNets,
    resnet18-cifar, declarative residual blocks ending in a BatchNorm); None keeps the model's default.
    """
    if zero_init_residual and not supports_zero_init_residual(name, architecture):
        raise ValueError(f"model.zero_init_residual: {name!r} has no residual block ending in a BatchNorm")
    if name == CUSTOM:
        from rigl_core.models.architecture import ArchitectureError
        from rigl_core.models.build import build_architecture

        if architecture is None:
            raise ValueError("model.architecture: required when model.name is 'custom'")
        try:
            model = build_architecture(architecture, num_classes, device=device)
        except ArchitectureError as exc:
            raise ValueError(f"model.architecture.{exc.field}: {exc.message}") from None
        if zero_init_residual and next(model.parameters()).device.type != "meta":
            _zero_residual_batchnorms(model)
        return model
    if name == PROGRAM:
        from rigl_core.models.program.fit import build_program

        if task not in ("auto", "classification"):
            raise ValueError("training.task: a model.program model is a classifier (task classification)")
        return build_program(program, num_classes, input_shape, device)
    task = resolve_task(task, hf if name == HF else None)
    if name == HF and hf is None:
        raise ValueError("model.hf: required when model.name is 'hf'")
    with torch.device(device or "cpu"):
        if name == HF:
            from rigl_core.models.hub import build_hf

            return build_hf(hf, task, num_classes)
        if timm_name(name) is not None:
            from rigl_core.models.hub import build_timm

            if hidden_sizes is not None:
                raise ValueError("model.hidden_sizes: applies to mlp only")
            return build_timm(timm_name(name), num_classes, input_shape)
        if name == "wrn-22-2":
            return WideResNet(22, 2, num_classes, input_shape[0])
        if name == "resnet18-cifar":
            return _resnet18_cifar(num_classes, input_shape[0], bool(zero_init_residual))
        if name == "mlp":
            return MLP(math.prod(input_shape), num_classes, hidden_sizes)
        if name in VIT_SIZES:
            if len(input_shape) != 3:
                raise ValueError(f"model.name: {name} needs a C,H,W input, the data has shape {list(input_shape)}")
            return ViT(name, input_shape, num_classes)
        if name == "lenet5":
            if len(input_shape) != 3:
                raise ValueError(f"model.name: lenet5 needs a C,H,W input, the data has shape {list(input_shape)}")
            return LeNet5(input_shape, num_classes)
        if name in torchvision_classifiers():
            import torchvision

            if hidden_sizes is not None:
                raise ValueError("model.hidden_sizes: applies to mlp only")
            extra = {"zero_init_residual": bool(zero_init_residual)} if is_torchvision_resnet(name) else {}
            if name in AUX_LOGIT_MODELS:
                # In train mode these return (logits, aux…) namedtuples, which no loss takes. Built without the
                # auxiliary heads they return the main logits in both modes; torchvision's reference adds
                # 0.4·aux loss, a regulariser we leave out (and its weights are not planned or masked).
                extra.update(aux_logits=False, init_weights=True)  # init_weights: today's default, said aloud
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)
    raise ValueError(f"unknown model {name!r}")


def check_model(model: nn.Module, input_shape: list[int], num_classes: int, task: str = "auto") -> None:
    """Run one forward on the meta device: rejects an input shape the model cannot take.

    A causal LM must output (L, vocab) logits per sample, a `torch.export` program its own number
    (`program_classes`: the data's classes need only fit, see rigl_core/models/program/fit.py), every
    other model `num_classes`. Raises ValueError naming `model.input_shape` or `model.num_classes`.
    """
    num_classes = getattr(model, "program_classes", num_classes)
    limit = getattr(model, "max_positions", None)
    if limit is not None and input_shape[-1] > limit:  # the meta device would not catch the bad index
        raise ValueError(f"model.input_shape: sequence length {input_shape[-1]} exceeds the model.hf "
                         f"position embeddings ({limit})")
    meta = model if next(model.parameters()).device.type == "meta" else None
    if meta is None:
        import copy

        meta = copy.deepcopy(model).to("meta")
    try:
        with torch.no_grad():
            out = meta.eval()(example_input(meta, input_shape, batch=2))
    except Exception as exc:  # noqa: BLE001 - any failure means the shapes do not fit
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"model.input_shape: {list(input_shape)} does not fit this model: {first}") from None
    if task == "causal-lm":
        expected = (2, *input_shape, getattr(model, "vocab_size", num_classes))
        if tuple(out.shape) != expected:
            raise ValueError(f"model.input_shape: a causal LM must output {list(expected[1:])} logits per sample, "
                             f"this model outputs {list(out.shape[1:])}")
        return
    if tuple(out.shape) != (2, num_classes):
        raise ValueError(f"model.num_classes: the model outputs {list(out.shape[1:])} per sample, "
                         f"expected [{num_classes}]")
