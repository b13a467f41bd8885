"""Kernel settings: channels_last memory format for conv nets, TF32 and cudnn.benchmark on CUDA.

None of these change what is trained, only how fast: masks, exports and checkpoints are indexed on
the logical shape and written contiguous, whatever the weights' memory format during training.
"""

from __future__ import annotations

import torch
from torch import nn


def has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def resolve_channels_last(value: bool | None, model: nn.Module, device: torch.device) -> bool:
    """`training.channels_last`: None (auto) is on for models with Conv2d layers on a CUDA device and
    off otherwise; true forces it (on CPU too), false never uses it."""
    if value is not None:
        return bool(value)
    return device.type == "cuda" and has_conv2d(model)


def configure_kernels(device: torch.device, tf32: bool) -> bool:
    """On a CUDA device: TF32 matmul/cuDNN as `training.tf32` says and cudnn.benchmark on. These are
    process-wide flags, so each job sets them all (a previous job's setting never leaks into the
    next). On any other device nothing is touched. Returns whether TF32 is in effect."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    torch.backends.cudnn.benchmark = True
    return bool(tf32) and torch.cuda.get_device_capability(device)[0] >= 8  # Ampere and newer have TF32


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """A 4-D batch in channels_last layout; other inputs unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def contiguous_state(state: dict) -> dict:
    """A copy of a (nested) state dict whose tensors are all contiguous in the default layout (a
    module's OrderedDict keeps its type and `_metadata`, which load_state_dict reads)."""
    out = type(state)() if isinstance(state, dict) else {}
    for key, value in state.items():
        if torch.is_tensor(value):
            out[key] = value.contiguous()
        elif isinstance(value, dict):
            out[key] = contiguous_state(value)
        else:
            out[key] = value
    if hasattr(state, "_metadata"):
        out._metadata = state._metadata
    return out
