"""The shapes a program fixes: a dynamic batch dimension, the sample shape, the number of logits.

A program exported with a fixed batch size refuses any other (`Guard failed: x.size()[0] == 2`) and
bakes that size into reshapes, so it could never train on batches of another size nor be evaluated on
a last, smaller batch. It is refused at upload with the way to export it. Only the batch dimension may
be dynamic: the example input fixes the sample shape (C,H,W, L,E, …), and a dataset of another shape
is refused by name. The output must be one (batch, classes) tensor of logits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rigl_core.models.program.errors import ProgramError
from rigl_core.models.program.graph_rules import GraphFacts

FLOAT_DTYPES = {6: "float16", 7: "float32", 8: "float64", 13: "bfloat16"}  # torch's ScalarType numbers
HOW_TO_EXPORT = ("export with a dynamic batch dimension: torch.export.export(model, (x,), dynamic_shapes="
                 "({0: torch.export.Dim('batch')},)) (x with at least 2 samples)")
SYMBOL_IN = re.compile(r"^(?:Symbol\('([a-z]{1,8}[0-9]{1,9})'(?:, [a-z_]+=(?:True|False))*\)|([a-z]{1,8}[0-9]{1,9}))$")


@dataclass(frozen=True)
class ProgramShape:
    input_shape: list[int]  # one sample, without the batch dimension
    num_classes: int  # logits per sample
    batch_symbol: str  # the batch dimension's symbol in the graph (s0, s77, …)


def program_shape(doc: dict, facts: GraphFacts) -> ProgramShape:
    """The shapes of the checked document (see graph_rules.check_document); ProgramError when they are not
    a dynamic batch of fixed samples in and a (batch, classes) tensor out."""
    meta = facts.input_meta
    if meta.get("dtype") not in FLOAT_DTYPES:
        raise ProgramError("the program's input must be a floating-point tensor (token models: use model.hf)")
    sizes = meta.get("sizes") or []
    if not sizes:
        raise ProgramError("the program's input is a scalar; forward(x) takes a batch")
    batch = _symbol(sizes[0])
    if batch is None:
        fixed = sizes[0].get("as_int") if isinstance(sizes[0], dict) else None
        raise ProgramError(f"the program was exported with a fixed batch size ({fixed}), so it refuses any "
                           f"other: {HOW_TO_EXPORT}")
    sample = [size.get("as_int") if isinstance(size, dict) else None for size in sizes[1:]]
    if any(type(size) is not int or size < 1 for size in sample):
        raise ProgramError("only the batch dimension may be dynamic: the example input fixes the sample shape")
    out = ((doc["graph_module"]["graph"].get("tensor_values") or {}).get(facts.output_name) or {}).get("sizes") or []
    classes = out[1].get("as_int") if len(out) == 2 and isinstance(out[1], dict) else None
    if len(out) != 2 or _symbol(out[0]) != batch or type(classes) is not int or classes < 2:
        raise ProgramError("forward(x) must return (batch, classes) logits with at least 2 classes")
    return ProgramShape(sample, classes, batch)


def _symbol(size: object) -> str | None:
    """The symbol a dynamic size is, or None for a fixed (or derived) one."""
    expr = size.get("as_expr") if isinstance(size, dict) else None
    match = SYMBOL_IN.fullmatch(expr.get("expr_str", "")) if isinstance(expr, dict) and isinstance(
        expr.get("expr_str"), str) else None
    return (match.group(1) or match.group(2)) if match else None
