"""Paper recipes: named JobSpec defaults that reproduce a setting of the RigL paper.

`{"recipe": "rigl-imagenet-resnet50", "dataset": {"path": "/data/imagenet"}}` is a whole ImageNet job.
A recipe fills only what the user left out: it is merged *under* the user's input at every depth
(model, dataset, sparsity, sparsity.schedule, training), so any field the user sets wins. Numbers
and their sources are in docs/algorithm.md ("Paper recipes"; [P] the paper, [R] its TF code).
Add a recipe by calling `register`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

# The nested sections a recipe fills key by key; every other value (lists, layer_density, an
# architecture) is a leaf that the user's value replaces whole.
SECTIONS = {"model": {}, "dataset": {}, "sparsity": {"schedule": {}}, "training": {}}
# The keys that say *which* model or dataset a section describes: a user who names another one gets
# none of the recipe's settings for that section (ImageNet crops make no sense for digits).
IDENTITY = {"model": ("name", "architecture"), "dataset": ("name",)}


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    defaults: dict = field(repr=False)  # nested JobSpec input, without `recipe`


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    """Add a recipe (extensible: a plugin or a test may register its own)."""
    RECIPES[recipe.name] = recipe
    return recipe


def recipe_names() -> list[str]:
    return sorted(RECIPES)


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`; ValueError naming `recipe` and the known ones otherwise."""
    if not isinstance(name, str) or name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(recipe_names())}")
    return RECIPES[name]


def apply_recipe(data: object) -> object:
    """The user's raw JobSpec input with its recipe's defaults merged underneath.

    Input without a (known) recipe comes back unchanged; the `recipe` field's own validator names an
    unknown one. Idempotent: merging again under an already-filled spec changes nothing.
    """
    name = data.get("recipe") if isinstance(data, dict) else None
    if not isinstance(name, str) or name not in RECIPES:
        return data
    return _merge(RECIPES[name].defaults, data, SECTIONS)


def _merge(defaults: dict, user: dict, sections: dict) -> dict:
    merged = dict(user)
    for key, value in defaults.items():
        if key not in user:
            merged[key] = copy.deepcopy(value)
        elif key in sections and isinstance(user[key], dict) and not _names_another(key, value, user[key]):
            merged[key] = _merge(value, user[key], sections[key])
    return merged


def _names_another(section: str, defaults: dict, user: dict) -> bool:
    """Whether the user's section points at a different model/dataset than the recipe's."""
    return any(key in user and user[key] != defaults.get(key) for key in IDENTITY.get(section, ()))


# The official code's lengths are optimizer steps (docs/guide/recipes.md): the recipes train exactly these
# many, with `max_steps` ending a run given enough epochs for it. T_end and the LR drops are fractions
# of the run, so a shortened run keeps their proportions; at full length they land on the official steps.
# ImageNet (imagenet_train_eval.py): 1,281,167 training images at batch 4096; 32,000 steps ≈ 102.3 epochs.
IMAGENET_IMAGES, IMAGENET_BATCH = 1_281_167, 4096
IMAGENET_STEPS, IMAGENET_T_END = 32_000, 25_000
IMAGENET_EPOCHS = 103  # enough epochs of 313 steps for max_steps to end the run
# LR_SCHEDULE [(1.0, 0), (0.1, 30), (0.01, 70), (0.001, 90)]: no warm-up, then ×0.1 from the first step whose
# epoch (global_step / (1,281,167 / 4096), float32) reaches 30, 70, 90: steps 9,384, 21,895, 28,151.
IMAGENET_LR_STEPS = (9_384, 21_895, 28_151)
# CIFAR-10 (cifar_resnet/resnet_train_eval.py): max_steps 97,656 (250 epochs of 50,000 at batch 128, rounded
# down); piecewise_constant LR 0.1 ×0.2 after steps 30k/60k/90k, i.e. from steps 30,001/60,001/90,001; T_end 75k.
CIFAR_STEPS, CIFAR_T_END = 97_656, 75_000
CIFAR_EPOCHS = 250  # 250 epochs of 391 steps hold the 97,656
CIFAR_LR_STEPS = (30_001, 60_001, 90_001)


