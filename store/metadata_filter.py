"""`GET /v1/jobs?metadata.KEY=VALUE`: jobs whose metadata has the top-level KEY with the scalar VALUE.

Metadata is a JSON column on the job row (store/db.py), so the match is a JSON path expression, written
per database so both give the same answer: the key's value read as text equals VALUE, for a string (its
text), an integer or a boolean (its JSON spelling: `5`, `true`); objects, arrays and null never match.
(Floats are compared as each database prints them, which can differ: `0.5` matches on both, `1e-05` may
not.) There is no index: the filter runs on the rows the other filters select, newest first, until a page
is full (bench figures in docs/guide/rest-api.md).
"""

from __future__ import annotations

import re

from sqlalchemy import String, case, cast, func, literal
from sqlalchemy.sql.elements import ColumnElement

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # safe inside a quoted SQLite JSON path
MAX_FILTERS = 8


def metadata_equals(column, dialect: str, key: str, value: str) -> ColumnElement[bool]:
    """SQL for "column[key] is the scalar `value`" on `dialect` (postgresql or sqlite)."""
    if dialect == "postgresql":
        member = column.op("->")(literal(key))
        return (func.json_typeof(member).in_(("string", "number", "boolean"))
                & (column.op("->>")(literal(key)) == value))
    path = f'$."{key}"'
    kind = func.json_type(column, path)
    text = case((kind == "true", "true"), (kind == "false", "false"),
                (kind.in_(("text", "integer", "real")), cast(func.json_extract(column, path), String)), else_=None)
    return text == value
