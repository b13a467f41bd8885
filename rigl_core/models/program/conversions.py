"""Finding, in a program's graph, the operators that become ordinary modules.

An unlifted program (`ExportedProgram.module()`) calls ATen operators on its parameters:
`aten.linear(x, fc.weight, fc.bias)`, `aten.conv2d(x, conv1.weight, None, stride, …)`,
`aten.batch_norm(x, bn.weight, …, training=True, …)`, `aten.dropout(x, p, train=True)`. Its modules
are empty containers, so nothing in it is a `nn.Linear` to mask, and train/eval mode is baked into
each call. Where a container is used exactly as the module it was (its weight only ever the weight
argument of the same kind of call, with its own bias), the call becomes a call of a real `nn.Linear` /
`nn.ConvNd` / `nn.BatchNormNd` holding *the same* parameters and buffers under the same names, and
each dropout becomes an `nn.Dropout`: they mask, count FLOPs, export and follow `.train()`/`.eval()`
like any model's. Linear and convolution weights used any other way (a `MultiheadAttention`'s
`in_proj_weight`, a functional `F.linear` on a bare parameter) are declared kernels: masked where
they live, their positions read from the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.operator_schemas import normalize_function

aten = torch.ops.aten
LINEAR = {aten.linear.default: 0}
CONVS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3, aten.conv1d.padding: 1,
         aten.conv2d.padding: 2, aten.conv3d.padding: 3}
KERNEL_OPS = {**LINEAR, **CONVS, aten.convolution.default: -1}  # -1: the weight's rank says
CONV_MODULES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCH_NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}  # by input rank
MODE_FIXED = (aten.batch_norm.default, aten.feature_dropout.default, aten.alpha_dropout.default,
              aten.feature_alpha_dropout.default, aten.native_dropout.default, aten.rrelu_with_noise.default)


def arguments(node: fx.Node) -> dict:
    """The node's arguments by schema name, defaults filled in."""
    pair = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    return dict(pair.kwargs) if pair is not None else {}


@dataclass
class KernelUse:
    node: fx.Node
    kind: str  # linear | conv
    dims: int  # 0 for linear, else the convolution's spatial dimensions
    weight: str  # the parameter's name
    bias: str | None
    settings: tuple  # stride, padding, dilation, groups (conv)
    transposed: bool = False


@dataclass
class Conversion:
    """A container that becomes a real module: replace `nodes` by calls of `build()` at `path`."""

    path: str
    nodes: list[fx.Node]
    build: object  # () -> nn.Module holding the container's own tensors
    removed: list[fx.Node] = field(default_factory=list)  # num_batches_tracked increments the module now does


def kernel_uses(graph: fx.Graph) -> list[KernelUse]:
    uses = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in KERNEL_OPS:
            continue
        args = arguments(node)
        weight, bias = args.get("weight"), args.get("bias")
        if not _is_attr(weight):
            continue
        dims = KERNEL_OPS[node.target]
        transposed = bool(args.get("transposed", False))
        if dims == -1:
            dims = weight.meta["val"].dim() - 2 if "val" in weight.meta else 0
        settings = () if dims == 0 else tuple(_plain(args.get(k)) for k in ("stride", "padding", "dilation", "groups"))
        uses.append(KernelUse(node, "linear" if dims == 0 else "conv", dims, weight.target,
                              bias.target if _is_attr(bias) else None, settings, transposed))
    return uses


def kernel_conversions(graph: fx.Graph, root: nn.Module, uses: list[KernelUse]) -> dict[str, Conversion]:
    """Containers whose weight is used only as the weight of one kind of linear/conv call, with its own bias."""
    by_weight: dict[str, list[KernelUse]] = {}
    for use in uses:
        by_weight.setdefault(use.weight, []).append(use)
    found = {}
    for weight, group in by_weight.items():
        path, _, attr = weight.rpartition(".")
        first = group[0]
        same = all((u.kind, u.dims, u.bias, u.settings, u.transposed) ==
                   (first.kind, first.dims, first.bias, first.settings, first.transposed) for u in group)
        if not path or attr != "weight" or not same or first.transposed or first.bias not in (None, f"{path}.bias"):
            continue
        nodes = [u.node for u in group]
        owned = {"weight"} | ({"bias"} if first.bias else set())
        if not _plain_container(root, path, owned, set()):
            continue
        if not _only_used_by(graph, weight, nodes, "weight") or (first.bias and not _only_used_by(
                graph, first.bias, nodes, "bias")):
            continue
        container = root.get_submodule(path)
        found[path] = Conversion(path, nodes, lambda c=container, u=first: _kernel_module(c, u))
    return found