def lr_drops(first_steps: tuple[int, ...], total_steps: int) -> list[float]:
    """`training.milestones` whose LR drops first apply at these steps of a `total_steps` run (lr_at
    drops at the first step with step / total ≥ milestone; halfway between two steps is exact in floats)."""
    return [(step - 0.5) / total_steps for step in first_steps]


RIGL_SCHEDULE = {  # paper §4: ΔT=100, α=0.3, cosine drop fraction, the same for every setting
    "delta_t": 100, "alpha": 0.3, "decay": "cosine",
    # the official code's RigL update replaces the optimizer step without advancing global_step
    "update_iterations_count": False,
}

register(Recipe(
    name="rigl-imagenet-resnet50",
    description="ResNet-50 on ImageNet (paper §4.1, the official code's numbers): RigL ERK 90%, 32,000 steps "
                "at batch 4096 (micro-batches of ≤256), Nesterov, LR 1.6 (no warm-up, as the code) ×0.1 at "
                "epochs 30/70/90, T_end 25,000, label smoothing 0.1, zero-init residual BN. Set dataset.path to "
                "an ImageNet folder (train/<class>, val/<class>).",
    defaults={
        # torchvision resnet50 (stride on the 3×3 conv), last BN γ of each bottleneck at 0 [R:resnet_model.py].
        "model": {"name": "resnet50", "zero_init_residual": True},
        # flips and random-resized crops at 224, read by DataLoader workers (ImageNet does not fit in RAM).
        "dataset": {"name": "imagefolder", "image_size": 224, "loader": "stream", "augment": "random-resized-crop"},
        "sparsity": {
            "method": "rigl", "sparsity": 0.9, "distribution": "erk", "erk_power_scale": 1.0,
            # ERK masks the first conv too (README's --first_layer_sparsity=-1) [R:README].
            "dense_first_layer": False,
            # T_end = 25k of 32k steps (maskupdate_end_step), kept as that fraction of whatever length runs.
            "schedule": {**RIGL_SCHEDULE, "t_end": IMAGENET_T_END / IMAGENET_STEPS},
        },
        "training": {
            "epochs": IMAGENET_EPOCHS, "max_steps": IMAGENET_STEPS,
            "batch_size": IMAGENET_BATCH, "accumulate_steps": "auto", "max_device_batch": 256,
            "optimizer": "nesterov", "momentum": 0.9,
            "lr": 0.1 * 4096 / 256,  # 1.6: the linear-scaling rule from 0.1 at batch 256
            "lr_schedule": "step", "warmup_epochs": 0, "gamma": 0.1,
            "milestones": lr_drops(IMAGENET_LR_STEPS, IMAGENET_STEPS),
            # L2 1e-4 on conv/FC kernels only (TF l2_regularizer ≡ torch weight_decay), none on BN/bias.
            "weight_decay": 1e-4, "weight_decay_kernels_only": True,
            "label_smoothing": 0.1, "precision": "auto",
        },
    },
))

register(Recipe(
    name="rigl-cifar10-wrn22-2",
    description="WRN-22-2 on CIFAR-10 (paper §4.3, the official code's numbers): RigL ERK 90% with the first "
                "conv dense, 97,656 steps at batch 128, Nesterov, LR 0.1 ×0.2 after steps 30k/60k/90k, "
                "T_end 75,000, weight decay 5e-4.",
    defaults={
        "model": {"name": "wrn-22-2"},
        "dataset": {"name": "cifar10"},  # augment auto: random crop + flip
        "sparsity": {
            "method": "rigl", "sparsity": 0.9, "distribution": "erk", "erk_power_scale": 1.0,
            # prune_first_layer=False in the paper's CIFAR code: conv1 unmasked, outside the budget.
            "dense_first_layer": True,
            "schedule": {**RIGL_SCHEDULE, "t_end": CIFAR_T_END / CIFAR_STEPS},
        },
        "training": {
            "epochs": CIFAR_EPOCHS, "max_steps": CIFAR_STEPS,
            "batch_size": 128, "optimizer": "nesterov", "momentum": 0.9, "lr": 0.1,
            "lr_schedule": "step", "warmup_epochs": 0, "milestones": lr_drops(CIFAR_LR_STEPS, CIFAR_STEPS),
            "gamma": 0.2, "weight_decay": 5e-4, "weight_decay_kernels_only": True,
            "label_smoothing": 0.0, "precision": "auto",
        },
    },
))
