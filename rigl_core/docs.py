"""Generate README's JobSpec reference from the pydantic models, so the docs cannot drift.

    python -m rigl_core.docs          # rewrite the section between the markers in README.md
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from rigl_core.spec import DatasetSpec, ExportSpec, JobSpec, ModelSpec, ScheduleSpec, SparsitySpec, TrainingSpec

START, END = "<!-- jobspec-reference:start -->", "<!-- jobspec-reference:end -->"
SECTIONS = [("model", ModelSpec), ("dataset", DatasetSpec), ("sparsity", SparsitySpec),
            ("sparsity.schedule", ScheduleSpec), ("training", TrainingSpec),
            ("export", ExportSpec)]


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(annotation)
        named = " or ".join(_type_name(a) for a in args if a is not type(None))
        return named + " or null" if type(None) in args else named
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(annotation))}]"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default_factory is not None:
        return f"`{field.default_factory()!r}`".replace("'", '"')
    if field.default is PydanticUndefined:
        return "required"
    if isinstance(field.default, BaseModel):
        return "(section)"
    return f"`{field.default!r}`".replace("'", '"').replace("`None`", "`null`").replace("`True`", "`true`").replace(
        "`False`", "`false`")


def fields() -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, meaning) of every JobSpec field: the README reference and `rigl fields`."""
    rows = []
    for name, field in JobSpec.model_fields.items():  # top-level fields that are not sections (`recipe`)
        if name not in {prefix.split(".")[0] for prefix, _ in SECTIONS}:
            rows.append((name, _type_name(field.annotation), _default(field), field.description or ""))
    for prefix, model in SECTIONS:
        for name, field in model.model_fields.items():
            if isinstance(field.default, BaseModel) or name == "architecture":
                continue
            rows.append((f"{prefix}.{name}", _type_name(field.annotation), _default(field), field.description or ""))
    return rows


def reference() -> str:
    lines = [START, "", "| field | type | default | meaning |", "|---|---|---|---|"]
    for name, type_name, default, description in fields():
        description = description.replace("|", "\\|")
        lines.append(f"| `{name}` | {type_name} | {default} | {description} |")
    lines += ["", "`model.architecture` takes a declarative architecture (see Models). Unknown fields are rejected.",
              "", END]
    return "\n".join(lines)


def update_readme(path: Path) -> bool:
    text = path.read_text()
    start, end = text.index(START), text.index(END) + len(END)
    new = text[:start] + reference() + text[end:]
    path.write_text(new)
    return new != text


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("-"):
        sys.exit("usage: python -m rigl_core.docs [README.md]  (rewrites the JobSpec reference between its markers)")
    changed = update_readme(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
    print("README.md updated" if changed else "README.md already current")
