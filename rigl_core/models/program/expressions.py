"""Symbolic-shape expressions of a program, checked before sympy sees them.

The graph JSON spells each symbolic size as a string (`"Symbol('s77', positive=True, integer=True)"`,
`"2*s0 + 1"`), and torch's deserializer turns it into a sympy expression with `sympy.sympify`, which
*evaluates* the string as Python: `"__import__('os').system(...)"` would run. So every such string is
parsed here with `ast` (a parser: nothing runs) and accepted only when it is arithmetic, comparisons
and calls of sympy's own constructors on numbers and symbol names, with keyword flags that are
booleans: no attribute access, no subscripts, no other names.
"""

from __future__ import annotations

import ast
import re

from rigl_core.models.program.errors import ProgramError

MAX_EXPRESSION = 4096  # characters
SYMBOL = re.compile(r"^[a-z]{1,8}[0-9]{1,9}$")  # s0, s77, u3, zuf0: torch's symbol names
SYMPY_CALLS = frozenset({
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Mod", "Max", "Min", "Abs", "floor", "ceiling",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan",
    "Equality", "Unequality", "And", "Or", "Not", "Piecewise", "ExprCondPair",
    # torch.utils._sympy.functions, as the deserializer's locals name them
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
})
CONSTANT_NAMES = frozenset({"oo", "zoo", "nan", "true", "false", "True", "False", "S"})
FLAGS = frozenset({"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "nonzero",
                   "zero", "even", "odd", "rational", "commutative", "extended_real", "evaluate"})
MAX_CONSTANT = 2**63  # and no powers or shifts: `Pow(10, 10**9)` would be evaluated, a bomb of its own
OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.USub, ast.UAdd, ast.BitAnd,
             ast.BitOr, ast.Invert, ast.Not, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.And, ast.Or)


def check_expression(text: object, where: str) -> None:
    """Raise ProgramError unless `text` is a plain symbolic-size expression."""
    if not isinstance(text, str) or len(text) > MAX_EXPRESSION:
        raise ProgramError(f"{where}: a symbolic size must be a short expression")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ProgramError(f"{where}: {text[:80]!r} is not a symbolic size") from None
    for node in ast.walk(tree):
        if not _allowed(node):
            raise ProgramError(f"{where}: {text[:80]!r} is not a symbolic size (it would run as Python code)")


def _allowed(node: ast.AST) -> bool:
    if isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.Load) + OPERATORS):
        return True
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Name) and node.func.id in SYMPY_CALLS
    if isinstance(node, ast.keyword):
        return node.arg in FLAGS and isinstance(node.value, ast.Constant) and isinstance(node.value.value, bool)
    if isinstance(node, ast.Name):
        return node.id in SYMPY_CALLS or node.id in CONSTANT_NAMES or SYMBOL.fullmatch(node.id) is not None
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, str):
            return SYMBOL.fullmatch(value) is not None
        return isinstance(value, (int, float, bool)) and abs(value) <= MAX_CONSTANT
    return False