def batch_norm_conversions(graph: fx.Graph, root: nn.Module, taken: set[str]) -> dict[str, Conversion]:
    """Containers used exactly as a BatchNorm (weight, bias, running stats, num_batches_tracked)."""
    groups: dict[str, list[tuple[fx.Node, dict]]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target == aten.batch_norm.default:
            args = arguments(node)
            tensors = [args.get(k) for k in ("weight", "bias", "running_mean", "running_var")]
            targets = {t.target.rpartition(".")[0] for t in tensors if _is_attr(t)}
            if len(targets) == 1 and all(t is None or _is_attr(t) for t in tensors):
                groups.setdefault(targets.pop(), []).append((node, args))
    found = {}
    for path, group in groups.items():
        first = group[0][1]
        names = {k: first[k].target for k in ("weight", "bias", "running_mean", "running_var") if first[k] is not None}
        dims = {_rank(args["input"]) for _, args in group}
        same = all({k: a[k].target for k in names if a.get(k) is not None} == names and
                   (a["momentum"], a["eps"]) == (first["momentum"], first["eps"]) for _, a in group)
        if (not path or path in taken or not same or len(dims) != 1 or dims.pop() not in BATCH_NORMS
                or not isinstance(first["momentum"], float) or any(t != f"{path}.{k}" for k, t in names.items())):
            continue
        params = {k for k in ("weight", "bias") if k in names}
        buffers = {k for k in ("running_mean", "running_var") if k in names} | {"num_batches_tracked"}
        if not _plain_container(root, path, params, buffers, optional={"num_batches_tracked"}):
            continue
        nodes = [node for node, _ in group]
        if not all(_only_used_by(graph, names[k], nodes, k) for k in names):
            continue
        increments = _counter_increments(graph, f"{path}.num_batches_tracked")
        if increments is None:
            continue
        rank = _rank(first["input"])
        container = root.get_submodule(path)
        found[path] = Conversion(path, nodes, lambda c=container, a=first, r=rank: _batch_norm_module(c, a, r),
                                 increments)
    return found


def dropouts(graph: fx.Graph) -> list[tuple[fx.Node, float]]:
    return [(node, float(arguments(node)["p"])) for node in graph.nodes
            if node.op == "call_function" and node.target == aten.dropout.default]


# ---------------------------------------------------------------------------------------------- modules
def _kernel_module(container: nn.Module, use: KernelUse) -> nn.Module:
    weight = container.weight
    bias = getattr(container, "bias", None) if use.bias else None
    if use.kind == "linear":
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        stride, padding, dilation, groups = use.settings
        module = CONV_MODULES[use.dims](weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                                        stride=stride, padding=padding, dilation=dilation, groups=groups,
                                        bias=bias is not None, device="meta")
    module.weight = weight
    if bias is not None:
        module.bias = bias
    return module


def _batch_norm_module(container: nn.Module, args: dict, rank: int) -> nn.Module:
    weight = getattr(container, "weight", None) if args["weight"] is not None else None
    running = args["running_mean"] is not None
    features = (weight if weight is not None else container.running_mean).shape[0]
    module = BATCH_NORMS[rank](features, eps=args["eps"], momentum=args["momentum"], affine=weight is not None,
                               track_running_stats=running, device="meta")
    if weight is not None:
        module.weight, module.bias = container.weight, container.bias
    if running:
        module.running_mean, module.running_var = container.running_mean, container.running_var
        counter = getattr(container, "num_batches_tracked", None)
        module.num_batches_tracked = counter if counter is not None else torch.zeros((), dtype=torch.long)
    return module


# ---------------------------------------------------------------------------------------------- checks
def _is_attr(value) -> bool:
    return isinstance(value, fx.Node) and value.op == "get_attr"


def _plain(value):
    return tuple(value) if isinstance(value, list) else value


def _rank(node) -> int | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dim() if isinstance(value, torch.Tensor) else None


def _plain_container(root: nn.Module, path: str, params: set[str], buffers: set[str],
                     optional: set[str] = frozenset()) -> bool:
    """The container at `path` holds exactly these tensors and nothing else (no children, no constants)."""
    try:
        container = root.get_submodule(path)
    except AttributeError:
        return False
    own_buffers = set(container._buffers)
    constants = [k for k, v in vars(container).items() if isinstance(v, torch.Tensor)]
    return (set(container._parameters) == params and own_buffers - optional == buffers - optional
            and own_buffers <= buffers and not container._modules and not constants
            and not container._non_persistent_buffers_set)


def _only_used_by(graph: fx.Graph, target: str, nodes: list[fx.Node], argument: str) -> bool:
    """Every get_attr of `target` feeds only `nodes`, and only as their `argument`."""
    wanted = set(nodes)
    for node in graph.nodes:
        if node.op == "get_attr" and node.target == target:
            for user in node.users:
                if user not in wanted or arguments(user).get(argument) is not node or \
                        sum(a is node for a in user.args) + sum(v is node for v in user.kwargs.values()) != 1:
                    return False
    return True


def _counter_increments(graph: fx.Graph, target: str) -> list[fx.Node] | None:
    """The `add_(num_batches_tracked, 1)` nodes an nn.BatchNorm makes itself, or None when the counter is
    used any other way (momentum=None reads it)."""
    increments = []
    for node in graph.nodes:
        if node.op == "get_attr" and node.target == target:
            for user in node.users:
                if not (user.target == aten.add_.Tensor and user.args == (node, 1) and not user.users):
                    return None
                increments.append(user)
    return increments
