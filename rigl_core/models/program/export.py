"""Writing a model as a program the service accepts: `torch.export` with a dynamic batch dimension.

The one rule users trip over is the batch: a program exported with a fixed batch size refuses every
other, so the first dimension of the example input is exported as `torch.export.Dim("batch")`. An
example batch of one sample is doubled first (torch specialises a dimension of size 1).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


def save_program(model: nn.Module, example_inputs, path: str | os.PathLike) -> Path:
    """`torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch")},)), path)`.
    `example_inputs`: a batch `x` (or a 1-tuple holding it) of the shape the model will be trained on."""
    x = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    if isinstance(example_inputs, (tuple, list)) and len(example_inputs) != 1:
        raise ValueError("example_inputs: the service trains forward(x) with one batch tensor")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("example_inputs: a batch tensor, e.g. torch.randn(2, 3, 32, 32)")
    if x.shape[0] < 2:
        x = torch.cat([x, x])
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = Path(path)
    torch.export.save(program, path)
    return path
