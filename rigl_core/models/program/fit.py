"""A program as `model.name: "program"`: loaded for a job, and checked against the data it will see.

The example inputs of the export fix the sample shape, and the program's output fixes how many classes
it can tell apart; a dataset of another shape, or with more classes, can never train it. Errors name
`model.program` and give both sides, as every model error names its field.
"""

from __future__ import annotations

import torch

from rigl_core.models.program.errors import ProgramError
from rigl_core.models.program.load import load_program
from rigl_core.models.program.trainable import ProgramModule


def build_program(path: str | None, num_classes: int | None, input_shape: list[int] | None,
                  device: torch.device | str | None = None) -> ProgramModule:
    """The program at `path` (a local .pt2) on `device`; ValueError naming model.program when the file is
    refused or does not fit samples of `input_shape` with labels below `num_classes`."""
    if path is None:
        raise ValueError("model.program: required when model.name is 'program'")
    try:
        model = load_program(path, device=device)
    except ProgramError as exc:
        raise ValueError(f"model.program: {exc}") from None
    except OSError as exc:
        raise ValueError(f"model.program: cannot read the file ({exc.strerror or exc})") from None
    check_fits(model, input_shape, num_classes)
    return model


def check_fits(model: ProgramModule, input_shape: list[int] | None, num_classes: int | None) -> None:
    if input_shape is not None and list(input_shape) != list(model.input_shape):
        raise ValueError(f"model.program: the program was exported for samples of shape {model.input_shape}, "
                         f"the dataset's samples have shape {list(input_shape)}")
    if num_classes is not None and num_classes > model.program_classes:
        raise ValueError(f"model.program: the program outputs {model.program_classes} logits, the dataset has "
                         f"{num_classes} classes")
