"""FLOPs accounting (paper App. H): forward FLOPs ≈ 2·nnz·(positions) per kernel, counted where it is used.

A kernel's positions are how many times each of its entries multiplies an input, per sample:
- conv: output positions; linear and GPT-2 `Conv1D`: tokens (1 for flat inputs). Both are read as the
  output's elements over its channels or features, from a forward at batch 1, so a batch folded into the
  token dimension (a `torch.export` program's `(B·L, E)` reshape) still counts per sample;
- kernels a model declares (`declared_kernels`, a program's weights outside nn.Linear/ConvNd) bring their
  positions, and a program its attention FLOPs (`graph_attention_flops`), read from its graph;
- `nn.MultiheadAttention`, from a hook on the attention module itself (it calls its weights directly, so
  hooks on `out_proj` never fire): in_proj over the tokens (L query, S key/value tokens; the packed (3E, E)
  kernel counts (L + 2S)/3 positions, exact for self-attention), q/k/v_proj over L/S/S, out_proj over L;
- `nn.RNN`/`LSTM`/`GRU`: every weight_ih/weight_hh/weight_hr once per time step;
- `nn.Embedding`: 0 (a lookup, no multiply-adds).

Only kernel FLOPs are in `flops_dense`/`flops_sparse`: biases, norms, activations and pooling are not
counted, as in the paper's sanity numbers. The attention score and weighted-sum matmuls (4·L·S·E per
attention call, unchanged by weight sparsity) are reported apart, as `flops_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from rigl_core.sparse.layers import KERNEL_TYPES, is_hf_conv1d, module_kernels
from rigl_core.models.registry import example_input


@dataclass
class Positions:
    """Per layer name (see rigl_core.sparse.layers): positions per sample; plus the attention-matrix FLOPs."""

    by_layer: dict[str, int] = field(default_factory=dict)
    attention_flops: int = 0

    def add(self, name: str, count: int) -> None:
        self.by_layer[name] = self.by_layer.get(name, 0) + int(count)


def _arg(args: tuple, kwargs: dict, index: int, name: str):
    return args[index] if len(args) > index else kwargs.get(name)


def count_positions(model: nn.Module, input_shape: list[int]) -> Positions:
    """Positions of every kernel for one sample, from one forward on the meta device (costs nothing even
    for ResNet-50 or ViT-B)."""
    result = Positions()
    hooks = []
    inside_attention = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}

    def linear_hook(name: str, module: nn.Module):
        def hook(_module, _inputs, output):
            channels = output.shape[-1] if isinstance(module, nn.Linear) else output.shape[-module.weight.dim() + 1]
            result.add(name, output.numel() // channels)  # the dummy batch holds one sample

        return hook

    def hf_conv1d_hook(name: str, module: nn.Module):
        def hook(_module, _inputs, output):
            result.add(name, output.numel() // module.nf)  # tokens: the dummy batch holds one sample

        return hook

    def attention_hook(name: str, module: nn.MultiheadAttention):
        kernels = [n for n, _, _ in module_kernels(name, module)]
        out_proj = f"{name}.out_proj" if name else "out_proj"

        def hook(_module, args, kwargs, _output):
            query, key = _arg(args, kwargs, 0, "query"), _arg(args, kwargs, 1, "key")
            q_tokens = query.numel() // module.embed_dim  # one sample, batched or not, either layout
            k_tokens = key.numel() // module.kdim
            if module.in_proj_weight is not None:
                result.add(kernels[0], (q_tokens + 2 * k_tokens) // 3)
            else:
                for kernel, tokens in zip(kernels, (q_tokens, k_tokens, k_tokens)):
                    result.add(kernel, tokens)
            result.add(out_proj, q_tokens)
            result.attention_flops += 4 * q_tokens * k_tokens * module.embed_dim

        return hook

    def rnn_hook(name: str, module: nn.RNNBase):
        kernels = [n for n, _, _ in module_kernels(name, module)]

        def hook(_module, args, _output):
            x = args[0]
            steps = x.data.shape[0] if isinstance(x, PackedSequence) else x.numel() // module.input_size
            for kernel in kernels:
                result.add(kernel, steps)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, KERNEL_TYPES) and id(module) not in inside_attention:
            hooks.append(module.register_forward_hook(linear_hook(name, module)))
        elif isinstance(module, nn.MultiheadAttention):
            hooks.append(module.register_forward_hook(attention_hook(name, module), with_kwargs=True))
        elif isinstance(module, nn.RNNBase):
            hooks.append(module.register_forward_hook(rnn_hook(name, module)))
        elif is_hf_conv1d(module):
            hooks.append(module.register_forward_hook(hf_conv1d_hook(name, module)))
    try:
        meta_model = model if _on_meta(model) else None
        if meta_model is None:
            import copy

            meta_model = copy.deepcopy(model).to("meta")
            # hooks are copied with the module, but they refer to the original names: fine.
        was_training = meta_model.training
        meta_model.eval()
        with torch.no_grad():
            meta_model(example_input(meta_model, input_shape))  # int64 token ids for a token model
        meta_model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    for kernel in getattr(model, "declared_kernels", ()):
        result.add(kernel.name, kernel.positions)
    result.attention_flops += getattr(model, "graph_attention_flops", 0)
    return result


def output_positions(model: nn.Module, input_shape: list[int]) -> dict[str, int]:
    """Per layer name: how many positions each kernel entry is applied at, per sample."""
    return count_positions(model, input_shape).by_layer


def _on_meta(model: nn.Module) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "meta"


def training_flops_ratio(
    method: str,
    dense_flops: float,
    sparse_flops: float,
    delta_t: int,
    t_end_fraction: float,
    gmp_curve: list[float] | None = None,
) -> float:
    """Training FLOPs per sample relative to dense training (3·f_D), per paper App. H."""
    f_d, f_s = dense_flops, sparse_flops
    if f_d == 0:
        return 1.0
    if method == "dense":
        cost = 3 * f_d
    elif method in ("static", "set", "snip"):
        cost = 3 * f_s
    elif method == "snfs":
        cost = 2 * f_s + f_d
    elif method in ("rigl", "srigl"):
        during = (3 * f_s * delta_t + 2 * f_s + f_d) / (delta_t + 1)
        cost = t_end_fraction * during + (1 - t_end_fraction) * 3 * f_s
    elif method == "gmp":
        # gmp_curve: forward FLOPs sampled uniformly over training along the pruning schedule.
        curve = gmp_curve or [f_d]
        cost = 3 * sum(curve) / len(curve)
    else:
        raise ValueError(f"unknown method {method!r}")
    return cost / (3 * f_d)
