"""What a program's graph may contain, checked on its JSON before torch deserialises anything.

A `.pt2` graph names its operators as strings, and torch's deserializer resolves them by attribute
lookup from `torch`, `operator` or `math` (`"torch.os.system"` would resolve), through registered
extension handlers (`"#ns:op"`), or to custom ops of any namespace; custom class objects (torchbind)
and higher-order operators carry code of their own; `guards_code` is Python that `ExportedProgram.module()`
runs with `exec`. So a program is accepted only when:

- every operator is an ATen operator of this torch (`torch.ops.aten.<op>.<overload>`, minus the few that
  read files or alias raw storage), or one of a handful of Python operators on sizes (`_operator.mul`, …);
- no argument is a graph, an operator or a custom object; no custom objects, tokens or constant
  inputs in the signature; exactly one tensor input (the batch) and one tensor output (the logits);
- `guards_code` is empty, the call signature is the plain `forward(x)` one, every symbolic-size
  expression passes `check_expression`;
- every value name is a plain identifier: torch.fx writes node names verbatim into the Python source
  of `forward` it generates and runs (`name = torch.ops.aten.relu.default(x)`).

`sanitized` returns the document torch deserialises: the checked graph without node metadata (stack
traces, source functions: strings torch would resolve or print into generated code).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rigl_core.models.program.errors import ProgramError
from rigl_core.models.program.expressions import SYMBOL, check_expression

MAX_NODES = 200_000
ATEN = re.compile(r"^torch\.ops\.aten\.([A-Za-z0-9_]{1,100})\.([A-Za-z0-9_]{1,100})$")
NAMESPACED = re.compile(r"^torch\.ops\.([A-Za-z0-9_]{1,100})\.([A-Za-z0-9_]{1,100})")
# ATen operators that reach outside tensors: a file's bytes, raw storages, the process's output
REFUSED_ATEN = frozenset({"from_file", "set_", "_print", "record_stream", "_make_per_tensor_quantized_tensor",
                          "_make_per_channel_quantized_tensor", "_copy_from", "_local_scalar_dense_cuda"})
PYTHON_OPERATORS = frozenset(
    {f"_operator.{name}" for name in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pos",
                                      "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "abs")}
    | {f"torch.{name}" for name in ("sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite",
                                    "_sym_sqrt", "sym_sum")}
    | {f"math.{name}" for name in ("ceil", "floor", "trunc")}
)
ARGUMENT_TYPES = frozenset({
    "as_none", "as_tensor", "as_tensors", "as_int", "as_ints", "as_float", "as_floats", "as_string", "as_strings",
    "as_sym_int", "as_sym_ints", "as_scalar_type", "as_memory_format", "as_layout", "as_device", "as_bool",
    "as_bools", "as_sym_bool", "as_sym_bools", "as_optional_tensors", "as_sym_float", "as_sym_floats",
    "as_optional_tensor", "as_int_lists", "as_float_lists",
})
INPUT_KINDS = frozenset({"user_input", "parameter", "buffer", "tensor_constant"})
OUTPUT_KINDS = frozenset({"user_output", "buffer_mutation"})
VERIFIERS = frozenset({"TRAINING", "ATEN", ""})
# forward(x): args (x,), no kwargs; returns one tensor (torch.utils._pytree's JSON treespecs)
IN_SPEC = ('[1, {"type": "builtins.tuple", "context": "null", "children_spec": [{"type": "builtins.tuple", '
           '"context": "null", "children_spec": [{"type": null, "context": null, "children_spec": []}]}, '
           '{"type": "builtins.dict", "context": "[]", "children_spec": []}]}]')
OUT_SPEC = '[1, {"type": null, "context": null, "children_spec": []}]'
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")
RESERVED_NAMES = frozenset({"torch", "self", "fx_pytree", "pytree", "math", "operator", "_operator", "builtins",
                            "getattr", "inf", "nan", "device", "typing", "NoneType"})
VALUE_TABLES = ("tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values")
FQN_PART = re.compile(r"^[A-Za-z0-9_]{1,200}$")


@dataclass(frozen=True)
class GraphFacts:
    """What the checks learnt: the input's name and tensor meta, the output's name, operators used."""

    input_name: str
    input_meta: dict
    output_name: str
    operators: dict[str, int]


def check_document(doc: object) -> GraphFacts:
    """Raise ProgramError naming the first rule `doc` (models/model.json, parsed) breaks."""
    from torch._export.serde.schema import SCHEMA_VERSION

    if not isinstance(doc, dict) or not isinstance(doc.get("graph_module"), dict):
        raise ProgramError("models/model.json: not an exported program")
    version = doc.get("schema_version") or {}
    if not isinstance(version, dict) or version.get("major") != SCHEMA_VERSION[0]:
        raise ProgramError(f"models/model.json: schema version {version!r:.60} is not this torch's "
                           f"({SCHEMA_VERSION[0]}.x); export with the service's torch version")
    if doc.get("guards_code"):
        raise ProgramError("models/model.json: guards_code holds Python code, which is never run; not accepted")
    verifiers = doc.get("verifiers") or []
    if not isinstance(verifiers, list) or any(v not in VERIFIERS for v in verifiers):
        raise ProgramError(f"models/model.json: unknown verifier dialects {verifiers!r:.80}")
    for name, bounds in (doc.get("range_constraints") or {}).items():
        if not SYMBOL.fullmatch(str(name)) or not isinstance(bounds, dict) or any(
                v is not None and type(v) is not int for v in bounds.values()):
            raise ProgramError(f"models/model.json: bad range constraint {str(name)[:40]!r}")
    module = doc["graph_module"]
    graph = module.get("graph")
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        raise ProgramError("models/model.json: no graph")
    if graph.get("custom_obj_values"):
        raise ProgramError("custom class objects (torchbind) are not accepted")
    if module.get("treespec_namedtuple_fields"):
        raise ProgramError("named-tuple inputs or outputs are not accepted: forward(x) must return one tensor")
    if len(graph["nodes"]) > MAX_NODES:
        raise ProgramError(f"the graph has {len(graph['nodes']):,} nodes, over the limit of {MAX_NODES:,}")
    operators: dict[str, int] = {}
    for node in graph["nodes"]:
        target = node.get("target") if isinstance(node, dict) else None
        _check_operator(target)
        operators[target] = operators.get(target, 0) + 1
        for item in node.get("inputs") or []:
            _check_argument(item.get("arg") if isinstance(item, dict) else None, target)
        for argument in node.get("outputs") or []:
            _check_argument(argument, target)
    _check_names(doc)
    _check_expressions(doc, "models/model.json")
    input_name, output_name = _check_signature(module.get("signature"))
    _check_call_graph(module.get("module_call_graph"))
    meta = (graph.get("tensor_values") or {}).get(input_name)
    if not isinstance(meta, dict):
        raise ProgramError("the program's input has no tensor description")
    return GraphFacts(input_name, meta, output_name, operators)


def _check_operator(target: object) -> None:
    if not isinstance(target, str):
        raise ProgramError("a graph node names no operator")
    aten = ATEN.fullmatch(target)
    if aten:
        import torch

        name, overload = aten.groups()
        if name in REFUSED_ATEN:
            raise ProgramError(f"operator aten.{name} reaches outside tensors; not accepted")
        try:
            op = getattr(getattr(torch.ops.aten, name), overload) if not name.startswith("__") else None
        except (AttributeError, RuntimeError):
            op = None
        if not isinstance(op, torch._ops.OpOverload) or op.namespace != "aten":
            raise ProgramError(f"operator aten.{name}.{overload} is not an ATen operator of this torch")
        return
    if target in PYTHON_OPERATORS:
        return
    namespaced = NAMESPACED.match(target)
    if namespaced and namespaced.group(1) == "higher_order":
        raise ProgramError(f"higher-order operator {namespaced.group(2)} (control flow, torch.no_grad or autocast "
                           "regions inside forward) is not accepted: export a forward of plain tensor operations")
    if namespaced:
        raise ProgramError(f"operator {namespaced.group(1)}::{namespaced.group(2)} is outside ATen (a custom op); "
                           "only ATen operators are accepted")
    raise ProgramError(f"operator {target[:100]!r} is not an ATen operator; only ATen operators are accepted")


def _check_argument(argument: object, target: str) -> None:
    if not isinstance(argument, dict) or len(argument) != 1:
        raise ProgramError(f"{target}: malformed argument")
    kind = next(iter(argument))
    if kind not in ARGUMENT_TYPES:
        what = {"as_custom_obj": "a custom class object (torchbind)", "as_graph": "a subgraph",
                "as_operator": "an operator"}.get(kind, kind)
        raise ProgramError(f"{target}: takes {what} as an argument; not accepted")


def _check_signature(signature: object) -> tuple[str, str]:
    """(the user input's name, the user output's name)."""
    if not isinstance(signature, dict):
        raise ProgramError("models/model.json: no graph signature")
    users: list[str] = []
    for spec in signature.get("input_specs") or []:
        kind = next(iter(spec), None) if isinstance(spec, dict) else None
        if kind not in INPUT_KINDS:
            what = {"custom_obj": "a custom class object (torchbind)", "token": "an effect token",
                    "constant_input": "a non-tensor input"}.get(kind, str(kind)[:40])
            raise ProgramError(f"the program takes {what}; only forward(x) with one tensor is accepted")
        if kind in ("parameter", "buffer", "tensor_constant"):
            check_fqn((spec[kind] or {}).get("parameter_name" if kind == "parameter" else
                                              "buffer_name" if kind == "buffer" else "tensor_constant_name"))
        if kind == "user_input":
            argument = (spec["user_input"] or {}).get("arg") or {}
            if "as_tensor" not in argument:
                raise ProgramError("the program takes a non-tensor input; only forward(x) with one tensor is accepted")
            users.append(argument["as_tensor"]["name"])
    outputs: list[str] = []
    for spec in signature.get("output_specs") or []:
        kind = next(iter(spec), None) if isinstance(spec, dict) else None
        if kind not in OUTPUT_KINDS:
            raise ProgramError(f"the program outputs {str(kind)[:40]} (it mutates its input or returns gradients); "
                               "forward(x) must return one tensor")
        if kind == "buffer_mutation":
            check_fqn((spec[kind] or {}).get("buffer_name"))
        if kind == "user_output":
            argument = (spec["user_output"] or {}).get("arg") or {}
            if "as_tensor" not in argument:
                raise ProgramError("forward(x) must return one tensor of logits")
            outputs.append(argument["as_tensor"]["name"])
    if len(users) != 1:
        raise ProgramError(f"the program takes {len(users)} tensor inputs; export forward(x) with one batch tensor")
    if len(outputs) != 1:
        raise ProgramError(f"the program returns {len(outputs)} tensors; forward(x) must return one tensor of logits")
    return users[0], outputs[0]


def check_fqn(name: object) -> str:
    """A parameter, buffer or constant name (`layer1.0.conv1.weight`): identifiers and indices only, none
    that would shadow a module's own attributes (`forward`, `training`, `__class__`)."""
    from torch import fx

    parts = name.split(".") if isinstance(name, str) and len(name) <= 1000 else [""]
    if any(not FQN_PART.fullmatch(part) or part.startswith("__") or hasattr(fx.GraphModule, part) for part in parts):
        raise ProgramError(f"bad tensor name {str(name)[:100]!r}")
    return name


