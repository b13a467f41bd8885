"""Generate the JobSpec field reference (docs/reference/jobspec.md) from the pydantic models, so the
docs cannot drift.

    python -m rigl_core.docs          # rewrite docs/reference/jobspec.md (run from the repository root)

tests/test_readme.py checks the committed page equals `page()`.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from rigl_core.spec import (DatasetSpec, ExportSpec, JobSpec, MlflowSpec, ModelSpec, ScheduleSpec, SparsitySpec,
                            TrainingSpec)

START, END = "<!-- jobspec-reference:start -->", "<!-- jobspec-reference:end -->"
SECTIONS = [("model", ModelSpec), ("dataset", DatasetSpec), ("sparsity", SparsitySpec),
            ("sparsity.schedule", ScheduleSpec), ("training", TrainingSpec),
            ("export", ExportSpec), ("tracking.mlflow", MlflowSpec)]


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
    """(dotted name, type, default, meaning) of every JobSpec field: the docs reference and `rigl fields`."""
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
        description = description.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")  # markdown tables; `<name>` is no HTML tag
        lines.append(f"| `{name}` | {type_name} | {default} | {description} |")
    lines += ["", "`model.architecture` takes a declarative architecture ([Models](../guide/models.md)). Unknown "
              "fields are rejected.", "", END]
    return "\n".join(lines)


PAGE = Path("docs") / "reference" / "jobspec.md"
INTRO = """# JobSpec fields

One pydantic model (`rigl_core.spec.JobSpec`) describes a job everywhere: `rigl train --config`,
`rigl submit`, `POST /v1/jobs` and the worker. This page is generated from that model by
`python -m rigl_core.docs`; `rigl fields [PREFIX]` prints the same rows in a terminal, and every field
is reachable on the command line with `--set FIELD=VALUE`.
"""


def page() -> str:
    """The whole of docs/reference/jobspec.md."""
    return INTRO + "\n" + reference() + "\n"


def update_page(path: Path = PAGE) -> bool:
    """Write the page; True when it changed."""
    old = path.read_text() if path.exists() else None
    new = page()
    if new != old:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(new)
    return new != old


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("-"):
        sys.exit("usage: python -m rigl_core.docs [PAGE]  (writes the JobSpec reference, default "
                 "docs/reference/jobspec.md)")
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PAGE
    print(f"{target} updated" if update_page(target) else f"{target} already current")
