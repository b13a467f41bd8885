"""2:4 inference on GPUs: swap 2:4-masked Linear weights for `torch.sparse.to_sparse_semi_structured` ones.

The semi-structured kernels (CUTLASS / cuSPARSELt) run only on CUDA GPUs of compute capability 8.0 or
later, in fp16/bf16, on weights with at most 2 nonzeros in every 4 consecutive along the input dim, which
is what `sparsity.pattern: "2:4"` trains (for convs: 2 in every 4 input channels at each kernel position, the
layout `conv_weight_channels_last` lays out for a sparse conv kernel). Elsewhere (CPU, fp32, an older GPU, a torch without it) the model
is returned unchanged and the report says why, so callers can fall back to the dense or packed exports
(rigl_core/export/packed.py), which work on any mask.
"""

from __future__ import annotations

import torch
from torch import nn

from rigl_core.sparse.nm import groups_of

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


def semi_structured_unavailable(device: torch.device | str | None = None) -> str | None:
    """Why semi-structured sparse kernels cannot run here (None when they can)."""
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    if not torch.cuda.is_available():
        return "no CUDA device: semi-structured (2:4) sparse kernels run only on NVIDIA GPUs (sm80+)"
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda":
        return f"the model is on {device.type}, not a CUDA device"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "the GPU's compute capability is below 8.0 (2:4 sparse tensor cores need Ampere or later)"
    return None


def is_2_4(weight: torch.Tensor) -> bool:
    """A Linear weight with at most 2 nonzeros in every 4 consecutive entries of each row (the input dim);
    a conv weight [out, C, kh, kw] with at most 2 in every 4 consecutive input channels at each kernel
    position (the channels-last layout of sparse conv kernels; rigl_core/sparse/nm.py)."""
    if weight.dim() < 2 or weight.shape[1] % 4 or (weight.dim() == 2 and weight.shape[1] % 4):
        return False
    kind = "conv" if weight.dim() > 2 else "linear"
    return bool((groups_of(weight != 0, 4, kind).sum(dim=1) <= 2).all())


def conv_weight_channels_last(weight: torch.Tensor) -> torch.Tensor:
    """A conv weight [out, C, kh, kw] as the [out, kh·kw·C] matrix whose rows hold the 2:4 groups in order
    (what an implicit-GEMM sparse conv kernel compresses); each row's 4 consecutive entries are one group."""
    return weight.movedim(1, -1).reshape(weight.shape[0], -1)


def to_semi_structured(model: nn.Module) -> tuple[nn.Module, dict]:
    """Convert every 2:4 Linear weight of `model` (in place) to a semi-structured sparse tensor.

    Returns (model, report): report["converted"] lists the converted Linear names, report["skipped"] maps
    the others to why, and report["reason"] says why nothing at all was converted (None otherwise). Put
    the model on the GPU in fp16/bf16 first; inference only (the sparse weight is not trained further).
    """
    report: dict = {"converted": [], "skipped": {}, "reason": None}
    first = next(model.parameters(), None)
    reason = semi_structured_unavailable(first.device if first is not None else None)
    if reason is not None:
        report["reason"] = reason
        return model, report
    from torch.sparse import to_sparse_semi_structured

    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        if weight.dtype not in SUPPORTED_DTYPES:
            report["skipped"][name] = f"dtype {weight.dtype} (needs float16 or bfloat16)"
        elif not is_2_4(weight.detach()):
            report["skipped"][name] = "not 2:4 (train with sparsity.pattern '2:4')"
        else:
            try:
                sparse = to_sparse_semi_structured(weight.detach())
            except (RuntimeError, ValueError) as exc:  # e.g. shapes below the kernels' minimum
                report["skipped"][name] = f"to_sparse_semi_structured refused it: {exc}"
                continue
            module.weight = nn.Parameter(sparse, requires_grad=False)
            report["converted"].append(name)
    if not report["converted"]:
        report["reason"] = "no Linear weight could be converted (see skipped)"
    return model, report