def _check_call_graph(entries: object) -> None:
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        raise ProgramError("models/model.json: no module call graph")
    top = entries[0].get("signature") or {}
    if entries[0].get("fqn") != "" or top.get("in_spec") != IN_SPEC or top.get("out_spec") != OUT_SPEC:
        raise ProgramError("the program must be exported as forward(x) with one tensor argument (no keyword "
                           "arguments) returning one tensor")
    if top.get("inputs") or top.get("outputs"):
        raise ProgramError("models/model.json: unexpected call signature entries")
    names = top.get("forward_arg_names") or []
    if not isinstance(names, list) or len(names) > 1:
        raise ProgramError("the program must be exported as forward(x) with one tensor argument")
    for name in names:  # written into the generated forward's signature
        check_name(name)
    for entry in entries[1:]:  # preserved submodule signatures carry specs of their own: not needed
        if not isinstance(entry, dict) or entry.get("signature") is not None:
            raise ProgramError("preserve_module_call_signature is not accepted; export without it")
        check_fqn(entry.get("fqn"))


def _check_expressions(value: object, where: str, depth: int = 0) -> None:
    """Every `expr_str` anywhere in the document is checked (they are what sympy evaluates)."""
    if depth > 64:
        raise ProgramError(f"{where}: nested too deep")
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "expr_str":
                check_expression(item, where)
            else:
                _check_expressions(item, where, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_expressions(item, where, depth + 1)


def _check_names(value: object, depth: int = 0) -> None:
    """Every `name` (nodes, values, arguments) and every key of the value tables is an identifier."""
    if depth > 64:
        raise ProgramError("models/model.json: nested too deep")
    if isinstance(value, dict):
        schema_argument = "arg" in value  # a NamedArgument: `name` is the operator schema's ("self", "input")
        for key, item in value.items():
            if key == "name" and schema_argument:
                if not isinstance(item, str) or item and not NAME.fullmatch(item):  # "": positional
                    raise ProgramError(f"models/model.json: bad argument name {str(item)[:60]!r}")
            elif key == "name" and item is not None:
                check_name(item)
            elif key in VALUE_TABLES and isinstance(item, dict):
                for name in item:
                    check_name(name)
                _check_names(item, depth + 1)
            else:
                _check_names(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_names(item, depth + 1)


def check_name(name: object) -> None:
    import keyword

    if not isinstance(name, str) or not NAME.fullmatch(name) or keyword.iskeyword(name) or name in RESERVED_NAMES:
        raise ProgramError(f"models/model.json: {str(name)[:60]!r} is not a plain identifier; not accepted")


def sanitized(doc: dict) -> dict:
    """The document torch deserialises: no node or module metadata, no guards code."""
    module = dict(doc["graph_module"])
    graph = dict(module["graph"])
    graph["nodes"] = [{**node, "metadata": {}} for node in graph["nodes"]]
    module.update(graph=graph, metadata={}, treespec_namedtuple_fields={})
    return {**doc, "graph_module": module, "guards_code": []}
